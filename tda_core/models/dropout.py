"""Dropout whose masks can be supplied from outside.

Training draws masks from per-model seeded generators (so `train` and `train_many` agree);
Dropout Ensemble members fix one mask per member, derived from (member seed, layer), so the
training-set and test-set gradients of a member see the same sub-network on any device.
"""
from __future__ import annotations

import hashlib
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn


class MaskableDropout(nn.Module):
    """`nn.Dropout` that uses ``self.mask`` (already scaled by 1/(1-p)) when one is set."""

    def __init__(self, p: float) -> None:
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"dropout rate must be in [0, 1), got {p}")
        self.p = p
        self.mask: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mask is not None:
            return x * self.mask
        return F.dropout(x, self.p, self.training)

    def extra_repr(self) -> str:
        return f"p={self.p}"


def dropout_layers(model: nn.Module) -> dict[str, MaskableDropout]:
    """The model's declared dropout layers by name (``model.dropout_layers``)."""
    return {name: model.get_submodule(name) for name in model.dropout_layers}


@torch.no_grad()
def mask_shapes(model: nn.Module, x: torch.Tensor) -> dict[str, tuple[int, ...]]:
    """Per dropout layer, the shape of its input without the batch dimension (one dry forward pass)."""
    shapes: dict[str, tuple[int, ...]] = {}
    hooks = [layer.register_forward_hook(lambda m, inp, out, n=name: shapes.__setitem__(n, tuple(inp[0].shape[1:])))
             for name, layer in dropout_layers(model).items()]
    was_training = model.training
    try:
        model.eval()
        model(x[:1])
    finally:
        model.train(was_training)
        for h in hooks:
            h.remove()
    return shapes


def _keep_scaled(uniform: torch.Tensor, p: float) -> torch.Tensor:
    """Mask from uniform draws: kept (u >= p) units scaled by 1/(1-p), dropped ones 0."""
    return (uniform >= p).to(torch.float32) / (1.0 - p)


def _bernoulli_mask(shape: tuple[int, ...], p: float, generator: torch.Generator, device: torch.device) -> torch.Tensor:
    return _keep_scaled(torch.rand(shape, generator=generator, device=device), p)


def draw_masks(shapes: Mapping[str, tuple[int, ...]], rates: Mapping[str, float], batch: int,
               generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Fresh per-example masks for one batch, from `generator` (training)."""
    return {name: _bernoulli_mask((batch, *shape), rates[name], generator, generator.device)
            for name, shape in shapes.items()}


def draw_stacked_masks(shapes: Mapping[str, tuple[int, ...]], rates: Mapping[str, float], batch: int,
                       generators: Sequence[torch.Generator]) -> dict[str, torch.Tensor]:
    """Masks of K models for one batch, (K, batch, ...) per layer; slice k equals `draw_masks` from generators[k]."""
    device = generators[0].device
    uniform = {name: torch.empty((len(generators), batch, *shape), device=device) for name, shape in shapes.items()}
    for k, generator in enumerate(generators):
        for name in shapes:  # the order draw_masks draws in
            uniform[name][k].uniform_(generator=generator)
    return {name: _keep_scaled(u, rates[name]) for name, u in uniform.items()}


def fixed_masks(shapes: Mapping[str, tuple[int, ...]], rates: Mapping[str, float], seed: int,
                device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """One mask per layer shared by every example, from (seed, layer name); identical on every device."""
    out = {}
    for name, shape in shapes.items():
        layer_seed = int.from_bytes(hashlib.sha256(f"{seed}/{name}".encode()).digest()[:8], "little") >> 1
        g = torch.Generator().manual_seed(layer_seed)
        out[name] = _bernoulli_mask(shape, rates[name], g, torch.device("cpu")).to(device)
    return out


@contextmanager
def use_masks(model: nn.Module, masks: Mapping[str, torch.Tensor]) -> Iterator[None]:
    """Set masks on the named dropout layers for the duration of the block."""
    layers = dropout_layers(model)
    try:
        for name, mask in masks.items():
            layers[name].mask = mask
        yield
    finally:
        for name in masks:
            layers[name].mask = None
