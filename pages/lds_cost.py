"""LDS vs cost: the user's results beside the committed reference results, attribution quality against training,
serving or space cost; a click on a point selects its setting, two rows of the table compare pairwise."""
from __future__ import annotations

import streamlit as st

from pages.ui.cached import cached_references
from pages.ui.present import comparison_metrics, method_label, projection_label, results_display
from pages.ui.routing import run_inside_app
from pages.ui.scaling import executor_note
from pages.ui.state import current_setting, friendly_errors, select_setting
from pages.ui.widgets import job_panel, start_job
from tda_core import jobs
from tda_core.errors import UserError
from tda_core.experiments import GRIDS, plan_sweep, sweep_settings
from tda_core.methods import METHODS
from tda_core.projections import PROJECTIONS
from tda_core.reference import SOURCE, compare_rows, reference_files, with_source
from tda_core.results import COST_LABELS, filter_results, lds_cost_figure, results_frame
from tda_core.settings import LIMITS, values_from_row
from tda_core.specs import EvalSpec
from tda_core.store import Store

run_inside_app()  # before drawing anything: see pages/ui/routing.py

st.title("LDS vs cost")
st.markdown("Each point is one setting: its attribution quality (LDS, higher is better) against what it cost. "
            "The dotted **Pareto frontier** links the best LDS reachable at each cost; the dashed **proj-seeds "
            "control** shows what averaging projection seeds alone buys, so an ensemble's real gain is its height "
            "above that series. Faded open markers are **reference results** measured by this project (where and "
            "how is listed below the plot). **Click a point** to make it the sidebar's setting.")
setting = current_setting()
store = Store()
own = results_frame(store)

# --- a sweep in the background -------------------------------------------------------------------------------
with st.expander(f":material/play_circle: Run a grid sweep for {setting.task.name} (the sidebar's task)"):
    c = st.columns([1, 2, 2, 1])
    grid = c[0].selectbox("Grid", sorted(GRIDS), index=sorted(GRIDS).index("paper"), key="sweep_grid",
                          help="paper: the research's comparison with the controls; small: a quick check")
    methods = c[1].multiselect("Methods", METHODS.names(), default=["trak"], format_func=method_label,
                               key="sweep_methods")
    projections = c[2].multiselect("Projections", PROJECTIONS.names(), default=["kron"], format_func=projection_label,
                                   key="sweep_proj")
    subsets = c[3].number_input("Subsets M", *LIMITS["M"], 50, key="sweep_M")
    spec = EvalSpec(M=int(subsets))
    executor_note()
    b = st.columns([1, 1, 4])
    if b[0].button("Estimate the work", key="sweep_plan", disabled=not (methods and projections)):
        with friendly_errors("choose other methods or projections"):
            pairs = sweep_settings(methods, grid, projections, setting.method.damping)
            st.info(plan_sweep(setting.task, pairs, spec).describe(), icon=":material/checklist:")
    sweep_job = jobs.sweep_job(setting.task, methods, grid, projections, spec, setting.method.damping)
    if b[1].button("Run the sweep", type="primary", key="sweep_run", disabled=not (methods and projections),
                   help="runs in the background; each finished setting joins the results table at once"):
        start_job(sweep_job)
job_panel(sweep_job, next_step="estimate the work first; lower M or choose the small grid")

# --- which results ---------------------------------------------------------------------------------------------
task = setting.task.name
f = st.columns([1, 3])
files, references = cached_references(task)
for problem in references.problems:
    st.warning(f"A reference file could not be read: {problem}. **Next step:** fix or remove its entry in "
               "`docs/reference_results.json`.", icon=":material/warning:")
show_reference = f[0].toggle("Reference results", value=True, key="lc_ref", disabled=not files,
                             help="committed results measured by this project, drawn faded beside yours")
sources = [file.source for file in files]
chosen_sources = f[1].multiselect("Reference series", sources, default=sources[:1], key="lc_ref_sources",
                                  disabled=not (files and show_reference), placeholder="none") if files else []
own_task = own[own["task"] == task] if not own.empty else own
shown_refs = references.frame
shown_refs = (shown_refs[shown_refs[SOURCE].isin(chosen_sources)] if show_reference and not shown_refs.empty
              else shown_refs.iloc[0:0])
