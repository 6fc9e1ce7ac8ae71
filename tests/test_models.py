"""Model shapes, backward passes, declared dropout layers and LoRA targets."""
from __future__ import annotations

import pytest
import torch

from tda_core.errors import UserError
from tda_core.models import build_model, n_parameters
from tda_core.models.dropout import (MaskableDropout, draw_masks, draw_stacked_masks, fixed_masks, mask_shapes,
                                     use_masks)


@pytest.mark.parametrize("kwargs, x_shape, n_params", [
    ({"in_features": 784}, (4, 1, 28, 28), 784 * 128 + 128 + 128 * 64 + 64 + 64 * 10 + 10),
    ({"in_features": 64}, (4, 1, 8, 8), 64 * 128 + 128 + 128 * 64 + 64 + 64 * 10 + 10),
    ({"in_features": 3072, "n_classes": 2}, (4, 3, 32, 32), 3072 * 128 + 128 + 128 * 64 + 64 + 64 * 2 + 2),
])
def test_mlp_shapes_and_parameter_count(kwargs, x_shape, n_params):
    model = build_model("mlp", **kwargs)
    out = model(torch.rand(x_shape))
    assert out.shape == (4, kwargs.get("n_classes", 10))
    assert n_parameters(model) == n_params
    out.sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.parametrize("width", [1.0, 0.25])
def test_resnet9_shapes_and_backward(width):
    model = build_model("resnet9", n_classes=2, width=width)
    out = model(torch.rand(3, 3, 32, 32))
    assert out.shape == (3, 2)
    out.sum().backward()
    assert all(p.grad is not None for p in model.parameters())
    assert isinstance(model.get_submodule("drop"), MaskableDropout)
    assert "head" in model.lora_targets and "prep.0" in model.lora_targets


def test_declared_layers_exist():
    for model in (build_model("mlp"), build_model("resnet9", width=0.25)):
        for name in model.dropout_layers:
            assert isinstance(model.get_submodule(name), MaskableDropout)
        for name in model.lora_targets:
            assert isinstance(model.get_submodule(name), (torch.nn.Linear, torch.nn.Conv2d))


def test_unknown_model_lists_choices():
    with pytest.raises(UserError, match="valid choices: mlp, music-transformer, resnet9"):
        build_model("resnet50")


def test_fixed_masks_are_reproducible_and_fix_a_subnetwork():
    model = build_model("mlp", in_features=64).eval()
    x = torch.rand(5, 1, 8, 8)
    shapes = mask_shapes(model, x)
    assert shapes == {"drop1": (128,), "drop2": (64,)}
    rates = {"drop1": 0.5, "drop2": 0.5}
    a, b, c = fixed_masks(shapes, rates, 3), fixed_masks(shapes, rates, 3), fixed_masks(shapes, rates, 4)
    assert all(torch.equal(a[k], b[k]) for k in a) and not torch.equal(a["drop1"], c["drop1"])
    assert set(a["drop1"].unique().tolist()) == {0.0, 2.0}
    with use_masks(model, a):
        batch = model(x)
        single = torch.cat([model(x[i:i + 1]) for i in range(5)])
    assert torch.allclose(batch, single, atol=1e-6)  # one sub-network for every example
    assert model.drop1.mask is None  # restored after the block
    assert not torch.allclose(batch, model(x))


def test_stacked_masks_equal_each_generators_own_draws():
    shapes, rates = {"drop1": (128,), "drop2": (3, 4)}, {"drop1": 0.1, "drop2": 0.5}
    stacked_gens = [torch.Generator().manual_seed(s) for s in (1, 2, 3)]
    own_gens = [torch.Generator().manual_seed(s) for s in (1, 2, 3)]
    for _ in range(2):  # consecutive batches keep each generator's stream in step
        stacked = draw_stacked_masks(shapes, rates, 5, stacked_gens)
        for k, gen in enumerate(own_gens):
            own = draw_masks(shapes, rates, 5, gen)
            assert all(torch.equal(stacked[name][k], own[name]) for name in shapes)
    assert not torch.equal(stacked["drop1"][0], stacked["drop1"][1])


@pytest.mark.parametrize("p", [0.0, 0.1, 1 / 3, 0.5, 0.9])
def test_masks_are_uniform_draws_compared_with_the_rate(p):
    """The CPU draws raw integers for speed; the masks and the generator's stream stay those of `torch.rand`."""
    gen, reference_gen = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    masks = draw_masks({"drop1": (40, 50)}, {"drop1": p}, 3, gen)
    reference = (torch.rand(3, 40, 50, generator=reference_gen) >= p).to(torch.float32) / (1 - p)
    assert torch.equal(masks["drop1"], reference)
    assert torch.equal(torch.rand(5, generator=gen), torch.rand(5, generator=reference_gen))


@pytest.mark.parametrize("name, kwargs, x_shape", [
    ("mlp", {"in_features": 64}, (5, 1, 8, 8)),
    ("resnet9", {"in_channels": 1, "width": 0.125}, (5, 1, 28, 28)),
])
def test_forward_stacked_equals_each_models_forward(name, kwargs, x_shape):
    """K models computed at once (training mode, masks given) equal each model's own forward under those masks."""
    from torch.func import stack_module_state

    models = [build_model(name, **kwargs).train() for _ in range(3)]
    x = torch.rand(3, *x_shape)
    shapes = mask_shapes(models[0], x[0])
    gens = [torch.Generator().manual_seed(k) for k in range(3)]
    masks = draw_stacked_masks(shapes, {n: 0.5 for n in shapes}, x_shape[0], gens)
    params, buffers = stack_module_state(models)
    out = models[0].forward_stacked(params, buffers, x, masks)
    for k, model in enumerate(models):
        with use_masks(model, {n: m[k] for n, m in masks.items()}):
            assert torch.allclose(out[k], model(x[k]), atol=1e-5)
        for b_name, b in model.named_buffers():  # BatchNorm running statistics updated per model, as forward does
            assert torch.allclose(buffers[b_name][k].double(), b.double(), atol=1e-6), b_name
