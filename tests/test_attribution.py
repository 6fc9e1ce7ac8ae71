"""The public API and the `attribute` command: caching, costs, damping sweeps, budgets, sequences."""
from __future__ import annotations

import contextlib
import dataclasses
import json
import time

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from tda_core.attribution import FEATURE_KIND, SCORE_KIND, TEST_FEATURE_KIND, attribute, plan
from tda_core.cli import main
from tda_core.data import REGISTRY, Dataset, DatasetInfo, SourceStatus, load_dataset
from tda_core.errors import UserError
from tda_core.models import MODELS
from tda_core.objectives import IGNORE
from tda_core.specs import EnsembleSpec, MethodSpec, Recipe, TaskSpec
from tda_core.store import Store
from tda_core.tasks import TASKS, get_task

TINY = dataclasses.replace(get_task("digits-mlp"), recipe=Recipe(epochs=2, batch_size=64, lr=0.01))
POS = torch.arange(4)


def test_naive_trak_costs_indices_and_resume(store):
    method = MethodSpec("trak", "dense", proj_dim=128)
    result = attribute(TINY, method, EnsembleSpec("naive", I=2), store=store, device="cpu", test_positions=POS)
    ds = load_dataset("digits")
    assert result.scores.shape == (ds.n_train, 4) and result.scores.dtype == torch.float32
    assert torch.equal(result.train_index, ds.train_index) and torch.equal(result.test_index, ds.test_index[:4])
    assert result.members == ["model seed 0", "model seed 1"] and result.damping == 1.0
    c = result.costs
    assert c.n_trained == 2 and c.n_members == 2 and c.train_s > 0 and c.serve_s > 0 and not c.from_store
    assert {"grads_s", "project_s", "gen_s", "solve_s"} <= set(c.breakdown)
    features = store.keys(FEATURE_KIND)
    assert len(features) == 2
    assert c.space_bytes >= sum(store.load(FEATURE_KIND, k).nbytes for k in features)
    assert store.has(SCORE_KIND, result.key)

    again = attribute(TINY, method, EnsembleSpec("naive", I=2), store=store, device="cpu", test_positions=POS)
    assert again.costs.from_store and torch.equal(again.scores, result.scores)
    assert again.costs.serve_s == pytest.approx(c.serve_s)

    # other dampings: a new score matrix, but the training-set features come from the cache
    swept = attribute(TINY, method, EnsembleSpec("naive", I=2), store=store, device="cpu", test_positions=POS,
                      dampings=[0.1, 10.0])
    assert store.keys(FEATURE_KIND) == features and len(store.keys(TEST_FEATURE_KIND)) == 2  # test side cached too
    assert {"cached_train_features_s", "cached_test_features_s"} <= set(swept.costs.breakdown)
    assert set(swept.scores_by_damping) == {0.1, 1.0, 10.0}
    assert torch.allclose(swept.scores_by_damping[1.0], result.scores, atol=1e-6)
    assert swept.costs.serve_s >= swept.costs.serve_now_s * 0.5  # recorded train-side seconds are included
    single = attribute(TINY, dataclasses.replace(method, damping=10.0), EnsembleSpec("naive", I=2), store=store,
                       device="cpu", test_positions=POS)
    assert torch.allclose(single.scores, swept.scores_by_damping[10.0], atol=1e-6)


def test_store_seconds_of_features_are_counted_apart_from_their_computation(store, monkeypatch):
    """A slow store (every write 0.25 s longer) shows up in `store_s`, not in the computation's seconds."""
    method, ensemble = MethodSpec("trak", "kron", proj_dim=64), EnsembleSpec("naive", I=1)
    attribute(TINY, method, ensemble, store=store, device="cpu", test_positions=POS)  # the base model, trained
    fast = attribute(TINY, method, ensemble, store=store, device="cpu", test_positions=POS, dampings=[0.5])
    assert fast.costs.breakdown["store_s"] < 0.25  # features read back from the store
    real_save = Store.save

    def slow_save(self, kind, *args, **kwargs):
        if kind in (FEATURE_KIND, TEST_FEATURE_KIND):
            time.sleep(0.25)
        return real_save(self, kind, *args, **kwargs)

    monkeypatch.setattr(Store, "save", slow_save)
    slow = attribute(TINY, dataclasses.replace(method, seed=1), ensemble, store=store, device="cpu",
                     test_positions=POS)
    b = slow.costs.breakdown
    assert b["store_s"] >= 0.5  # training and test features: two slow writes
    assert b["grads_s"] + b["project_s"] < 0.25 and slow.costs.serve_s >= b["store_s"]


