"""Analysis of score matrices ``scores[n_train, n_test]`` (higher = more helpful): top-k proponents and
opponents, the reverse view, how two settings or several members agree, and per-example LDS views.

Everything takes plain score matrices and a `Dataset`, so it works the same from Python, the CLI and the app.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd
import torch
from scipy.stats import rankdata, spearmanr

from .data import Dataset
from .errors import UserError
from .evaluation import datamodel_predictions


def as_numpy(scores: np.ndarray | torch.Tensor) -> np.ndarray:
    """Scores as a float64 numpy array."""
    if isinstance(scores, torch.Tensor):
        scores = scores.detach().cpu().numpy()
    return np.asarray(scores, dtype=np.float64)


def _check(index: int, n: int, what: str) -> None:
    if not 0 <= index < n:
        raise UserError(f"{what} position {index} is out of range; choose 0..{n - 1}")


def _label(dataset: Dataset, y: torch.Tensor) -> str:
    """A readable label: the class name, or 'window' for music windows."""
    if y.dim() == 0 and dataset.class_names:
        return dataset.class_names[int(y)]
    return "window"


def top_k(scores: np.ndarray | torch.Tensor, test_pos: int, k: int, dataset: Dataset) -> pd.DataFrame:
    """The k strongest proponents and k strongest opponents of one test example.

    Columns: role ('proponent' / 'opponent'), rank (1 = strongest), position (row in the
    training set), source_index (position in the original data), label, score.
    """
    s = as_numpy(scores)
    _check(test_pos, s.shape[1], "test")
    return _ranking(s[:, test_pos], k, ("proponent", "opponent"), dataset, "train")


def _ranking(values: np.ndarray, k: int, roles: tuple[str, str], dataset: Dataset, split: str) -> pd.DataFrame:
    """The k highest (first role) and k lowest (second role) of `values`, one per example of `split`."""
    _, y, index = dataset.split(split)
    k = max(1, min(k, len(values)))
    order = np.argsort(-values, kind="stable")
    rows = []
    for role, picked in zip(roles, (order[:k], order[::-1][:k])):
        for rank, pos in enumerate(picked, start=1):
            rows.append({"role": role, "rank": rank, "position": int(pos), "source_index": int(index[pos]),
                         "label": _label(dataset, y[pos]), "score": float(values[pos])})
    return pd.DataFrame(rows)


def reverse_top_k(scores: np.ndarray | torch.Tensor, train_pos: int, k: int, dataset: Dataset) -> pd.DataFrame:
    """The test examples a training example helps most ('helps') and hurts most ('hurts')."""
    s = as_numpy(scores)
    _check(train_pos, s.shape[0], "training")
    return _ranking(s[train_pos], k, ("helps", "hurts"), dataset, "test")


@dataclasses.dataclass(frozen=True)
class Comparison:
    """How two settings agree on one test example."""

    k: int
    overlap: int  # training examples in both top-k proponent lists
    opponent_overlap: int  # same for the top-k opponents
    spearman: float  # rank correlation of the two score columns over the whole training set


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


def member_agreement(member_scores: list[np.ndarray | torch.Tensor],
                     ensemble_scores: np.ndarray | torch.Tensor) -> pd.DataFrame:
    """Mean over test examples of the column Spearman between every pair of members and with the ensemble's
    scores (as `attribute` combines them, e.g. `MemberAttribution.average()`).

    Returns a square table indexed by 'member 1'..'member n' and 'ensemble'.
    """
    mats = [as_numpy(m) for m in member_scores]
    if not mats:
        raise UserError("no members to compare")
    mats.append(as_numpy(ensemble_scores))
    normed = []  # per matrix: column ranks, centred and scaled to unit norm, so a Spearman is a dot product
    for m in mats:
        r = rankdata(m, axis=0)
        r -= r.mean(0)
        norm = np.sqrt((r ** 2).sum(0))
        normed.append(np.divide(r, norm, out=np.full_like(r, np.nan), where=norm > 0))
    names = [f"member {i + 1}" for i in range(len(mats) - 1)] + ["ensemble"]
    table = np.ones((len(mats), len(mats)))
    for i in range(len(mats)):
        for j in range(i + 1, len(mats)):
            table[i, j] = table[j, i] = np.nanmean((normed[i] * normed[j]).sum(0))
    return pd.DataFrame(table, index=names, columns=names)


def hub_share(scores: np.ndarray | torch.Tensor, k: int) -> float:
    """Distinct training examples among all test examples' top-k proponents, as a share of the most possible.

    Near 0: the same few training examples top every list (typical of Grad-Dot's large-gradient
    outliers); near 1: every test example gets its own proponents.
    """
    s = as_numpy(scores)
    k = max(1, min(k, s.shape[0]))
    top = np.argpartition(-s, k - 1, axis=0)[:k]
    return len(np.unique(top)) / min(s.shape[0], k * s.shape[1])


def lds_scatter(scores: np.ndarray | torch.Tensor, subsets: np.ndarray | torch.Tensor,
                values: np.ndarray | torch.Tensor, test_pos: int) -> tuple[pd.DataFrame, float]:
    """For one test example: predicted (sum of its scores over each subset) vs actual (target of the model
    trained on that subset), one row per subset, and their Spearman correlation (that example's LDS)."""
    s = as_numpy(scores)
    _check(test_pos, s.shape[1], "test")
    predicted = datamodel_predictions(s[:, [test_pos]], np.asarray(subsets))[:, 0]
    actual = np.asarray(values, dtype=np.float64)[:, test_pos]
    rho = spearmanr(predicted, actual).statistic
    frame = pd.DataFrame({"subset": np.arange(len(actual)), "predicted": predicted, "actual": actual})
    return frame, float(rho) if np.isfinite(rho) else float("nan")
