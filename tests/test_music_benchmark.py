"""The chorales benchmark: whole pieces held out, the ladder grid, damping grids on the command line, what LoRA
fine-tunes do to the test loss, the per-epoch hook the model selection uses."""
from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd
import pytest
import torch

from benchmarks.bench_music_model import fit_validation_corpus
from tda_core.cli import main
from tda_core.data import load_dataset
from tda_core.data import music
from tda_core.ensembles import ENSEMBLES, adapter_seed, lora_test_losses
from tda_core.errors import UserError
from tda_core.experiments import CHORALES_LORA_EPOCHS, DAMPING_GRID, GRIDS, grid_settings, setting_key
from tda_core.lora import load_or_finetune_lora
from tda_core.report import baselines
from tda_core.specs import EnsembleSpec, EvalSpec, MethodSpec, Recipe
from tda_core.tasks import TASKS, get_task
from tda_core.training import evaluate, load_or_train, train

TINY = dataclasses.replace(get_task("digits-mlp"), name="digits-tiny",
                           recipe=Recipe(epochs=2, batch_size=64, lr=0.05))


@pytest.fixture
def tiny(monkeypatch):
    monkeypatch.setitem(TASKS, TINY.name, TINY)
    return TINY


# --- the split: whole pieces held out ------------------------------------------------------------------------
def test_chorale_splits_hold_out_a_seeded_fraction_of_pieces():
    splits = music.chorale_splits(413)
    assert splits.count("test") == round(music.CHORALE_TEST_FRACTION * 413) == 124
    assert splits == music.chorale_splits(413)  # seeded
    assert music.chorale_splits(4).count("test") == 1 and music.chorale_splits(1) == ("train",)


def test_held_out_pieces_never_appear_in_training_windows(store):
    corpus = music.convert_chorales(store, limit=10)
    assert corpus.splits == music.chorale_splits(10)  # decided on load, not by the cached conversion
    dataset, table = music.music_dataset("chorales", corpus, "test")
    train_files = set(table.set_index("source_index").loc[dataset.train_index.numpy(), "file"])
    test_files = set(table.set_index("source_index").loc[dataset.test_index.numpy(), "file"])
    assert train_files and test_files and not train_files & test_files
    assert test_files == {n for n, s in zip(corpus.names, corpus.splits) if s == "test"}
    # every window of a held-out piece is a test window
    assert dataset.n_test == int((table["split"] == "test").sum())
    # the model selection's validation pieces come from the training pieces only
    fit, _ = music.music_dataset("fit", fit_validation_corpus(corpus, 0.25), "fit")
    fit_files = set(table.set_index("source_index").loc[np.r_[fit.train_index, fit.test_index], "file"])
    assert fit_files <= train_files and fit.n_train + fit.n_test == dataset.n_train and fit.n_test > 0


# --- the ladder grid and damping grids -----------------------------------------------------------------------
def test_chorales_grid_holds_every_baseline_its_report_compares_with():
    grid = grid_settings("chorales")
    assert len(grid) == len(set(grid)) == 11
    assert {(e.kind, e.I, e.D, e.L, e.P) for e in grid} >= {("naive", i, 1, 1, 1) for i in (1, 2, 5, 10)}
    assert {(e.I, e.D) for e in grid if e.kind == "dropout"} == {(1, 5), (1, 10), (2, 5)}
    lora = [e for e in grid if e.kind == "lora"]
    assert [(e.I, e.L, e.lora_epochs) for e in lora] == [(1, 5, CHORALES_LORA_EPOCHS)]
    for ensemble in grid:
        missing = [name for name, base in baselines(MethodSpec("trak"), ensemble).items() if base not in grid]
        assert not missing, f"{ensemble}: its {missing} baseline is not in the grid"


