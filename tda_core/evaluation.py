"""Evaluation: subset-retraining ground truth, the linear datamodeling score (LDS), counterfactual checks.

Ground truth: M subsets of alpha * n training positions, subset j drawn from (seed, j) so the
first subsets do not depend on M; each trained R times (run r with its own training seed),
the target of every test example recorded. Every trained model's targets are stored as soon
as its chunk finishes, so an interrupted computation resumes where it stopped.
"""
from __future__ import annotations

import dataclasses
import hashlib
import time
from collections.abc import Sequence

import numpy as np
import scipy.stats
import torch
from torch import nn

from .data import Dataset, load_dataset
from .context import Context, resolve
from .errors import UserError
from .executors import Executor, Task, chunks
from .objectives import target
from .progress import Progress, report
from .specs import EvalSpec, TaskSpec
from .store import Store, spec_key
from .training import dataset_fingerprint, load_or_train, train_many

GROUND_TRUTH_KIND = "ground_truth"
SUBSET_TARGETS_KIND = "ground_truth_models"
COUNTERFACTUAL_KIND = "counterfactual"
DEFAULT_CHUNK = 50


# --- ground truth ------------------------------------------------------------------------------
def subset_size(n_train: int, spec: EvalSpec) -> int:
    """alpha * n, rounded, at least 1."""
    return max(1, int(round(spec.alpha * n_train)))


def draw_subset(n_train: int, spec: EvalSpec, j: int) -> np.ndarray:
    """Sorted training positions of subset j, drawn from (spec.seed, j) alone."""
    rng = np.random.default_rng([spec.seed, j])
    return np.sort(rng.permutation(n_train)[: subset_size(n_train, spec)])


def draw_subsets(n_train: int, spec: EvalSpec) -> np.ndarray:
    """All M subsets as an int64 array [M, alpha * n]."""
    return np.stack([draw_subset(n_train, spec, j) for j in range(spec.M)]).astype(np.int64)


def run_seed(spec: EvalSpec, j: int, r: int) -> int:
    """Training seed of run r on subset j (distinct per (seed, j, r), independent of M and R)."""
    return int(np.random.SeedSequence([spec.seed, j, r, 7]).generate_state(1, dtype=np.uint32)[0])


@torch.no_grad()
def target_values(model: nn.Module, dataset: Dataset, sequence: bool, batch_size: int = 1024) -> torch.Tensor:
    """Target (margin or mean token log-likelihood) of every test example under `model` [n_test]."""
    device = next(model.parameters()).device
    model.eval()
    out = []
    for start in range(0, dataset.n_test, batch_size):
        xb = dataset.x_test[start:start + batch_size].to(device)
        yb = dataset.y_test[start:start + batch_size].to(device)
        out.append(target(model(xb), yb, sequence).float().cpu())
    return torch.cat(out)


@dataclasses.dataclass
class GroundTruth:
    """Subsets [M, n_sub] and the targets of every test example under every subset model [M, R, n_test]."""

    task: str
    spec: EvalSpec
    subsets: torch.Tensor
    targets: torch.Tensor
    key: str
    meta: dict

    @property
    def values(self) -> torch.Tensor:
        """Targets averaged over the R runs [M, n_test]."""
        return self.targets.mean(1)


def _gt_key(task: TaskSpec, dataset: Dataset, spec: EvalSpec, device: torch.device) -> str:
    return spec_key({"task": task, "data": dataset_fingerprint(dataset), "eval": spec, "device": device.type})


def _model_key(task: TaskSpec, dataset: Dataset, spec: EvalSpec, j: int, r: int, device: torch.device) -> str:
    # M and R are left out so a larger ground truth reuses the models of a smaller one.
    return spec_key({"task": task, "data": dataset_fingerprint(dataset), "alpha": spec.alpha, "seed": spec.seed,
                     "subset": j, "run": r, "device": device.type})


def missing_models(task: TaskSpec, spec: EvalSpec, *, store: Store | None = None,
                   device: str | torch.device = "auto", dataset: Dataset | None = None) -> int:
    """How many of the M x R subset models a ground truth still has to train."""
    task, ctx = resolve(task, store, device)
    store, device = ctx.store, ctx.device
    dataset = dataset or load_dataset(task.dataset)
    if store.has(GROUND_TRUTH_KIND, _gt_key(task, dataset, spec, device)):
        return 0
    return sum(not store.has(SUBSET_TARGETS_KIND, _model_key(task, dataset, spec, j, r, device))
               for j in range(spec.M) for r in range(spec.runs))


