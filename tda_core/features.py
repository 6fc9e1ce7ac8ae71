"""Per-sample gradient features of the attribution target, with seeded projections.

One feature row per example: ``phi(z) = P^T grad_theta f(z)`` with f the task's target
(classification margin, or mean token log-likelihood for sequences). The training-loss
gradient never needs its own pass: for cross-entropy ``grad loss = -(1 - p) grad margin``
and for sequences ``grad loss = -grad f``, so every method reads the same features and p.

Three ways to build them (`kind`):
- ``none``: the exact per-sample gradients (``torch.func.vmap(grad(...))``, chunked);
- ``dense``: those gradients times a seeded Gaussian or Rademacher JL matrix, generated in
  fixed row blocks from (seed, block), held whole when it fits, else regenerated per chunk;
- ``kron``: per layer (Linear over any leading dims, Conv2d, Embedding) the layer inputs and
  output gradients captured in one batched forward/backward are projected separately and
  combined by outer product, summed over positions (LoGra-style Kronecker JL). Parameters
  outside such layers (norm scales, free tables) are not covered; `covered` says which are.
"""
from __future__ import annotations

import dataclasses
import hashlib
import math
import time
from collections.abc import Mapping, Sequence
from contextlib import AbstractContextManager, nullcontext

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

from .errors import UserError
from .models.dropout import use_masks
from .objectives import correct_probability, target
from .progress import Progress, report

DENSE_BLOCK_ENTRIES = 1 << 22  # entries per generated block of the dense JL matrix (fixes the stream)
KRON_LAYERS = (nn.Linear, nn.Conv2d, nn.Embedding)


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


