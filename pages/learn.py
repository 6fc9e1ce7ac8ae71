"""Learn: training data attribution explained with live small examples on 8x8 digits."""
from __future__ import annotations

from pathlib import Path

import plotly.express as px
import streamlit as st

from pages.ui.cached import (all_stored, cached_agreement, cached_attribution_of, cached_dataset,
                             cached_ground_truth, cached_ladder, cached_members, has_ground_truth, has_members)
from pages.ui.present import caption, counterfactual_view, describe_example
from pages.ui.routing import run_inside_app
from pages.ui.state import friendly_errors
from pages.ui.widgets import StreamlitProgress, job_panel, show_examples, start_job
from tda_core import jobs, score_analysis
from tda_core.evaluation import counterfactual
from tda_core.specs import EnsembleSpec, EvalSpec, MethodSpec
from tda_core.tasks import get_task

run_inside_app()  # before drawing anything: see pages/ui/routing.py

ASSETS = Path(__file__).resolve().parent.parent / "assets"
TASK = get_task("digits-mlp")
TRAK = MethodSpec("trak", proj="kron", proj_dim=2048)
SIZES = (1, 2, 3, 4, 5)  # naive ensembles of the ladder; the largest is the one whose members are shown
EVAL = EvalSpec(M=50, alpha=0.5)
GRADIENTS = [(MethodSpec("grad-dot"), EnsembleSpec("naive", I=1)), (MethodSpec("grad-cos"), EnsembleSpec("naive", I=1))]
ENSEMBLES = [(TRAK, EnsembleSpec("naive", I=i)) for i in SIZES]
LARGEST = ENSEMBLES[-1]
LIVE_JOB = jobs.attribute_job(TASK, GRADIENTS + ENSEMBLES, "Learn page: training 5 small MLPs and attributing",
                              members=[LARGEST])

st.title("Learn: what training data attribution is, and why ensembles")
st.markdown("Every example below runs live on scikit-learn's 8x8 digits (1500 training, 297 test images) "
            "with a small MLP, so each step takes seconds. Results are stored, so a second visit is instant.")
dataset = cached_dataset(TASK.dataset)
test_pos = st.slider("Test digit used in every example below (position in the test set)", 0, dataset.n_test - 1, 7,
                     key="learn_test")
show_examples(dataset, "test", [test_pos], [describe_example(dataset, "test", test_pos)], size=112)

live = all_stored(TASK, GRADIENTS + ENSEMBLES) and has_members(TASK, *LARGEST)
if not live:
    status = job_panel(LIVE_JOB, next_step="press the button to try again")
    if status is None or not status.active:
        st.info(f"The live examples train {len(SIZES)} small MLPs on digits and attribute with them: seconds on a "
                "free machine, a minute or two on two busy cores, in the background. They are stored, so this "
                "happens once.", icon=":material/play_circle:")
        if st.button("Start the live examples", type="primary", key="learn_start"):
            start_job(LIVE_JOB)


def attribution(method: MethodSpec, ensemble: EnsembleSpec):  # noqa: ANN201 - Attribution
    with friendly_errors():
        return cached_attribution_of(TASK, method, ensemble)


def top_row(scores, k: int = 6, size: int = 72) -> None:  # noqa: ANN001
    rows = score_analysis.top_k(scores, test_pos, k, dataset)
    rows = rows[rows["role"] == "proponent"]
    show_examples(dataset, "train", rows["position"].tolist(),
                  [caption(r, compact=size < 96) for _, r in rows.iterrows()], size=size)


# --- 1 -------------------------------------------------------------------------------------------------
st.header("1 · Gradient similarity: Grad-Dot and Grad-Cos", divider="gray")
st.markdown("Training on example *i* moves the weights along minus the gradient of its loss. To first order, "
            "that changes the test example's target *f* (its margin) by the inner product of the two gradients. "
            "**Grad-Dot** scores exactly that; **Grad-Cos** divides by both lengths, so training examples with "
            "huge gradients (badly fit, odd-looking ones) stop dominating every list.")
st.latex(r"\text{Grad-Dot}(i, z) = \nabla_\theta \ell(z_i)^\top \nabla_\theta f(z) \qquad "
         r"\text{Grad-Cos}(i, z) = \frac{\nabla_\theta \ell(z_i)^\top \nabla_\theta f(z)}"
         r"{\lVert\nabla_\theta \ell(z_i)\rVert\,\lVert\nabla_\theta f(z)\rVert}")
cols = st.columns(2, gap="large") if live else []
for col, name in zip(cols, ("grad-dot", "grad-cos")):
    with col:
        att = attribution(MethodSpec(name), EnsembleSpec("naive", I=1))
        st.markdown(f"**{'Grad-Dot' if name == 'grad-dot' else 'Grad-Cos'}: top proponents**")
        top_row(att.scores)
        st.metric("Distinct training examples among all test digits' top-10",
                  f"{score_analysis.hub_share(att.scores, 10):.0%}",
                  help="low = the same few training examples top almost every list")

# --- 2 -------------------------------------------------------------------------------------------------
st.header("2 · One model is not enough", divider="gray")
st.markdown("A neural network's loss is not convex: models trained with different seeds end in different minima, "
            "and gradient-based attribution, a local linearisation, changes with the minimum. Below, TRAK on five "
            "models that differ only in their seed: the members of a naive ensemble of five. Their rankings "
            "disagree; the **ensemble** combines them as the product does (mean member score times mean Q), and it "
            "agrees with every member better than the members agree with each other.")
