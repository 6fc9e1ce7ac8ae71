"""Experiments: damping tuned on a validation split, resumable sweeps, grids, the Pareto frontier, the CLI."""
from __future__ import annotations

import dataclasses
import json

import numpy as np
import pandas as pd
import pytest

from tda_core import experiments
from tda_core.cli import main
from tda_core.errors import UserError
from tda_core.evaluation import ground_truth, lds_against
from tda_core.experiments import DAMPING_GRID, grid_settings, run, sweep, sweep_settings, validation_split
from tda_core.results import lds_cost_figure, pareto
from tda_core.specs import EnsembleSpec, EvalSpec, MethodSpec
from tda_core.tasks import TASKS, get_task
from test_attribution import gain_task  # noqa: F401  (fixture: a model with a parameter no adapter covers)

EVAL = EvalSpec(M=8, seed=0)
KRON = MethodSpec("trak", proj="kron", proj_dim=256, damping=None)


@pytest.fixture
def tiny(monkeypatch):
    """digits-mlp with a 4-epoch recipe, registered as `digits-tiny` so the CLI finds it too."""
    task = get_task("digits-mlp")
    task = dataclasses.replace(task, name="digits-tiny", recipe=dataclasses.replace(task.recipe, epochs=4, lr=0.05))
    monkeypatch.setitem(TASKS, task.name, task)
    return task


def test_validation_split_is_seeded_disjoint_and_complete():
    val, rest = validation_split(500, seed=3)
    assert len(val) == 100 and len(rest) == 400
    assert not set(val) & set(rest) and set(val) | set(rest) == set(range(500))
    again, _ = validation_split(500, seed=3)
    other, _ = validation_split(500, seed=4)
    assert np.array_equal(val, again) and not np.array_equal(val, other)
    with pytest.raises(UserError, match="too few"):
        validation_split(1, seed=0)


def test_pareto_keeps_only_undominated_rows():
    df = pd.DataFrame({"train_s": [1, 2, 2, 3, 4, 5], "lds": [0.1, 0.3, 0.2, 0.25, 0.4, 0.4]})
    front = pareto(df, "train_s")
    assert front["train_s"].tolist() == [1, 2, 4] and front["lds"].tolist() == [0.1, 0.3, 0.4]
    with pytest.raises(UserError, match="cost column"):
        pareto(df, "nope")


def test_paper_grid_has_the_research_settings_and_the_controls():
    grid = grid_settings("paper")
    kinds = pd.DataFrame([dataclasses.asdict(e) for e in grid])
    naive = kinds[kinds.kind == "naive"]
    assert sorted(naive.I) == [1, 2, 5, 10]
    for kind in ("dropout", "dropout-forward"):
        part = kinds[(kinds.kind == kind) & ~kinds.shared_projection]
        assert sorted(zip(part.I, part.D)) == [(i, d) for i in (1, 2, 5) for d in (5, 10)]
    lora = kinds[(kinds.kind == "lora") & ~kinds.shared_projection]
    assert sorted(zip(lora.I, lora.L)) == [(1, 5), (2, 5)]
    seeds = kinds[kinds.kind == "proj-seeds"]
    assert set(seeds.P) == set(kinds[kinds.kind == "dropout"].D) | set(lora.L)
    shared = kinds[kinds.shared_projection]
    assert set(shared.kind) == {"dropout", "lora"} and len(shared) == 8
    pairs = sweep_settings(["trak", "grad-dot"], "paper", ("dense", "kron"))
    assert len(pairs) == 4 * len(grid)
    assert {m.proj for m, _ in pairs} == {"dense", "kron"}
    assert all(m.damping is None for m, _ in pairs)  # TRAK tunes c; Grad-Dot has none
    with pytest.raises(UserError, match="valid choices: chorales, paper, readme, resnet, small"):
        grid_settings("huge")


def test_resnet_grid_is_the_convolutional_ladder_with_its_controls():
    grid = {(e.kind, e.I, e.D, e.L, e.P) for e in grid_settings("resnet")}
    assert grid == {("naive", 1, 1, 1, 1), ("naive", 2, 1, 1, 1), ("naive", 5, 1, 1, 1),
                    ("dropout", 1, 5, 1, 1), ("dropout", 1, 10, 1, 1), ("dropout", 2, 5, 1, 1),
                    ("lora", 1, 1, 5, 1),
                    ("proj-seeds", 1, 1, 1, 5), ("proj-seeds", 1, 1, 1, 10), ("proj-seeds", 2, 1, 1, 5)}
    assert len(grid_settings("resnet")) == len(grid)
    assert not any(e.shared_projection for e in grid_settings("resnet"))


def test_run_tunes_damping_on_the_validation_split_and_scores_the_rest(tiny, store):
    truth = ground_truth(tiny, EVAL, store=store, device="cpu")
    result = run(tiny, KRON, EnsembleSpec("naive", I=1), EVAL, store=store, device="cpu")
    val, rest = validation_split(truth.values.shape[1], EVAL.seed)
    assert set(result.validation_lds) == set(DAMPING_GRID)
    assert result.damping_tuned and result.damping == max(result.validation_lds, key=result.validation_lds.get)
    assert result.validation_lds[result.damping] == pytest.approx(lds_against(result.scores[:, val], truth, val).mean)
    assert result.lds == pytest.approx(lds_against(result.scores[:, rest], truth, rest).mean)
    assert result.n_eval == len(rest) and 0.05 < result.lds < 1
    row = result.row()
    assert set(row) == set(experiments.ROW_COLUMNS)
    assert row["n_members"] == 1 and row["train_s"] > 0 and row["device"].startswith("cpu")
    assert result.provenance["seeds"]["base_models"] == [[0]] and "torch" in result.provenance["versions"]
    # a fixed c is used as given and scored on the same evaluation split
    fixed = run(tiny, dataclasses.replace(KRON, damping=result.damping), EnsembleSpec("naive", I=1), EVAL,
                store=store, device="cpu")
    assert not fixed.damping_tuned and fixed.validation_lds == {}
    assert fixed.lds == pytest.approx(result.lds, abs=1e-6)


