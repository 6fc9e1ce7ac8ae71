"""Computations behind the explorer: top-k proponents/opponents, the reverse view, comparing two
settings, agreement between members, test-example tables and thumbnails.

Everything takes plain score matrices ``scores[n_train, n_test]`` (higher = more helpful) and a
`Dataset`, so it works the same from Python, the CLI and the app.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd
import torch
from scipy.stats import spearmanr

from .data import Dataset
from .errors import UserError


def as_numpy(scores: np.ndarray | torch.Tensor) -> np.ndarray:
    """Scores as a float64 numpy array."""
    if isinstance(scores, torch.Tensor):
        scores = scores.detach().cpu().numpy()
    return np.asarray(scores, dtype=np.float64)


def _check(index: int, n: int, what: str) -> None:
    if not 0 <= index < n:
        raise UserError(f"{what} position {index} is out of range; choose 0..{n - 1}")


def _label(dataset: Dataset, y: torch.Tensor) -> str:
    """A readable label: the class name, or 'sequence' for music windows."""
    if y.dim() == 0 and dataset.class_names:
        return dataset.class_names[int(y)]
    return "sequence"


def top_k(scores: np.ndarray | torch.Tensor, test_pos: int, k: int, dataset: Dataset) -> pd.DataFrame:
    """The k strongest proponents and k strongest opponents of one test example.

    Columns: role ('proponent' / 'opponent'), rank (1 = strongest), position (row in the
    training set), source_index (position in the original data), label, score.
    """
    s = as_numpy(scores)
    _check(test_pos, s.shape[1], "test")
    column = s[:, test_pos]
    k = max(1, min(k, len(column)))
    order = np.argsort(-column, kind="stable")
    rows = []
    for role, picked in (("proponent", order[:k]), ("opponent", order[::-1][:k])):
        for rank, pos in enumerate(picked, start=1):
            rows.append({"role": role, "rank": rank, "position": int(pos),
                         "source_index": int(dataset.train_index[pos]),
                         "label": _label(dataset, dataset.y_train[pos]), "score": float(column[pos])})
    return pd.DataFrame(rows)


def reverse_top_k(scores: np.ndarray | torch.Tensor, train_pos: int, k: int, dataset: Dataset) -> pd.DataFrame:
    """The test examples a training example helps most ('helps') and hurts most ('hurts')."""
    s = as_numpy(scores)
    _check(train_pos, s.shape[0], "training")
    row = s[train_pos]
    k = max(1, min(k, len(row)))
    order = np.argsort(-row, kind="stable")
    rows = []
    for role, picked in (("helps", order[:k]), ("hurts", order[::-1][:k])):
        for rank, pos in enumerate(picked, start=1):
            rows.append({"role": role, "rank": rank, "position": int(pos),
                         "source_index": int(dataset.test_index[pos]),
                         "label": _label(dataset, dataset.y_test[pos]), "score": float(row[pos])})
    return pd.DataFrame(rows)


@dataclasses.dataclass(frozen=True)
class Comparison:
    """How two settings agree on one test example."""

    k: int
    overlap: int  # training examples in both top-k proponent lists
    opponent_overlap: int  # same for the top-k opponents
    spearman: float  # rank correlation of the two score columns over the whole training set

    @property
    def overlap_fraction(self) -> float:
        return self.overlap / self.k


def compare(scores_a: np.ndarray | torch.Tensor, scores_b: np.ndarray | torch.Tensor,
            test_pos: int, k: int) -> Comparison:
    """Overlap of the top-k proponents/opponents and Spearman correlation of two settings' scores."""
    a, b = as_numpy(scores_a), as_numpy(scores_b)
    if a.shape != b.shape:
        raise UserError(f"the two settings score different examples ({a.shape} vs {b.shape}); "
                        "compare settings of the same task")
    _check(test_pos, a.shape[1], "test")
    col_a, col_b = a[:, test_pos], b[:, test_pos]
    k = max(1, min(k, len(col_a)))
    top_a, top_b = np.argsort(-col_a)[:k], np.argsort(-col_b)[:k]
    bot_a, bot_b = np.argsort(col_a)[:k], np.argsort(col_b)[:k]
    rho = spearmanr(col_a, col_b).statistic
    return Comparison(k, len(set(top_a) & set(top_b)), len(set(bot_a) & set(bot_b)),
                      float(rho) if np.isfinite(rho) else 0.0)


def column_spearman(scores_a: np.ndarray | torch.Tensor, scores_b: np.ndarray | torch.Tensor) -> np.ndarray:
    """Per test example, the Spearman correlation of two score matrices' columns."""
    a, b = as_numpy(scores_a), as_numpy(scores_b)
    ra = np.argsort(np.argsort(a, axis=0), axis=0).astype(np.float64)
    rb = np.argsort(np.argsort(b, axis=0), axis=0).astype(np.float64)
    ra -= ra.mean(0)
    rb -= rb.mean(0)
    denom = np.sqrt((ra ** 2).sum(0) * (rb ** 2).sum(0))
    return np.divide((ra * rb).sum(0), denom, out=np.zeros(a.shape[1]), where=denom > 0)


