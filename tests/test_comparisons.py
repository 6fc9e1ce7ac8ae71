"""Honest comparisons: paired bootstrap intervals, seed replicates, the ground-truth ceiling, refused settings."""
from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from torch import nn

from tda_core.attribution import attribute
from tda_core.cli import main
from tda_core.comparison import paired_bootstrap
from tda_core.data import REGISTRY, Dataset, DatasetInfo, SourceStatus
from tda_core.errors import UserError
from tda_core.evaluation import GroundTruth, ground_truth, ground_truth_ceiling
from tda_core.experiments import compare_stored, replicate_specs, run
from tda_core.models import MODELS
from tda_core.models.dropout import MaskableDropout
from tda_core.objectives import IGNORE
from tda_core.settings import parse_setting
from tda_core.specs import EnsembleSpec, EvalSpec, MethodSpec, Recipe, TaskSpec
from tda_core.tasks import TASKS, get_task
from tda_core.training import CHECKPOINT_KIND

EVAL = EvalSpec(M=8, seed=0)
KRON = MethodSpec("trak", proj="kron", proj_dim=128, damping=None)


@pytest.fixture
def tiny(monkeypatch):
    task = get_task("digits-mlp")
    task = dataclasses.replace(task, name="digits-tiny", recipe=dataclasses.replace(task.recipe, epochs=3, lr=0.05))
    monkeypatch.setitem(TASKS, task.name, task)
    return task


# --- the paired bootstrap --------------------------------------------------------------------------------
def test_bootstrap_interval_covers_a_known_difference_and_excludes_zero():
    rng = np.random.default_rng(0)
    difficulty = rng.normal(0.3, 0.2, 400)  # shared by both settings: pairing removes it
    a = difficulty + 0.03 + rng.normal(0, 0.02, 400)
    b = difficulty + rng.normal(0, 0.02, 400)
    cmp = paired_bootstrap(a, b, resamples=5000, seed=1)
    assert cmp.low < 0.03 < cmp.high and cmp.low > 0 and cmp.verdict == "A better"
    assert cmp.high - cmp.low < 0.01  # paired: far narrower than the spread of difficulty
    flipped = paired_bootstrap(b, a, resamples=5000, seed=1)
    assert flipped.verdict == "B better" and flipped.difference == pytest.approx(-cmp.difference)
    again = paired_bootstrap(a, b, resamples=5000, seed=1)
    assert (again.low, again.high) == (cmp.low, cmp.high)  # seeded


def test_bootstrap_of_identical_settings_is_centred_on_zero():
    rng = np.random.default_rng(3)
    a = rng.normal(0.3, 0.2, 300)
    same = paired_bootstrap(a, a.copy(), resamples=2000)
    assert same.difference == 0.0 and same.low <= 0.0 <= same.high
    assert same.verdict == "not distinguishable at 95%"
    noisy = paired_bootstrap(a + rng.normal(0, 0.05, 300), a + rng.normal(0, 0.05, 300), resamples=2000)
    assert noisy.low < 0 < noisy.high


def test_bootstrap_resamples_replicates_too():
    rng = np.random.default_rng(5)
    base = rng.normal(0.3, 0.1, 200)
    # A's replicates disagree by a shared offset per replicate: the interval must widen with them
    a = np.stack([base + 0.02 + offset for offset in (-0.03, 0.0, 0.03)])
    b = np.stack([base.copy()] * 3)
    wide = paired_bootstrap(a, b, resamples=3000)
    narrow = paired_bootstrap(a.mean(0), b.mean(0), resamples=3000)
    assert (wide.high - wide.low) > 3 * (narrow.high - narrow.low)
    with pytest.raises(UserError, match="different test examples"):
        paired_bootstrap(a, b[:, :100])


# --- the ground truth's ceiling --------------------------------------------------------------------------
def test_ceiling_is_one_for_identical_runs_and_below_one_for_independent_runs(tiny, store):
    truth = ground_truth(tiny, dataclasses.replace(EVAL, runs=2), store=store, device="cpu")
    independent = ground_truth_ceiling(truth)
    assert independent.runs == 2 and 0 < independent.mean_reliability < 1 and independent.ceiling < 1
    copied = truth.targets.clone()
    copied[:, 1] = copied[:, 0]  # two runs with identical seeds give identical targets
    identical = ground_truth_ceiling(GroundTruth(truth.task, truth.spec, truth.subsets, copied, truth.key, {}))
    assert identical.mean_reliability == pytest.approx(1.0) and identical.ceiling == pytest.approx(1.0)
    single = ground_truth_ceiling(GroundTruth(truth.task, truth.spec, truth.subsets, copied[:, :1], truth.key, {}))
    assert np.isnan(single.ceiling)


