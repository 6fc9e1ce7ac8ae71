"""Per-sample gradient features of the attribution target: what is differentiated, and the feature loop.

One feature row per example: ``phi(z) = P^T grad_theta f(z)`` with f the task's target
(classification margin, or mean token log-likelihood for sequences). The training-loss
gradient never needs its own pass: for cross-entropy ``grad loss = -(1 - p) grad margin``
and for sequences ``grad loss = -grad f``, so every method reads the same features and p.

`GradientSource` says what is differentiated (model, parameters, dropout masks); a feature map
(tda_core/projections.py: exact gradients, dense JL or Kronecker JL) turns a chunk of examples into
feature rows; `compute_features` runs one over a whole split.
"""
from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager, nullcontext
from typing import TYPE_CHECKING

import torch
from torch import nn
from torch.func import functional_call, grad, vmap

from .models.dropout import use_masks
from .objectives import IGNORE, correct_probability, target
from .progress import Progress, report

if TYPE_CHECKING:
    from .projections import FeatureMap


def masked(model: nn.Module, masks: Mapping[str, torch.Tensor]) -> AbstractContextManager:
    """`use_masks` when there are masks, else nothing (models wrapped by peft hide their dropout names)."""
    return use_masks(model, masks) if masks else nullcontext()


def derive_seed(*parts: object) -> int:
    """A 63-bit seed from any parts (stable across runs, platforms and devices)."""
    text = "/".join(map(str, parts))
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little") >> 1


@dataclasses.dataclass
class GradientSource:
    """What is differentiated: a model (eval mode), the names of the parameters, and its masks.

    `masks` are fixed masks (no batch dimension, shared by all examples) or, when
    `per_example_masks`, one mask per example (first dimension = examples of the split).
    `average_masks` (dropout-forward, mask-mean form): the target and p are means over these
    fixed masks' forward passes, differentiated once.
    """

    model: nn.Module
    param_names: tuple[str, ...]
    sequence: bool
    masks: Mapping[str, torch.Tensor] | None = None
    per_example_masks: bool = False
    average_masks: Sequence[Mapping[str, torch.Tensor]] = ()

    def params(self) -> dict[str, torch.Tensor]:
        named = dict(self.model.named_parameters())
        return {n: named[n].detach() for n in self.param_names}

    def fixed_tensors(self) -> dict[str, torch.Tensor]:
        """Parameters that are not differentiated and buffers: held fixed in functional calls."""
        return {n: t.detach() for n, t in list(self.model.named_parameters()) + list(self.model.named_buffers())
                if n not in self.param_names}

    @property
    def n_params(self) -> int:
        named = dict(self.model.named_parameters())
        return sum(named[n].numel() for n in self.param_names)

    def masks_for(self, rows: slice, device: torch.device) -> dict[str, torch.Tensor]:
        if not self.masks:
            return {}
        if self.per_example_masks:
            return {k: v[rows].to(device) for k, v in self.masks.items()}
        return {k: v.to(device) for k, v in self.masks.items()}


def all_param_names(model: nn.Module) -> tuple[str, ...]:
    """Names of the model's trainable parameters."""
    return tuple(n for n, p in model.named_parameters() if p.requires_grad)


@dataclasses.dataclass
class Features:
    """Feature rows of one split for one member, the correct-class probability, and timings."""

    phi: torch.Tensor  # float32 [n, k]
    p: torch.Tensor  # float32 [n]; NaN for sequence tasks
    timings: dict[str, float]


@torch.no_grad()
def mask_averaged_probabilities(model: nn.Module, mask_sets: Sequence[Mapping[str, torch.Tensor]],
                                x: torch.Tensor) -> torch.Tensor:
    """Softmax probabilities (last dim) averaged over one forward pass per mask set."""
    total = torch.zeros(())
    for m in mask_sets:
        with masked(model, m):
            total = total + model(x).float().softmax(-1)
    return total / len(mask_sets)