def test_sweep_is_resumable_and_the_cli_reads_the_results(tiny, store, monkeypatch, capsys, tmp_path):
    frame = sweep(tiny, ["trak", "grad-dot"], "small", projections=("kron",), eval_spec=EVAL, store=store,
                  device="cpu")
    # every small-grid setting for both methods, except forward-only Dropout with Grad-Dot (it would be naive)
    assert len(frame) == 2 * len(grid_settings("small")) - 1
    assert not ((frame.method == "grad-dot") & (frame.ensemble == "dropout-forward")).any()
    assert frame["lds"].notna().all() and (frame.loc[frame.method == "trak", "damping"].isin(DAMPING_GRID)).all()
    assert len(store.read_table("results")) == len(frame)
    naive = frame[(frame.ensemble == "naive") & (frame.method == "trak")].set_index("I")
    assert naive.loc[2, "n_members"] == 2 and naive.loc[2, "train_s"] > naive.loc[1, "train_s"]
    # everything is in the table: a second sweep (here through the CLI, with a figure) runs nothing
    monkeypatch.setattr(experiments, "run", lambda *a, **k: pytest.fail("re-ran a finished setting"))
    plot = tmp_path / "lds.html"
    code = main(["sweep", "--task", "digits-tiny", "--methods", "trak,grad-dot", "--grid", "small", "--proj", "kron",
                 "--M", "8", "--device", "cpu", "--store", str(store.root), "--plot", str(plot), "--json"])
    out = capsys.readouterr()
    assert code == 0 and "13 already in the results table, 0 to run" in out.err
    assert len(json.loads(out.out)) == len(frame) and plot.read_text().count("Pareto frontier") >= 1
    assert len(store.read_table("results")) == len(frame)
    fig = lds_cost_figure(frame, "serve_s")
    assert len(fig.layout.annotations) == 2  # one panel per (method, projection)


def test_cli_run_prints_one_json_row(tiny, store, capsys):
    code = main(["run", "--task", "digits-tiny", "--method", "grad-dot", "--proj", "kron", "--proj-dim", "256",
                 "--M", "8", "--device", "cpu", "--store", str(store.root), "--json"])
    row = json.loads(capsys.readouterr().out)
    assert code == 0 and row["method"] == "grad-dot" and row["damping"] is None
    assert {"lds", "lds_sem", "train_s", "serve_s", "space_bytes", "provenance"} <= set(row)
    assert row["uncovered"] == []  # the MLP's Linear layers: every parameter covered by the Kronecker projection


def test_cli_run_lists_the_parameters_the_projection_left_out(gain_task, store, capsys):
    """`run --json` carries the names of the parameters no Kronecker adapter covers, as `attribute` does."""
    common = ["--task", gain_task.name, "--method", "trak", "--proj-dim", "64", "--M", "4",
              "--device", "cpu", "--store", str(store.root), "--json"]
    assert main(["run", *common, "--proj", "kron"]) == 0
    kron = json.loads(capsys.readouterr().out)
    assert main(["run", *common, "--proj", "dense"]) == 0
    dense = json.loads(capsys.readouterr().out)
    assert kron["uncovered"] == ["gain.scale"] and dense["uncovered"] == []
    assert np.isfinite(kron["lds"]) and "uncovered" not in experiments.ROW_COLUMNS


def test_cli_names_valid_choices(capsys):
    assert main(["sweep", "--task", "digits-mlp", "--methods", "trak,shapley", "--dry-run"]) == 2
    assert "unknown method shapley; valid choices: trak, if, grad-dot, grad-cos" in capsys.readouterr().err
    assert main(["run", "--task", "nope", "--M", "4"]) == 2
    assert "valid choices" in capsys.readouterr().err


def test_cli_results_filters_a_csv_into_markdown_and_a_figure(tmp_path, capsys):
    rows = [{"task": "t", "method": m, "proj": "kron", "ensemble": "naive", "I": i, "D": 1, "L": 1, "P": 1,
             "shared_projection": False, "lds": 0.1 * i, "lds_sem": 0.01, "damping": 1.0, "train_s": 2.0 * i,
             "serve_s": 0.5 * i, "space_bytes": 100 * i, "n_trained": i, "n_members": i, "device": "cpu",
             "setting_key": f"{m}{i}"} for m in ("trak", "grad-dot") for i in (1, 2)]
    csv, md, html = tmp_path / "r.csv", tmp_path / "r.md", tmp_path / "r.html"
    pd.DataFrame(rows).to_csv(csv, index=False)
    assert main(["results", "--csv", str(csv), "--methods", "trak", "--markdown", str(md), "--plot", str(html),
                 "--x", "n_trained"]) == 0
    table = md.read_text().splitlines()
    assert table[0].startswith("| method | proj | ensemble") and len(table) == 4 and "grad-dot" not in md.read_text()
    assert "Pareto frontier" in html.read_text()
    assert main(["results", "--csv", str(csv), "--methods", "if"]) == 2
    assert "no results match" in capsys.readouterr().err