# --- seed replicates -------------------------------------------------------------------------------------
def test_replicates_train_new_models_and_report_their_spread(tiny, store):
    one = run(tiny, KRON, EnsembleSpec("naive", I=2), EVAL, store=store, device="cpu")
    assert one.replicates == 1 and np.isnan(one.lds_rep_se)
    before = set(store.keys(CHECKPOINT_KIND))
    two = run(tiny, KRON, EnsembleSpec("naive", I=2), EVAL, store=store, device="cpu", replicates=2)
    assert len(set(store.keys(CHECKPOINT_KIND)) - before) == 2  # replicate 1: two new base models
    assert two.provenance["seeds"]["base_models"] == [[0, 1], [1000, 1001]]
    assert two.per_example.shape == (2, two.n_eval) and np.isfinite(two.lds_rep_se) and two.lds_rep_se > 0
    assert np.allclose(two.per_example[0], one.per_example[0])  # replicate 0 is the setting itself
    assert two.setting_key != one.setting_key and two.row()["replicates"] == 2
    method_1, ensemble_1 = replicate_specs(KRON, EnsembleSpec("naive", I=2), 1)
    assert (method_1.seed, ensemble_1.seed) == (1, 1000)
    cmp = compare_stored(store, two.setting_key, one.setting_key, resamples=500)
    assert cmp.n == two.n_eval and cmp.low <= cmp.difference <= cmp.high


def test_cli_compare_prints_the_difference_interval_and_verdict(tiny, store, capsys):
    code = main(["compare", "--task", "digits-tiny", "kind=naive,I=2", "kind=naive,I=1", "--M", "8", "--proj-dim",
                 "128", "--resamples", "500", "--device", "cpu", "--store", str(store.root), "--json"])
    row = json.loads(capsys.readouterr().out)
    assert code == 0 and row["low"] <= row["difference"] <= row["high"] and row["n"] > 0
    assert row["verdict"] in ("A better", "B better", "not distinguishable at 95%")
    assert "naive I=2" in row["label_a"] and "naive I=1" in row["label_b"]
    assert main(["compare", "--task", "digits-tiny", "kind=naive,bogus=1", "kind=naive", "--device", "cpu"]) == 2
    assert "unknown setting key 'bogus'" in capsys.readouterr().err


def test_parse_setting_reads_method_and_ensemble_keys():
    method, ensemble = parse_setting("method=grad-dot,proj=dense,kind=dropout,I=2,D=5,shared_projection=true")
    assert (method.name, method.proj, method.damping) == ("grad-dot", "dense", None)
    assert (ensemble.kind, ensemble.I, ensemble.D, ensemble.shared_projection) == ("dropout", 2, 5, True)
    with pytest.raises(UserError, match="expected int"):
        parse_setting("I=two")


# --- forward-only Dropout where it would be the naive member -------------------------------------------------
class DropSeq(nn.Module):
    """Embedding + dropout + Linear over tokens: a sequence model with a dropout layer."""

    dropout_layers = ("drop",)
    lora_targets = ("head",)

    def __init__(self, vocab: int = 12, dim: int = 8) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.drop = MaskableDropout(0.3)
        self.head = nn.Linear(dim, vocab)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.drop(torch.relu(self.emb(x))))


def _tokens(root, download) -> Dataset:  # noqa: ANN001
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 12, (50, 7), generator=g)
    y = torch.roll(x, -1, dims=1)
    y[:, -1] = IGNORE
    return Dataset("dropseq", "sequence", x[:40], y[:40], x[40:], y[40:], torch.arange(40), torch.arange(40, 50), (),
                   "synthetic")


@pytest.fixture
def sequence_task(monkeypatch):
    monkeypatch.setitem(MODELS, "dropseq", DropSeq)
    monkeypatch.setitem(REGISTRY, "dropseq", DatasetInfo("dropseq", "sequence", "synthetic", _tokens,
                                                         lambda root: SourceStatus("embedded", "test")))
    task = TaskSpec("dropseq", "dropseq", "dropseq", (), Recipe(epochs=2, batch_size=8, lr=1e-2, optimizer="adam"),
                    sequence=True)
    monkeypatch.setitem(TASKS, task.name, task)
    return task


def test_forward_only_dropout_is_refused_where_it_equals_naive(sequence_task, tiny, store, capsys):
    forward = EnsembleSpec("dropout-forward", D=3)
    with pytest.raises(UserError, match="exactly the naive member"):
        attribute(sequence_task, MethodSpec("trak", "kron", proj_dim=32), forward, store=store, device="cpu")
    with pytest.raises(UserError, match="grad-dot"):
        attribute(tiny, MethodSpec("grad-dot", "kron", proj_dim=32), forward, store=store, device="cpu")
    assert main(["run", "--task", "dropseq", "--ensemble", "dropout-forward", "--D", "3", "--M", "4",
                 "--device", "cpu", "--store", str(store.root)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: dropout-forward would compute exactly the naive member") and err.count("\n") == 1
    # the gradient of the mask-averaged target is a real definition there: it differs from the naive member
    mean = attribute(sequence_task, MethodSpec("grad-dot", "kron", proj_dim=32),
                     dataclasses.replace(forward, forward_grad="mask-mean"), store=store, device="cpu")
    naive = attribute(sequence_task, MethodSpec("grad-dot", "kron", proj_dim=32), EnsembleSpec(), store=store,
                      device="cpu")
    assert not torch.allclose(mean.scores, naive.scores, atol=1e-4)
