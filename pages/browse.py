"""Attribution browser: a test example's proponents and opponents, two settings side by side, the reverse view."""
from __future__ import annotations

import dataclasses

import streamlit as st

from pages.ui.cached import cached_dataset, cached_predictions
from pages.ui.present import caption, describe_example, example_label, kind_label
from pages.ui.state import current_setting, friendly_errors
from pages.ui.widgets import gallery, obtain_attribution, show_examples
from tda_core import examples, score_analysis
from tda_core.ensembles import ENSEMBLES
from tda_core.specs import EnsembleSpec

st.title("Attribution browser")
setting = current_setting()
st.caption(f"**{setting.task.name}** · {setting.label} — change it in the sidebar")
with friendly_errors("choose a task whose dataset is available (see Home), or download it with "
                     "`python -m tda_core datasets --download NAME`"):
    dataset = cached_dataset(setting.task.dataset)

def show_ranking(frame, split: str, roles: tuple[tuple[str, str], ...], table_title: str) -> None:
    """A gallery per role (e.g. proponents, opponents) of ranked examples, then the whole ranking as a table."""
    for role, title in roles:
        rows = frame[frame["role"] == role]
        st.markdown(f"**{title}**")
        show_examples(dataset, split, rows["position"].tolist(),
                      [caption(r) for _, r in rows.iterrows()], per_row=8 if is_image else None, key=role)
    with st.expander(table_title):
        st.dataframe(frame, hide_index=True, width="stretch")


attribution = obtain_attribution(setting, "main")
if attribution is None:
    st.stop()
scores = attribution.scores
is_image = dataset.kind == "image"

tab_one, tab_two, tab_reverse = st.tabs([":material/person_search: Proponents & opponents",
                                         ":material/compare: Compare two settings",
                                         ":material/swap_horiz: Reverse view"])

# --- choose a test example -------------------------------------------------------------------------
with st.sidebar:
    st.markdown("### Test example")
    table = examples.example_table(dataset, cached_predictions(setting) if is_image else None)
    if "label" in table:
        labels = st.multiselect("Class", sorted(table["label"].unique()), key="browse_labels")
        correctness = st.radio("Prediction", ["all", "correct", "wrong"], horizontal=True, key="browse_correct")
        with friendly_errors():
            table = examples.filter_tests(table, labels, correctness)
    if table.empty:
        st.warning("No test example matches these filters; clear them.")
        st.stop()
    positions = table["position"].tolist()
    if st.session_state.get("test_pos") not in positions:
        st.session_state["test_pos"] = positions[0]
    st.selectbox("Test example (position)", positions, key="test_pos",
                 format_func=lambda p: example_label(table, p))
    k = st.slider("k (proponents / opponents shown)", 1, 20, 8 if is_image else 4, key="browse_k")
test_pos = int(st.session_state["test_pos"])

with tab_one:
    left, right = st.columns([1, 4], gap="large") if is_image else (st.container(), st.container())
    with left:
        st.markdown("**Test example**")
        show_examples(dataset, "test", [test_pos], [example_label(table, test_pos)], size=168, key="test")
    with right:
        show_ranking(score_analysis.top_k(scores, test_pos, k, dataset), "train",
                     (("proponent", "Top proponents — training examples that raise its target"),
                      ("opponent", "Top opponents — training examples that lower it")),
                     "As a table (label · source index = position in the original data · score)")
    if is_image:
        with st.expander(f":material/grid_view: Pick another test example: {len(table)} match the sidebar filters "
                         "(select a row)"):
            gallery(dataset, table, "test_gallery")

# --- two settings side by side ------------------------------------------------------------------------
with tab_two:
    st.markdown("Compare the current setting with a second ensemble of the same task and method.")
    c = st.columns(4)
    kind_b = c[0].selectbox("Second ensemble", ENSEMBLES.names(), index=0, key="cmp_kind", format_func=kind_label)
    i_b = c[1].number_input("I", 1, 50, 2, key="cmp_I")
    budget_name = ENSEMBLES.get(kind_b).budget
    budget = c[2].number_input(budget_name or "members per model", 1, 50, 5, key="cmp_budget",
                               disabled=budget_name is None)
    with friendly_errors():
        extra = {budget_name: int(budget)} if budget_name else {}
        ensemble_b = EnsembleSpec(kind=kind_b, I=int(i_b), seed=setting.ensemble.seed, **extra)
        other = dataclasses.replace(setting, ensemble=ensemble_b)
    attribution_b = obtain_attribution(other, "compare")
    if attribution_b is not None:
        comparison = score_analysis.compare(scores, attribution_b.scores, test_pos, k)
        m = st.columns(3)
        m[0].metric(f"Top-{k} proponents shared", f"{comparison.overlap} / {k}")
        m[1].metric(f"Top-{k} opponents shared", f"{comparison.opponent_overlap} / {k}")
        m[2].metric("Spearman of all scores", f"{comparison.spearman:.3f}",
                    help="rank correlation of the two settings' scores over every training example")
        cols = st.columns(2, gap="large")
        for side, col, label, sc in (("a", cols[0], setting.label, scores),
                                     ("b", cols[1], other.label, attribution_b.scores)):
            with col:
                st.markdown(f"**{label}**")
                rows = score_analysis.top_k(sc, test_pos, k, dataset)
                rows = rows[rows["role"] == "proponent"]
                show_examples(dataset, "train", rows["position"].tolist(),
                              [caption(r) for _, r in rows.iterrows()], per_row=4 if is_image else 1,
                              key=f"compare-{side}")

# --- reverse view ------------------------------------------------------------------------------------
with tab_reverse:
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
