"""Ensemble members: identities with the base model, masks, LoRA adapters in the store, controls."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from tda_core.attribution import attribute
from tda_core.data import load_dataset
from tda_core.ensembles import build_members
from tda_core.lora import ADAPTER_KIND
from tda_core.specs import EnsembleSpec, MethodSpec, Recipe
from tda_core.store import Store
from tda_core.tasks import get_task
from tda_core.training import load_or_train

TINY = dataclasses.replace(get_task("digits-mlp"), recipe=Recipe(epochs=2, batch_size=64, lr=0.01))
KRON = MethodSpec("trak", "kron", proj_dim=256)
DENSE = MethodSpec("trak", "dense", proj_dim=256)
POS = torch.arange(5)


@pytest.fixture(scope="module")
def shared_store(tmp_path_factory) -> Store:
    return Store(tmp_path_factory.mktemp("ensembles_store"))


def _scores(store, method, ensemble, **kw):
    return attribute(TINY, method, ensemble, store=store, device="cpu", test_positions=POS, **kw)


def test_dropout_member_with_p0_equals_base_model(shared_store):
    naive = _scores(shared_store, KRON, EnsembleSpec("naive"))
    member = _scores(shared_store, KRON, EnsembleSpec("dropout", D=1, dropout_p=0.0))
    assert torch.allclose(member.scores, naive.scores, atol=1e-6, rtol=1e-5)
    masked = _scores(shared_store, KRON, EnsembleSpec("dropout", D=1))
    assert not torch.allclose(masked.scores, naive.scores, atol=1e-4)


def test_shared_projection_dropout_members_with_p0_equal_base_member_exactly(shared_store):
    naive = _scores(shared_store, DENSE, EnsembleSpec("naive"))
    shared = _scores(shared_store, DENSE, EnsembleSpec("dropout", D=3, dropout_p=0.0, shared_projection=True))
    assert torch.allclose(shared.scores, naive.scores, atol=1e-6, rtol=1e-5)
    own = _scores(shared_store, DENSE, EnsembleSpec("dropout", D=3, dropout_p=0.0))  # own projection per member
    assert not torch.allclose(own.scores, naive.scores, atol=1e-4)
    assert shared.members == ["model seed 0, mask seed 0", "model seed 0, mask seed 1", "model seed 0, mask seed 2"]


def test_dropout_forward_d1_p0_equals_naive(shared_store):
    naive = _scores(shared_store, DENSE, EnsembleSpec("naive", I=2))
    forward = _scores(shared_store, DENSE, EnsembleSpec("dropout-forward", I=2, D=1, dropout_p=0.0))
    assert torch.allclose(forward.scores, naive.scores, atol=1e-6, rtol=1e-5)
    averaged = _scores(shared_store, DENSE, EnsembleSpec("dropout-forward", I=2, D=4))
    assert not torch.allclose(averaged.scores, naive.scores, atol=1e-5)
    assert averaged.costs.n_members == 2 and averaged.costs.breakdown["q_s"] > 0


def test_proj_seeds_p1_equals_naive_and_more_seeds_differ(shared_store):
    naive = _scores(shared_store, DENSE, EnsembleSpec("naive", I=2))
    control = _scores(shared_store, DENSE, EnsembleSpec("proj-seeds", I=2, P=1))
    assert torch.equal(control.scores, naive.scores)
    three = _scores(shared_store, DENSE, EnsembleSpec("proj-seeds", I=1, P=3))
    assert three.costs.n_members == 3 and three.costs.n_trained == 1
    assert three.members[2] == "model seed 0, projection 2"


def test_lora_member_before_fine_tuning_equals_base_model(shared_store):
    naive = _scores(shared_store, DENSE, EnsembleSpec("naive"))
    lora = _scores(shared_store, DENSE, EnsembleSpec("lora", L=1, lora_epochs=0))
    assert torch.allclose(lora.scores, naive.scores, atol=1e-6, rtol=1e-5)


def test_lora_adapters_are_stored_not_merged_and_reused(shared_store):
    spec = EnsembleSpec("lora", L=2, lora_rank=4, lora_epochs=1)
    first = _scores(shared_store, KRON, spec)
    adapters = shared_store.keys(ADAPTER_KIND)
    assert len(adapters) >= 2
    art = shared_store.load(ADAPTER_KIND, adapters[0])
    assert all("lora_" in name for name in art.tensors)
    checkpoint = load_or_train(TINY, [0], store=shared_store, device="cpu")[0]
    assert art.nbytes < checkpoint.nbytes / 2
    assert first.costs.breakdown["finetune_s"] > 0 and first.costs.train_s > checkpoint.train_s
    again = _scores(shared_store, KRON, spec, dampings=[0.5])  # new score key, adapters and features from store
    assert torch.allclose(again.scores_by_damping[1.0], first.scores, atol=1e-6)
    assert sorted(shared_store.keys(ADAPTER_KIND)) == sorted(adapters)


def test_lora_adapter_only_gradients_cover_adapter_weights(shared_store):
    spec = EnsembleSpec("lora", L=1, lora_rank=4, lora_epochs=1, lora_grad="adapter")
    task_ds = load_dataset(TINY.dataset)
    bases = load_or_train(TINY, [0], store=shared_store, device="cpu")
    member = next(build_members(TINY, spec, MethodSpec("trak", "none"), bases, task_ds, shared_store,
                                torch.device("cpu"), POS))
    # fc1 64->128, fc2 128->64, fc3 64->10 at rank 4: A (4 x in) + B (out x 4)
    assert member.train_source.n_params == 4 * (64 + 128) + 4 * (128 + 64) + 4 * (64 + 10)
    result = _scores(shared_store, MethodSpec("trak", "none"), spec)
    assert result.scores.shape == (task_ds.n_train, len(POS)) and torch.isfinite(result.scores).all()


def test_fixed_masks_shared_by_train_and_test_fresh_masks_per_example(shared_store):
    ds = load_dataset(TINY.dataset)
    bases = load_or_train(TINY, [0], store=shared_store, device="cpu")
    fixed = list(build_members(TINY, EnsembleSpec("dropout", D=2), DENSE, bases, ds, shared_store,
                               torch.device("cpu"), POS))
    assert fixed[0].train_source.masks is fixed[0].test_source.masks
    assert not torch.equal(fixed[0].train_source.masks["drop1"], fixed[1].train_source.masks["drop1"])
    fresh = list(build_members(TINY, EnsembleSpec("dropout", D=1, masks="fresh"), DENSE, bases, ds, shared_store,
                               torch.device("cpu"), POS))
    again = list(build_members(TINY, EnsembleSpec("dropout", D=1, masks="fresh"), DENSE, bases, ds, shared_store,
                               torch.device("cpu"), torch.arange(ds.n_test)))
    m = fresh[0].train_source.masks["drop1"]
    assert m.shape == (ds.n_train, 128) and not torch.equal(m[0], m[1])
    assert torch.equal(m, again[0].train_source.masks["drop1"])
    assert torch.equal(fresh[0].test_source.masks["drop1"], again[0].test_source.masks["drop1"][POS])
    result = _scores(shared_store, KRON, EnsembleSpec("dropout", D=2, masks="fresh"))
    assert torch.isfinite(result.scores).all()


def test_dropout_forward_mask_mean_gradient_is_the_mean_of_masked_gradients(shared_store):
    ds = load_dataset(TINY.dataset)
    bases = load_or_train(TINY, [0], store=shared_store, device="cpu")
    exact = MethodSpec("trak", "none")
    from tda_core.features import compute_features

    x, y = ds.x_train[:20], ds.y_train[:20]
    fwd = next(build_members(TINY, EnsembleSpec("dropout-forward", D=2, forward_grad="mask-mean"), exact, bases, ds,
                             shared_store, torch.device("cpu"), POS))
    masked = list(build_members(TINY, EnsembleSpec("dropout", D=2), exact, bases, ds, shared_store,
                                torch.device("cpu"), POS))
    mean = compute_features(fwd.train_source, x, y)
    each = [compute_features(m.train_source, x, y) for m in masked]
    assert torch.allclose(mean.phi, (each[0].phi + each[1].phi) / 2, atol=1e-6)
    assert torch.allclose(mean.p, (each[0].p + each[1].p) / 2, atol=1e-6)
    naive = _scores(shared_store, KRON, EnsembleSpec("naive"))
    same = _scores(shared_store, KRON, EnsembleSpec("dropout-forward", D=1, dropout_p=0.0, forward_grad="mask-mean"))
    assert torch.allclose(same.scores, naive.scores, atol=1e-6, rtol=1e-5)
