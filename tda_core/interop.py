"""Scores from any tool measured on our ground truth, and our ground truth handed to other tools.

Score files (what `attribute --save-scores` writes; TRAK, dattri or kronfluence scores saved the same way):
an ``.npz`` or ``.safetensors`` file with

- ``scores``: float [n_train, n_test] (train x test) or [n_test, n_train] (test x train; detected from
  the two index arrays and transposed);
- ``train_index``: int [n_train], the source index of every row's training example: all of the task's
  training examples, in any order;
- ``test_index``: int [n_test], the source index of every column's test example: any of the task's test
  examples.

Ground-truth files (`export_ground_truth`, ``.npz``), M subsets, R runs, subset size alpha * n:

- ``subsets``: int [M, alpha * n], training *source indices* of each subset;
- ``subset_positions``: int [M, alpha * n], the same as positions 0..n_train-1 in ``train_index`` order;
- ``targets``: float [M, R, n_test], each test example's target (margin, or mean token log-likelihood)
  under each subset model; ``values``: float [M, n_test], their mean over the R runs;
- ``train_index`` [n_train] and ``test_index`` [n_test]: the source indices of the rows and columns;
- ``validation_positions`` / ``evaluation_positions``: test positions of the split `run` uses (damping
  tuned on the first, LDS reported on the second);
- ``meta``: a JSON string (task, M, alpha, runs, seed, target, validation fraction).

dattri's metric takes it as ``dattri.metric.lds(scores_train_x_test, (values, subset_positions))``.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import torch

from .data import Dataset, load_dataset
from .device import resolve_device
from .errors import UserError, unknown_choice
from .evaluation import LDS, ground_truth, lds_against
from .experiments import VALIDATION_FRACTION, validation_split
from .progress import Progress
from .specs import EvalSpec, TaskSpec
from .store import Store
from .tasks import get_task

SCORE_FIELDS = ("scores", "train_index", "test_index")
ORIENTATIONS = ("auto", "train-test", "test-train")


def read_score_file(path: str | Path) -> dict[str, np.ndarray]:
    """The arrays of a score file (.npz read without pickle, or .safetensors); missing fields raise UserError."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise UserError(f"scores file {file} does not exist")
    if file.suffix == ".npz":
        try:
            with np.load(file, allow_pickle=False) as npz:
                arrays = {k: npz[k] for k in npz.files}
        except (OSError, ValueError) as exc:
            raise UserError(f"cannot read {file.name} as npz: {exc}") from None
    elif file.suffix == ".safetensors":
        from safetensors.numpy import load_file

        try:
            arrays = load_file(str(file))
        except Exception as exc:  # noqa: BLE001 - a damaged or foreign file
            raise UserError(f"cannot read {file.name} as safetensors: {exc}") from None
    else:
        raise UserError(f"cannot read scores from {file.name!r}; use a .npz or .safetensors file")
    missing = [k for k in SCORE_FIELDS if k not in arrays]
    if missing:
        raise UserError(f"{file.name} lacks {', '.join(missing)}: a scores file holds scores (train x test or "
                        f"test x train), train_index and test_index (source indices); it has {', '.join(arrays)}")
    return arrays


@dataclasses.dataclass(frozen=True)
class AlignedScores:
    """Scores as train x test in the task's training order, with the test positions of their columns."""

    scores: np.ndarray  # [n_train, n_columns], rows in the task's training order
    test_positions: np.ndarray  # [n_columns] positions in the task's test split
    transposed: bool  # True when the file was test x train


def _positions(file_index: np.ndarray, task_index: torch.Tensor, what: str, task: str) -> np.ndarray:
    """Positions in the task's split of each source index in the file; unknown ones raise UserError."""
    where = {int(s): p for p, s in enumerate(task_index.tolist())}
    unknown = [int(s) for s in file_index if int(s) not in where]
    if unknown:
        raise UserError(f"{len(unknown)} of the file's {len(file_index)} {what} source indices are not {what} "
                        f"examples of task {task} (first: {unknown[:5]}); are these scores of another task or data?")
    if len(np.unique(file_index)) != len(file_index):
        raise UserError(f"the file's {what}_index repeats source indices")
    return np.asarray([where[int(s)] for s in file_index], dtype=np.int64)


