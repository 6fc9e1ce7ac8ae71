"""The Streamlit explorer, page by page, with streamlit's AppTest on small precomputed digits fixtures.

A session fixture trains tiny digits models (2 epochs) and stores attributions, a ground truth and
results rows, all through the real tda_core API; every test then opens pages against that store
and checks what is shown, including the error paths.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pandas as pd
import pytest
from streamlit.testing.v1 import AppTest

from tda_core import jobs, tasks
from tda_core.attribution import attribute, member_attribution
from tda_core.data import load_dataset
from tda_core.evaluation import ground_truth, lds_against
from tda_core.experiments import compare_stored, run
from tda_core.reference import read_reference, reference_files
from tda_core.results import RESULTS_TABLE, results_frame
from tda_core.specs import EnsembleSpec, EvalSpec, MethodSpec, Recipe
from tda_core.tasks import get_task
from tda_core.store import Store
from tda_core.teaching import member_ranks as teaching_ranks

TRAK = MethodSpec("trak", proj="kron", proj_dim=2048)  # the app's default method
MAIN = EnsembleSpec("dropout", I=1, D=2)
OTHER = EnsembleSpec("naive", I=1)
EVAL = EvalSpec(M=50, alpha=0.5)  # the Build and Learn pages' default
APP = str(Path(__file__).resolve().parents[1] / "app.py")
TIMEOUT = 120
STATE = {"task": "digits-mlp", "kind": "dropout", "I": 1, "D": 2, "cmp_kind": "naive", "cmp_I": 1}


@pytest.fixture(scope="module")
def tiny_task():
    """digits-mlp with a 2-epoch recipe, while this module runs."""
    original = tasks.TASKS["digits-mlp"]
    tiny = dataclasses.replace(original, recipe=Recipe(epochs=2, batch_size=64, lr=0.05))
    tasks.TASKS["digits-mlp"] = tiny
    yield tiny
    tasks.TASKS["digits-mlp"] = original


@pytest.fixture(scope="module")
def filled_store(tmp_path_factory, tiny_task):
    """A store holding what the pages show for the tiny digits task (computed by the real core)."""
    store = Store(tmp_path_factory.mktemp("app-store"))
    truth = ground_truth(tiny_task, EVAL, store=store)
    for ensemble in (MAIN, OTHER, EnsembleSpec("proj-seeds", I=1, P=2)):
        store.append_rows(RESULTS_TABLE, [run(tiny_task, TRAK, ensemble, EVAL, store=store, truth=truth).row()])
    for name in ("grad-dot", "grad-cos"):  # the Learn page's examples
        attribute(tiny_task, MethodSpec(name), OTHER, store=store)
    for size in range(1, 6):
        attribute(tiny_task, TRAK, EnsembleSpec("naive", I=size), store=store)
    member_attribution(tiny_task, TRAK, EnsembleSpec("naive", I=5), store=store)
    member_attribution(tiny_task, TRAK, MAIN, store=store)  # the browser's member views
    return store


@pytest.fixture
def app_store(filled_store, monkeypatch):
    monkeypatch.setenv("TDA_STORE", str(filled_store.root))
    return filled_store


def open_page(page: str | None = None, **state) -> AppTest:
    at = AppTest.from_file(APP, default_timeout=TIMEOUT)
    for key, value in {**STATE, **state}.items():
        at.session_state[key] = value
    if page:
        at.switch_page(f"pages/{page}.py")
    return at.run()


def captions(at: AppTest) -> list[str]:
    return [img.caption for element in at.get("image") for img in element.proto.imgs]


def table_with(at: AppTest, column: str, value) -> pd.DataFrame:
    """The first table shown whose `column` holds `value`."""
    return next(d.value for d in at.dataframe if column in d.value and value in set(d.value[column]))


def digits_reference():
    """The reference file the LDS-vs-cost page shows for digits-mlp by default."""
    return reference_files("digits-mlp")[0]


def texts(elements) -> str:
    return "\n".join(str(e.value) for e in elements)


def test_home_shows_device_datasets_and_store(app_store):
    at = open_page()
    assert not at.exception
    assert at.title[0].value == "Ensemble TDA Explorer"
    assert "Computing on" in [m.label for m in at.metric]
    datasets = at.dataframe[1].value
    assert {"digits", "mnist", "cifar2"} <= set(datasets["dataset"])
    assert datasets.set_index("dataset").loc["digits", "status"] == "embedded"
    kinds = set(at.dataframe[0].value["kind"])
    assert {"checkpoints", "features", "scores", "ground_truth"} <= kinds
    assert "Best of 3 results (all on the LDS vs cost page)" in [s.value for s in at.subheader]
    assert len(at.dataframe[2].value) == 3


def test_home_on_an_empty_store_says_where_to_start(tiny_task):
    at = open_page()
    assert not at.exception
    assert "Nothing computed yet" in texts(at.info)


def test_browser_shows_proponents_and_opponents(app_store):
    at = open_page("browse", test_pos=5, browse_k=4)
    assert not at.exception, at.exception
    assert not at.error
    table = table_with(at, "role", "proponent")
    assert list(table["role"]) == ["proponent"] * 4 + ["opponent"] * 4
    assert table["score"].iloc[:4].is_monotonic_decreasing and table["score"].iloc[0] > table["score"].iloc[-1]
    shown = captions(at)
    for _, row in table.iterrows():  # every ranked example is drawn with label, source index and score
        assert f"{row['label']} · #{row['source_index']} · {row['score']:+.3g}" in shown


def test_browser_compares_two_settings(app_store):
    at = open_page("browse", test_pos=5, browse_k=4, tab="Compare two settings")
    assert not at.exception, at.exception
    labels = [m.label for m in at.metric]
    assert "Top-4 proponents shared" in labels and "Spearman of all scores" in labels
    shared = next(m.value for m in at.metric if m.label == "Top-4 proponents shared")
    assert shared.endswith("/ 4") and 0 <= int(shared.split("/")[0]) <= 4
    rho = float(next(m.value for m in at.metric if m.label == "Spearman of all scores"))
    assert -1.0 <= rho <= 1.0


def test_browser_reverse_view_lists_test_examples(app_store):
    at = open_page("browse", test_pos=5, browse_k=3, reverse_pos=10, tab="Reverse view")
    reverse = table_with(at, "role", "helps")
    assert list(reverse["role"]) == ["helps"] * 3 + ["hurts"] * 3
    assert reverse["score"].iloc[0] >= reverse["score"].iloc[2]


def test_browser_filters_test_examples(app_store):
    at = open_page("browse", browse_labels=["3"], browse_correct="all")
    assert not at.exception
    options = at.selectbox(key="test_pos").options
    assert options and all("label 3" in o for o in options)


def test_browser_computes_a_missing_setting_on_request(app_store):
    at = open_page("browse", kind="naive", I=1, seed=9, browse_k=3)  # seed 9: no stored model
    assert not at.exception
    assert "Not computed yet" in texts(at.info)
    assert "1 model(s) to train (0 stored)" in texts(at.info).replace("**", "")
    assert not at.get("image")
    at.button(key="compute-main").click().run()
    assert not at.exception, at.exception
    (job,) = jobs.all_jobs(app_store)  # the work runs in a worker process, not in the script run
    assert job.kind == "attribute" and "seed=9" not in job.title and "naive I=1" in job.title
    assert jobs.wait(app_store, job.job_id, TIMEOUT).status == "done"
    at.run()  # what the job's progress panel does when the job ends
    assert not at.exception, at.exception
    assert len(table_with(at, "role", "proponent")) == 6 and len(captions(at)) >= 7


def test_build_shows_plan_costs_and_lds(app_store):
    at = open_page("build")
    assert not at.exception, at.exception
    metrics = {m.label: m.value for m in at.metric}
    assert metrics["Models to train"] == "0" and metrics["Members"] == "2"
    assert metrics["Trained / members"] == "1 / 2"
    want = run(get_task("digits-mlp"), TRAK, MAIN, EVAL, store=app_store, device="cpu")  # the same stored inputs
    assert metrics["LDS"] == f"{want.lds:.3f} ± {want.lds_sem:.3f}"
    assert "in the results table" in texts(at.caption)


def test_build_without_ground_truth_offers_to_compute_it(app_store):
    at = open_page("build", build_alpha=0.3)  # no subset model of this size is stored
    assert not at.exception
    assert "No ground truth yet for M=50, alpha=0.3" in texts(at.info)
    assert "Compute the ground truth" in [b.label for b in at.button]


def test_build_with_an_impossible_budget_says_what_fits(app_store, monkeypatch):
    monkeypatch.setenv("TDA_MEMORY_BUDGET_GB", "0.000001")
    at = open_page("build")
    assert not at.exception
    assert "memory budget" in texts(at.error) and "Next step" in texts(at.error)
    assert "Run" not in [b.label for b in at.button]


def test_missing_dataset_is_a_message_not_a_traceback(app_store):
    at = open_page("browse", task="cifar2-mlp")
    assert not at.exception
    assert "CIFAR-10 not found" in texts(at.error) and "--download" in texts(at.error)


def test_lds_cost_plots_own_and_reference_results(app_store):
    at = open_page("lds_cost")
    assert not at.exception, at.exception
    (chart,) = at.get("plotly_chart")
    table = at.dataframe(key="lc_table").value
    reference = table[table["source"] != "this store"]
    assert (table["source"] == "this store").sum() == 3
    assert len(reference) > 0 and set(reference["source"]) == {digits_reference().source}
    figure = json.loads(chart.proto.spec)
    assert "circle-open" in {t.get("marker", {}).get("symbol") for t in figure["data"]}  # reference drawn apart
    assert any(digits_reference().when in caption for caption in texts(at.caption).splitlines())  # where and when
    at.toggle(key="lc_ref").set_value(False).run()
    assert len(at.dataframe(key="lc_table").value) == 3
    at.multiselect(key="lc_series").set_value(["proj-seeds"]).run()
    shown = at.dataframe(key="lc_table").value
    assert len(shown) == 1 and shown["ensemble"].iloc[0] == "proj-seeds"
    assert at.selectbox(key="lc_x").options == ["training seconds", "serving seconds", "space (bytes)",
                                                 "independently trained models", "members"]


def test_lds_cost_on_an_empty_store_shows_the_reference_results(tiny_task):
    at = open_page("lds_cost", task="mnist-mlp")  # a first visitor: the default task, nothing computed
    assert not at.exception, at.exception
    assert len(at.get("plotly_chart")) == 1
    table = at.dataframe(key="lc_table").value
    assert len(table) == len(read_reference(reference_files("mnist-mlp")[0]))
    assert (table["source"] != "this store").all()
    assert "Run the sweep" in [b.label for b in at.button]


def test_lds_cost_compares_two_selected_rows_pairwise(app_store):
    at = open_page("lds_cost", lc_ref=False)
    table = at.dataframe(key="lc_table").value
    rows = [int(i) for i in (table["ensemble"] == "dropout").to_numpy().nonzero()[0]]
    rows += [int(i) for i in (table["ensemble"] == "naive").to_numpy().nonzero()[0]]
    at.session_state["lc_table"] = {"selection": {"rows": rows, "columns": [], "cells": []}}
    at.run()
    assert not at.exception, at.exception
    metrics = {m.label: m.value for m in at.metric}
    stored = results_frame(app_store).set_index("ensemble")
    want = compare_stored(app_store, stored.loc["dropout", "setting_key"], stored.loc["naive", "setting_key"])
    assert metrics["A − B"] == f"{want.difference:+.3f}"
    assert metrics["95% interval"] == f"[{want.low:+.3f}, {want.high:+.3f}]"
    assert metrics["Verdict"] == want.verdict


def test_lds_cost_explains_why_a_reference_row_cannot_be_compared(app_store):
    at = open_page("lds_cost")
    table = at.dataframe(key="lc_table").value
    own = int((table["source"] == "this store").to_numpy().nonzero()[0][0])
    reference = int((table["source"] != "this store").to_numpy().nonzero()[0][0])
    at.session_state["lc_table"] = {"selection": {"rows": [own, reference], "columns": [], "cells": []}}
    at.run()
    assert not at.exception, at.exception
    assert "reference rows carry no per-example LDS" in texts(at.info)
    assert "A − B" not in [m.label for m in at.metric]


def test_learn_runs_its_live_examples(app_store):
    at = open_page("learn", learn_test=3)
    assert not at.exception, at.exception
    assert [h.value for h in at.header][:5] == [
        "1 · Gradient similarity: Grad-Dot and Grad-Cos", "2 · One model is not enough",
        "3 · Cheaper members: Dropout and LoRA ensembles", "4 · What LDS measures", "5 · Counterfactual check"]
    assert len(at.get("plotly_chart")) == 3  # member agreement + two LDS scatters (ground truth is stored)
    ladder = at.dataframe[0].value  # the product's own naive ensembles of 1..5 models, not averaged members
    truth = ground_truth(get_task("digits-mlp"), EVAL, store=app_store)
    want = [round(lds_against(attribute(get_task("digits-mlp"), TRAK, EnsembleSpec("naive", I=i),
                                        store=app_store).scores, truth).mean, 3) for i in range(1, 6)]
    assert list(ladder["LDS"]) == want and ladder["ensemble"].str.startswith("naive I=").all()
    at.select_slider(key="learn_cf_k").set_value(10)
    at.button(key="learn_cf").click().run()
    assert not at.exception, at.exception
    assert "Without the top-10 proponents" in texts(at.markdown)


def test_learn_on_an_empty_store_waits_for_the_start_button(tiny_task):
    at = open_page("learn")
    assert not at.exception
    assert [b.label for b in at.button] == ["Start the live examples"]
    assert "3 · Cheaper members: Dropout and LoRA ensembles" in [h.value for h in at.header]
    assert not at.get("plotly_chart")  # nothing computed behind the user's back


# --- the computations behind the pages ------------------------------------------------------------------
def test_top_k_and_reverse_follow_the_score_matrix():
    import numpy as np

    from tda_core.data import load_dataset
    from tda_core.score_analysis import reverse_top_k, top_k

    digits = load_dataset("digits")
    scores = np.random.default_rng(0).normal(size=(digits.n_train, digits.n_test))
    ranked = top_k(scores, 4, 3, digits)
    assert list(ranked["position"][:3]) == list(np.argsort(-scores[:, 4])[:3])
    assert list(ranked["position"][3:]) == list(np.argsort(scores[:, 4])[:3])
    assert list(ranked["source_index"]) == [int(digits.train_index[p]) for p in ranked["position"]]
    assert list(ranked["label"]) == [str(int(digits.y_train[p])) for p in ranked["position"]]
    reverse = reverse_top_k(scores, 9, 2, digits)
    assert list(reverse["position"][:2]) == list(np.argsort(-scores[9])[:2])


def test_compare_counts_overlap_and_rank_correlation():
    import numpy as np

    from tda_core.score_analysis import compare, member_agreement

    a = np.arange(20, dtype=float)[:, None] * np.ones((1, 3))
    same, reversed_ = compare(a, a * 2 + 1, 0, 5), compare(a, -a, 0, 5)
    assert (same.overlap, same.opponent_overlap, same.spearman) == (5, 5, 1.0)
    assert (reversed_.overlap, reversed_.spearman) == (0, -1.0)
    table = member_agreement([a, a, -a], a)
    assert table.loc["member 1", "member 2"] == pytest.approx(1.0)
    assert table.loc["member 1", "member 3"] == pytest.approx(-1.0)
    assert table.loc["member 3", "ensemble"] == pytest.approx(-1.0)
    assert list(table.index) == ["member 1", "member 2", "member 3", "ensemble"]


def test_hub_share_separates_shared_from_distinct_proponents():
    import numpy as np

    from tda_core.score_analysis import hub_share

    shared = np.zeros((100, 10))
    shared[:3] = 1.0  # the same three examples top every column
    distinct = np.zeros((100, 10))
    distinct[np.arange(10) * 3, np.arange(10)] = 1.0
    assert hub_share(shared, 3) == pytest.approx(3 / 30)
    assert hub_share(distinct, 1) == 1.0


def test_settings_from_urls_keep_only_valid_values():
    from tda_core.settings import make_setting, values_from_query

    values = values_from_query({"task": "digits-mlp", "kind": "lora", "I": "2", "L": "99", "method": "nope"})
    assert values == {"task": "digits-mlp", "kind": "lora", "I": 2}
    setting = make_setting(values)
    assert (setting.ensemble.kind, setting.ensemble.I, setting.ensemble.D) == ("lora", 2, 1)  # D stays default


def test_lds_cost_estimates_a_sweep_before_running_it(app_store):
    at = open_page("lds_cost", sweep_grid="small")
    at.button(key="sweep_plan").click().run()
    assert not at.exception, at.exception
    estimate = texts(at.info)
    # the fixture ran three of the small grid's seven settings: naive I1, dropout I1 D2, proj-seeds I1 P2
    assert "digits-mlp: 7 settings, 3 already in the results table, 4 to run" in estimate


def test_a_url_reading_names_every_value_it_cannot_use():
    from tda_core.errors import UserError
    from tda_core.settings import LIMITS, check_limits, read_query

    values, problems = read_query({"task": "nope", "I": "-3", "D": "100000", "L": "two", "damping": "2.5",
                                   "tab": "Reverse view", "shared_projection": "maybe", "kind": "naive"})
    assert values == {"damping": 2.5, "kind": "naive"}  # keys that are not setting values are left to their pages
    assert problems == [
        f"unknown task 'nope'; valid choices: {', '.join(sorted(tasks.TASKS))}",
        "I=-3 is below the smallest value, 1",
        f"D=100000 is above the app's ceiling of {LIMITS['D'][1]} (larger runs belong on the command line: "
        "`python -m tda_core ...`)",
        "L='two' is not a whole number; give one from 1 to 50",
        "shared_projection='maybe': write true or false"]
    check_limits({"I": 50, "M": 1000, "damping": 0.0})
    with pytest.raises(UserError, match=r"I=51 is outside what the app runs \(1 to 50\)"):
        check_limits({"I": 51})
    with pytest.raises(UserError, match=r"M=5000 is outside what the app runs \(2 to 1000\)"):
        check_limits({"M": 5000})


@pytest.mark.parametrize("page", [None, "browse", "build", "lds_cost"])
def test_a_link_with_unusable_values_is_a_message_not_an_exception(app_store, page):
    at = AppTest.from_file(APP, default_timeout=TIMEOUT)
    at.query_params.update({"task": "digits-mlp", "kind": "naive", "I": "-3", "D": "100000", "method": "garbage",
                            "seed": "x"})
    if page:
        at.switch_page(f"pages/{page}.py")
    at.run()
    assert not at.exception, at.exception
    warning = texts(at.warning)
    for expected in ("unknown method 'garbage'", "I=-3 is below the smallest value, 1",
                     "D=100000 is above the app's ceiling of 50", "seed='x' is not a whole number", "Next step"):
        assert expected in warning
    assert at.selectbox(key="task").value == "digits-mlp" and at.selectbox(key="kind").value == "naive"
    assert at.number_input(key="I").value == 1 and at.selectbox(key="method").value == "trak"  # defaults instead
    at.run()
    assert not at.warning or "This link carries" not in texts(at.warning)  # said once, not on every rerun


def test_a_click_on_a_point_opens_its_setting_unless_it_is_above_the_ceilings(app_store):
    from pages.ui.state import select_setting
    from tda_core.errors import UserError
    from tda_core.settings import values_from_row

    row = read_reference(digits_reference()).iloc[0].to_dict()
    with pytest.raises(UserError, match=r"I=80 is outside what the app runs"):
        select_setting(values_from_row(row | {"I": 80}))  # refused before touching the session


def test_browser_shows_how_members_rank_the_proponents(app_store):
    from tda_core.teaching import growth_summary

    at = open_page("browse", test_pos=5, browse_k=4)
    assert not at.exception, at.exception
    assert "Why these proponents? What each member says" in [s.value for s in at.subheader]
    strip = next(c for c in at.get("plotly_chart") if c.proto.id and "rank_strip" in c.proto.id)
    cells = json.loads(strip.proto.spec)["data"][0]
    members = member_attribution(get_task("digits-mlp"), TRAK, MAIN, store=app_store)
    want = teaching_ranks(members, 5, 4)
    assert cells["y"] == list(want.index) and [list(map(int, r)) for r in cells["text"]] == want.values.tolist()
    summary = growth_summary(members, 5, 4)
    shown = texts(at.markdown)
    for n, shared, rho in summary.itertuples(index=False):
        assert f"{n} member{'s' if n > 1 else ''}: **{shared} / 4** of the final list, Spearman {rho:.2f}" in shown
    at.toggle(key="browse_diff").set_value(True).run()
    assert sum(c.startswith("test − #") for c in captions(at)) == 8  # one per proponent and opponent


def test_browser_computes_member_scores_in_the_background(app_store):
    at = open_page("browse", kind="proj-seeds", P=2, test_pos=3, browse_k=3)  # scores stored, members not
    assert not at.exception, at.exception
    at.button(key="browse_members").click().run()
    (job,) = [j for j in jobs.all_jobs(app_store) if j.title.startswith("Member scores")]
    assert jobs.wait(app_store, job.job_id, TIMEOUT).status == "done"
    at.run()
    assert not at.exception, at.exception
    assert "1 member: **" in texts(at.markdown) and "2 members: **3 / 3**" in texts(at.markdown)


def test_build_shows_the_ground_truth_ceiling_beside_the_lds(app_store):
    spec = EvalSpec(M=8, alpha=0.5, runs=2)
    ground_truth(get_task("digits-mlp"), spec, store=app_store)
    at = open_page("build", build_M=8, build_runs=2)
    assert not at.exception, at.exception
    metrics = {m.label: m.value for m in at.metric}
    want = run(get_task("digits-mlp"), TRAK, MAIN, spec, store=app_store, device="cpu")
    assert metrics["LDS"] == f"{want.lds:.3f} ± {want.lds_sem:.3f}"
    assert metrics["Ground-truth ceiling"] == f"{want.ceiling.ceiling:.3f}" != "nan"
    at = open_page("build")  # one run per subset: the ceiling is not measured, and the page says how to get it
    assert {m.label: m.value for m in at.metric}["Ground-truth ceiling"] == "unknown"
    assert "set R = 2 or more" in texts(at.caption)


def test_build_runs_in_the_background_and_can_be_cancelled(app_store):
    at = open_page("build", kind="naive", I=1, seed=31)  # nothing stored for this seed
    at.button(key="build_run").click().run()
    assert not at.exception, at.exception
    (job,) = [j for j in jobs.active_jobs(app_store) if "naive I=1" in j.title]
    cancel = next(b for b in at.button if b.key and b.key.startswith(f"cancel-{job.job_id}-main"))
    cancel.click().run()
    assert jobs.status(app_store, job.job_id).status == "cancelled"
    assert "was cancelled" in texts(at.info) and "Run" in [b.label for b in at.button]


def test_lds_cost_for_a_task_without_results_says_where_to_look(tiny_task):
    at = open_page("lds_cost", task="cifar2-mlp")
    assert not at.exception, at.exception
    assert "No results for cifar2-mlp yet, and no reference results are committed for it" in texts(at.info)
    assert "pick chorales-mt, digits-mlp, mnist-mlp, mnist-resnet9-cpu in the sidebar" in texts(at.info)


def test_browser_shows_feature_vectors_of_your_own_task(user_registries, tmp_path, monkeypatch):
    """A task registered with plain feature vectors (no picture, no sound) is browsed as rows of values."""
    from tda_core.examples import feature_preview
    from tda_core.user_tasks import load_user_tasks

    tasks_file = tmp_path / "my_tasks.py"
    tasks_file.write_text("from sklearn.datasets import load_digits\nfrom torch import nn\n"
                          "from tda_core import Recipe, register_task\n"
                          "x, y = load_digits(return_X_y=True)\n"
                          "register_task('digit-vectors', lambda: nn.Sequential(nn.Flatten(), nn.Linear(64, 32), "
                          "nn.ReLU(), nn.Dropout(0.1), nn.Linear(32, 10)), x[:300], y[:300], x[1500:1560], "
                          "y[1500:1560], Recipe(epochs=2, batch_size=64, lr=0.01))\n")
    store = Store(tmp_path / "store")
    monkeypatch.setenv("TDA_STORE", str(store.root))
    monkeypatch.setenv("TDA_TASKS_FILE", str(tasks_file))
    load_user_tasks()
    task = get_task("digit-vectors")
    attribute(task, TRAK, OTHER, store=store)
    dataset = load_dataset(task.dataset)
    assert dataset.kind == "features"
    preview = feature_preview(dataset, "train", [0, 7])
    assert list(preview["position"]) == [0, 7] and preview["values"].tolist() == ["64 in all"] * 2
    assert preview["x[3]"].tolist() == [float(dataset.x_train[0].flatten()[3]), float(dataset.x_train[7].flatten()[3])]

    at = open_page("browse", task="digit-vectors", kind="naive", I=1)
    assert not at.exception, at.exception
    test_pos = int(at.session_state["test_pos"]) if "test_pos" in at.session_state else 0
    top = attribute(task, TRAK, OTHER, store=store).scores[:, test_pos].argmax().item()
    shown = [d.value for d in at.dataframe if "x[0]" in d.value]
    assert shown[0]["position"].tolist() == [test_pos]  # the test example, then its proponents and opponents
    assert top in set(shown[1]["position"])