def member_agreement(member_scores: list[np.ndarray | torch.Tensor]) -> pd.DataFrame:
    """Mean over test examples of the column Spearman between every pair of members and with their mean.

    Returns a square table indexed by 'member 1'..'member n' and 'average'.
    """
    mats = [as_numpy(m) for m in member_scores]
    if not mats:
        raise UserError("no members to compare")
    mats.append(np.mean(mats, axis=0))
    names = [f"member {i + 1}" for i in range(len(mats) - 1)] + ["average"]
    table = np.ones((len(mats), len(mats)))
    for i in range(len(mats)):
        for j in range(i + 1, len(mats)):
            table[i, j] = table[j, i] = column_spearman(mats[i], mats[j]).mean()
    return pd.DataFrame(table, index=names, columns=names)


def example_table(dataset: Dataset, predictions: np.ndarray | torch.Tensor | None = None) -> pd.DataFrame:
    """One row per test example: position, source_index, label and, given predictions, predicted and correct."""
    frame = pd.DataFrame({"position": np.arange(dataset.n_test),
                          "source_index": dataset.test_index.numpy().astype(np.int64)})
    if dataset.y_test.dim() == 1:
        frame["label"] = [dataset.class_names[int(y)] for y in dataset.y_test]
        if predictions is not None:
            pred = np.asarray(predictions)
            frame["predicted"] = [dataset.class_names[int(p)] for p in pred]
            frame["correct"] = pred == dataset.y_test.numpy()
    return frame


def filter_tests(table: pd.DataFrame, labels: list[str] | None = None, correctness: str = "all") -> pd.DataFrame:
    """Rows of `example_table` with a label in `labels` (None = any) and correctness 'all' / 'correct' / 'wrong'."""
    out = table
    if labels:
        out = out[out["label"].isin(labels)]
    if correctness != "all":
        if "correct" not in out:
            raise UserError("correct/wrong needs the model's predictions; choose 'all'")
        out = out[out["correct"] == (correctness == "correct")]
    return out


@torch.no_grad()
def predict(model: torch.nn.Module, x: torch.Tensor, batch_size: int = 1024) -> np.ndarray:
    """Predicted class of every example (argmax of the logits) with a model in eval mode."""
    device = next(model.parameters()).device
    out = [model(x[i:i + batch_size].to(device)).argmax(-1).cpu() for i in range(0, len(x), batch_size)]
    return torch.cat(out).numpy()


def thumbnail(image: np.ndarray, size: int = 84) -> np.ndarray:
    """Upscale a small uint8 image by pixel repetition (crisp, no blur) to about `size` pixels wide."""
    factor = max(1, size // image.shape[1])
    return np.repeat(np.repeat(image, factor, axis=0), factor, axis=1)


def thumbnails(dataset: Dataset, split: str, positions: list[int] | np.ndarray, size: int = 84) -> list[np.ndarray]:
    """Crisp thumbnails of several examples of one split."""
    return [thumbnail(dataset.image(split, int(p)), size) for p in positions]


def caption(row: pd.Series | dict) -> str:
    """A short caption for a top-k row: label, source index and score."""
    return f"{row['label']} · #{row['source_index']} · {row['score']:+.3g}"


def dataset_rows(data_root: str | None = None) -> pd.DataFrame:
    """Every registered dataset with its kind, where its data comes from right now and a description."""
    from .data import REGISTRY
    from .paths import data_dir

    root = data_dir(data_root)
    rows = []
    for name, info in sorted(REGISTRY.items()):
        status = info.locate(root)
        rows.append({"dataset": name, "kind": info.kind, "status": status.status,
                     "description": info.description, "where": status.where})
    return pd.DataFrame(rows)


def human_bytes(n: float) -> str:
    """1234567 -> '1.2 MB'."""
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"


def store_overview(store) -> pd.DataFrame:  # noqa: ANN001 - a tda_core Store
    """What the store holds: artifacts per kind with their total size, readable."""
    summary = store.summary()
    if summary.empty:
        return summary
    summary = summary.copy()
    summary["size"] = summary["bytes"].map(human_bytes)
    return summary[["kind", "artifacts", "size"]]


def describe_example(dataset: Dataset, split: str, position: int) -> str:
    """'label 7 · #1234' (source index) for one example of a split."""
    _, y, index = dataset.split(split)
    _check(position, len(y), split)
    return f"{_label(dataset, y[position])} · #{int(index[position])}"


def example_label(table: pd.DataFrame, position: int) -> str:
    """A selector label for a row of `example_table`: position, label and, when known, the prediction."""
    row = table.set_index("position").loc[position]
    text = f"{position}"
    if "label" in row:
        text += f" · label {row['label']}"
    if "predicted" in row:
        text += f" · predicted {row['predicted']}" + ("" if row["correct"] else " ✗")
    return text
