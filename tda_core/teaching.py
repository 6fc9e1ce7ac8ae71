"""The numbers behind the explorer's teaching views: how an ensemble's members agree on one test example, how its
proponent list forms as members are added, how a test image differs from its proponents, and LDS as an
ensemble grows. Inputs are the product's own attributions (`MemberAttribution` holds each member's scores and
averages them exactly as `attribute` does), so every view shows what the product computes.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np
import pandas as pd
import torch
from scipy.stats import rankdata, spearmanr

from .attribution import MemberAttribution
from .data import Dataset
from .errors import UserError
from .evaluation import GroundTruth, lds_against
from .score_analysis import as_numpy

GROWTH_SIZES = (1, 2, 5, 10)


def _column(scores: torch.Tensor | np.ndarray, test_pos: int) -> np.ndarray:
    s = as_numpy(scores)
    if not 0 <= test_pos < s.shape[1]:
        raise UserError(f"test position {test_pos} is out of range; choose 0..{s.shape[1] - 1}")
    return s[:, test_pos]


def _at(members: MemberAttribution, test_pos: int) -> MemberAttribution:
    """The members' scores of one test example only (the views below need no other column)."""
    n_test = members.scores.shape[2]
    if not 0 <= test_pos < n_test:
        raise UserError(f"test position {test_pos} is out of range; choose 0..{n_test - 1}")
    return dataclasses.replace(members, scores=members.scores[:, :, test_pos:test_pos + 1])


def _top(column: np.ndarray, k: int) -> np.ndarray:
    return np.argsort(-column, kind="stable")[:max(1, min(k, len(column)))]


def member_ranks(members: MemberAttribution, test_pos: int, k: int) -> pd.DataFrame:
    """For the ensemble's top-k proponents of one test example (columns, strongest first), each member's rank of
    that training example among all of them (rows; 1 = that member's own strongest proponent)."""
    members, test_pos = _at(members, test_pos), 0
    top = _top(_column(members.average(), test_pos), k)
    rows = []
    for j in range(len(members.labels)):
        ranks = rankdata(-_column(members.member(j), test_pos), method="min")
        rows.append(ranks[top].astype(int))
    return pd.DataFrame(rows, index=list(members.labels), columns=[int(p) for p in top])


def growth_sizes(n_members: int, sizes: Sequence[int] = GROWTH_SIZES) -> list[int]:
    """The member counts to show: `sizes` up to n_members, and n_members itself."""
    return sorted({s for s in sizes if s < n_members} | {n_members})


def top_k_as_members_grow(members: MemberAttribution, test_pos: int, k: int,
                          sizes: Sequence[int] = GROWTH_SIZES) -> pd.DataFrame:
    """The top-k proponents of one test example when the first n members are averaged (as `attribute` averages
    them), for each n of `growth_sizes`: one row per (members, rank) with the training position, its score and
    whether it is among the full ensemble's top k. Columns: members, rank, position, score, in_final."""
    members, test_pos = _at(members, test_pos), 0
    n_all = len(members.labels)
    final = set(_top(_column(members.average(), test_pos), k).tolist())
    rows = []
    for n in growth_sizes(n_all, sizes):
        column = _column(members.average(n), test_pos)
        for rank, pos in enumerate(_top(column, k), start=1):
            rows.append({"members": n, "rank": rank, "position": int(pos), "score": float(column[pos]),
                         "in_final": int(pos) in final})
    return pd.DataFrame(rows)


def growth_summary(members: MemberAttribution, test_pos: int, k: int,
                   sizes: Sequence[int] = GROWTH_SIZES) -> pd.DataFrame:
    """Per member count n: how many of the top k are already the full ensemble's, and the Spearman correlation of
    the n-member scores with the full ensemble's over all training examples."""
    members, test_pos = _at(members, test_pos), 0
    full = _column(members.average(), test_pos)
    final = set(_top(full, k).tolist())
    rows = []
    for n in growth_sizes(len(members.labels), sizes):
        column = _column(members.average(n), test_pos)
        rho = spearmanr(column, full).statistic
        rows.append({"members": n, "shared with the full top-k": len(final & set(_top(column, k).tolist())),
                     "Spearman with the full ensemble": float(rho) if np.isfinite(rho) else float("nan")})
    return pd.DataFrame(rows)


def pixel_differences(dataset: Dataset, test_pos: int, train_positions: Sequence[int]) -> np.ndarray:
    """Test image minus each training image, intensities scaled to [-1, 1]: [n, H, W] (channels averaged).
    Positive where the test example is brighter than the training example."""
    if dataset.kind != "image":
        raise UserError(f"pixel differences need images; {dataset.name} holds {dataset.kind} examples")

    def gray(image: np.ndarray) -> np.ndarray:
        image = np.asarray(image, dtype=np.float64) / 255.0
        return image.mean(-1) if image.ndim == 3 else image

    test = gray(dataset.image("test", int(test_pos)))
    return np.stack([test - gray(dataset.image("train", int(p))) for p in train_positions])


def ensemble_ladder(ensembles: Sequence[tuple[str, torch.Tensor | np.ndarray]], truth: GroundTruth) -> pd.DataFrame:
    """LDS (mean ± standard error over test examples) of several ensembles' score matrices against one ground
    truth, in the given order: one row per (label, scores)."""
    rows = []
    for label, scores in ensembles:
        result = lds_against(scores, truth)
        rows.append({"ensemble": label, "LDS": round(result.mean, 3), "± sem": round(result.sem, 3)})
    return pd.DataFrame(rows)
