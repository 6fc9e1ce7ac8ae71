"""Build & attribute: the work a setting implies, running it with progress, then its LDS and costs."""
from __future__ import annotations

import streamlit as st

from pages.ui.cached import cached_attribution, cached_ground_truth, cached_run, has_ground_truth, plan_setting
from pages.ui.present import breakdown_table, human_bytes, plan_summary, seconds_per_model
from pages.ui.scaling import app_executor, executor_note
from pages.ui.state import current_setting, friendly_errors
from pages.ui.widgets import StreamlitProgress, is_ready
from tda_core.executors import using
from tda_core.results import append_results, is_recorded
from tda_core.specs import EvalSpec
from tda_core.store import Store

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

executor_note()
ready = is_ready(setting)
if ready or st.button("Run", type="primary", icon=":material/play_arrow:", key="build_run"):
    if not ready:
        st.caption("Stop with the Stop button at the top right; finished artifacts stay in the store, unfinished "
                   "ones are never written, so a rerun resumes.")
    with friendly_errors(), using(app_executor()):
        attribution = cached_attribution(setting, StreamlitProgress("Training and attributing"))
    st.session_state.setdefault("_computed", set()).add(setting)

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
    spec = EvalSpec(M=e[0].number_input("Subsets M", 2, 1000, 50, key="build_M"),
                    alpha=e[1].number_input("Subset fraction alpha", 0.05, 0.95, 0.5, step=0.05, key="build_alpha"),
                    runs=e[2].number_input("Runs per subset R", 1, 10, 1, key="build_runs"))
    store = Store()
    if has_ground_truth(setting.task, spec):
        with friendly_errors(), using(app_executor()):
            result = cached_run(setting, spec)
        st.metric("LDS", f"{result.lds:.3f} ± {result.lds_sem:.3f}",
                  help=f"mean ± standard error over {result.n_eval} test examples (the validation split is held out)")
        if is_recorded(result.setting_key, store):
            st.caption("This setting is in the results table: see it on the **LDS vs cost** page.")
        elif st.button("Add to the results table (LDS vs cost page)", key="build_record"):
            append_results(store, [result.row()])
            st.success("Added; open **LDS vs cost** to see it against the others.")
    else:
        per_model = seconds_per_model(attribution.costs)
        st.info(f"No ground truth yet for M={spec.M}, alpha={spec.alpha:g}, R={spec.runs}: it trains "
                f"{spec.M * spec.runs} models on {spec.alpha:.0%} of the data, in batches of 25 (one full model "
                f"took {per_model:.1f} s here when trained alone). It is stored and shared by every setting.",
                icon=":material/info:")
        if st.button("Compute the ground truth", key="build_gt"):
            with friendly_errors(), using(app_executor()):
                cached_ground_truth(setting.task, spec, StreamlitProgress("Training the subset models"))
            st.rerun()
