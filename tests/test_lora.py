"""LoRA members of a BatchNorm model: the member fine-tuned now and the member loaded from the store are one."""
from __future__ import annotations

import copy

import torch
from torch import nn

from tda_core.data import Dataset
from tda_core.features import GradientSource, all_param_names, compute_features
from tda_core.lora import ADAPTER_KIND, BATCHNORM_SCHEME, load_or_finetune_lora
from tda_core.models import ResNet9
from tda_core.specs import EnsembleSpec, Recipe, TaskSpec
from tda_core.training import TrainedModel

TASK = TaskSpec("tiny-resnet9", "random", "resnet9", (("n_classes", 3), ("width", 0.125), ("in_channels", 1)),
                Recipe(epochs=1, batch_size=16, lr=0.05))
SPEC = EnsembleSpec("lora", L=1, lora_rank=2, lora_epochs=2, lora_lr=0.01)


def _dataset(n: int = 48) -> Dataset:
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(n, 1, 8, 8, generator=g), torch.randint(0, 3, (n,), generator=g)
    return Dataset("random", "images", x[:40], y[:40], x[40:], y[40:], torch.arange(40), torch.arange(8),
                   ("a", "b", "c"), "random 8x8 images")


def _base(dataset: Dataset) -> TrainedModel:
    """A ResNet-9 (width 0.125) whose BatchNorm running statistics are those of the data, not the defaults."""
    torch.manual_seed(0)
    model = ResNet9(n_classes=3, width=0.125, in_channels=1).train()
    with torch.no_grad():
        for _ in range(3):
            model(dataset.x_train)
    return TrainedModel(TASK, 0, model.eval(), "tiny-resnet9-base", 0.0, True, 0.0, 0, {})


def _running_stats(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: b.clone() for n, b in model.named_buffers() if "running" in n}


def _member_features(peft_model: nn.Module, dataset: Dataset, merged: bool) -> torch.Tensor:
    model = peft_model
    if merged:  # the merged member differentiates every parameter, BatchNorm scales and shifts included
        model = copy.deepcopy(peft_model).merge_and_unload().eval().requires_grad_(True)
    src = GradientSource(model, all_param_names(model), False)
    return compute_features(src, dataset.x_train, dataset.y_train).phi


def test_resnet9_lora_member_loaded_from_the_store_equals_the_member_just_tuned(store):
    dataset = _dataset()
    base = _base(dataset)
    before = _running_stats(base.model)
    fresh, _, _, key, loaded = load_or_finetune_lora(TASK, SPEC, base, dataset, store, torch.device("cpu"), seed=7)
    assert not loaded
    reloaded, _, _, key2, loaded2 = load_or_finetune_lora(TASK, SPEC, base, dataset, store, torch.device("cpu"),
                                                          seed=7)
    assert loaded2 and key2 == key
    stats = _running_stats(fresh)
    assert all(torch.equal(stats[f"base_model.model.{n}"], t) for n, t in before.items())  # the base's statistics
    assert not any(n.startswith("base_model.model.") and "running" in n
                   for n in store.load(ADAPTER_KIND, key).tensors)  # only the adapter is stored
    for merged in (False, True):
        a, b = _member_features(fresh, dataset, merged), _member_features(reloaded, dataset, merged)
        assert torch.allclose(a, b, atol=1e-6, rtol=0), (merged, float((a - b).abs().max()))
    untuned = _member_features(load_or_finetune_lora(
        TASK, EnsembleSpec("lora", L=1, lora_rank=2, lora_epochs=0), base, dataset, store, torch.device("cpu"),
        seed=7)[0], dataset, merged=True)
    assert not torch.allclose(untuned, _member_features(fresh, dataset, merged=True), atol=1e-4)  # it was tuned


def test_batchnorm_scheme_keys_only_models_with_batchnorm(store):
    """Adapters of BatchNorm models carry the scheme in their keys; MLP adapter keys are as they were."""
    from tda_core.store import spec_key

    dataset = _dataset()
    base = _base(dataset)
    key = load_or_finetune_lora(TASK, SPEC, base, dataset, store, torch.device("cpu"), seed=7)[3]
    targets = sorted(base.model.lora_targets)
    plain = {"checkpoint": base.key, "rank": 2, "alpha": SPEC.lora_alpha, "epochs": 2, "lr": 0.01,
             "targets": targets, "seed": 7}
    assert key == spec_key({**plain, "batchnorm": BATCHNORM_SCHEME}) != spec_key(plain)


def test_lora_member_gradient_rows_by_hooks_equal_vmap(store):
    """Through peft's LoRA Conv2d and Linear wrappers, the hooked per-sample gradients of the adapter weights (the
    dense projection's rows) are vmap's."""
    from tda_core.features import per_sample_gradients
    from tda_core.projections import HookedGradients, gradient_rows

    dataset = _dataset()
    member = load_or_finetune_lora(TASK, SPEC, _base(dataset), dataset, store, torch.device("cpu"), seed=7)[0].eval()
    src = GradientSource(member, all_param_names(member), False)
    assert all("lora_" in n for n in src.param_names)
    rows = gradient_rows(src, torch.device("cpu"), torch.float32, (dataset.x_train, dataset.y_train))
    assert isinstance(rows, HookedGradients)
    x, y = dataset.x_train[:6], dataset.y_train[:6]
    assert torch.allclose(rows(x, y, {})[0], per_sample_gradients(src, torch.device("cpu"))(x, y, {})[0],
                          atol=1e-5, rtol=1e-4)
