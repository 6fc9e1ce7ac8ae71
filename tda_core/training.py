"""Training: `train` (one model, a plain readable loop) and `train_many` (K models at once).

All randomness is per model: initialisation from `seed`, shuffling from a CPU generator
seeded with `seed`, dropout masks from a generator on the training device seeded with
`seed + MASK_SEED_OFFSET`. Hence `train_many` gives the same parameters as `train`.
`train_many` stacks the K models' parameters and buffers and takes one optimizer step on the stack per
batch: models that define `forward_stacked` (MLP: batched matrix products; ResNet-9: grouped convolutions,
BatchNorm with per-model running statistics) run it, every other model (the Music Transformer) runs under
`torch.func.vmap` over `functional_call`.
`load_or_train` adds the store: a spec trained once is loaded afterwards.
"""
from __future__ import annotations

import copy
import ctypes
import dataclasses
import functools
import hashlib
import time
from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import nn
from torch.func import functional_call, stack_module_state, vmap

from .context import Context
from .data import Dataset, load_dataset
from .device import resolve_device
from .executors import Executor, Task, as_executor, chunks
from .models.dropout import draw_masks, draw_stacked_masks, mask_shapes, use_masks
from .objectives import IGNORE, per_example_loss
from .progress import Progress, report
from .specs import Recipe, TaskSpec
from .store import Store, spec_key
from .tasks import make_model

MASK_SEED_OFFSET = 1_000_003
CHECKPOINT_KIND = "checkpoints"
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc `mallopt` parameters


@functools.cache
def _keep_freed_memory() -> None:
    """Make glibc's malloc keep freed blocks of up to 32 MB (its largest mmap threshold) for reuse instead of
    handing them back to the OS. torch has no caching allocator on the CPU, so otherwise the large stacked
    activations and gradients of `train_many` come back as fresh zeroed pages every step (ResNet-9, 8 models:
    15,000-20,000 page faults per step, a sixth of its time). Process-wide; a no-op where the C library is not glibc."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    libc.mallopt(_M_MMAP_THRESHOLD, 32 * 2 ** 20)
    libc.mallopt(_M_TRIM_THRESHOLD, 2 ** 31 - 1)


def init_model(task: TaskSpec, seed: int) -> nn.Module:
    """The task's model with its initial weights drawn from `seed` (global RNG untouched)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return make_model(task)


def dropout_rates(model: nn.Module) -> dict[str, float]:
    """Rate of each declared dropout layer."""
    return {name: model.get_submodule(name).p for name in model.dropout_layers}


def _training_positions(dataset: Dataset, subset: np.ndarray | torch.Tensor | None) -> torch.Tensor:
    """Positions in the training set a model trains on: `subset`, or all of them."""
    if subset is None:
        return torch.arange(dataset.n_train)
    return torch.as_tensor(np.asarray(subset), dtype=torch.long)


