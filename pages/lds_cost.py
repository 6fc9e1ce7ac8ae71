"""LDS vs cost: every stored result, attribution quality against training, serving or space cost."""
from __future__ import annotations

import streamlit as st

from pages.ui.present import method_label, projection_label, results_display
from pages.ui.scaling import app_executor, executor_note
from pages.ui.state import current_setting, friendly_errors
from pages.ui.widgets import StreamlitProgress
from tda_core.executors import using
from tda_core.experiments import GRIDS, plan_sweep, sweep, sweep_settings
from tda_core.methods import METHODS
from tda_core.projections import PROJECTIONS
from tda_core.results import COST_LABELS, filter_results, lds_cost_figure, results_frame
from tda_core.specs import EvalSpec
from tda_core.store import Store

st.title("LDS vs cost")
st.markdown("Each point is one setting: its attribution quality (LDS, higher is better) against what it cost. "
            "The dotted **Pareto frontier** links the best LDS reachable at each cost; the grey "
            "**proj-seeds control** shows what averaging projection seeds alone buys, so an ensemble's real gain "
            "is its height above that series.")
setting = current_setting()
store = Store()
results = results_frame(store)

with st.expander(f":material/play_circle: Run a grid sweep for {setting.task.name} (the sidebar's task)",
                 expanded=results.empty):
    c = st.columns([1, 2, 2, 1])
    grid = c[0].selectbox("Grid", sorted(GRIDS), index=sorted(GRIDS).index("paper"), key="sweep_grid",
                          help="paper: the research's comparison with the controls; small: a quick check")
    methods = c[1].multiselect("Methods", METHODS.names(), default=["trak"], format_func=method_label,
                               key="sweep_methods")
    projections = c[2].multiselect("Projections", PROJECTIONS.names(), default=["kron"], format_func=projection_label,
                                   key="sweep_proj")
    subsets = c[3].number_input("Subsets M", 2, 500, 50, key="sweep_M")
    spec = EvalSpec(M=int(subsets))
    executor_note()
    b = st.columns([1, 1, 4])
    if b[0].button("Estimate the work", key="sweep_plan", disabled=not (methods and projections)):
        with friendly_errors():
            pairs = sweep_settings(methods, grid, projections, setting.method.damping)
            st.info(plan_sweep(setting.task, pairs, spec).describe(), icon=":material/checklist:")
    if b[1].button("Run the sweep", type="primary", key="sweep_run", disabled=not (methods and projections)):
        st.caption("Each finished setting is appended to the results table at once; stopping keeps them.")
        progress = StreamlitProgress("Running the sweep")
        with friendly_errors(), using(app_executor()):
            sweep(setting.task, methods, grid, projections=projections, eval_spec=spec,
                  damping=setting.method.damping, progress=progress)
        progress.finish()
        st.rerun()

if results.empty:
    st.info("No results in the store yet. Run a grid above, add a setting on **Build & attribute**, or use "
            "`python -m tda_core sweep --task digits-mlp --methods trak --grid paper`.", icon=":material/info:")
    st.stop()

f = st.columns([1, 2, 2, 2])
tasks = sorted(results["task"].unique())
task = f[0].selectbox("Task", tasks, index=tasks.index(setting.task.name) if setting.task.name in tasks else 0,
                      key="lc_task")
subset = results[results["task"] == task]
chosen_methods = f[1].multiselect("Methods", sorted(subset["method"].unique()), key="lc_methods",
                                  placeholder="all methods")
chosen_proj = f[2].multiselect("Projections", sorted(subset["proj"].astype(str).unique()), key="lc_proj",
                               placeholder="all projections")
chosen_series = f[3].multiselect("Ensembles", sorted(subset["series"].unique()), key="lc_series",
                                 placeholder="all ensembles")
subset = filter_results(subset, chosen_methods, chosen_proj, chosen_series)
if subset.empty:
    st.warning("No result matches these filters; clear some of them.")
    st.stop()

o = st.columns([2, 1, 4])
x = o[0].selectbox("x axis", list(COST_LABELS), format_func=COST_LABELS.get, key="lc_x")
log_x = o[1].toggle("log x", value=x in ("train_s", "serve_s", "space_bytes"), key="lc_log")
st.plotly_chart(lds_cost_figure(subset, x, log_x), width="stretch")

st.subheader(f"{len(subset)} results")
st.dataframe(results_display(subset), hide_index=True, width="stretch")
st.download_button("Download CSV", subset.drop(columns=["setting", "series", "budget"]).to_csv(index=False).encode(),
                   f"results-{task}.csv", mime="text/csv", icon=":material/download:")
