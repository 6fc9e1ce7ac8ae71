"""Ensemble TDA Explorer: `streamlit run app.py`. The entry point draws the shared sidebar and routes to pages."""
from __future__ import annotations

import streamlit as st

from pages.ui.routing import inside_app
from pages.ui.state import sidebar
from pages.ui.widgets import jobs_sidebar
from tda_core.user_tasks import load_user_tasks

st.set_page_config(page_title="Ensemble TDA Explorer", page_icon=":material/hub:", layout="wide")

PAGES = [
    st.Page("pages/home.py", title="Home", icon=":material/home:", default=True),
    st.Page("pages/build.py", title="Build & attribute", icon=":material/construction:"),
    st.Page("pages/browse.py", title="Attribution browser", icon=":material/image_search:"),
    st.Page("pages/lds_cost.py", title="LDS vs cost", icon=":material/scatter_plot:"),
    st.Page("pages/learn.py", title="Learn", icon=":material/school:"),
]

# Deep links on a fresh server: with a pages/ folder here, Streamlit runs old-style multipage until st.navigation
# below has run once, so /browse?task=... would run pages/browse.py alone. Each page starts with run_inside_app():
# outside the `inside_app()` block below it runs this script instead, which routes back to that page (the URL still
# names it) with the sidebar (pages/ui/routing.py).
load_user_tasks()  # tasks from TDA_TASKS_FILE and image folders recorded in the store, like the CLI
page = st.navigation(PAGES)
sidebar()
jobs_sidebar()
with inside_app():
    page.run()