def _rows(data: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """data[positions] for (K, B) positions, by `index_select` (a plain copy of rows, faster than indexing)."""
    return data.index_select(0, positions.flatten()).view(*positions.shape, *data.shape[1:])


def _generators(seed: int, device: torch.device) -> tuple[torch.Generator, torch.Generator]:
    """(shuffling, dropout masks) generators of the model trained from `seed`."""
    return (torch.Generator().manual_seed(seed),
            torch.Generator(device=device).manual_seed(seed + MASK_SEED_OFFSET))


def _optimizer(recipe: Recipe, params: Sequence[torch.Tensor], device: torch.device) -> torch.optim.Optimizer:
    """The recipe's optimizer; the fused kernels where torch has them (one pass over each tensor, same arithmetic
    for one model and for a stack, since every update is elementwise)."""
    fused = True if device.type in ("cpu", "cuda") else None
    if recipe.optimizer == "sgd":
        return torch.optim.SGD(params, lr=recipe.lr, momentum=recipe.momentum, weight_decay=recipe.weight_decay,
                               fused=fused)
    return torch.optim.Adam(params, lr=recipe.lr, weight_decay=recipe.weight_decay, fused=fused)


def train(task: TaskSpec, dataset: Dataset, seed: int, subset: np.ndarray | None = None,
          device: str | torch.device = "auto", progress: Progress | None = None,
          on_epoch: Callable[[int, nn.Module], None] | None = None) -> nn.Module:
    """Train one model on the training set (or `subset` of its positions); returns it in eval mode.
    `on_epoch(epochs done, model in eval mode)` is called after every epoch (e.g. for a validation curve)."""
    device = resolve_device(device) if isinstance(device, str) else device
    recipe = task.recipe
    x, y = dataset.x_train.to(device), dataset.y_train.to(device)
    positions = _training_positions(dataset, subset)
    model = init_model(task, seed).to(device)
    shapes, rates = mask_shapes(model, x[:1]), dropout_rates(model)
    shuffle_gen, mask_gen = _generators(seed, device)
    opt = _optimizer(recipe, list(model.parameters()), device)
    model.train()
    for epoch in range(recipe.epochs):
        for batch in torch.randperm(len(positions), generator=shuffle_gen).split(recipe.batch_size):
            idx = positions[batch].to(device)
            with use_masks(model, draw_masks(shapes, rates, len(idx), mask_gen)):
                loss = per_example_loss(model(x[idx]), y[idx], task.sequence).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        report(progress, epoch + 1, recipe.epochs, f"train seed {seed}")
        if on_epoch is not None:
            on_epoch(epoch + 1, model.eval())
            model.train()
    return model.eval()


class _ModelStack:
    """K models of one architecture as stacked parameters and buffers, (K, *shape) each.

    Models whose class defines `forward_stacked` (MLP, ResNet-9; see `models.stacked`) run it: batched matrix
    products, grouped convolutions, BatchNorm over the K models' channels. Their stacked matrices are stored as
    (K, in, out) and handed over as (K, out, in) transposes, so each batched product's gradient lands in its leaf
    tensor without a copy. Every other model (the Music Transformer) runs under `vmap` over `functional_call`.
    Either way the backward pass is ordinary autograd, and BatchNorm running statistics are kept per model in
    the stacked buffers."""

    def __init__(self, models: Sequence[nn.Module], task: TaskSpec) -> None:
        params, self.buffers = stack_module_state(list(models))
        self.sequence = task.sequence
        stacked = hasattr(models[0], "forward_stacked")
        self._transposed = {name for name, p in params.items() if stacked and p.dim() == 3}
        self.leaves = {name: (p.detach().transpose(1, 2).contiguous() if name in self._transposed else p.detach())
                       .requires_grad_() for name, p in params.items()}
        if stacked:
            self._forward = models[0].forward_stacked
        else:
            base = copy.deepcopy(models[0]).to("meta").train()

            def forward(p, b, x, masks):
                with use_masks(base, masks):
                    return functional_call(base, (p, b), (x,))

            self._forward = vmap(forward)

    def params(self) -> dict[str, torch.Tensor]:
        """The stacked parameters under the module's names and shapes (views of the leaves)."""
        return {name: leaf.transpose(1, 2) if name in self._transposed else leaf for name, leaf in self.leaves.items()}

    def loss(self, x: torch.Tensor, y: torch.Tensor, masks: dict[str, torch.Tensor]) -> torch.Tensor:
        """Sum over the models of each model's mean loss on its own batch (x, y are (K, B, ...))."""
        logits = self._forward(self.params(), self.buffers, x, masks)
        losses = per_example_loss(logits.flatten(0, 1), y.flatten(0, 1), self.sequence)
        return losses.view(len(x), -1).mean(1).sum()

    @torch.no_grad()
    def write_back(self, models: Sequence[nn.Module]) -> None:
        """Copy model k's parameters and buffers into models[k]."""
        params = self.params()
        for k, model in enumerate(models):
            for name, p in model.named_parameters():
                p.copy_(params[name][k])
            for name, b in model.named_buffers():
                b.copy_(self.buffers[name][k])


def train_many(task: TaskSpec, dataset: Dataset, seeds: Sequence[int],
               subsets: Sequence[np.ndarray | None] | None = None, device: str | torch.device = "auto",
               progress: Progress | None = None) -> list[nn.Module]:
    """Train K models at once: one optimizer step on their stacked parameters per batch, each model with its own
    seed, batch order, dropout masks and training subset (all subsets of one size; otherwise, and for K = 1,
    the models are trained one by one with `train`)."""
    device = resolve_device(device) if isinstance(device, str) else device
    subsets = list(subsets) if subsets is not None else [None] * len(seeds)
    if len(subsets) != len(seeds):
        raise ValueError(f"{len(seeds)} seeds but {len(subsets)} subsets")
    positions = [_training_positions(dataset, s) for s in subsets]
    if len(seeds) == 1 or len({len(p) for p in positions}) > 1:
        if len(seeds) == 1:
            return [train(task, dataset, seeds[0], subsets[0], device, progress)]  # reports its epochs
        out = []
        for k, (seed, subset) in enumerate(zip(seeds, subsets)):
            out.append(train(task, dataset, seed, subset, device))
            report(progress, k + 1, len(seeds), "train models")
        return out

    _keep_freed_memory()
    recipe = task.recipe
    x, y = dataset.x_train.to(device), dataset.y_train.to(device)
    models = [init_model(task, s).to(device) for s in seeds]
    stack = _ModelStack(models, task)
    shapes, rates = mask_shapes(models[0], x[:1]), dropout_rates(models[0])
    shuffle_gens, mask_gens = zip(*(_generators(s, device) for s in seeds))
    opt = _optimizer(recipe, list(stack.leaves.values()), device)
    pos = torch.stack(positions).to(device)  # (K, n)
    for epoch in range(recipe.epochs):
        order = torch.stack([torch.randperm(pos.shape[1], generator=g) for g in shuffle_gens]).to(device)
        epoch_positions = pos.gather(1, order)  # each model's dataset positions in its own order
        for batch in epoch_positions.split(recipe.batch_size, dim=1):
            masks = draw_stacked_masks(shapes, rates, batch.shape[1], mask_gens)
            loss = stack.loss(_rows(x, batch), _rows(y, batch), masks)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        report(progress, epoch + 1, recipe.epochs, f"train {len(seeds)} models")
    stack.write_back(models)
    return [m.eval() for m in models]


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, sequence: bool,
             batch_size: int = 1024) -> dict[str, float]:
    """Mean loss and accuracy (per token for sequences) of a model in eval mode."""
    device = next(model.parameters()).device
    losses, correct, count = [], 0, 0
    for start in range(0, len(x), batch_size):
        xb, yb = x[start:start + batch_size].to(device), y[start:start + batch_size].to(device)
        logits = model(xb)
        losses.append(per_example_loss(logits, yb, sequence))
        valid = yb != IGNORE
        correct += int(((logits.argmax(-1) == yb) & valid).sum())
        count += int(valid.sum())
    return {"loss": float(torch.cat(losses).mean()), "accuracy": correct / max(count, 1)}


