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
  multiplied, summed over positions and layers: a JL projection whose columns are Kronecker
  products u (x) v, never materialised. Parameters outside such layers (norm scales, free
  tables) are not covered; `uncovered` counts them.
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
from .objectives import IGNORE, correct_probability, target
from .progress import Progress, report

KRON_CHUNK_BYTES = 1 << 28
KRON_FORM = "rank-one sketches summed over layers"  # in store keys: features of the per-layer form differ
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


@dataclasses.dataclass
class _KronLayer:
    name: str
    module: nn.Module
    d_out: int
    d_in: int  # includes the bias column for Linear / Conv2d with bias
    u: torch.Tensor  # [d_out, k] standard Gaussian, sketches output gradients
    v: torch.Tensor  # [d_in, k] standard Gaussian, sketches inputs


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
    """Kronecker-structured JL over all covered layers: k features, each a rank-one sketch of every layer.

    Feature r = k^-1/2 * sum over layers l and positions t of (u_lr . g_t)(v_lr . a_t), with g_t the
    layer's output gradient, a_t its input (bias column appended) and u, v independent standard Gaussians:
    a product of two separate projections (inputs, output gradients), which is vec(G) projected by the
    Kronecker-structured column u_lr (x) v_lr, G = sum_t g_t a_t^T the layer's weight gradient. Hence
    E[phi(z) . phi(z')] = <grad(z), grad(z')>, and k is shared by all layers (no per-layer split).
    """

    def __init__(self, source: GradientSource, proj_dim: int, seed: int, device: torch.device,
                 probe: tuple[torch.Tensor, torch.Tensor]) -> None:
        modules, names, self.uncovered = kron_layers(source)
        fired = _positions(source, modules, probe, device)
        self.k = proj_dim
        # examples per chunk: the [B, positions, k] sketches of the busiest layer stay near KRON_CHUNK_BYTES
        self.chunk = max(1, min(512, KRON_CHUNK_BYTES // (4 * proj_dim * max(fired.values(), default=1))))
        self.layers: list[_KronLayer] = []
        for name, module in zip(names, modules):
            if id(module) not in fired:  # called functionally (e.g. inside nn.MultiheadAttention): no hook fires
                self.uncovered += sum(p.numel() for p in module.parameters(recurse=False))
                continue
            d_out, d_in = layer_dims(module)
            u = _gaussian(d_out, proj_dim, derive_seed(seed, name, "out"), device)
            v = _gaussian(d_in, proj_dim, derive_seed(seed, name, "in"), device)
            self.layers.append(_KronLayer(name, module, d_out, d_in, u, v))
        if not self.layers:
            raise UserError("the Kronecker projection found no Linear, Conv2d or Embedding layer among the "
                            "differentiated parameters; use --proj dense")

    def layer_features(self, layer: _KronLayer, inp: torch.Tensor, gout: torch.Tensor) -> torch.Tensor:
        """[B, k] contribution of one call of a layer, from its input and output gradient."""
        m, b = layer.module, gout.shape[0]
        if isinstance(m, nn.Embedding):
            tokens = inp.reshape(b, -1)
            g = gout.reshape(b, tokens.shape[1], -1)
            if m.padding_idx is not None:
                g = g * (tokens != m.padding_idx).unsqueeze(-1)
            if tokens.shape[1] == 1:
                return self._combine(g @ layer.u, layer.v[tokens])
            grad_t = g.new_zeros(b, layer.d_in, layer.d_out).scatter_add_(
                1, tokens.unsqueeze(-1).expand(-1, -1, layer.d_out), g)  # [B, vocab, dim]
            return self._combine_gradient(layer, grad_t.transpose(1, 2))
        if isinstance(m, nn.Conv2d):
            a = F.unfold(inp, m.kernel_size, m.dilation, m.padding, m.stride).transpose(1, 2)  # [B, L, C*kh*kw]
            g = gout.flatten(2).transpose(1, 2)  # [B, L, out]
        else:
            a = inp.reshape(b, -1, inp.shape[-1])
            g = gout.reshape(b, -1, gout.shape[-1])
        if m.bias is not None:
            a = torch.cat([a, torch.ones_like(a[..., :1])], dim=-1)
        if a.shape[1] * (layer.d_out + layer.d_in) > layer.d_out * layer.d_in:
            # many positions: cheaper to form the per-example weight gradient sum_t g_t a_t^T first
            return self._combine_gradient(layer, torch.bmm(g.transpose(1, 2), a))
        return self._combine(g @ layer.u, a @ layer.v)

    def _combine_gradient(self, layer: _KronLayer, grad_w: torch.Tensor) -> torch.Tensor:
        """[B, out, in] weight gradients G -> [B, k] with feature r = u_r^T G v_r (smaller side contracted last)."""
        if layer.d_out <= layer.d_in:
            return ((grad_w @ layer.v) * layer.u).sum(1) / math.sqrt(self.k)
        return ((grad_w.transpose(1, 2) @ layer.u) * layer.v).sum(1) / math.sqrt(self.k)

    def _combine(self, gu: torch.Tensor, av: torch.Tensor) -> torch.Tensor:
        """[B, T, k] sketches of output gradients and inputs -> [B, k], summed over positions T."""
        return (gu * av).sum(1) / math.sqrt(self.k)


def _gaussian(d: int, width: int, seed: int, device: torch.device) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(d, width, generator=g).to(device)


def _positions(source: GradientSource, modules: list[nn.Module], probe: tuple[torch.Tensor, torch.Tensor],
               device: torch.device) -> dict[int, int]:
    """Positions (tokens, pixels) per example of each module that fires on one probe example, by id."""
    seen: dict[int, int] = {}

    def hook(mod, inputs, output):
        channels = output.shape[1] if isinstance(mod, nn.Conv2d) else output.shape[-1]
        seen[id(mod)] = seen.get(id(mod), 0) + output.numel() // channels

    hooks = [m.register_forward_hook(hook) for m in modules]
    try:
        with torch.no_grad(), masked(source.model, source.masks_for(slice(0, 1), device)):
            source.model(probe[0][:1].to(device))
    finally:
        for h in hooks:
            h.remove()
    return seen


# --- feature computation -----------------------------------------------------------------------
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
        chunk = chunk or kron.chunk
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
        phi = sum(kron.layer_features(la, inp, gout.detach()) for (la, inp, _), gout in zip(calls, gouts))
        return phi, torch.stack(probs).mean(0), time.perf_counter() - t0

    return run
