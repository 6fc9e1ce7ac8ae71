"""Feature maps: exact gradients, dense JL and Kronecker-structured JL, behind one interface, in one table.

A feature map turns a chunk of examples into feature rows (`step`), and says before it is built what its
store-key identity is (`identity`), how many features it gives (`feature_dim`) and roughly how much memory
its pass needs (`peak_bytes`). `PROJECTIONS` maps the names users type (`--proj none|dense|kron`) to the
classes; to add a projection, subclass `FeatureMap` here and register it.

- ``none``: the exact per-sample gradients (``torch.func.vmap(grad(...))``, chunked);
- ``dense``: the per-sample gradients times a seeded Gaussian or Rademacher JL matrix, generated in fixed row
  blocks from (seed, block), held whole when it fits, else regenerated per chunk. The gradients come from one
  batched forward/backward with hooks on the layers (`HookedGradients`, the same layer adapters as ``kron``)
  when the adapters cover every differentiated parameter and agree with vmap(grad) on a probe example, else by vmap;
- ``kron``: every covered layer's inputs and output gradients, captured in one batched forward/backward,
  projected separately and multiplied, summed over positions and layers (tda_core/kron_layers.py): a JL
  projection whose columns are Kronecker products u (x) v (materialised per layer only where weight gradients
  are formed, many positions, and memory allows); normalisation scales and shifts enter by their exact
  per-example gradients, dense-projected into the same k features. Differentiated parameters that no layer
  adapter covers are listed by name in `uncovered` (dense and exact gradients cover every parameter).
"""
from __future__ import annotations

import abc
import math
import time
from collections.abc import Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from contextvars import ContextVar
from typing import ClassVar, TypeVar

import torch
from torch import nn

from .errors import UserError
from .features import (GradientSource, GradientStep, default_chunk, derive_seed, mask_mean_target, masked,
                       per_sample_gradients)
from .kron_layers import KronLayer, adapter_for
from .registry import Registry
from .specs import MethodSpec

KRON_CHUNK_BYTES = 1 << 28
KRON_FORM = "rank-one sketches summed over layers"  # in store keys: features of the per-layer form differ
# in store keys only of members with layers covered since every parameter is (norms, position tables)
KRON_COVER = "every parameter: norm scales and shifts exact and dense-projected, position tables Kronecker"
DENSE_BLOCK_ENTRIES = 1 << 22  # entries per generated block of the dense JL matrix (fixes the stream)
HOLD_FRACTION = 0.5  # hold a whole projection matrix (dense, Kronecker columns) when it takes at most this share
# of the memory budget
# examples per dense step: the product's rows and the per-sample gradients' vmap chunk. Measured on a 2-core
# AVX512 CPU (bfloat16, 2 threads, median of 4 repeats of 2048 rows in chunks of B): B = 256, 512, 1024, 2048 ran at
# 661, 672, 706, 666 GFLOP/s, and vmap's per-sample gradients took 2.5 s at B = 256 vs 1.3 s at 1024 (MNIST MLP,
# 5000 examples); benchmarks/bench_attribution.py prints the product's rates in each run
DENSE_CHUNK_ROWS = 1024
DENSE_CHUNK_BYTES = 1 << 30  # ... at most this many bytes of float32 gradients per step
# examples per hooked forward/backward of `HookedGradients`: this many positions (tokens, pixels) of the busiest
# call site; 64 chorales windows (2 heads x 256 queries of relative logits each), the forward/backward's fastest
# batch on a 2-core CPU (benchmarks/bench_attribution.py's floor)
HOOKED_POSITIONS = 1 << 15
Step = tuple[torch.Tensor, torch.Tensor, dict[str, float]]
Entry = TypeVar("Entry")  # what `hooked_pass` returns with each call: a KronLayer, or (name, module, adapter)