# --- projections -------------------------------------------------------------------------------
class DenseProjection:
    """Seeded JL matrix P (n_params x k), entries N(0, 1/k) or +-1/sqrt(k), built from fixed row blocks."""

    def __init__(self, n_params: int, k: int, seed: int, device: torch.device, distribution: str = "gaussian",
                 hold_bytes: int = 2 << 30, dtype: torch.dtype = torch.float32) -> None:
        if distribution not in ("gaussian", "rademacher"):
            raise UserError(f"unknown dense projection {distribution!r}; valid choices: gaussian, rademacher")
        self.n_params, self.k, self.seed, self.device, self.distribution = n_params, k, seed, device, distribution
        self.dtype = dtype  # bfloat16: the same matrix rounded, float32 accumulation (AMX, tensor cores)
        self.rows_per_block = max(1, DENSE_BLOCK_ENTRIES // k)
        self.gen_s = 0.0
        self._whole: torch.Tensor | None = None
        self.hold = n_params * k * dtype.itemsize <= hold_bytes

    def _block(self, b: int) -> torch.Tensor:
        t0 = time.perf_counter()
        r0 = b * self.rows_per_block
        rows = min(self.rows_per_block, self.n_params - r0)
        g = torch.Generator(device=self.device).manual_seed(derive_seed(self.seed, "dense", b))
        if self.distribution == "gaussian":
            out = torch.randn(rows, self.k, generator=g, device=self.device).mul_(1.0 / math.sqrt(self.k))
        else:
            out = torch.randint(0, 2, (rows, self.k), generator=g, device=self.device, dtype=torch.float32)
            out.mul_(2.0 / math.sqrt(self.k)).sub_(1.0 / math.sqrt(self.k))
        out = out.to(self.dtype)
        self.gen_s += time.perf_counter() - t0
        return out

    @property
    def n_blocks(self) -> int:
        return -(-self.n_params // self.rows_per_block)

    def matrix(self) -> torch.Tensor:
        """The whole matrix (generated once and kept when it fits `hold_bytes`)."""
        if self._whole is None:
            whole = torch.cat([self._block(b) for b in range(self.n_blocks)])
            if not self.hold:
                return whole
            self._whole = whole
        return self._whole

    def __call__(self, g: torch.Tensor) -> torch.Tensor:
        """Project gradient rows g [B, n_params] -> [B, k]."""
        g = g.to(self.dtype)
        if self.hold:
            return (g @ self.matrix()).float()
        out = torch.zeros(g.shape[0], self.k, device=g.device)
        for b in range(self.n_blocks):
            r0 = b * self.rows_per_block
            out += (g[:, r0:r0 + self.rows_per_block] @ self._block(b)).float()
        return out


def kron_factor_dims(layer_dims: Sequence[tuple[int, int]], proj_dim: int) -> list[tuple[int, int]]:
    """Per layer (out, in) -> (k_out, k_in): `proj_dim` split evenly over layers, square factors,
    a factor at least as large as its side is the identity (exact)."""
    budget = max(1, proj_dim // max(1, len(layer_dims)))
    dims = []
    for d_out, d_in in layer_dims:
        k_out = min(d_out, max(1, math.isqrt(budget)))
        k_in = min(d_in, max(1, budget // k_out))
        dims.append((k_out, k_in))
    return dims


def _factor(d: int, k: int, seed: int, device: torch.device) -> torch.Tensor | None:
    """A d x k Gaussian factor with N(0, 1/k) entries, or None (identity) when k >= d."""
    if k >= d:
        return None
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(d, k, generator=g) / math.sqrt(k)).to(device)


def _apply(x: torch.Tensor, factor: torch.Tensor | None) -> torch.Tensor:
    return x if factor is None else x @ factor


@dataclasses.dataclass
class _KronLayer:
    name: str
    module: nn.Module
    d_out: int
    d_in: int  # includes the bias column for Linear / Conv2d with bias
    p_out: torch.Tensor | None = None
    p_in: torch.Tensor | None = None

    @property
    def k(self) -> int:
        k_out = self.d_out if self.p_out is None else self.p_out.shape[1]
        k_in = self.d_in if self.p_in is None else self.p_in.shape[1]
        return k_out * k_in


def layer_dims(module: nn.Module) -> tuple[int, int]:
    """(out side, in side) of a layer's weight gradient; the in side counts a bias column."""
    bias = 1 if getattr(module, "bias", None) is not None else 0
    if isinstance(module, nn.Linear):
        return module.out_features, module.in_features + bias
    if isinstance(module, nn.Conv2d):
        kh, kw = module.kernel_size
        return module.out_channels, module.in_channels * kh * kw + bias
    return module.embedding_dim, module.num_embeddings  # Embedding: grad is (vocab x dim); out side = dim


def kron_layers(source: GradientSource) -> tuple[list[nn.Module], list[str], int]:
    """Modules whose weight is differentiated and whose bias (if any) is too; their names; params not covered."""
    wanted = set(source.param_names)
    modules, names, covered = [], [], 0
    for name, module in source.model.named_modules():
        if not isinstance(module, KRON_LAYERS):
            continue
        if isinstance(module, nn.Conv2d) and (module.groups != 1 or module.padding_mode != "zeros"
                                              or isinstance(module.padding, str)):
            continue
        prefix = f"{name}." if name else ""
        pnames = [prefix + "weight"] + ([prefix + "bias"] if getattr(module, "bias", None) is not None else [])
        if all(p in wanted for p in pnames):
            modules.append(module)
            names.append(name)
            covered += sum(getattr(module, p.rsplit(".", 1)[-1]).numel() for p in pnames)
    return modules, names, source.n_params - covered


class KronProjection:
    """Per-layer Kronecker-structured JL: phi_layer = sum_t (P_out^T g_t) (x) (P_in^T a_t)."""

    def __init__(self, source: GradientSource, proj_dim: int, seed: int, device: torch.device,
                 probe: tuple[torch.Tensor, torch.Tensor]) -> None:
        modules, names, self.uncovered = kron_layers(source)
        fired = _modules_called(source, modules, probe, device)
        self.layers: list[_KronLayer] = []
        for name, module in zip(names, modules):
            if id(module) in fired:
                self.layers.append(_KronLayer(name, module, *layer_dims(module)))
            else:  # called functionally (e.g. inside nn.MultiheadAttention): no hook fires
                self.uncovered += sum(p.numel() for p in module.parameters(recurse=False))
        if not self.layers:
            raise UserError("the Kronecker projection found no Linear, Conv2d or Embedding layer among the "
                            "differentiated parameters; use --proj dense")
        dims = kron_factor_dims([(la.d_out, la.d_in) for la in self.layers], proj_dim)
        for la, (k_out, k_in) in zip(self.layers, dims):
            la.p_out = _factor(la.d_out, k_out, derive_seed(seed, la.name, "out"), device)
            la.p_in = _factor(la.d_in, k_in, derive_seed(seed, la.name, "in"), device)
        self.k = sum(la.k for la in self.layers)

    def layer_features(self, layer: _KronLayer, inp: torch.Tensor, gout: torch.Tensor) -> torch.Tensor:
        """[B, k_layer] from one call's input and output gradient."""
        m, b = layer.module, gout.shape[0]
        if isinstance(m, nn.Embedding):
            tokens = inp.reshape(b, -1)
            g = gout.reshape(b, tokens.shape[1], -1)
            if m.padding_idx is not None:
                g = g * (tokens != m.padding_idx).unsqueeze(-1)
            a = F.one_hot(tokens, m.num_embeddings).to(g.dtype) if layer.p_in is None else layer.p_in[tokens]
            g = _apply(g, layer.p_out)
            return torch.einsum("bto,bti->boi", g, a).reshape(b, -1)
        if isinstance(m, nn.Conv2d):
            a = F.unfold(inp, m.kernel_size, m.dilation, m.padding, m.stride).transpose(1, 2)  # [B, L, C*kh*kw]
            g = gout.flatten(2).transpose(1, 2)  # [B, L, out]
        else:
            a = inp.reshape(b, -1, inp.shape[-1])
            g = gout.reshape(b, -1, gout.shape[-1])
        if m.bias is not None:
            a = torch.cat([a, torch.ones_like(a[..., :1])], dim=-1)
        a, g = _apply(a, layer.p_in), _apply(g, layer.p_out)
        if a.shape[1] == 1:
            return (g[:, 0, :, None] * a[:, 0, None, :]).reshape(b, -1)
        return torch.einsum("blo,bli->boi", g, a).reshape(b, -1)


def _modules_called(source: GradientSource, modules: list[nn.Module], probe: tuple[torch.Tensor, torch.Tensor],
                    device: torch.device) -> set[int]:
    fired: set[int] = set()
    hooks = [m.register_forward_hook(lambda mod, i, o: fired.add(id(mod))) for m in modules]
    try:
        with torch.no_grad(), masked(source.model, source.masks_for(slice(0, 1), device)):
            source.model(probe[0][:1].to(device))
    finally:
        for h in hooks:
            h.remove()
    return fired


# --- feature computation -----------------------------------------------------------------------
def _p_or_nan(logits: torch.Tensor, y: torch.Tensor, sequence: bool) -> torch.Tensor:
    if sequence:
        return torch.full(logits.shape[:1], float("nan"), device=logits.device)
    return correct_probability(logits, y)


def _vmap_grads(source: GradientSource, device: torch.device):
    """A function (x, y, masks) -> (per-sample flat gradients [B, n_params], p [B])."""
    model = source.model
    fixed = {n: t.detach() for n, t in list(model.named_parameters()) + list(model.named_buffers())
             if n not in source.param_names}

    def f(params, x, y, masks):
        y1 = y.unsqueeze(0)
        values, probs = [], []
        for m in source.average_masks or (masks,):
            with masked(model, m):
                logits = functional_call(model, {**fixed, **params}, (x.unsqueeze(0),))
            values.append(target(logits, y1, source.sequence).sum())
            probs.append(_p_or_nan(logits, y1, source.sequence)[0])
        return torch.stack(values).mean(), torch.stack(probs).mean()

    mask_dims = 0 if source.per_example_masks else None
    per_sample = vmap(grad(f, has_aux=True), in_dims=(None, 0, 0, mask_dims))
    params = {n: t.to(device) for n, t in source.params().items()}

    def run(x, y, masks):
        grads, p = per_sample(params, x, y, masks)
        return torch.cat([grads[n].reshape(x.shape[0], -1) for n in source.param_names], dim=1), p

    return run


def default_chunk(n_params: int, budget_bytes: int = 1 << 29) -> int:
    """Examples per vmap chunk so that the chunk's gradients stay near `budget_bytes`."""
    return int(max(1, min(1024, budget_bytes // max(1, 4 * n_params))))


def compute_features(source: GradientSource, x: torch.Tensor, y: torch.Tensor, projection: str, *,
                     dense: DenseProjection | None = None, kron: KronProjection | None = None,
                     device: torch.device | str = "cpu", chunk: int | None = None,
                     progress: Progress | None = None, label: str = "features") -> Features:
    """Feature rows for (x, y): `projection` is 'none', 'dense' (needs `dense`) or 'kron' (needs `kron`)."""
    device = torch.device(device)
    model = source.model
    model.eval()
    timings = {"grads_s": 0.0, "project_s": 0.0}
    rows_phi, rows_p = [], []
    n = len(x)
    if projection == "kron":
        chunk = chunk or 512
        step = _kron_step(source, kron)
    else:
        chunk = chunk or default_chunk(source.n_params)
        step = _vmap_grads(source, device)
    gen_before = dense.gen_s if dense is not None else 0.0
    for start in range(0, n, chunk):
        rows = slice(start, min(n, start + chunk))
        xb, yb = x[rows].to(device), y[rows].to(device)
        masks = source.masks_for(rows, device)
        t0 = time.perf_counter()
        if projection == "kron":
            phi, p, t_proj = step(xb, yb, masks)
            timings["grads_s"] += time.perf_counter() - t0 - t_proj
            timings["project_s"] += t_proj
        else:
            g, p = step(xb, yb, masks)
            t1 = time.perf_counter()
            timings["grads_s"] += t1 - t0
            phi = g if projection == "none" else dense(g)
            timings["project_s"] += time.perf_counter() - t1
        rows_phi.append(phi.detach().float())
        rows_p.append(p.detach().float())
        report(progress, rows.stop, n, label)
    if dense is not None:
        timings["gen_s"] = dense.gen_s - gen_before
        timings["project_s"] -= timings["gen_s"]
    return Features(torch.cat(rows_phi), torch.cat(rows_p), timings)


def _kron_step(source: GradientSource, kron: KronProjection):
    """A function (x, y, masks) -> (Kronecker features [B, k], p [B], seconds spent projecting)."""
    model = source.model
    by_module = {id(la.module): la for la in kron.layers}

    def run(x, y, masks):
        calls: list[tuple[_KronLayer, torch.Tensor, torch.Tensor]] = []

        def hook(mod, inputs, output):
            calls.append((by_module[id(mod)], inputs[0].detach(), output))

        hooks = [la.module.register_forward_hook(hook) for la in kron.layers]
        values, probs = [], []
        try:
            for m in source.average_masks or (masks,):
                with masked(model, m):
                    logits = model(x)
                values.append(target(logits, y, source.sequence))
                probs.append(_p_or_nan(logits.detach(), y, source.sequence))
        finally:
            for h in hooks:
                h.remove()
        total = torch.stack(values).mean(0).sum()
        gouts = torch.autograd.grad(total, [out for _, _, out in calls])
        t0 = time.perf_counter()
        parts: dict[str, torch.Tensor] = {}
        for (la, inp, _), gout in zip(calls, gouts):
            feat = kron.layer_features(la, inp, gout.detach())
            parts[la.name] = feat if la.name not in parts else parts[la.name] + feat
        phi = torch.cat([parts[la.name] for la in kron.layers], dim=1)
        return phi, torch.stack(probs).mean(0), time.perf_counter() - t0

    return run
