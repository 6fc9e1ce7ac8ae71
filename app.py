"""Ensemble TDA Explorer: `streamlit run app.py`. The entry point draws the shared sidebar and routes to pages."""
from __future__ import annotations

import streamlit as st

from app_pages.ui.state import sidebar
from app_pages.ui.widgets import jobs_sidebar
from tda_core.user_tasks import load_user_tasks

st.set_page_config(page_title="Ensemble TDA Explorer", page_icon=":material/hub:", layout="wide")

PAGES = [
    st.Page("app_pages/home.py", title="Home", icon=":material/home:", default=True),
    st.Page("app_pages/build.py", title="Build & attribute", icon=":material/construction:"),
    st.Page("app_pages/browse.py", title="Attribution browser", icon=":material/image_search:"),
    st.Page("app_pages/lds_cost.py", title="LDS vs cost", icon=":material/scatter_plot:"),
    st.Page("app_pages/learn.py", title="Learn", icon=":material/school:"),
]

load_user_tasks()  # tasks from TDA_TASKS_FILE and image folders recorded in the store, like the CLI
page = st.navigation(PAGES)
sidebar()
jobs_sidebar()
page.run()
