"""Attribution browser: a test example's proponents and opponents with how the ensemble's members see them, two
settings side by side with their paired LDS comparison, and the reverse view.

Everything below the attribution is one fragment: choosing a test example, a gallery row, a tab or the second
setting reruns only it. The chosen test example and tab live in the URL.
"""
from __future__ import annotations

import dataclasses

import streamlit as st

from pages.ui.cached import (cached_dataset, cached_members, cached_predictions, cached_run,
                             has_ground_truth, has_members)
from pages.ui.present import (caption, comparison_metrics, describe_example, difference_image, example_label,
                              kind_label, rank_strip)
from pages.ui.routing import run_inside_app
from pages.ui.state import URL, current_setting, friendly_errors, sync_url
from pages.ui.widgets import gallery, job_panel, obtain_attribution, show_examples, start_job
from tda_core import examples, jobs, score_analysis, teaching
from tda_core.ensembles import ENSEMBLES
from tda_core.experiments import compare_results
from tda_core.settings import LIMITS
from tda_core.specs import EnsembleSpec, EvalSpec

run_inside_app()  # before drawing anything: see pages/ui/routing.py

TABS = ("Proponents & opponents", "Compare two settings", "Reverse view")
EVAL = EvalSpec()  # the ground truth the paired comparison uses (Build's default)
SIZE = 112  # thumbnail width: a 28-pixel digit drawn 4x, readable on a laptop and a phone

st.title("Attribution browser")
setting = current_setting()
st.caption(f"**{setting.task.name}** · {setting.label} — change it in the sidebar")
with friendly_errors("choose a task whose dataset is available (see Home), or download it with "
                     "`python -m tda_core datasets --download NAME`"):
    dataset = cached_dataset(setting.task.dataset)
is_image = dataset.kind == "image"

attribution = obtain_attribution(setting, "main")
if attribution is None:
    st.stop()
scores = attribution.scores


def show_ranking(frame, split: str, roles: tuple[tuple[str, str], ...], table_title: str,  # noqa: ANN001
                 differences_from: int | None = None) -> None:
    """A gallery per role (e.g. proponents, opponents) of ranked examples, then the whole ranking as a table;
    with `differences_from` (a test position), each image's pixel difference from that test example too."""
    for role, title in roles:
        rows = frame[frame["role"] == role]
        st.markdown(f"**{title}**")
        positions = rows["position"].tolist()
        show_examples(dataset, split, positions, [caption(r) for _, r in rows.iterrows()], size=SIZE, key=role)
        if differences_from is not None:
            diffs = teaching.pixel_differences(dataset, differences_from, positions)
            st.image([difference_image(d, SIZE) for d in diffs], width=SIZE,
                     caption=[f"test − #{r['source_index']}" for _, r in rows.iterrows()])
    with st.expander(table_title):
        st.dataframe(frame, hide_index=True, width="stretch")


def pick_test_example():  # noqa: ANN201 - (position, k, table)
    """Filters, the test example (mirrored in the URL) and k, in one row above the tabs."""
    table = examples.example_table(dataset, cached_predictions(setting) if is_image else None)
    cols = st.columns([2, 2, 3, 2]) if "label" in table else st.columns([3, 2])
    if "label" in table:
        labels = cols[0].multiselect("Class", sorted(table["label"].unique()), key="browse_labels",
                                     placeholder="any class")
        correctness = cols[1].radio("Prediction", ["all", "correct", "wrong"], horizontal=True, key="browse_correct")
        with friendly_errors():
            table = examples.filter_tests(table, labels, correctness)
    if table.empty:
        st.warning("No test example matches these filters. **Next step:** clear the class or prediction filter.")
        st.stop()
    positions = table["position"].tolist()
    linked = str(st.query_params.get("test_pos", ""))
    if "test_pos" not in st.session_state and linked.isdigit():  # a link's test example, once per session
        st.session_state["test_pos"] = int(linked)
    if st.session_state.get("test_pos") not in positions:
        st.session_state["test_pos"] = positions[0]
    cols[-2].selectbox("Test example", positions, key="test_pos", format_func=lambda p: example_label(table, p),
                       help="position in the test set · source index · label · the model's prediction")
    k = cols[-1].slider("k shown", 1, 20, 8 if is_image else 4, key="browse_k", help="proponents / opponents shown")
    sync_url({"test_pos": int(st.session_state["test_pos"])})
    return int(st.session_state["test_pos"]), k, table