def test_members_sharing_a_dense_projection_generate_it_once(store, tmp_path, monkeypatch):
    method, ensemble = MethodSpec("trak", "dense", proj_dim=64), EnsembleSpec("dropout", I=1, D=2, shared_projection=True)
    shared = attribute(TINY, method, ensemble, store=store, device="cpu", test_positions=POS)
    generated = [store.load(FEATURE_KIND, key).meta["timings"]["gen_s"] > 0 for key in store.keys(FEATURE_KIND)]
    assert sorted(generated) == [False, True]  # the second member reused the first one's matrix
    monkeypatch.setattr("tda_core.attribution.reuse_dense_matrix", contextlib.nullcontext)
    alone = attribute(TINY, method, ensemble, store=Store(tmp_path / "alone"), device="cpu", test_positions=POS)
    assert torch.equal(shared.scores, alone.scores)


def test_plan_lists_work_and_refuses_what_does_not_fit(store, monkeypatch):
    wp = plan(TINY, MethodSpec("trak", "kron", proj_dim=256), EnsembleSpec("dropout", I=2, D=3), store)
    assert wp.models_to_train == [0, 1] and wp.models_stored == [] and len(wp.members) == 6 and wp.fits
    assert wp.feature_dim <= 256 and "6 member(s)" in wp.describe()
    monkeypatch.setenv("TDA_MEMORY_BUDGET_GB", "0.01")
    big = plan(TINY, MethodSpec("trak", "none"), EnsembleSpec(), store)
    assert not big.fits and "what would fit: --proj" in big.message
    with pytest.raises(UserError, match="memory budget"):
        attribute(TINY, MethodSpec("trak", "none"), EnsembleSpec(), store=store, device="cpu")


def test_grad_methods_and_if_run_through_the_api(store):
    for name in ("grad-dot", "grad-cos", "if"):
        r = attribute(TINY, MethodSpec(name, "kron", proj_dim=256), EnsembleSpec(), store=store, device="cpu",
                      test_positions=POS)
        assert torch.isfinite(r.scores).all() and r.scores.shape[1] == 4
        assert (r.damping is None) == (name != "if")
    cos = attribute(TINY, MethodSpec("grad-cos", "kron", proj_dim=256), EnsembleSpec(), store=store, device="cpu",
                    test_positions=POS)
    assert float(cos.scores.abs().max()) <= 1.0 + 1e-5


def test_if_fisher_is_reproducible_and_seeded(store, tmp_path):
    """The sampled labels behind IF's Fisher come from the method seed: same seed, same scores on a fresh store;
    another seed, other labels (and projection), other scores."""
    spec = MethodSpec("if", "kron", proj_dim=256)
    first = attribute(TINY, spec, EnsembleSpec(), store=store, device="cpu", test_positions=POS)
    again = attribute(TINY, spec, EnsembleSpec(), store=Store(tmp_path / "fresh"), device="cpu", test_positions=POS)
    assert torch.equal(first.scores, again.scores)
    other = attribute(TINY, dataclasses.replace(spec, seed=1), EnsembleSpec(), store=store, device="cpu",
                      test_positions=POS)
    assert not torch.allclose(first.scores, other.scores)


# --- a sequence task (Embedding + Linear, next-token targets with ignored positions) ------------
class ToySeqModel(nn.Module):
    dropout_layers = ()
    lora_targets = ("mix", "head")

    def __init__(self, vocab: int = 12, dim: int = 8) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.mix = nn.Linear(dim, dim)
        self.head = nn.Linear(dim, vocab)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.mix(self.emb(x))))


def _toy_sequences(root, download) -> Dataset:
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 12, (70, 9), generator=g)
    y = torch.roll(x, -1, dims=1)
    y[:, -1] = IGNORE
    return Dataset("toyseq", "sequence", x[:60], y[:60], x[60:], y[60:], torch.arange(60), torch.arange(60, 70),
                   (), "synthetic")


@pytest.fixture
def toy_sequence_task(monkeypatch):
    monkeypatch.setitem(MODELS, "toyseq", ToySeqModel)
    monkeypatch.setitem(REGISTRY, "toyseq", DatasetInfo("toyseq", "sequence", "synthetic tokens", _toy_sequences,
                                                        lambda root: SourceStatus("embedded", "test")))
    return TaskSpec("toyseq", "toyseq", "toyseq", (), Recipe(epochs=2, batch_size=16, lr=1e-2, optimizer="adam"),
                    sequence=True)


@pytest.mark.parametrize("proj", ["kron", "dense", "none"])
def test_sequence_task_through_every_projection(store, toy_sequence_task, proj):
    r = attribute(toy_sequence_task, MethodSpec("trak", proj, proj_dim=64), EnsembleSpec("lora", L=1, lora_rank=2,
                  lora_epochs=1), store=store, device="cpu")
    assert r.scores.shape == (60, 10) and torch.isfinite(r.scores).all()


def test_sequence_kron_grad_dot_approaches_exact(store, toy_sequence_task):
    """Kronecker JL inner products converge to the exact ones as k grows (relative error ~ k^-1/2)."""
    exact = attribute(toy_sequence_task, MethodSpec("grad-dot", "none"), EnsembleSpec(), store=store, device="cpu")
    errors = []
    for k in (256, 4096):
        kron = attribute(toy_sequence_task, MethodSpec("grad-dot", "kron", proj_dim=k), EnsembleSpec(),
                         store=store, device="cpu")
        errors.append(float((kron.scores - exact.scores).norm() / exact.scores.norm()))
    assert errors[1] < 0.2 and errors[1] < errors[0] / 2, errors


