"""Where the app's background work runs: the Ray cluster at $TDA_RAY_ADDRESS when it is set, else this machine."""
from __future__ import annotations

import os

import streamlit as st

from tda_core.ray_executor import ADDRESS_ENV


def executor_note() -> None:
    """Say where the work of the buttons below runs, when that is a Ray cluster (the job worker connects to it)."""
    address = os.environ.get(ADDRESS_ENV)
    if address:
        st.caption(f":material/hub: Training and attribution run on the Ray cluster at `{address}` "
                   f"(${ADDRESS_ENV}); results are saved in this app's store as each task finishes.")