def members_views(test_pos: int, k: int) -> None:
    """How the ensemble's members rank its top proponents, and how the top-k forms as members are added."""
    n = setting.ensemble.n_members
    st.subheader("Why these proponents? What each member says", divider="gray")
    if n < 2:
        st.caption("This setting has one member. Choose an ensemble with several (e.g. Dropout with D = 5) to see "
                   "how much members agree and how the list forms as they are averaged.")
        return
    task, method, ensemble = setting.task, setting.method, setting.ensemble
    if not has_members(task, method, ensemble):
        spec = jobs.members_job(task, method, ensemble, f"Member scores of {setting.label}")
        status = job_panel(spec, next_step="press the button to try again")
        if status is None or not status.active:
            st.caption(f"The ensemble averages {n} members. To see how each ranks this example's proponents, "
                       "compute every member's own scores once (about the serving cost of the setting; stored).")
            if st.button(f"Compute the {n} members' own scores", key="browse_members", icon=":material/groups:"):
                start_job(spec)
        return
    members = cached_members(task, method, ensemble)
    ranks = teaching.member_ranks(members, test_pos, k)
    top = score_analysis.top_k(scores, test_pos, k, dataset)
    labels = [f"#{r['rank']} · {r['label']} · {r['source_index']}" for _, r in
              top[top["role"] == "proponent"].iterrows()]
    st.markdown(f"Each row is one of the {n} members, each column one of the ensemble's top-{k} proponents (its rank, "
                "label, source index); a cell is that member's own rank of that training example, **dark = high in "
                "its list too**. Proponents every member ranks high are robust; ones only a few members like come "
                "from averaging.")
    st.plotly_chart(rank_strip(ranks.head(20), labels, dataset.n_train), width="stretch", key="rank_strip",
                    config={"displayModeBar": False})
    if n > 20:
        st.caption(f"The first 20 of {n} members are shown.")
    st.markdown("**The list as members are added** (averaged as the product averages them: mean score times mean "
                "Q); ✓ marks a proponent that stays in the full ensemble's top-k.")
    summary = teaching.growth_summary(members, test_pos, k)
    growth = teaching.top_k_as_members_grow(members, test_pos, k)
    for n, shared, rho in summary.itertuples(index=False):
        part = growth[growth["members"] == n]
        st.markdown(f"{n} member{'s' if n > 1 else ''}: **{shared} / {k}** of the final list, Spearman {rho:.2f} with "
                    "the full ensemble")
        show_examples(dataset, "train", part["position"].tolist(),
                      [f"{'✓' if r['in_final'] else '·'} {describe_example(dataset, 'train', r['position'])}"
                       for _, r in part.iterrows()], size=72 if is_image else SIZE, per_row=4, key=f"grow-{n}")


def proponents_tab(test_pos: int, k: int, table) -> None:  # noqa: ANN001
    left, right = st.columns([1, 4], gap="large") if is_image else (st.container(), st.container())
    with left:
        st.markdown("**Test example**")
        show_examples(dataset, "test", [test_pos], [example_label(table, test_pos)], size=168, key="test")
    with right:
        differences = is_image and st.toggle("Show each one's pixel difference from the test example",
                                             key="browse_diff", help="test − training image per pixel: red where "
                                             "the test example is brighter, blue where the training example is")
        show_ranking(score_analysis.top_k(scores, test_pos, k, dataset), "train",
                     (("proponent", "Top proponents — training examples that raise its target"),
                      ("opponent", "Top opponents — training examples that lower it")),
                     "As a table (label · source index = position in the original data · score)",
                     differences_from=test_pos if differences else None)
    members_views(test_pos, k)
    if is_image:
        with st.expander(f":material/grid_view: Pick another test example: {len(table)} match the filters "
                         "(select a row)"):
            gallery(dataset, table, "test_gallery")