@torch.no_grad()
def sample_labels(source: GradientSource, x: torch.Tensor, y: torch.Tensor, seed: int, *,
                  device: torch.device | str = "cpu", chunk: int = 512) -> torch.Tensor:
    """Labels drawn from the member's own predictive distribution (its masks applied; dropout-forward:
    the mask-averaged one). Sequences: one token per position, IGNORE kept where y has it. Gradients of the
    loss at such labels have the Gauss-Newton matrix as their expected outer product (the true Fisher)."""
    device = torch.device(device)
    model = source.model.eval()
    gen = torch.Generator().manual_seed(seed)
    out = []
    for start in range(0, len(x), chunk):
        rows = slice(start, min(len(x), start + chunk))
        mask_sets = source.average_masks or (source.masks_for(rows, device),)
        p = mask_averaged_probabilities(model, mask_sets, x[rows].to(device)).cpu()
        drawn = torch.multinomial(p.reshape(-1, p.shape[-1]), 1, generator=gen).reshape(p.shape[:-1])
        out.append(torch.where(y[rows] == IGNORE, y[rows], drawn) if source.sequence else drawn)
    return torch.cat(out).to(y.dtype)


def p_or_nan(logits: torch.Tensor, y: torch.Tensor, sequence: bool) -> torch.Tensor:
    """p of the correct class per example, NaN for sequences (which have no TRAK Q)."""
    if sequence:
        return torch.full(logits.shape[:1], float("nan"), device=logits.device)
    return correct_probability(logits, y)


def mask_mean_target(source: GradientSource, logits_of: Callable[[], torch.Tensor], y: torch.Tensor,
                     masks: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(target [B], p [B]) of a batch, each the mean over one forward pass `logits_of()` per mask set: the
    source's `average_masks` (dropout-forward) when it has them, else `masks` alone."""
    values, probs = [], []
    for m in source.average_masks or (masks,):
        with masked(source.model, m):
            logits = logits_of()
        values.append(target(logits, y, source.sequence))
        probs.append(p_or_nan(logits.detach(), y, source.sequence))
    return torch.stack(values).mean(0), torch.stack(probs).mean(0)


GradientStep = Callable[[torch.Tensor, torch.Tensor, Mapping[str, torch.Tensor]], tuple[torch.Tensor, torch.Tensor]]


def per_sample_gradients(source: GradientSource, device: torch.device,
                         dtype: torch.dtype = torch.float32) -> GradientStep:
    """A function (x, y, masks) -> (flat per-sample target gradients [B, n_params], p [B]) by vmap(grad).
    The gradients are computed in float32 and written once, rounded to `dtype`, into the flat rows."""
    model = source.model
    fixed = source.fixed_tensors()

    def f(params, x, y, masks):
        value, p = mask_mean_target(source, lambda: functional_call(model, {**fixed, **params}, (x.unsqueeze(0),)),
                                    y.unsqueeze(0), masks)
        return value.sum(), p[0]

    mask_dims = 0 if source.per_example_masks else None
    per_sample = vmap(grad(f, has_aux=True), in_dims=(None, 0, 0, mask_dims))
    params = {n: t.to(device) for n, t in source.params().items()}

    sizes = [params[n].numel() for n in source.param_names]

    def run(x, y, masks):
        grads, p = per_sample(params, x, y, masks)
        flat = torch.empty(x.shape[0], sum(sizes), dtype=dtype, device=x.device)
        for part, n in zip(flat.split(sizes, dim=1), source.param_names):
            part.copy_(grads.pop(n).reshape(x.shape[0], -1))
        return flat, p

    return run


def default_chunk(n_params: int, budget_bytes: int = 1 << 29) -> int:
    """Examples per vmap chunk so that the chunk's gradients stay near `budget_bytes`."""
    return int(max(1, min(1024, budget_bytes // max(1, 4 * n_params))))


def compute_features(source: GradientSource, x: torch.Tensor, y: torch.Tensor,
                     feature_map: FeatureMap | None = None, *, device: torch.device | str = "cpu",
                     chunk: int | None = None, progress: Progress | None = None,
                     label: str = "features") -> Features:
    """Feature rows for (x, y) by `feature_map` (default: exact gradients), chunk by chunk, with timings."""
    from .projections import ExactGradients

    device = torch.device(device)
    feature_map = feature_map or ExactGradients(source, device)
    source.model.eval()
    timings: dict[str, float] = {}
    rows_phi, rows_p = [], []
    n = len(x)
    chunk = chunk or feature_map.chunk
    for start in range(0, n, chunk):
        rows = slice(start, min(n, start + chunk))
        phi, p, spent = feature_map.step(x[rows].to(device), y[rows].to(device), source.masks_for(rows, device))
        for name, seconds in spent.items():
            timings[name] = timings.get(name, 0.0) + seconds
        rows_phi.append(phi.detach().float())
        rows_p.append(p.detach().float())
        report(progress, rows.stop, n, label)
    return Features(torch.cat(rows_phi), torch.cat(rows_p), timings)