class FeatureMap(abc.ABC):
    """Turns chunks of examples of one member into feature rows [B, k] and p [B], with named seconds."""

    name: ClassVar[str]
    label: ClassVar[str]
    scheme: ClassVar[dict[str, str]] = {}  # store-key entries of schemes that changed under the same spec
    exact: ClassVar[bool] = False  # the features are the gradients themselves (kept in float32 throughout)
    chunk: int  # examples per step
    uncovered: tuple[str, ...] = ()  # names of differentiated parameters the features leave out

    @classmethod
    @abc.abstractmethod
    def build(cls, source: GradientSource, method: MethodSpec, seed: int, device: torch.device,
              probe: tuple[torch.Tensor, torch.Tensor], budget: int) -> FeatureMap:
        """The feature map of one member (projection `seed`), for a memory `budget` in bytes."""

    @classmethod
    def identity(cls, method: MethodSpec, seed: int) -> dict:
        """What distinguishes this map's features in store keys."""
        return {"proj": cls.name, "dim": method.proj_dim, "seed": seed}

    @classmethod
    def model_scheme(cls, source: GradientSource) -> dict[str, str]:
        """Store-key entries that depend on what a member differentiates (none unless a map says otherwise)."""
        return {}

    @classmethod
    def feature_dim(cls, n_params: int, method: MethodSpec) -> int:
        return method.proj_dim

    @classmethod
    @abc.abstractmethod
    def peak_bytes(cls, n_params: int, k: int, n_train: int, budget: int) -> int:
        """Memory of one pass besides the feature rows themselves (gradient chunks, projection matrices)."""

    @abc.abstractmethod
    def step(self, x: torch.Tensor, y: torch.Tensor, masks: Mapping[str, torch.Tensor]) -> Step:
        """(phi [B, k], p [B], seconds by name) for one chunk."""


def _gradient_chunk_bytes(n_params: int, n_train: int) -> int:
    return min(n_train, default_chunk(n_params)) * n_params * 4 * 3


