"""Training: `train` (one model, a plain readable loop) and `train_many` (K models at once with torch.func).

All randomness is per model: initialisation from `seed`, shuffling from a CPU generator
seeded with `seed`, dropout masks from a generator on the training device seeded with
`seed + MASK_SEED_OFFSET`. Hence `train_many` gives the same parameters as `train`.
`load_or_train` adds the store: a spec trained once is loaded afterwards.
"""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import math
import time
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn
from torch.func import functional_call, grad, stack_module_state, vmap

from .context import Context
from .data import Dataset, load_dataset
from .device import resolve_device
from .executors import Executor, Task, as_executor, chunks
from .models.dropout import draw_masks, mask_shapes, use_masks
from .objectives import per_example_loss
from .progress import Progress, report
from .specs import Recipe, TaskSpec
from .store import Store, spec_key
from .tasks import make_model

MASK_SEED_OFFSET = 1_000_003
CHECKPOINT_KIND = "checkpoints"


def init_model(task: TaskSpec, seed: int) -> nn.Module:
    """The task's model with its initial weights drawn from `seed` (global RNG untouched)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return make_model(task)


def dropout_rates(model: nn.Module) -> dict[str, float]:
    """Rate of each declared dropout layer."""
    return {name: model.get_submodule(name).p for name in model.dropout_layers}


def _positions(dataset: Dataset, subset: np.ndarray | torch.Tensor | None) -> torch.Tensor:
    if subset is None:
        return torch.arange(dataset.n_train)
    return torch.as_tensor(np.asarray(subset), dtype=torch.long)


def _generators(seed: int, device: torch.device) -> tuple[torch.Generator, torch.Generator]:
    return (torch.Generator().manual_seed(seed),
            torch.Generator(device=device).manual_seed(seed + MASK_SEED_OFFSET))


def _has_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def _optimizer(recipe: Recipe, params) -> torch.optim.Optimizer:
    if recipe.optimizer == "sgd":
        return torch.optim.SGD(params, lr=recipe.lr, momentum=recipe.momentum, weight_decay=recipe.weight_decay)
    return torch.optim.Adam(params, lr=recipe.lr, weight_decay=recipe.weight_decay)


def train(task: TaskSpec, dataset: Dataset, seed: int, subset: np.ndarray | None = None,
          device: str | torch.device = "auto", progress: Progress | None = None) -> nn.Module:
    """Train one model on the training set (or `subset` of its positions); returns it in eval mode."""
    device = resolve_device(device) if isinstance(device, str) else device
    recipe = task.recipe
    x, y = dataset.x_train.to(device), dataset.y_train.to(device)
    positions = _positions(dataset, subset)
    model = init_model(task, seed).to(device)
    shapes, rates = mask_shapes(model, x[:1]), dropout_rates(model)
    shuffle_gen, mask_gen = _generators(seed, device)
    opt = _optimizer(recipe, model.parameters())
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
    return model.eval()


class _FunctionalOptimizer:
    """SGD (momentum, weight decay) and Adam on stacked parameters, with torch.optim's arithmetic."""

    def __init__(self, recipe: Recipe, params: dict[str, torch.Tensor]) -> None:
        self.recipe = recipe
        self.step_count = 0
        self.state = {name: [torch.zeros_like(p) for _ in range(1 if recipe.optimizer == "sgd" else 2)]
                      for name, p in params.items()}

    @torch.no_grad()
    def step(self, params: dict[str, torch.Tensor], grads: dict[str, torch.Tensor]) -> None:
        r = self.recipe
        self.step_count += 1
        for name, p in params.items():
            g = grads[name]
            if r.weight_decay:
                g = g.add(p, alpha=r.weight_decay)
            if r.optimizer == "sgd":
                (buf,) = self.state[name]
                if r.momentum:
                    buf.mul_(r.momentum).add_(g)
                    g = buf
                p.add_(g, alpha=-r.lr)
            else:
                beta1, beta2, eps = 0.9, 0.999, 1e-8
                m, v = self.state[name]
                m.lerp_(g, 1 - beta1)
                v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
                bc1, bc2 = 1 - beta1 ** self.step_count, 1 - beta2 ** self.step_count
                denom = (v.sqrt() / math.sqrt(bc2)).add_(eps)
                p.addcdiv_(m, denom, value=-r.lr / bc1)