def test_damping_grid_reaches_the_report_and_its_setting_keys(tiny, store, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(GRIDS, "tiny", lambda: [EnsembleSpec("naive"), EnsembleSpec("proj-seeds", P=2)])
    out = tmp_path / "tiny_report"
    code = main(["report", "--task", tiny.name, "--grid", "tiny", "--methods", "trak,grad-dot", "--M", "6",
                 "--proj-dim", "64", "--damping-grid", "1e4,1000", "--out", str(out), "--device", "cpu",
                 "--store", str(store.root)])
    assert code == 0
    rows = pd.read_csv(out.with_suffix(".csv"))
    trak = rows[rows["method"] == "trak"]
    assert set(trak["damping"]) <= {1000.0, 10000.0} and trak["damping_tuned"].all()
    method = MethodSpec("trak", proj="kron", proj_dim=64, damping=None)
    ensemble, spec, cpu = EnsembleSpec("naive"), EvalSpec(M=6), torch.device("cpu")
    key = setting_key(tiny, method, ensemble, spec, cpu, (1000.0, 10000.0))
    assert key in set(trak["setting_key"]) and key != setting_key(tiny, method, ensemble, spec, cpu, DAMPING_GRID)
    text = out.with_suffix(".md").read_text()
    assert "over {1000, 10000}: tuned c at an end of the grid for trak (kron)" in text  # two values: both ends
    assert "| c |" in text
    paired = pd.read_csv(out.with_name("tiny_report_paired.csv"))
    assert len(paired) == 2 and (paired["versus"] == "naive I=1").all()  # proj-seeds P=2 vs naive, per method
    with pytest.raises(SystemExit) as exit_:
        main(["run", "--task", tiny.name, "--damping-grid", "0,1", "--device", "cpu"])
    assert exit_.value.code == 2
    assert "damping values must be positive" in capsys.readouterr().err


# --- LoRA members' test loss ---------------------------------------------------------------------------------
def test_lora_test_losses_of_untuned_adapters_equal_the_base_model(tiny, store):
    losses = lora_test_losses(tiny, EnsembleSpec("lora", I=2, L=2, lora_rank=4, lora_epochs=0), store=store,
                              device="cpu")
    assert len(losses) == 2 * 3 and list(losses["adapter"]) == [-1, 0, 1] * 2
    for _, group in losses.groupby("base_seed"):
        assert np.allclose(group["test_loss"], group["test_loss"].iloc[0], rtol=1e-6)  # B = 0: the base model


def test_lora_test_losses_are_those_of_the_stored_members(tiny, store):
    ensemble = EnsembleSpec("lora", I=1, L=2, lora_rank=4, lora_epochs=2, lora_lr=1e-2)
    losses = lora_test_losses(tiny, ensemble, store=store, device="cpu")
    dataset = load_dataset(tiny.dataset)
    (base,) = load_or_train(tiny, [0], store=store, device="cpu", dataset=dataset)
    assert losses["test_loss"].iloc[0] == pytest.approx(evaluate(base.model, dataset.x_test, dataset.y_test,
                                                                 False)["loss"])
    for li in range(2):
        member, *_, loaded = load_or_finetune_lora(tiny, ensemble, base, dataset, store, torch.device("cpu"),
                                                   adapter_seed(ensemble, 0, li))
        assert loaded  # the adapter lora_test_losses fine-tuned is the one attribution reads
        expected = evaluate(member, dataset.x_test, dataset.y_test, False)["loss"]
        assert losses["test_loss"].iloc[li + 1] == pytest.approx(expected)
        assert abs(expected - losses["test_loss"].iloc[0]) > 1e-4  # the fine-tune moved the model
    assert "lora" in ENSEMBLES.names()
    with pytest.raises(UserError, match="needs a LoRA ensemble"):
        lora_test_losses(tiny, EnsembleSpec("naive"), store=store, device="cpu")


# --- the per-epoch hook of the model selection ---------------------------------------------------------------
def test_on_epoch_sees_every_epoch_in_eval_mode_and_leaves_training_unchanged(tiny):
    dataset = load_dataset(tiny.dataset)
    seen = []
    hooked = train(tiny, dataset, seed=3, device="cpu",
                   on_epoch=lambda done, model: seen.append((done, model.training,
                                                             evaluate(model, dataset.x_test, dataset.y_test,
                                                                      False)["loss"])))
    plain = train(tiny, dataset, seed=3, device="cpu")
    assert [(d, t) for d, t, _ in seen] == [(1, False), (2, False)]
    assert seen[1][2] == pytest.approx(evaluate(plain, dataset.x_test, dataset.y_test, False)["loss"])
    for (name, a), b in zip(hooked.named_parameters(), plain.parameters()):
        assert torch.equal(a, b), name
