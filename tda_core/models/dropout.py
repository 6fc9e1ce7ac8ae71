"""Dropout whose masks can be supplied from outside.

Training draws masks from per-model seeded generators (so `train` and `train_many` agree);
Dropout Ensemble members fix one mask per member, derived from (member seed, layer), so the
training-set and test-set gradients of a member see the same sub-network on any device.
"""
from __future__ import annotations

import hashlib
import math
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from functools import lru_cache

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


# torch's CPU `uniform_` makes each float32 from one 32-bit Mersenne Twister draw: (draw & (2**24 - 1)) * 2**-24.
_UNIFORM_BITS = 24


@lru_cache(maxsize=None)
def _keep_threshold(p: float) -> int:
    """The least m with float32(m * 2**-24) >= p under torch's comparison: a raw CPU draw is kept iff its low 24
    bits are at least this (so that it is kept iff `uniform_` would have made it a float >= p)."""
    def kept(m: int) -> bool:
        return bool(torch.tensor(m * 2.0 ** -_UNIFORM_BITS, dtype=torch.float32) >= p)

    m = math.ceil(p * 2 ** _UNIFORM_BITS)
    while m > 0 and kept(m - 1):
        m -= 1
    while not kept(m):
        m += 1
    return m


def _empty_draws(shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """A buffer for uniform draws: int32 for raw draws on the CPU in float32 training (see `_draw_`), else the
    default dtype."""
    raw = device.type == "cpu" and torch.get_default_dtype() == torch.float32
    return torch.empty(shape, dtype=torch.int32 if raw else None, device=device)


def _draw_(draws: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Fill `draws` with the generator's next uniform numbers, consuming its stream as `uniform_` does. An int32
    buffer gets the raw CPU draws (`random_` keeps each draw's low 31 bits), which `_keep_scaled` compares in their
    low 24 bits as `uniform_` would after scaling them: the same masks, in about half the time."""
    return draws.random_(generator=generator) if draws.dtype == torch.int32 else draws.uniform_(generator=generator)


def _keep_scaled(draws: torch.Tensor, p: float) -> torch.Tensor:
    """Mask from uniform draws u (raw on the CPU): kept (u >= p) units scaled by 1/(1-p), dropped ones 0."""
    if draws.dtype == torch.int32:
        keep = (draws & (2 ** _UNIFORM_BITS - 1)) >= _keep_threshold(p)
    else:
        keep = draws >= p
    return keep.to(torch.float32) / (1.0 - p)


def _bernoulli_mask(shape: tuple[int, ...], p: float, generator: torch.Generator, device: torch.device) -> torch.Tensor:
    return _keep_scaled(_draw_(_empty_draws(shape, device), generator), p)


def draw_masks(shapes: Mapping[str, tuple[int, ...]], rates: Mapping[str, float], batch: int,
               generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Fresh per-example masks for one batch, from `generator` (training)."""
    return {name: _bernoulli_mask((batch, *shape), rates[name], generator, generator.device)
            for name, shape in shapes.items()}


def draw_stacked_masks(shapes: Mapping[str, tuple[int, ...]], rates: Mapping[str, float], batch: int,
                       generators: Sequence[torch.Generator]) -> dict[str, torch.Tensor]:
    """Masks of K models for one batch, (K, batch, ...) per layer; slice k equals `draw_masks` from generators[k]."""
    device = generators[0].device
    draws = {name: _empty_draws((len(generators), batch, *shape), device) for name, shape in shapes.items()}
    for k, generator in enumerate(generators):
        for name in shapes:  # the order draw_masks draws in
            _draw_(draws[name][k], generator)
    return {name: _keep_scaled(d, rates[name]) for name, d in draws.items()}


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