def train_many(task: TaskSpec, dataset: Dataset, seeds: Sequence[int],
               subsets: Sequence[np.ndarray | None] | None = None, device: str | torch.device = "auto",
               progress: Progress | None = None) -> list[nn.Module]:
    """Train K models at once (stacked parameters, one vmapped gradient per step).

    Each model has its own seed and its own training subset (all subsets of one size).
    Models with BatchNorm are trained one by one with `train` (per-model running statistics).
    """
    device = resolve_device(device) if isinstance(device, str) else device
    subsets = list(subsets) if subsets is not None else [None] * len(seeds)
    if len(subsets) != len(seeds):
        raise ValueError(f"{len(seeds)} seeds but {len(subsets)} subsets")
    if not seeds:
        return []
    positions = [_positions(dataset, s) for s in subsets]
    probe = init_model(task, seeds[0])
    if _has_batchnorm(probe) or len({len(p) for p in positions}) > 1:
        out = []
        for k, (seed, subset) in enumerate(zip(seeds, subsets)):
            out.append(train(task, dataset, seed, subset, device))
            report(progress, k + 1, len(seeds), "train models")
        return out

    recipe = task.recipe
    x, y = dataset.x_train.to(device), dataset.y_train.to(device)
    models = [init_model(task, s).to(device) for s in seeds]
    params, buffers = stack_module_state(models)
    params = {k: v.detach().clone() for k, v in params.items()}
    base = copy.deepcopy(models[0]).to("meta")
    shapes, rates = mask_shapes(models[0], x[:1]), dropout_rates(models[0])
    gens = [_generators(s, device) for s in seeds]
    pos = torch.stack(positions)  # (K, n)
    n = pos.shape[1]

    def loss_fn(p, b, masks, xb, yb):
        with use_masks(base, masks):
            logits = functional_call(base, (p, b), (xb,))
        return per_example_loss(logits, yb, task.sequence).mean()

    batched_grad = vmap(grad(loss_fn))
    opt = _FunctionalOptimizer(recipe, params)
    rows = torch.arange(len(seeds))[:, None]
    for epoch in range(recipe.epochs):
        order = torch.stack([torch.randperm(n, generator=g[0]) for g in gens])
        idx_all = pos[rows, order].to(device)  # (K, n) dataset positions in each model's order
        for start in range(0, n, recipe.batch_size):
            idx = idx_all[:, start:start + recipe.batch_size]
            per_model = [draw_masks(shapes, rates, idx.shape[1], g[1]) for g in gens]
            masks = {name: torch.stack([m[name] for m in per_model]) for name in shapes}
            grads = batched_grad(params, buffers, masks, x[idx], y[idx])
            opt.step(params, grads)
        report(progress, epoch + 1, recipe.epochs, f"train {len(seeds)} models")

    out = []
    for k, model in enumerate(models):
        with torch.no_grad():
            for name, p in model.named_parameters():
                p.copy_(params[name][k])
        out.append(model.eval())
    return out


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
        valid = yb != -100
        correct += int(((logits.argmax(-1) == yb) & valid).sum())
        count += int(valid.sum())
    return {"loss": float(torch.cat(losses).mean()), "accuracy": correct / max(count, 1)}


# --- the store ---------------------------------------------------------------------------------
_FINGERPRINTS: dict[int, str] = {}


def dataset_fingerprint(dataset: Dataset) -> str:
    """Hash of a dataset's contents and source indices (so keys survive moving the data directory)."""
    if id(dataset) not in _FINGERPRINTS:
        h = hashlib.sha256(dataset.name.encode())
        for t in (dataset.x_train, dataset.y_train, dataset.x_test, dataset.y_test,
                  dataset.train_index, dataset.test_index):
            h.update(t.contiguous().numpy().tobytes())
        _FINGERPRINTS[id(dataset)] = h.hexdigest()[:16]
    return _FINGERPRINTS[id(dataset)]


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
    with its test metrics and its share of the training seconds."""
    t0 = time.perf_counter()
    models = train_many(task, dataset, seeds, subsets, ctx.device, ctx.progress)
    per_model_s = (time.perf_counter() - t0) / len(seeds)
    for seed, subset, key, model in zip(seeds, subsets, keys, models):
        metrics = evaluate(model, dataset.x_test, dataset.y_test, task.sequence)
        meta = {"task": task.name, "seed": seed, "subset": subset_digest(subset), "train_s": per_model_s,
                "device": ctx.device.type, "metrics": metrics, "trained_together": len(seeds)}
        ctx.store.save(CHECKPOINT_KIND, key, model.state_dict(), meta)
