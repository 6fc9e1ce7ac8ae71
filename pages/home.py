"""Home: what TDA is, what each page does, the device, the datasets and what the store already holds."""
from __future__ import annotations

import streamlit as st

from pages.ui.cached import cached_device
from pages.ui.present import results_display, store_overview
from pages.ui.routing import run_inside_app
from pages.ui.state import current_setting
from tda_core.data import dataset_table
from tda_core.results import results_frame
from tda_core.store import Store

run_inside_app()  # before drawing anything: see pages/ui/routing.py

st.title("Ensemble TDA Explorer")
st.markdown(
    "**Training data attribution (TDA)** asks which training examples made a model predict what it did "
    "for a given test example. A method such as TRAK gives every (training, test) pair a score: positive "
    "scores mark *proponents* that pushed the prediction up, negative scores *opponents*. Single models "
    "give noisy scores; averaging over an **ensemble** makes them reliable, and this explorer measures how "
    "cheap Dropout and LoRA ensembles get that reliability compared with training many models."
)

setting = current_setting()
st.info(f"Current setting (edit it in the sidebar, it follows you across pages): "
        f"**{setting.task.name}** · {setting.label}", icon=":material/tune:")

st.subheader("Pages")
cols = st.columns(4)
PAGE_TEXT = [
    ("pages/build.py", "Build & attribute", ":material/construction:",
     "See the work a setting implies, run it in the background, then read its LDS, ceiling and costs."),
    ("pages/browse.py", "Attribution browser", ":material/image_search:",
     "Pick a test example, see its proponents and opponents and what each member says, compare two "
     "settings, or go in reverse."),
    ("pages/lds_cost.py", "LDS vs cost", ":material/scatter_plot:",
     "Attribution quality against training, serving or space cost: your results beside the project's "
     "measured reference results. Start here."),
    ("pages/learn.py", "Learn", ":material/school:",
     "Live small examples on digits: gradient similarity, ensembles, Dropout/LoRA members, LDS."),
]
for col, (path, title, icon, text) in zip(cols, PAGE_TEXT):
    with col.container(border=True):
        st.page_link(path, label=title, icon=icon)
        st.caption(text)

left, right = st.columns([1, 2])
with left:
    st.subheader("Device")
    st.metric("Computing on", cached_device())
    store = Store()
    st.subheader("Store")
    st.caption(f"`{store.root}` (set `TDA_STORE` to use another)")
    overview = store_overview(store)
    if overview.empty:
        st.info("Nothing computed yet. **Next step:** open **LDS vs cost** to see the project's measured results, "
                "or **Build & attribute** to run the current setting.")
    else:
        st.dataframe(overview, hide_index=True, width="stretch")
with right:
    st.subheader("Datasets")
    st.dataframe(dataset_table(), hide_index=True, width="stretch",
                 column_config={"where": st.column_config.TextColumn(width="large")})
    results = results_frame(store)
    if not results.empty:
        st.subheader(f"Best of {len(results)} results (all on the LDS vs cost page)")
        shown = results_display(results)
        columns = ["task", "method", "proj", "ensemble", "I", "D", "L", "P", "lds", "lds_sem", "train_s", "serve_s"]
        st.dataframe(shown[columns].head(8), hide_index=True, width="stretch")