class ExactGradients(FeatureMap):
    """The per-sample gradients themselves (k = number of differentiated parameters)."""

    name, label, exact = "none", "none (exact)", True

    def __init__(self, source: GradientSource, device: torch.device) -> None:
        self.grads = per_sample_gradients(source, device)
        self.chunk = default_chunk(source.n_params)

    @classmethod
    def build(cls, source, method, seed, device, probe, budget) -> FeatureMap:  # noqa: ANN001
        return cls(source, device)

    @classmethod
    def identity(cls, method: MethodSpec, seed: int) -> dict:
        return {"proj": cls.name}

    @classmethod
    def feature_dim(cls, n_params: int, method: MethodSpec) -> int:
        return n_params

    @classmethod
    def peak_bytes(cls, n_params: int, k: int, n_train: int, budget: int) -> int:
        return _gradient_chunk_bytes(n_params, n_train)

    def step(self, x, y, masks) -> Step:  # noqa: ANN001
        t0 = time.perf_counter()
        g, p = self.grads(x, y, masks)
        return g, p, {"grads_s": time.perf_counter() - t0, "project_s": 0.0}


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

    def _block(self, b: int, out: torch.Tensor | None = None) -> torch.Tensor:
        """Row block b, drawn from its own generator (so blocks can be drawn in any order, in parallel)."""
        r0 = b * self.rows_per_block
        rows = min(self.rows_per_block, self.n_params - r0)
        g = torch.Generator(device=self.device).manual_seed(derive_seed(self.seed, "dense", b))
        if self.distribution == "gaussian":
            block = torch.randn(rows, self.k, generator=g, device=self.device).mul_(1.0 / math.sqrt(self.k))
        else:
            block = torch.randint(0, 2, (rows, self.k), generator=g, device=self.device, dtype=torch.float32)
            block.mul_(2.0 / math.sqrt(self.k)).sub_(1.0 / math.sqrt(self.k))
        return block.to(self.dtype) if out is None else out.copy_(block)

    @property
    def n_blocks(self) -> int:
        return -(-self.n_params // self.rows_per_block)

    def matrix(self) -> torch.Tensor:
        """The whole matrix (generated once and kept when it fits `hold_bytes`). On a CPU the blocks are drawn
        by as many threads as torch uses (one generator per block: the same matrix in any order)."""
        if self._whole is not None:
            return self._whole
        t0 = time.perf_counter()
        whole = torch.empty(self.n_params, self.k, dtype=self.dtype, device=self.device)
        parts = whole.split(self.rows_per_block)
        workers = torch.get_num_threads() if self.device.type == "cpu" else 1
        with ThreadPoolExecutor(workers) as pool:
            list(pool.map(lambda b: self._block(b, parts[b]), range(self.n_blocks)))
        self.gen_s += time.perf_counter() - t0
        if self.hold:
            self._whole = whole
        return whole

    def __call__(self, g: torch.Tensor) -> torch.Tensor:
        """Project gradient rows g [B, n_params] -> [B, k]."""
        g = g.to(self.dtype)
        if self.hold:
            return (g @ self.matrix()).float()
        out = torch.zeros(g.shape[0], self.k, device=g.device)
        for b in range(self.n_blocks):
            r0 = b * self.rows_per_block
            t0 = time.perf_counter()
            block = self._block(b)
            self.gen_s += time.perf_counter() - t0
            out += (g[:, r0:r0 + self.rows_per_block] @ block).float()
        return out


_LAST_MATRIX: ContextVar[dict | None] = ContextVar("last_dense_matrix", default=None)


@contextmanager
def reuse_dense_matrix() -> Iterator[None]:
    """Inside the block, consecutive dense feature maps with the same projection seed and shape share one
    `DenseProjection` (generated once): the members of one base model under a shared projection. Only the most
    recent matrix is kept, so memory holds one matrix at a time."""
    token = _LAST_MATRIX.set({})
    try:
        yield
    finally:
        _LAST_MATRIX.reset(token)


class DenseJL(FeatureMap):
    """Exact per-sample gradients times a dense seeded JL matrix (`DenseProjection`)."""

    name, label = "dense", "dense JL"

    def __init__(self, source: GradientSource, projection: DenseProjection, device: torch.device,
                 probe: tuple[torch.Tensor, torch.Tensor]) -> None:
        self.grads = gradient_rows(source, device, projection.dtype, probe)
        self.projection = projection
        self.chunk = self.chunk_rows(source.n_params)

    @staticmethod
    def chunk_rows(n_params: int) -> int:
        """Examples per step: `DENSE_CHUNK_ROWS`, fewer when their float32 gradients exceed `DENSE_CHUNK_BYTES`."""
        return max(1, min(DENSE_CHUNK_ROWS, DENSE_CHUNK_BYTES // (4 * n_params)))

    @classmethod
    def build(cls, source, method, seed, device, probe, budget) -> FeatureMap:  # noqa: ANN001
        shape = (source.n_params, method.proj_dim, seed, method.dense_kind, method.proj_dtype, str(device))
        last = _LAST_MATRIX.get()
        if last is not None and last.get("shape") == shape:
            return cls(source, last["matrix"], device, probe)  # generated (and counted) for an earlier member
        matrix = DenseProjection(source.n_params, method.proj_dim, seed, device, method.dense_kind,
                                 hold_bytes=int(budget * HOLD_FRACTION), dtype=getattr(torch, method.proj_dtype))
        if last is not None:
            last.update(shape=shape, matrix=matrix)
        return cls(source, matrix, device, probe)

    @classmethod
    def identity(cls, method: MethodSpec, seed: int) -> dict:
        out = super().identity(method, seed) | {"dense_kind": method.dense_kind}
        if method.proj_dtype != "float32":  # keys of float32 features stay as they were
            out["dtype"] = method.proj_dtype
        return out

    @classmethod
    def peak_bytes(cls, n_params: int, k: int, n_train: int, budget: int) -> int:
        whole = n_params * k * 4
        matrix = whole if whole <= budget * HOLD_FRACTION else DENSE_BLOCK_ENTRIES * 4
        return _gradient_chunk_bytes(n_params, n_train) + matrix

    def step(self, x, y, masks) -> Step:  # noqa: ANN001
        t0 = time.perf_counter()
        g, p = self.grads(x, y, masks)
        t1 = time.perf_counter()
        gen_before = self.projection.gen_s
        phi = self.projection(g)
        gen_s = self.projection.gen_s - gen_before
        return phi, p, {"grads_s": t1 - t0, "project_s": time.perf_counter() - t1 - gen_s, "gen_s": gen_s}


class KronProjection(FeatureMap):
    """Kronecker-structured JL over all covered layers: k features, each a rank-one sketch of every layer.

    Feature r = k^-1/2 * sum over layers l and positions t of (u_lr . g_t)(v_lr . a_t), with g_t the
    layer's output gradient, a_t its input (bias column appended) and u, v independent standard Gaussians:
    a product of two separate projections (inputs, output gradients), which is vec(G) projected by the
    Kronecker-structured column u_lr (x) v_lr, G = sum_t g_t a_t^T the layer's weight gradient. Exact blocks
    (norm scales and shifts) add their exact per-example gradient times a dense Gaussian. Hence
    E[phi(z) . phi(z')] = <grad(z), grad(z')> over every covered parameter, and k is shared by all layers (no
    per-layer split). `hold_bytes`: memory for the Kronecker columns of layers that form weight gradients
    (one matrix product per chunk instead of two contractions).
    """

    name, label = "kron", "Kronecker JL"
    scheme = {"kron_form": KRON_FORM}

    def __init__(self, source: GradientSource, proj_dim: int, seed: int, device: torch.device,
                 probe: tuple[torch.Tensor, torch.Tensor], hold_bytes: int = 0) -> None:
        self.source = source
        self.k = proj_dim
        candidates, fired = _firing_modules(source, probe, device)
        # examples per chunk: the [B, positions, k] sketches of the busiest layer stay near KRON_CHUNK_BYTES
        self.chunk = max(1, min(512, KRON_CHUNK_BYTES // (4 * proj_dim * max(fired.values(), default=1))))
        self.layers: list[KronLayer] = []
        covered: set[str] = set()
        for name, module, adapter in candidates:
            u, v = adapter.sketches(name, module, proj_dim, seed, device)
            self.layers.append(KronLayer(name, module, adapter, u, v))
            covered.update(_qualified(name, adapter.param_names(module)))
        self.uncovered = tuple(n for n in source.param_names if n not in covered)
        if not self.layers:
            raise UserError("the Kronecker projection covers none of the differentiated parameters (no Linear, "
                            "Conv2d, Embedding or normalisation layer among them); use --proj dense")
        kronecker = [layer for layer in self.layers if layer.v is not None]
        if _columns_bytes(kronecker) <= hold_bytes:  # layers that form weight gradients build their columns
            for layer in kronecker:
                layer.hold_columns = True

    @classmethod
    def build(cls, source, method, seed, device, probe, budget) -> FeatureMap:  # noqa: ANN001
        return cls(source, method.proj_dim, seed, device, probe, int(budget * HOLD_FRACTION))

    @classmethod
    def identity(cls, method: MethodSpec, seed: int) -> dict:
        return super().identity(method, seed) | {"kron_form": KRON_FORM}

    @classmethod
    def model_scheme(cls, source: GradientSource) -> dict[str, str]:
        """`KRON_COVER` when layers covered since every parameter is (norms, position tables) are among the
        differentiated ones (features once computed without them differ); nothing otherwise: MLP keys stay."""
        extended = any(adapter.extends_coverage for _, _, adapter in _covered_modules(source))
        return {"kron_cover": KRON_COVER} if extended else {}

    @classmethod
    def peak_bytes(cls, n_params: int, k: int, n_train: int, budget: int) -> int:
        """The Kronecker columns when held (at most those of every parameter); the sketches are bounded per
        chunk by KRON_CHUNK_BYTES, counted with the features."""
        whole = n_params * k * 4
        return whole if whole <= budget * HOLD_FRACTION else 0

    def step(self, x, y, masks) -> Step:  # noqa: ANN001
        """One batched forward/backward with hooks on the covered layers, then their sketches."""
        t0 = time.perf_counter()
        calls, p = hooked_pass(self.source, {id(layer.site): layer for layer in self.layers}, x, y, masks)
        t1 = time.perf_counter()
        phi = None  # the layers' contributions summed in place
        for layer, inp, gout in calls:
            part = layer.adapter.features(layer, inp, gout)
            phi = part if phi is None else phi.add_(part)
        return phi, p, {"grads_s": t1 - t0, "project_s": time.perf_counter() - t1}


def hooked_pass(source: GradientSource, sites: Mapping[int, Entry], x: torch.Tensor, y: torch.Tensor,
                masks: Mapping[str, torch.Tensor]
                ) -> tuple[list[tuple[Entry, torch.Tensor, torch.Tensor]], torch.Tensor]:
    """One batched forward/backward of the summed target (averaged over `source.average_masks` when it has
    them) with forward hooks on the call sites `sites` (module id -> its entry): for every call, (entry, its first
    input, the gradient of the target with respect to its output), and p [B]. In eval mode examples do not
    interact, so each example's rows of these are its own."""
    calls: list[tuple[Entry, torch.Tensor, torch.Tensor]] = []

    def hook(mod, inputs, output):
        calls.append((sites[id(mod)], inputs[0].detach(), output))

    hooks = [module.register_forward_hook(hook) for module in source.model.modules() if id(module) in sites]
    try:
        values, p = mask_mean_target(source, lambda: source.model(x), y, masks)
    finally:
        for h in hooks:
            h.remove()
    gouts = torch.autograd.grad(values.sum(), [out for _, _, out in calls])
    return [(entry, inp, gout.detach()) for (entry, inp, _), gout in zip(calls, gouts)], p


class HookedGradients:
    """Exact per-sample gradient rows [B, n_params] (`source.param_names` order) from batched hooked
    forward/backward passes: each covered layer's per-example parameter gradients from its input and output
    gradient (`LayerAdapter.gradients`), computed in float32 and written once, rounded to `dtype`. Build it with
    `gradient_rows`, which checks that the layer adapters cover every differentiated parameter."""

    def __init__(self, source: GradientSource, modules: list[tuple[str, nn.Module, object]],
                 fired: Mapping[int, int], dtype: torch.dtype) -> None:
        self.source, self.dtype = source, dtype
        self.sites = {id(adapter.call_site(module)): (name, module, adapter) for name, module, adapter in modules}
        self.pass_rows = max(1, HOOKED_POSITIONS // max(fired.values()))
        named = dict(source.model.named_parameters())
        self.sizes = [named[n].numel() for n in source.param_names]

    def __call__(self, x: torch.Tensor, y: torch.Tensor, masks: Mapping[str, torch.Tensor]
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        flat = torch.empty(x.shape[0], sum(self.sizes), dtype=self.dtype, device=x.device)
        probs = []
        for start in range(0, x.shape[0], self.pass_rows):
            rows = slice(start, start + self.pass_rows)
            part_masks = {k: v[rows] for k, v in masks.items()} if self.source.per_example_masks else masks
            calls, p = hooked_pass(self.source, self.sites, x[rows], y[rows], part_masks)
            by_name: dict[str, torch.Tensor] = {}
            for (name, module, adapter), inp, gout in calls:
                for qualified, g in zip(_qualified(name, adapter.param_names(module)),
                                        adapter.gradients(module, inp, gout)):
                    by_name[qualified] = g if qualified not in by_name else by_name[qualified].add_(g)
            for part, n in zip(flat[rows].split(self.sizes, dim=1), self.source.param_names):
                part.copy_(by_name.pop(n))
            probs.append(p)
        return flat, torch.cat(probs)


def gradient_rows(source: GradientSource, device: torch.device, dtype: torch.dtype,
                  probe: tuple[torch.Tensor, torch.Tensor]) -> GradientStep:
    """Per-sample gradient rows [B, n_params] and p [B] by `HookedGradients` where the layer adapters cover every
    differentiated parameter through calls that fire on the probe example and give its gradient as vmap(grad) does
    (a parameter also used outside its layer's call would not), else by vmap (`per_sample_gradients`)."""
    modules, fired = _firing_modules(source, probe, device)
    covered = {q for name, module, adapter in modules for q in _qualified(name, adapter.param_names(module))}
    if modules and covered.issuperset(source.param_names):
        x, y = probe[0][:1].to(device), probe[1][:1].to(device)
        masks = source.masks_for(slice(0, 1), device)
        expected = per_sample_gradients(source, device)(x, y, masks)[0][0]
        got = HookedGradients(source, modules, fired, torch.float32)(x, y, masks)[0]
        if torch.allclose(got, expected, rtol=1e-4, atol=1e-5 * float(expected.abs().max()) + 1e-12):
            return HookedGradients(source, modules, fired, dtype)
    return per_sample_gradients(source, device, dtype)


def _columns_bytes(layers: list[KronLayer]) -> int:
    return sum(layer.d_out * layer.d_in * layer.k * 4 for layer in layers)


def _qualified(module_name: str, local: list[str]) -> list[str]:
    return [f"{module_name}.{p}" if module_name else p for p in local]


def _covered_modules(source: GradientSource) -> list[tuple[str, nn.Module, object]]:
    """(name, module, adapter) of every module of a covered type whose covered parameters are all differentiated."""
    wanted = set(source.param_names)
    out = []
    for name, module in source.model.named_modules():
        adapter = adapter_for(module)
        if adapter is None:
            continue
        names = _qualified(name, adapter.param_names(module))
        if names and all(p in wanted for p in names):
            out.append((name, module, adapter))
    return out


def _firing_modules(source: GradientSource, probe: tuple[torch.Tensor, torch.Tensor], device: torch.device
                    ) -> tuple[list[tuple[str, nn.Module, object]], dict[int, int]]:
    """The covered modules whose call sites fire on one probe example (a module called functionally, as inside
    nn.MultiheadAttention, does not), and the positions per example of each call site that fired, by id."""
    modules = _covered_modules(source)
    fired = _fired_positions(source, modules, probe, device)
    firing = [(name, module, adapter) for name, module, adapter in modules if id(adapter.call_site(module)) in fired]
    return firing, fired


def _fired_positions(source: GradientSource, modules: list[tuple[str, nn.Module, object]],
                     probe: tuple[torch.Tensor, torch.Tensor], device: torch.device) -> dict[int, int]:
    """Positions (tokens, pixels) per example of each call site that fires on one probe example, by id."""
    seen: dict[int, int] = {}

    def hook_for(module, adapter):
        def hook(site, inputs, output):
            seen[id(site)] = seen.get(id(site), 0) + adapter.positions(module, output)
        return hook

    hooks = [adapter.call_site(module).register_forward_hook(hook_for(module, adapter))
             for _, module, adapter in modules]
    try:
        with torch.no_grad(), masked(source.model, source.masks_for(slice(0, 1), device)):
            source.model(probe[0][:1].to(device))
    finally:
        for h in hooks:
            h.remove()
    return seen


PROJECTIONS: Registry[type[FeatureMap]] = Registry("projection")
for _cls in (DenseJL, KronProjection, ExactGradients):
    PROJECTIONS.register(_cls.name, _cls)