def align_scores(arrays: dict[str, np.ndarray], dataset: Dataset, task: str = "",
                 orientation: str = "auto") -> AlignedScores:
    """Check a score file against the task's data and bring it to train x test in the task's training order."""
    if orientation not in ORIENTATIONS:
        raise unknown_choice("orientation", orientation, ORIENTATIONS)
    scores = np.asarray(arrays["scores"], dtype=np.float64)
    train = np.asarray(arrays["train_index"]).reshape(-1).astype(np.int64)
    test = np.asarray(arrays["test_index"]).reshape(-1).astype(np.int64)
    as_train_test, as_test_train = (len(train), len(test)), (len(test), len(train))
    if scores.ndim != 2 or scores.shape not in (as_train_test, as_test_train):
        raise UserError(f"scores have shape {scores.shape} but the file holds {len(train)} train and {len(test)} "
                        f"test source indices: expected {as_train_test} (train x test) or {as_test_train}")
    if orientation == "auto":
        if as_train_test == as_test_train:
            raise UserError(f"scores are {scores.shape}, as many train as test indices: say --orientation "
                            "train-test or test-train")
        orientation = "train-test" if scores.shape == as_train_test else "test-train"
    transposed = orientation == "test-train"
    if transposed:
        scores = scores.T
    if scores.shape != as_train_test:
        raise UserError(f"scores have shape {arrays['scores'].shape}, not {orientation} for {len(train)} train and "
                        f"{len(test)} test indices")
    if len(train) != dataset.n_train:
        raise UserError(f"the file scores {len(train)} training examples but task {task} has {dataset.n_train}: "
                        "LDS needs a score for every training example")
    rows = _positions(train, dataset.train_index, "train", task)
    ordered = np.empty_like(scores)
    ordered[rows] = scores
    return AlignedScores(ordered, _positions(test, dataset.test_index, "test", task), transposed)


@dataclasses.dataclass(frozen=True)
class ScoresLDS:
    """LDS of a score file on the evaluation split `run` reports on."""

    task: str
    lds: LDS
    n_columns: int  # test examples in the file
    transposed: bool
    ground_truth_key: str

    def row(self) -> dict:
        return {"task": self.task, "lds": self.lds.mean, "lds_sem": self.lds.sem, "n_eval": self.lds.n,
                "n_scored": self.n_columns, "transposed": self.transposed, "ground_truth": self.ground_truth_key}


def scores_lds(task: str | TaskSpec, scores: str | Path | dict[str, np.ndarray], eval_spec: EvalSpec = EvalSpec(),
               *, store: Store | None = None, device: str = "auto", orientation: str = "auto",
               validation_fraction: float = VALIDATION_FRACTION, progress: Progress | None = None) -> ScoresLDS:
    """LDS of precomputed scores (a score file, or its arrays) against the task's ground truth, on the test
    examples of `run`'s evaluation split (the validation split is left out), with its standard error."""
    task = get_task(task) if isinstance(task, str) else task
    dataset = load_dataset(task.dataset)
    arrays = scores if isinstance(scores, dict) else read_score_file(scores)
    aligned = align_scores(arrays, dataset, task.name, orientation)
    truth = ground_truth(task, eval_spec, store=store, device=resolve_device(device), dataset=dataset,
                         progress=progress)
    _, rest = validation_split(dataset.n_test, eval_spec.seed, validation_fraction)
    keep = np.isin(aligned.test_positions, rest)
    if not keep.any():
        raise UserError(f"none of the {len(keep)} scored test examples is in the evaluation split ({len(rest)} of "
                        f"{dataset.n_test} test positions); score more test examples")
    result = lds_against(aligned.scores[:, keep], truth, aligned.test_positions[keep])
    return ScoresLDS(task.name, result, len(keep), aligned.transposed, truth.key)


def export_ground_truth(task: str | TaskSpec, path: str | Path, eval_spec: EvalSpec = EvalSpec(), *,
                        store: Store | None = None, device: str = "auto",
                        validation_fraction: float = VALIDATION_FRACTION, progress: Progress | None = None) -> Path:
    """Write the task's ground truth (computed or read from the store) to an .npz in the format above."""
    task = get_task(task) if isinstance(task, str) else task
    out = Path(path).expanduser()
    if out.suffix != ".npz":
        raise UserError(f"cannot write the ground truth to {out.name!r}; use a name ending in .npz")
    dataset = load_dataset(task.dataset)
    truth = ground_truth(task, eval_spec, store=store, device=resolve_device(device), dataset=dataset,
                         progress=progress)
    val, rest = validation_split(dataset.n_test, eval_spec.seed, validation_fraction)
    positions = truth.subsets.numpy().astype(np.int64)
    meta = {"task": task.name, "M": eval_spec.M, "alpha": eval_spec.alpha, "runs": eval_spec.runs,
            "seed": eval_spec.seed, "target": truth.meta["target"], "validation_fraction": validation_fraction,
            "orientation": "scores are train x test; rows follow train_index, columns test_index"}
    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez(out, subsets=dataset.train_index.numpy()[positions], subset_positions=positions,
             targets=truth.targets.numpy(), values=truth.values.numpy(), train_index=dataset.train_index.numpy(),
             test_index=dataset.test_index.numpy(), validation_positions=val, evaluation_positions=rest,
             meta=np.array(json.dumps(meta)))
    return out