def ground_truth(task: TaskSpec, spec: EvalSpec, *, store: Store | None = None, device: str | torch.device = "auto",
                 dataset: Dataset | None = None, chunk: int = DEFAULT_CHUNK, progress: Progress | None = None,
                 executor: Executor | str | None = None) -> GroundTruth:
    """Train M x R subset models (chunks of `chunk` at once with `train_many`, one executor task per chunk) and
    record their test targets.

    Resumable: each finished model's targets are stored, so a rerun trains only what is missing. With more than
    one worker the chunks shrink so that every worker gets one.
    """
    task, ctx = resolve(task, store, device, progress, executor)
    store, device = ctx.store, ctx.device
    dataset = dataset or load_dataset(task.dataset)
    if chunk < 1:
        raise UserError(f"chunk must be a positive number of models, got {chunk}")
    key = _gt_key(task, dataset, spec, device)
    found = store.load(GROUND_TRUTH_KIND, key)
    if found is not None:
        return GroundTruth(task.name, spec, found.tensors["subsets"], found.tensors["targets"], key, found.meta)

    t_wall = time.perf_counter()
    subsets = draw_subsets(dataset.n_train, spec)
    jobs = [(j, r) for j in range(spec.M) for r in range(spec.runs)]
    keys = {job: _model_key(task, dataset, spec, *job, device) for job in jobs}
    values: dict[tuple[int, int], torch.Tensor] = {}
    train_s = 0.0

    def load_stored(wanted: list[tuple[int, int]]) -> list[tuple[int, int]]:
        """Read the stored targets among `wanted`; the jobs still missing."""
        nonlocal train_s
        for job in wanted:
            art = store.load(SUBSET_TARGETS_KIND, keys[job])
            if art is not None:
                values[job] = art.tensors["targets"]
                train_s += art.meta["train_s"]
        return [job for job in wanted if job not in values]

    missing = load_stored(jobs)
    resumed = len(values)
    report(progress, len(values), len(jobs), "ground-truth models")

    def arrived(_: int, trained: dict[tuple[int, int], tuple[torch.Tensor, float]]) -> None:
        nonlocal train_s
        for job, (targets, seconds) in trained.items():
            values[job] = targets
            train_s += seconds
        report(progress, len(values), len(jobs), "ground-truth models")

    workers = ctx.executor.workers if missing else 1
    ctx.executor.for_each([Task(train_subset_models, (task, dataset, spec, part, [keys[job] for job in part]))
                           for part in chunks(missing, chunk, workers)], ctx, arrived)

    targets = torch.stack([torch.stack([values[(j, r)] for r in range(spec.runs)]) for j in range(spec.M)])
    meta = {"task": task.name, "eval": dataclasses.asdict(spec), "device": device.type, "n_train": dataset.n_train,
            "n_test": dataset.n_test, "train_s": train_s, "resumed_models": resumed,
            "target": "token log-likelihood" if task.sequence else "margin",
            "wall_s": time.perf_counter() - t_wall, "workers": workers, "executor": ctx.executor.name}
    art = store.save(GROUND_TRUTH_KIND, key, {"subsets": torch.from_numpy(subsets), "targets": targets}, meta)
    return GroundTruth(task.name, spec, art.tensors["subsets"], targets, key, meta)


def train_subset_models(ctx: Context, task: TaskSpec, dataset: Dataset, spec: EvalSpec, part: list[tuple[int, int]],
                        keys: list[str]) -> dict[tuple[int, int], tuple[torch.Tensor, float]]:
    """Task: train one chunk of subset models together (`train_many`) and store each model's test targets under
    the key the driver handed out. Returns {(subset j, run r): (targets, training seconds per model)}."""
    trained = {}
    with ctx.store.lock_keys(SUBSET_TARGETS_KIND, keys):
        todo = []
        for job, key in zip(part, keys):  # another process may have trained some meanwhile
            art = ctx.store.load(SUBSET_TARGETS_KIND, key)
            if art is None:
                todo.append((job, key))
            else:
                trained[job] = (art.tensors["targets"], float(art.meta["train_s"]))
        if not todo:
            return trained
        t0 = time.perf_counter()
        models = train_many(task, dataset, [run_seed(spec, j, r) for (j, r), _ in todo],
                            [draw_subset(dataset.n_train, spec, j) for (j, _), _ in todo], ctx.device,
                            ctx.progress)  # reports epochs of this chunk
        per_model_s = (time.perf_counter() - t0) / len(todo)
        for ((j, r), key), model in zip(todo, models):
            targets = target_values(model, dataset, task.sequence)
            ctx.store.save(SUBSET_TARGETS_KIND, key, {"targets": targets},
                           {"task": task.name, "subset": j, "run": r, "seed": run_seed(spec, j, r),
                            "train_s": per_model_s, "trained_together": len(todo), "device": ctx.device.type})
            trained[(j, r)] = (targets, per_model_s)
    return trained


