"""Every page runs inside app.py's navigation, with its sidebar, even when Streamlit runs a page file by itself.

Streamlit starts a server whose entry script has a `pages/` folder beside it in its old-style multipage mode:
until some run has called `st.navigation`, a link such as ``/browse?task=...`` runs ``pages/browse.py`` directly.
app.py runs the chosen page inside `inside_app()`; a page that finds itself outside it runs app.py instead, which
routes back to the same page (the URL still names it) with the sidebar, and ends its own run.
"""
from __future__ import annotations

import runpy
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path

import streamlit as st

APP = Path(__file__).resolve().parents[2] / "app.py"
_INSIDE_APP: ContextVar[bool] = ContextVar("inside_app", default=False)


@contextmanager
def inside_app() -> Iterator[None]:
    """app.py runs the page returned by `st.navigation` inside this block."""
    token = _INSIDE_APP.set(True)
    try:
        yield
    finally:
        _INSIDE_APP.reset(token)


def run_inside_app() -> None:
    """First call of every page script: outside app.py, run app.py (which runs this page) and stop here."""
    if _INSIDE_APP.get():
        return
    runpy.run_path(str(APP), run_name="__main__")
    st.stop()
