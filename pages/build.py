"""Build & attribute: the work a setting implies, running it in the background, then its LDS (with the ground
truth's ceiling) and costs."""
from __future__ import annotations

import math

import streamlit as st

from pages.ui.cached import cached_attribution, cached_run, has_ground_truth, plan_setting
from pages.ui.present import breakdown_table, human_bytes, plan_summary, seconds_per_model
from pages.ui.routing import run_inside_app
from pages.ui.scaling import executor_note
from pages.ui.state import current_setting, friendly_errors
from pages.ui.widgets import attribution_job, is_ready, job_panel, start_job
from tda_core import jobs
from tda_core.evaluation import DEFAULT_CHUNK
from tda_core.results import append_results, is_recorded
from tda_core.settings import LIMITS
from tda_core.specs import EvalSpec
from tda_core.store import Store

run_inside_app()  # before drawing anything: see pages/ui/routing.py

st.title("Build & attribute")
setting = current_setting()
st.markdown(f"**{setting.task.name}** — {setting.task.description}  \n{setting.label}")
st.caption("Change the task, method, ensemble and budgets in the sidebar; the plan below follows them.")

with friendly_errors("lower I, D or L in the sidebar, or pick a smaller projection dimension"):
    work = plan_setting(setting)

st.subheader("Before running: the work it implies")
m = st.columns(4)
m[0].metric("Models to train", len(work.models_to_train), help=f"{len(work.models_stored)} already stored")
m[1].metric("Members", len(work.members))
m[2].metric("Peak memory (est.)", human_bytes(work.peak_bytes),
            help=f"budget {human_bytes(work.budget_bytes)} (set TDA_MEMORY_BUDGET_GB to change it)")
m[3].metric("Feature cache (est.)", human_bytes(work.disk_bytes))
st.caption(plan_summary(work))
with st.expander("Members"):
    st.dataframe({"member": work.members}, hide_index=True, width="stretch")
if not work.fits:
    st.error(f"{work.message}\n\n**Next step:** lower I, D or L, or the projection dimension.",
             icon=":material/memory:")
    st.stop()

if not is_ready(setting):
    executor_note()
    status = job_panel(attribution_job(setting), next_step="check the setting, then press Run again")
    if status is None or not status.active:
        if st.button("Run", type="primary", icon=":material/play_arrow:", key="build_run",
                     help="trains what is missing and attributes, in the background; the other pages stay usable"):
            start_job(attribution_job(setting))
        st.caption("The work runs in a background process: you can browse other pages meanwhile and cancel it "
                   "from its panel; finished artifacts stay in the store, so a new start resumes.")
    st.stop()

with friendly_errors():
    attribution = cached_attribution(setting)

st.subheader("Costs")
costs = attribution.costs
c = st.columns(5)
c[0].metric("Training", f"{costs.train_s:.1f} s", help="base models plus fine-tuning; ground truth excluded")
c[1].metric("Serving", f"{costs.serve_s:.1f} s", help="features, scoring and combination")
c[2].metric("Space", human_bytes(costs.space_bytes), help="checkpoints, adapters and cached features")
c[3].metric("Trained / members", f"{costs.n_trained} / {costs.n_members}")
c[4].metric("Damping c", "-" if attribution.damping is None else f"{attribution.damping:g}")
with st.expander("Cost breakdown (seconds)"):
    st.dataframe(breakdown_table(costs), hide_index=True)

st.subheader("Attribution quality (LDS)")
e = st.columns(3)
spec = EvalSpec(M=e[0].number_input("Subsets M", *LIMITS["M"], 50, key="build_M",
                                    help=f"subset models of the ground truth (the app trains up to {LIMITS['M'][1]})"),
                alpha=e[1].number_input("Subset fraction alpha", 0.05, 0.95, 0.5, step=0.05, key="build_alpha"),
                runs=e[2].number_input("Runs per subset R", *LIMITS["runs"], 1, key="build_runs",
                                       help="R >= 2 also measures the ground truth's own noise (its ceiling)"))
store = Store()
if has_ground_truth(setting.task, spec):
    with friendly_errors():
        result = cached_run(setting, spec)
    q = st.columns(2)
    q[0].metric("LDS", f"{result.lds:.3f} ± {result.lds_sem:.3f}",
                help=f"mean ± standard error over {result.n_eval} test examples (the validation split is held out)")
    ceiling = result.ceiling.ceiling
    q[1].metric("Ground-truth ceiling", "unknown" if math.isnan(ceiling) else f"{ceiling:.3f}",
                help="the highest LDS this ground truth's own noise allows (needs R >= 2 runs per subset)")
    if math.isnan(ceiling):
        st.caption("With one run per subset the ground truth's noise is not measured; set R = 2 or more to see how "
                   "far this LDS is from the best reachable.")
    if is_recorded(result.setting_key, store):
        st.caption("This setting is in the results table: see it on the **LDS vs cost** page.")
    elif st.button("Add to the results table (LDS vs cost page)", key="build_record"):
        append_results(store, [result.row()])
        st.success("Added; open **LDS vs cost** to see it against the others.")
else:
    gt_job = jobs.ground_truth_job(setting.task, spec)
    status = job_panel(gt_job, next_step="lower M, or press the button to try again")
    if status is None or not status.active:
        per_model = seconds_per_model(attribution.costs)
        st.info(f"No ground truth yet for M={spec.M}, alpha={spec.alpha:g}, R={spec.runs}: it trains "
                f"{spec.M * spec.runs} models on {spec.alpha:.0%} of the data, in batches of {DEFAULT_CHUNK} (one "
                f"full model took {per_model:.1f} s here when trained alone). It is stored and shared by every setting.",
                icon=":material/info:")
        if st.button("Compute the ground truth", key="build_gt", icon=":material/model_training:",
                     help="runs in the background; the other pages stay usable"):
            start_job(gt_job)
