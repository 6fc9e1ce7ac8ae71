"""Evaluation: LDS against reference computations, subset ground truth (resumable), counterfactual check."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import scipy.stats
import torch

from tda_core import evaluation
from tda_core.data import load_dataset
from tda_core.errors import UserError
from tda_core.evaluation import (columnwise_spearman, counterfactual, datamodel_predictions, draw_subset, draw_subsets,
                                 ground_truth, lds, run_seed, target_values)
from tda_core.specs import EvalSpec
from tda_core.tasks import get_task
from tda_core.training import train


def tiny_digits(epochs: int = 3):
    task = get_task("digits-mlp")
    return dataclasses.replace(task, recipe=dataclasses.replace(task.recipe, epochs=epochs, lr=0.05))


# --- LDS ------------------------------------------------------------------------------------------
def test_lds_small_case_by_hand():
    scores = np.array([[1.0, 1.0], [2.0, 2.0], [3.0, 3.0], [4.0, 4.0]])  # 4 train x 2 test
    subsets = np.array([[0, 1], [2, 3], [0, 3]])  # predictions 3, 7, 5 -> ranks 1, 3, 2
    values = np.array([[0.1, 0.3], [0.2, 0.2], [0.3, 0.1]])  # ranks 1, 2, 3 and 3, 2, 1
    assert datamodel_predictions(scores, subsets)[:, 0].tolist() == [3.0, 7.0, 5.0]
    result = lds(scores, subsets, values)
    # rho = 1 - 6 sum d^2 / (n (n^2 - 1)) with d = (0, 1, -1): 1 - 12 / 24 = 0.5; the reversed column -0.5
    assert result.per_example == pytest.approx([0.5, -0.5])
    assert result.mean == pytest.approx(0.0)
    assert result.sem == pytest.approx(np.std([0.5, -0.5], ddof=1) / np.sqrt(2))


def test_columnwise_spearman_matches_scipy_with_ties():
    rng = np.random.default_rng(0)
    a, b = rng.integers(0, 5, (30, 7)).astype(float), rng.normal(size=(30, 7))
    ours = columnwise_spearman(a, b)
    for z in range(7):
        assert ours[z] == pytest.approx(scipy.stats.spearmanr(a[:, z], b[:, z]).statistic)


def test_perfect_linear_datamodel_scores_one():
    rng = np.random.default_rng(1)
    n, m, M = 60, 25, 40
    weights = rng.normal(size=(n, m))
    subsets = draw_subsets(n, EvalSpec(M=M, alpha=0.5, seed=3))
    values = datamodel_predictions(weights, subsets)
    assert lds(weights, subsets, values).mean == pytest.approx(1.0)
    # Spearman: any increasing transform of the targets keeps LDS at 1
    assert lds(weights, subsets, np.exp(values / 10)).mean == pytest.approx(1.0)


def test_random_scores_score_about_zero_and_shuffled_truth_drops_lds():
    rng = np.random.default_rng(2)
    n, m, M = 200, 300, 50
    weights = rng.normal(size=(n, m))
    subsets = draw_subsets(n, EvalSpec(M=M, seed=4))
    values = datamodel_predictions(weights, subsets) + rng.normal(scale=3.0, size=(M, m))
    good = lds(weights + rng.normal(scale=0.5, size=(n, m)), subsets, values)
    random = lds(rng.normal(size=(n, m)), subsets, values)
    shuffled = lds(weights, subsets, values[rng.permutation(M)])
    assert good.mean > 0.6
    assert abs(random.mean) < 0.05 and abs(random.mean) < 4 * random.sem
    assert abs(shuffled.mean) < 0.15 and shuffled.mean < good.mean - 0.5


def test_constant_predictions_are_left_out_of_the_mean():
    scores = np.zeros((4, 2))
    scores[:, 1] = [1, 2, 3, 4]
    result = lds(scores, np.array([[0, 1], [2, 3], [0, 3]]), np.array([[0.1, 0.1], [0.3, 0.3], [0.2, 0.2]]))
    assert np.isnan(result.per_example[0]) and result.n == 1
    assert result.mean == pytest.approx(1.0)


def test_lds_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="test examples"):
        lds(np.zeros((4, 3)), np.array([[0, 1]]), np.zeros((1, 2)))


# --- subsets --------------------------------------------------------------------------------------
def test_subsets_are_seeded_sorted_distinct_and_independent_of_m():
    spec = EvalSpec(M=5, alpha=0.3, seed=7)
    subs = draw_subsets(100, spec)
    assert subs.shape == (5, 30)
    assert all(len(set(s)) == 30 and list(s) == sorted(s) for s in subs)
    assert np.array_equal(subs, draw_subsets(100, spec))
    assert np.array_equal(subs[:5], draw_subsets(100, dataclasses.replace(spec, M=9))[:5])
    assert not np.array_equal(draw_subset(100, spec, 0), draw_subset(100, dataclasses.replace(spec, seed=8), 0))
    assert len({run_seed(spec, j, r) for j in range(5) for r in range(3)}) == 15


# --- ground truth ---------------------------------------------------------------------------------
def test_ground_truth_matches_train_and_resumes_after_interruption(store, monkeypatch):
    task, ds = tiny_digits(), load_dataset("digits")
    spec = EvalSpec(M=3, runs=2, seed=1)
    trained: list[int] = []
    real_train_many = evaluation.train_many

    def counting_train_many(task_, dataset, seeds, subsets, device, progress):
        trained.extend(seeds)
        return real_train_many(task_, dataset, seeds, subsets, device, progress)

    monkeypatch.setattr(evaluation, "train_many", counting_train_many)

    def stop_after_first_chunk(done, total, label):
        if label == "ground-truth models" and done >= 4:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        ground_truth(task, spec, store=store, device="cpu", chunk=4, progress=stop_after_first_chunk)
    assert len(trained) == 4
    truth = ground_truth(task, spec, store=store, device="cpu", chunk=4)
    assert len(trained) == 6  # only the 2 missing models were trained on resume
    assert truth.meta["resumed_models"] == 4
    assert truth.subsets.shape == (3, 750) and truth.targets.shape == (3, 2, ds.n_test)
    assert torch.equal(truth.values, truth.targets.mean(1))
    # the stored targets are those of the subset model trained alone with the same seed and subset
    j, r = 2, 1
    model = train(task, ds, run_seed(spec, j, r), truth.subsets[j].numpy(), "cpu")
    torch.testing.assert_close(truth.targets[j, r], target_values(model, ds, False), atol=1e-4, rtol=1e-4)
    # a finished ground truth is read back, nothing retrained
    again = ground_truth(task, spec, store=store, device="cpu")
    assert len(trained) == 6 and torch.equal(again.targets, truth.targets)


def test_ground_truth_rejects_bad_chunk(store):
    with pytest.raises(UserError, match="chunk"):
        ground_truth(tiny_digits(), EvalSpec(M=2), store=store, device="cpu", chunk=0)


# --- counterfactual -------------------------------------------------------------------------------
def test_removing_the_test_examples_class_hurts_more_than_random(store, monkeypatch):
    task, ds = tiny_digits(epochs=6), load_dataset("digits")
    z = 0
    label = int(ds.y_test[z])
    # proponents: every training example of its class (ties broken by a little noise)
    scores = (ds.y_train == label).float() + 1e-3 * torch.rand(ds.n_train, generator=torch.Generator().manual_seed(0))
    k = int((ds.y_train == label).sum()) - 5
    cf = counterfactual(task, scores, z, k, seeds=[0], n_random=3, seed=0, store=store, device="cpu")
    assert set(ds.y_train[cf.removed].tolist()) == {label}
    assert len(cf.random_changes) == 3
    assert cf.top_change < cf.random_mean - 1.0
    assert cf.fraction_random_below == 0.0
    assert cf.row()["k"] == k and cf.row()["random_draws"] == 3
    # stored: asking again reads it back without training
    monkeypatch.setattr(evaluation, "load_or_train", lambda *a, **kw: pytest.fail("retrained a stored result"))
    again = counterfactual(task, scores, z, k, seeds=[0], n_random=3, seed=0, store=store, device="cpu")
    assert again.key == cf.key and again.top_change == cf.top_change
    assert np.array_equal(again.random_changes, cf.random_changes)


def test_counterfactual_rejects_bad_k(store):
    with pytest.raises(UserError, match="k must be"):
        counterfactual(tiny_digits(), torch.zeros(1500), 0, 0, store=store, device="cpu")