# --- the command line ---------------------------------------------------------------------------
@pytest.fixture
def tiny_cli_task(monkeypatch):
    monkeypatch.setitem(TASKS, "digits-mlp", TINY)


def test_cli_prints_costs_and_top5_and_saves_scores(tiny_cli_task, tmp_path, capsys):
    out = tmp_path / "scores.npz"
    assert main(["attribute", "--task", "digits-mlp", "--method", "trak", "--ensemble", "dropout", "--I", "1",
                 "--D", "2", "--proj", "kron", "--proj-dim", "256", "--n-test", "3", "--json",
                 "--save-scores", str(out), "--device", "cpu"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["n_members"] == 2 and summary["n_trained"] == 1 and summary["serve_s"] > 0
    assert len(summary["top"]) == 3 and len(summary["top"][0]["top_train_indices"]) == 5
    saved = np.load(out)
    ds = load_dataset("digits")
    assert saved["scores"].shape == (ds.n_train, 3)
    assert (saved["test_index"] == ds.test_index[:3].numpy()).all()
    best = int(np.argmax(saved["scores"][:, 0]))
    assert summary["top"][0]["top_train_indices"][0] == int(saved["train_index"][best])

    st = tmp_path / "scores.safetensors"
    assert main(["attribute", "--task", "digits-mlp", "--ensemble", "proj-seeds", "--P", "2", "--proj", "kron",
                 "--proj-dim", "256", "--n-test", "3", "--save-scores", str(st), "--device", "cpu"]) == 0
    assert "written to" in capsys.readouterr().out
    assert load_file(str(st))["train_index"].shape == (ds.n_train,)


def test_cli_errors_are_one_line(tiny_cli_task, capsys, monkeypatch):
    assert main(["attribute", "--task", "digits-mlp", "--save-scores", "x.csv", "--proj", "kron", "--n-test", "2",
                 "--device", "cpu"]) == 2
    assert ".npz or .safetensors" in capsys.readouterr().err
    monkeypatch.setenv("TDA_MEMORY_BUDGET_GB", "0.01")
    assert main(["attribute", "--task", "digits-mlp", "--proj", "none", "--device", "cpu"]) == 2
    assert "what would fit" in capsys.readouterr().err
    assert main(["attribute", "--task", "digits-mlp", "--I", "0"]) == 2
    assert main(["attribute", "--task", "digits-mlp", "--method", "trak", "--hessian", "exact"]) == 2
    capsys.readouterr()
    assert main(["attribute", "--task", "digits-mlp", "--method", "if", "--proj", "kron", "--hessian",
                 "gauss-newton"]) == 2
    err = capsys.readouterr().err
    assert "'gauss-newton'" in err and "--proj none" in err and "--hessian fisher" in err


# --- parameters the Kronecker projection cannot cover are named, in the features, the result and the CLI ---
class GainMLP(nn.Module):
    """An MLP with a layer type no Kronecker adapter covers (a learned per-feature gain)."""

    dropout_layers = ()
    lora_targets = ("fc", "head")

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(64, 16)
        self.gain = nn.Module()
        self.gain.scale = nn.Parameter(torch.ones(16))
        self.head = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.fc(x.flatten(1))) * self.gain.scale)


@pytest.fixture
def gain_task(monkeypatch):
    monkeypatch.setitem(MODELS, "gain-mlp", GainMLP)
    task = TaskSpec("digits-gain", "digits", "gain-mlp", (), Recipe(epochs=1, batch_size=64, lr=0.01))
    monkeypatch.setitem(TASKS, "digits-gain", task)
    return task


def test_uncovered_parameters_are_listed_in_features_result_and_cli(store, gain_task, capsys):
    kron = attribute(gain_task, MethodSpec("trak", "kron", proj_dim=64), EnsembleSpec(), store=store, device="cpu",
                     test_positions=POS)
    assert kron.uncovered == ["gain.scale"]
    (feature_key,) = store.keys(FEATURE_KIND)
    assert store.load(FEATURE_KIND, feature_key).meta["uncovered"] == ["gain.scale"]
    again = attribute(gain_task, MethodSpec("trak", "kron", proj_dim=64), EnsembleSpec(), store=store, device="cpu",
                      test_positions=POS)
    assert again.costs.from_store and again.uncovered == ["gain.scale"]
    dense = attribute(gain_task, MethodSpec("trak", "dense", proj_dim=64), EnsembleSpec(), store=store, device="cpu",
                      test_positions=POS)
    assert dense.uncovered == []
    assert main(["attribute", "--task", "digits-gain", "--proj", "kron", "--proj-dim", "64", "--n-test", "4",
                 "--json", "--device", "cpu", "--store", str(store.root)]) == 0
    assert json.loads(capsys.readouterr().out)["uncovered"] == ["gain.scale"]