def compare_tab(test_pos: int, k: int) -> None:
    st.markdown("Compare the current setting (**A**) with a second ensemble (**B**) of the same task and method.")
    c = st.columns(3)
    kind_b = c[0].selectbox("Second ensemble", ENSEMBLES.names(), index=0, key="cmp_kind", format_func=kind_label)
    i_b = c[1].number_input("I", *LIMITS["I"], 2, key="cmp_I")
    budget_name = ENSEMBLES.get(kind_b).budget
    budget = c[2].number_input(budget_name or "members per model", *LIMITS["D"], 5, key="cmp_budget",
                               disabled=budget_name is None)
    with friendly_errors("change the second ensemble"):
        extra = {budget_name: int(budget)} if budget_name else {}
        ensemble_b = EnsembleSpec(kind=kind_b, I=int(i_b), seed=setting.ensemble.seed, **extra)
        other = dataclasses.replace(setting, ensemble=ensemble_b)
    attribution_b = obtain_attribution(other, "compare")
    if attribution_b is None:
        return
    st.markdown(f"**A**: {setting.label}  \n**B**: {other.label}")
    st.markdown("**Overall quality: paired LDS comparison**")
    if has_ground_truth(setting.task, EVAL):
        with friendly_errors():
            cmp = compare_results(cached_run(setting, EVAL), cached_run(other, EVAL))
        for col, (label, value, help_text) in zip(st.columns(5), comparison_metrics(cmp)):
            col.metric(label, value, help=help_text)
    else:
        st.info(f"The paired LDS comparison needs the ground truth (M = {EVAL.M} subset models). **Next step:** "
                "compute it on **Build & attribute**; it is stored and shared by every setting.",
                icon=":material/info:")
    comparison = score_analysis.compare(scores, attribution_b.scores, test_pos, k)
    st.markdown("**This test example: do A and B pick the same proponents?**")
    m = st.columns(3)
    m[0].metric(f"Top-{k} proponents shared", f"{comparison.overlap} / {k}")
    m[1].metric(f"Top-{k} opponents shared", f"{comparison.opponent_overlap} / {k}")
    m[2].metric("Spearman of all scores", f"{comparison.spearman:.3f}",
                help="rank correlation of the two settings' scores over every training example")
    cols = st.columns(2, gap="large")
    for side, col, label, sc in (("a", cols[0], "A", scores), ("b", cols[1], "B", attribution_b.scores)):
        with col:
            st.markdown(f"**{label}: top proponents**")
            rows = score_analysis.top_k(sc, test_pos, k, dataset)
            rows = rows[rows["role"] == "proponent"]
            show_examples(dataset, "train", rows["position"].tolist(), [caption(r) for _, r in rows.iterrows()],
                          size=SIZE, per_row=1, key=f"compare-{side}")


def reverse_tab(test_pos: int, k: int) -> None:
    st.markdown("Pick a training example and see the test examples it helps and hurts most.")
    default_train = int(score_analysis.top_k(scores, test_pos, 1, dataset)["position"].iloc[0])
    train_pos = st.number_input(f"Training example (position 0..{dataset.n_train - 1}; default: the top "
                                "proponent of the chosen test example)", 0, dataset.n_train - 1, default_train,
                                key="reverse_pos")
    left, right = st.columns([1, 4], gap="large") if is_image else (st.container(), st.container())
    with left:
        st.markdown("**Training example**")
        show_examples(dataset, "train", [int(train_pos)],
                      [describe_example(dataset, "train", int(train_pos))], size=168, key="reverse")
    with right:
        show_ranking(score_analysis.reverse_top_k(scores, int(train_pos), k, dataset), "test",
                     (("helps", "Test examples it helps most"), ("hurts", "Test examples it hurts most")),
                     "As a table")


@st.fragment
def explore() -> None:
    """The test example, the tabs and their contents: reruns on its own."""
    test_pos, k, table = pick_test_example()
    tabs = st.tabs(TABS, key="tab", bind=URL)
    for tab, draw in zip(tabs, (lambda: proponents_tab(test_pos, k, table), lambda: compare_tab(test_pos, k),
                                lambda: reverse_tab(test_pos, k))):
        if tab.open:
            with tab:
                draw()


explore()