# --- LDS ---------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class LDS:
    """Mean and standard error over test examples of the per-example Spearman correlation."""

    mean: float
    sem: float
    per_example: np.ndarray  # NaN where a correlation is undefined (constant predictions or targets)

    @property
    def n(self) -> int:
        """Test examples with a defined correlation."""
        return int(np.isfinite(self.per_example).sum())


def datamodel_predictions(scores: torch.Tensor | np.ndarray, subsets: torch.Tensor | np.ndarray) -> np.ndarray:
    """sum_{i in S_j} score(i, z) for every subset j and test example z [M, n_test]."""
    scores = np.asarray(scores, dtype=np.float64)
    subsets = np.asarray(subsets)
    indicator = np.zeros((len(subsets), scores.shape[0]))
    np.put_along_axis(indicator, subsets, 1.0, axis=1)
    return indicator @ scores


def columnwise_spearman(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Spearman correlation of a[:, z] and b[:, z] for every column z (NaN when undefined)."""
    ra = scipy.stats.rankdata(a, axis=0)
    rb = scipy.stats.rankdata(b, axis=0)
    ra -= ra.mean(0)
    rb -= rb.mean(0)
    denom = np.sqrt((ra ** 2).sum(0) * (rb ** 2).sum(0))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denom > 0, (ra * rb).sum(0) / np.where(denom > 0, denom, 1.0), np.nan)


def lds(scores: torch.Tensor | np.ndarray, subsets: torch.Tensor | np.ndarray,
        values: torch.Tensor | np.ndarray) -> LDS:
    """LDS of `scores` [n_train, n_test] against subset models' targets `values` [M, n_test]."""
    values = np.asarray(values, dtype=np.float64)
    scores = np.asarray(scores)
    if scores.shape[1] != values.shape[1]:
        raise ValueError(f"scores cover {scores.shape[1]} test examples but the ground truth {values.shape[1]}")
    if len(subsets) != len(values):
        raise ValueError(f"{len(subsets)} subsets but targets for {len(values)}")
    return lds_of_examples(columnwise_spearman(datamodel_predictions(scores, subsets), values))


def lds_of_examples(per_example: np.ndarray) -> LDS:
    """Mean and standard error over the test examples whose LDS is defined."""
    defined = per_example[np.isfinite(per_example)]
    if len(defined) == 0:
        return LDS(float("nan"), float("nan"), per_example)
    sem = float(scipy.stats.sem(defined)) if len(defined) > 1 else float("nan")
    return LDS(float(defined.mean()), sem, per_example)


def lds_against(scores: torch.Tensor | np.ndarray, truth: GroundTruth,
                test_positions: Sequence[int] | np.ndarray | None = None) -> LDS:
    """LDS against a stored ground truth; `scores` columns are `test_positions` (default: all)."""
    values = truth.values.numpy()
    if test_positions is not None:
        values = values[:, np.asarray(test_positions, dtype=np.int64)]
    return lds(scores, truth.subsets.numpy(), values)


# --- the ground truth's own noise ------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Ceiling:
    """How reproducible a ground truth is, per test example, and the LDS it allows.

    `reliability`: split-half Spearman between the mean targets of the even and the odd runs of each subset,
    corrected to all R runs (Spearman-Brown, 2r / (1 + r)); `ceiling`: its square root, the highest correlation
    any attribution can reach with targets that noisy (the attenuation bound; for rank correlations an
    approximation). Both NaN with one run per subset.
    """

    reliability: np.ndarray  # per test example
    runs: int

    @property
    def mean_reliability(self) -> float:
        defined = self.reliability[np.isfinite(self.reliability)]
        return float(defined.mean()) if len(defined) else float("nan")

    @property
    def ceiling(self) -> float:
        """Mean over test examples of sqrt(reliability) (clipped at 0)."""
        defined = self.reliability[np.isfinite(self.reliability)]
        return float(np.sqrt(np.clip(defined, 0.0, None)).mean()) if len(defined) else float("nan")


def ground_truth_ceiling(truth: GroundTruth, test_positions: Sequence[int] | np.ndarray | None = None) -> Ceiling:
    """Reliability of the ground truth's targets (needs R >= 2 runs per subset), on `test_positions`."""
    targets = truth.targets.numpy().astype(np.float64)  # [M, R, n_test]
    if test_positions is not None:
        targets = targets[:, :, np.asarray(test_positions, dtype=np.int64)]
    runs = targets.shape[1]
    if runs < 2:
        return Ceiling(np.full(targets.shape[2], np.nan), runs)
    half = columnwise_spearman(targets[:, 0::2].mean(1), targets[:, 1::2].mean(1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return Ceiling(2 * half / (1 + half), runs)


# --- counterfactual check ----------------------------------------------------------------------
@dataclasses.dataclass
class Counterfactual:
    """Change of one test example's target when its top-k proponents are removed, vs k random examples."""

    test_position: int
    k: int
    seeds: list[int]
    removed: np.ndarray  # the top-k training positions
    base: float  # target with the full training set (mean over seeds)
    top_change: float  # mean over seeds of (target without top-k) - base
    random_changes: np.ndarray  # per random draw, mean over seeds
    key: str

    @property
    def random_mean(self) -> float:
        return float(self.random_changes.mean())

    @property
    def fraction_random_below(self) -> float:
        """Share of random removals that lowered the target at least as much (small = proponents matter)."""
        return float((self.random_changes <= self.top_change).mean())

    def row(self) -> dict:
        """A flat summary for tables and JSON."""
        return {"test_position": self.test_position, "k": self.k, "seeds": self.seeds, "base": self.base,
                "top_k_change": self.top_change, "random_change_mean": self.random_mean,
                "random_change_std": float(self.random_changes.std(ddof=1)) if len(self.random_changes) > 1 else 0.0,
                "random_draws": len(self.random_changes), "fraction_random_below": self.fraction_random_below,
                "key": self.key}


def top_proponents(scores: torch.Tensor | np.ndarray, k: int) -> np.ndarray:
    """Positions of the k highest scores of one test column (ties broken by position)."""
    column = np.asarray(scores, dtype=np.float64).reshape(-1)
    if not 0 < k < len(column):
        raise UserError(f"k must be between 1 and {len(column) - 1}, got {k}")
    return np.sort(np.argsort(-column, kind="stable")[:k])


def counterfactual(task: TaskSpec, scores: torch.Tensor | np.ndarray, test_position: int, k: int, *,
                   seeds: Sequence[int] = (0, 1, 2), n_random: int = 5, seed: int = 0,
                   store: Store | None = None, device: str | torch.device = "auto", dataset: Dataset | None = None,
                   progress: Progress | None = None) -> Counterfactual:
    """Retrain without the top-k proponents of `test_position` (from its score column `scores` [n_train])
    and without k random examples (`n_random` draws from `seed`), each with the same training `seeds`."""
    task, ctx = resolve(task, store, device)
    store, device = ctx.store, ctx.device
    dataset = dataset or load_dataset(task.dataset)
    if not 0 <= test_position < dataset.n_test:
        raise UserError(f"test position must be in [0, {dataset.n_test - 1}], got {test_position}")
    if n_random < 1:
        raise UserError(f"n_random must be >= 1, got {n_random}")
    seeds = [int(s) for s in seeds]
    column = np.asarray(scores, dtype=np.float32).reshape(-1)
    if len(column) != dataset.n_train:
        raise ValueError(f"expected {dataset.n_train} scores (one per training example), got {len(column)}")
    removed = top_proponents(column, k)
    rng = np.random.default_rng(seed)
    random_removed = np.stack([np.sort(rng.choice(dataset.n_train, k, replace=False)) for _ in range(n_random)])
    key = spec_key({"task": task, "data": dataset_fingerprint(dataset), "test": test_position, "k": k, "seeds": seeds,
                    "n_random": n_random, "seed": seed, "device": device.type,
                    "scores": hashlib.sha256(column.tobytes()).hexdigest()[:16]})

    def compute() -> tuple[dict[str, torch.Tensor], dict]:
        keep = [np.setdiff1d(np.arange(dataset.n_train), r) for r in (removed, *random_removed)]
        full = load_or_train(task, seeds, None, store, device, dataset)
        reduced = load_or_train(task, [s for _ in keep for s in seeds], [kept for kept in keep for _ in seeds],
                                store, device, dataset, progress)  # one batch: every subset has n - k examples
        models = full + reduced
        x, y = dataset.x_test[test_position:test_position + 1], dataset.y_test[test_position:test_position + 1]
        with torch.no_grad():
            margins = torch.tensor([float(target(m.model(x.to(device)), y.to(device), task.sequence)) for m in models])
        margins = margins.reshape(1 + len(keep), len(seeds))
        return ({"removed": torch.from_numpy(removed), "random_removed": torch.from_numpy(random_removed),
                 "targets": margins},
                {"task": task.name, "test_position": test_position, "k": k, "seeds": seeds, "n_random": n_random,
                 "seed": seed, "device": device.type,
                 "rows": "full training set, without top-k, then without each random draw; columns: seeds"})

    art, _ = store.get_or_create(COUNTERFACTUAL_KIND, key, compute)
    targets = art.tensors["targets"].double()
    base = targets[0].mean()
    changes = (targets[1:] - targets[0]).mean(1)
    return Counterfactual(test_position, k, seeds, art.tensors["removed"].numpy(), float(base), float(changes[0]),
                          changes[1:].numpy(), key)