# --- the store ---------------------------------------------------------------------------------
def dataset_fingerprint(dataset: Dataset) -> str:
    """Hash of a dataset's contents and source indices (so keys survive moving the data directory)."""
    return dataset.fingerprint


def subset_digest(subset: np.ndarray | None) -> str | None:
    """Short hash of a subset of training positions (None = full training set)."""
    if subset is None:
        return None
    return hashlib.sha256(np.asarray(subset, dtype=np.int64).tobytes()).hexdigest()[:16]


def checkpoint_key(task: TaskSpec, dataset: Dataset, seed: int, subset: np.ndarray | None,
                   device: torch.device) -> str:
    """Store key of one trained model."""
    return spec_key({"task": task, "data": dataset_fingerprint(dataset), "seed": seed,
                     "subset": subset_digest(subset), "device": device.type})


@dataclasses.dataclass
class TrainedModel:
    """A trained model with where it came from and what it cost."""

    task: TaskSpec
    seed: int
    model: nn.Module
    key: str
    train_s: float  # seconds it took to train (recorded when trained, also when loaded)
    loaded: bool  # True when read from the store instead of trained now
    load_s: float
    nbytes: int
    metrics: dict[str, float]


def load_or_train(task: TaskSpec, seeds: Sequence[int], subsets: Sequence[np.ndarray | None] | None = None,
                  store: Store | None = None, device: str | torch.device = "auto",
                  dataset: Dataset | None = None, progress: Progress | None = None,
                  executor: Executor | str | None = None) -> list[TrainedModel]:
    """Models for (task, seed[, subset]): loaded from the store when present, else trained together (one executor
    task per chunk of the missing models: a single chunk locally) and stored."""
    device = resolve_device(device) if isinstance(device, str) else device
    store = store or Store()
    dataset = dataset or load_dataset(task.dataset)
    subsets = list(subsets) if subsets is not None else [None] * len(seeds)
    keys = [checkpoint_key(task, dataset, s, sub, device) for s, sub in zip(seeds, subsets)]
    results: dict[int, TrainedModel] = {}

    def load_stored(positions: Sequence[int]) -> list[int]:
        """Load what is stored among `positions`; the positions still missing."""
        for k in positions:
            t0 = time.perf_counter()
            art = store.load(CHECKPOINT_KIND, keys[k])
            if art is not None:
                model = init_model(task, seeds[k])
                model.load_state_dict(art.tensors)
                results[k] = TrainedModel(task, seeds[k], model.to(device).eval(), keys[k], art.meta["train_s"], True,
                                          time.perf_counter() - t0, art.nbytes, art.meta["metrics"])
        return [k for k in positions if k not in results]

    missing = load_stored(range(len(keys)))
    if missing:
        ctx = Context(store, device, progress, as_executor(executor))
        parts, trained = chunks(missing, len(missing), ctx.executor.workers), []

        def arrived(i: int, _: None) -> None:
            trained.extend(parts[i])
            report(progress, len(trained), len(missing), "models trained")

        ctx.executor.for_each([Task(train_models, (task, dataset, [seeds[k] for k in part],
                                                   [subsets[k] for k in part], [keys[k] for k in part]))
                               for part in parts], ctx, arrived)
        load_stored(trained)  # just trained: what it cost is in the stored metadata
        for k in trained:
            results[k] = dataclasses.replace(results[k], loaded=False, load_s=0.0)
    return [results[k] for k in range(len(keys))]


def train_models(ctx: Context, task: TaskSpec, dataset: Dataset, seeds: list[int], subsets: list[np.ndarray | None],
                 keys: list[str]) -> None:
    """Task: train models together (`train_many`) and store each under the checkpoint key the driver handed out,
    with its test metrics and its share of the training seconds. Under the keys' locks: what another process
    stored meanwhile is not trained again."""
    with ctx.store.lock_keys(CHECKPOINT_KIND, keys):
        todo = [i for i, key in enumerate(keys) if not ctx.store.has(CHECKPOINT_KIND, key)]
        if not todo:
            return
        t0 = time.perf_counter()
        models = train_many(task, dataset, [seeds[i] for i in todo], [subsets[i] for i in todo], ctx.device,
                            ctx.progress)
        per_model_s = (time.perf_counter() - t0) / len(todo)
        for i, model in zip(todo, models):
            metrics = evaluate(model, dataset.x_test, dataset.y_test, task.sequence)
            meta = {"task": task.name, "seed": seeds[i], "subset": subset_digest(subsets[i]),
                    "train_s": per_model_s, "device": ctx.device.type, "metrics": metrics,
                    "trained_together": len(todo)}
            ctx.store.save(CHECKPOINT_KIND, keys[i], model.state_dict(), meta)
