"""Where the app's computations run: the Ray cluster at $TDA_RAY_ADDRESS when it is set, else this process."""
from __future__ import annotations

import streamlit as st

from tda_core.executors import Executor
from tda_core.ray_executor import ADDRESS_ENV, executor_from_environment


@st.cache_resource
def app_executor() -> Executor:
    """One executor per app process (a Ray connection is made on first use)."""
    return executor_from_environment()


def executor_note() -> None:
    """Say where the work of the buttons below runs, when that is a Ray cluster."""
    executor = app_executor()
    if executor.name == "ray":
        st.caption(f":material/hub: Training and attribution run on the Ray cluster at `{executor.address}` "
                   f"(${ADDRESS_ENV}); results are saved in this app's store as each task finishes.")
