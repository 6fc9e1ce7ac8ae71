"""The dataset record every loader returns, and the registry of datasets."""
from __future__ import annotations

import dataclasses
import functools
import hashlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from ..errors import unknown_choice
from ..paths import data_dir

SPLITS = ("train", "test")


@dataclasses.dataclass(frozen=True, eq=False)
class Dataset:
    """Train and test tensors with the source index of every example.

    Images: ``x`` is float32 (N, C, H, W) in [0, 1], ``y`` int64 class labels.
    Music: ``x`` is int64 (N, T) input tokens, ``y`` int64 (N, T) next tokens (-100 = ignored).
    ``*_index`` holds each example's position in its original file or package array.
    """

    name: str
    kind: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    train_index: torch.Tensor
    test_index: torch.Tensor
    class_names: tuple[str, ...]
    source: str

    def split(self, split: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(x, y, source_index) of 'train' or 'test'."""
        if split == "train":
            return self.x_train, self.y_train, self.train_index
        if split == "test":
            return self.x_test, self.y_test, self.test_index
        raise unknown_choice("split", split, SPLITS)

    @functools.cached_property
    def fingerprint(self) -> str:
        """Hash of the name, contents and source indices, computed once per Dataset object (store keys use it,
        so they survive moving the data directory)."""
        h = hashlib.sha256(self.name.encode())
        for t in (self.x_train, self.y_train, self.x_test, self.y_test, self.train_index, self.test_index):
            h.update(t.contiguous().numpy().tobytes())
        return h.hexdigest()[:16]

    @property
    def n_train(self) -> int:
        return len(self.x_train)

    @property
    def n_test(self) -> int:
        return len(self.x_test)

    def image(self, split: str, i: int) -> np.ndarray:
        """Example ``i`` of a split as a uint8 image, (H, W) grey or (H, W, 3) colour."""
        if self.kind != "image":
            raise ValueError(f"dataset {self.name!r} holds {self.kind}, not images")
        x = self.split(split)[0][i]
        img = (x.clamp(0, 1) * 255).round().to(torch.uint8)
        return img[0].numpy() if img.shape[0] == 1 else img.permute(1, 2, 0).numpy()


@dataclasses.dataclass(frozen=True)
class SourceStatus:
    """Where a dataset comes from right now: 'found', 'embedded' or 'missing', and where that was decided."""

    status: str
    where: str


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    """A registered dataset: its loader and a cheap check of where its data is."""

    name: str
    kind: str
    description: str
    load: Callable[[Path, bool], Dataset]
    locate: Callable[[Path], SourceStatus]


REGISTRY: dict[str, DatasetInfo] = {}
_CACHE: dict[tuple[str, str], Dataset] = {}


def register(info: DatasetInfo) -> DatasetInfo:
    """Add a dataset to the registry (called by each loader module at import)."""
    REGISTRY[info.name] = info
    return info


def dataset_info(name: str) -> DatasetInfo:
    """Registry entry by name; unknown names list the valid ones."""
    if name not in REGISTRY:
        raise unknown_choice("dataset", name, sorted(REGISTRY))
    return REGISTRY[name]


def load_dataset(name: str, data_root: str | Path | None = None, download: bool = False) -> Dataset:
    """Load a dataset (memoised per process). `download=True` fetches missing files where allowed."""
    info = dataset_info(name)
    root = data_dir(data_root)
    key = (name, str(root))
    if key not in _CACHE:
        _CACHE[key] = info.load(root, download)
    return _CACHE[key]


def remember_dataset(name: str, dataset: Dataset, data_root: str | Path | None = None) -> None:
    """Make `load_dataset(name)` return `dataset` in this process (a worker handed the driver's dataset)."""
    _CACHE[(name, str(data_dir(data_root)))] = dataset


def sample_indices(n_available: int, n_wanted: int, seed: int) -> np.ndarray:
    """A fixed-seed sample of ``min(n_available, n_wanted)`` positions, sorted."""
    rng = np.random.default_rng(seed)
    return np.sort(rng.permutation(n_available)[: min(n_available, n_wanted)])


def dataset_table(data_root: str | Path | None = None, sizes: bool = False) -> pd.DataFrame:
    """Every registered dataset: name, kind, where its data comes from right now and a description; with
    `sizes`, its train/test sizes too (loading the datasets that are available)."""
    root = data_dir(data_root)
    rows = []
    for name, info in sorted(REGISTRY.items()):
        status = info.locate(root)
        row = {"dataset": name, "kind": info.kind}
        if sizes:
            found = status.status in ("found", "embedded")
            row["train/test"] = (lambda ds: f"{ds.n_train}/{ds.n_test}")(load_dataset(name, root)) if found else "-"
        rows.append(row | {"status": status.status, "where": status.where, "description": info.description})
    return pd.DataFrame(rows)