if live:
    members = cached_members(TASK, *LARGEST)
    left, right = st.columns([2, 3], gap="large")
    with left:
        fig = px.imshow(cached_agreement(TASK, *LARGEST).round(2), text_auto=True, color_continuous_scale="Blues",
                        zmin=0, zmax=1, title="Spearman of scores, mean over test digits")
        fig.update_layout(height=380, margin=dict(l=10, r=10, t=50, b=10), coloraxis_showscale=False)
        st.plotly_chart(fig, width="stretch", config={"displayModeBar": False})
    with right:
        for j in range(3):
            st.markdown(members.labels[j].capitalize())
            top_row(members.member(j))
        st.markdown(f"**The ensemble of all {len(members.labels)}**")
        top_row(attribution(*LARGEST).scores)

# --- 3 -------------------------------------------------------------------------------------------------
st.header("3 · Cheaper members: Dropout and LoRA ensembles", divider="gray")
st.image(str(ASSETS / "ensembles.svg"), width="stretch")
st.markdown(
    "Training is the expensive part of a naive ensemble. A **Dropout Ensemble** trains I models and makes D "
    "members of each by switching off a fixed random set of units (the same mask for the training and the test "
    "gradients of that member). A **LoRA Ensemble** fine-tunes L small low-rank adapters on each trained model. "
    "Both give I x D (or I x L) members for the training cost of I models; the forward-only Dropout variant also "
    "keeps serving close to one member.")
st.info("**The projection-seed control.** Each TRAK member projects its gradients with its own random matrix, so "
        "averaging members also averages projection noise, with no model diversity at all. The `proj-seeds` "
        "ensemble (same I models, P projection seeds, nothing else changed) measures that part; an ensemble only "
        "adds real diversity where it beats this control on the LDS vs cost page.", icon=":material/science:")

if not live:
    st.caption("Start the live examples at the top to see sections 1, 2, 4 and 5 computed.")
    st.stop()

# --- 4 -------------------------------------------------------------------------------------------------
st.header("4 · What LDS measures", divider="gray")
st.markdown(f"Train {EVAL.M} models, each on a random half of the training set, and record each one's margin on "
            "the test digit. A good attribution predicts those outcomes: the predicted value for a subset is the "
            "sum of the scores of the training examples in it. The **linear datamodeling score (LDS)** is the "
            "Spearman rank correlation between predicted and actual, averaged over test examples.")
ensemble = attribution(*LARGEST).scores
if has_ground_truth(TASK, EVAL):
    truth = cached_ground_truth(TASK, EVAL)
    left, right = st.columns(2, gap="large")
    for col, title, scores in ((left, "One model (seed 0)", attribution(*ENSEMBLES[0]).scores),
                               (right, f"Naive ensemble of {SIZES[-1]}", ensemble)):
        frame, rho = score_analysis.lds_scatter(scores, truth.subsets, truth.values, test_pos)
        fig = px.scatter(frame, x="predicted", y="actual", hover_data=["subset"],
                         title=f"{title}: Spearman {rho:.2f} for this digit",
                         labels={"predicted": "predicted (sum of scores in the subset)",
                                 "actual": "actual margin of the subset model"})
        fig.update_layout(height=360, margin=dict(l=10, r=10, t=50, b=10))
        col.plotly_chart(fig, width="stretch", config={"displayModeBar": False})
    st.markdown("LDS over all test digits of naive ensembles of 1 to 5 models, each as the product computes it "
                "(mean ± standard error):")
    st.dataframe(cached_ladder(TASK, TRAK, [e for _, e in ENSEMBLES], EVAL), hide_index=True)
else:
    gt_job = jobs.ground_truth_job(TASK, EVAL)
    status = job_panel(gt_job, next_step="press the button to try again")
    if status is None or not status.active:
        if st.button(f"Train the {EVAL.M} subset models (about 10-30 s on 2 CPU cores)", key="learn_gt",
                     type="primary"):
            start_job(gt_job)
        st.caption("Press the button to compute the ground truth in the background; it is stored and reused by "
                   "every page.")

# --- 5 -------------------------------------------------------------------------------------------------
st.header("5 · Counterfactual check", divider="gray")
st.markdown("The direct test of an attribution: remove the test digit's top-k proponents from the training set, "
            "retrain (same seeds), and compare the change in its margin with removing k random training examples.")
k_cf = st.select_slider("k (training examples removed)", [10, 20, 50, 100], value=50, key="learn_cf_k")
if st.button("Remove and retrain (a few seconds)", key="learn_cf"):
    with friendly_errors():
        progress = StreamlitProgress("Retraining without them")
        result = counterfactual(TASK, score_analysis.as_numpy(ensemble)[:, test_pos], test_pos, k_cf,
                                progress=progress)
        progress.finish()
    frame, summary = counterfactual_view(result)
    fig = px.strip(frame, x="change", y="removed", color="removed", stripmode="overlay",
                   title="Change of the test digit's margin after retraining",
                   labels={"change": "margin change (negative = the prediction got less confident)", "removed": ""})
    fig.update_traces(marker=dict(size=14))
    fig.update_layout(height=260, showlegend=False, margin=dict(l=10, r=10, t=50, b=10))
    st.plotly_chart(fig, width="stretch", config={"displayModeBar": False})
    st.markdown(summary)