frame = with_source(own_task, shown_refs)
if frame.empty:
    with_references = ", ".join(sorted({f.task for f in reference_files()}))
    st.info(f"No results for {task} yet" + (", and no reference results are shown" if files else
                                             ", and no reference results are committed for it") +
            ". **Next step:** " + ("switch on the reference results above, " if files else
                                   f"pick {with_references} in the sidebar to see reference results, ") +
            "run a grid (the expander above), add a setting on **Build & attribute**, or run "
            f"`python -m tda_core sweep --task {task} --methods trak --grid small`.", icon=":material/info:")
    st.stop()

g = st.columns([2, 2, 2])
chosen_methods = g[0].multiselect("Methods", sorted(frame["method"].unique()), key="lc_methods",
                                  placeholder="all methods")
chosen_proj = g[1].multiselect("Projections", sorted(frame["proj"].astype(str).unique()), key="lc_proj",
                               placeholder="all projections")
chosen_series = g[2].multiselect("Ensembles", sorted(frame["series"].unique()), key="lc_series",
                                 placeholder="all ensembles")
subset = filter_results(frame, chosen_methods, chosen_proj, chosen_series)
if subset.empty:
    st.warning("No result matches these filters. **Next step:** clear some of them.")
    st.stop()


# --- the plot: a click selects a setting ---------------------------------------------------------------------------
def pick_point() -> None:
    """Make the clicked point's setting the sidebar's (runs before the page, so the sidebar shows it)."""
    points = st.session_state["lc_plot"]["selection"]["points"]
    rows = st.session_state.get("_lc_rows", {})
    if not points or int(points[0]["customdata"][1]) not in rows:
        return
    row = rows[int(points[0]["customdata"][1])]
    try:
        select_setting(values_from_row(row))
    except UserError as exc:
        st.session_state["lc_picked"] = row | {"problem": str(exc)}
        return
    st.session_state["lc_picked"] = row


st.session_state["_lc_rows"] = {int(r["row_id"]): r for r in subset.to_dict("records")}
o = st.columns([2, 1, 4])
x = o[0].selectbox("x axis", list(COST_LABELS), format_func=COST_LABELS.get, key="lc_x")
log_x = o[1].toggle("log x", value=x in ("train_s", "serve_s", "space_bytes"), key="lc_log")
st.plotly_chart(lds_cost_figure(subset, x, log_x), width="stretch", key="lc_plot", on_select=pick_point,
                selection_mode="points")
st.caption("Error bars: thin with caps, the standard error over test examples; thick, the spread across seed "
           "replicates (where a row has several). The dash-dot line is the ground truth's ceiling, the best LDS its "
           "own noise allows (where measured, i.e. with R >= 2 runs per subset).")
picked = st.session_state.get("lc_picked")
if picked and picked.get("problem"):
    st.warning(f"**{picked['setting']}** cannot be opened in the app: {picked['problem']}", icon=":material/block:")
elif picked:
    with st.container(border=True):
        st.markdown(f":material/ads_click: **{picked['setting']}** ({picked['task']}) · LDS {picked['lds']:.3f} · "
                    f"{picked[SOURCE]} — now the sidebar's setting")
        links = st.columns(2)
        links[0].page_link("pages/build.py", label="Open in Build & attribute", icon=":material/construction:")
        links[1].page_link("pages/browse.py", label="Browse its attributions", icon=":material/image_search:")
for file in files:
    if file.source in chosen_sources and show_reference:
        st.caption(f"Reference: {file.describe()}")

# --- the table and a paired comparison ----------------------------------------------------------------------------
st.subheader(f"{len(subset)} results")
st.caption("Select two rows to compare them pairwise (LDS difference with its 95% interval).")
shown = results_display(subset)
table = st.dataframe(shown, hide_index=True, width="stretch", key="lc_table", on_select="rerun",
                     selection_mode="multi-row", column_config={"row_id": None})
chosen = [subset.set_index("row_id").loc[int(shown.iloc[i]["row_id"])] for i in table.selection.rows]
if len(chosen) == 2:
    a, b = chosen
    st.markdown(f"**A**: {a['setting']} ({a[SOURCE]})  \n**B**: {b['setting']} ({b[SOURCE]})")
    try:
        cmp = compare_rows(store, a, b)
    except UserError as exc:
        st.info(f"{exc}.", icon=":material/info:")
    else:
        for col, (label, value, help_text) in zip(st.columns(5), comparison_metrics(cmp)):
            col.metric(label, value, help=help_text)
elif len(chosen) > 2:
    st.warning("Select exactly two rows to compare.")
st.download_button("Download CSV", subset.drop(columns=["setting", "series", "budget", "row_id"]).to_csv(index=False)
                   .encode(), f"results-{task}.csv", mime="text/csv", icon=":material/download:")
