"""`EnsembleAttributor`: the attributor object dattri and TRAK users know, over `attribute`.

    att = EnsembleAttributor("digits-mlp", method="trak", ensemble="dropout", I=2, D=5, proj="kron").fit()
    result = att.attribute([0, 1, 2])    # result.scores: train x test, result.train_index / test_index
    att.top_k(0, k=5)                     # DataFrame of the 5 strongest proponents of test example 0

`fit` does the expensive part once (trains or loads the I base models, fine-tunes LoRA adapters, caches
every member's training-set features in the store); `attribute` then pays only the test side and the
solve, and equals `attribute(task, method_spec, ensemble_spec, test_positions=...)` exactly.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import pandas as pd
import torch

from .attribution import Attribution, attribute
from .data import load_dataset
from .errors import UserError
from .progress import Progress
from .specs import EnsembleSpec, MethodSpec, TaskSpec
from .store import Store
from .tasks import get_task

METHOD_OPTIONS = tuple(f.name for f in dataclasses.fields(MethodSpec) if f.name not in ("name", "seed"))
ENSEMBLE_OPTIONS = tuple(f.name for f in dataclasses.fields(EnsembleSpec) if f.name != "kind")


def _specs(method: str | MethodSpec, ensemble: str | EnsembleSpec,
           options: dict[str, Any]) -> tuple[MethodSpec, EnsembleSpec]:
    """Method and ensemble specs from names or specs plus keyword options (`proj_seed` is the method's seed)."""
    unknown = sorted(set(options) - set(METHOD_OPTIONS) - set(ENSEMBLE_OPTIONS) - {"proj_seed"})
    if unknown:
        raise UserError(f"unknown options {', '.join(unknown)}; method options: {', '.join(METHOD_OPTIONS)}, "
                        f"proj_seed; ensemble options: {', '.join(ENSEMBLE_OPTIONS)}")
    m_opts = {k: v for k, v in options.items() if k in METHOD_OPTIONS}
    if "proj_seed" in options:
        m_opts["seed"] = options["proj_seed"]
    e_opts = {k: v for k, v in options.items() if k in ENSEMBLE_OPTIONS}
    method = dataclasses.replace(method, **m_opts) if isinstance(method, MethodSpec) else MethodSpec(method, **m_opts)
    ensemble = (dataclasses.replace(ensemble, **e_opts) if isinstance(ensemble, EnsembleSpec)
                else EnsembleSpec(ensemble, **e_opts))
    return method, ensemble


class EnsembleAttributor:
    """Attribution with an ensemble, dattri-style: construct, `fit`, then `attribute` and `top_k`.

    `method`: "trak", "if", "grad-dot", "grad-cos" (or a MethodSpec); `ensemble`: "naive", "dropout",
    "dropout-forward", "lora", "proj-seeds" (or an EnsembleSpec). Keyword options set fields of either spec
    (I, D, L, P, proj, proj_dim, damping, lora_rank, seed = the base models' first seed, proj_seed = the
    projections' seed, ...). Scores are train x test: rows are training examples, columns test examples.
    """

    def __init__(self, task: str | TaskSpec, method: str | MethodSpec = "trak", ensemble: str | EnsembleSpec = "naive",
                 *, store: Store | None = None, device: str = "auto", progress: Progress | None = None,
                 **options: Any) -> None:
        self.task = get_task(task) if isinstance(task, str) else task
        self.method, self.ensemble = _specs(method, ensemble, options)
        self.store = store or Store()
        self.device = device
        self.progress = progress
        self.fitted = False

    def __repr__(self) -> str:
        return (f"EnsembleAttributor({self.task.name!r}, {self.method.name!r} ({self.method.proj}), "
                f"{self.ensemble.kind!r} with {self.ensemble.n_members} members, fitted={self.fitted})")

    def fit(self) -> EnsembleAttributor:
        """Train or load the base models and cache every member's training-set features (by attributing
        the first test example); returns self."""
        self.attribute([0])
        self.fitted = True
        return self

    def attribute(self, test_positions: Sequence[int] | torch.Tensor | None = None) -> Attribution:
        """Scores [n_train, n_test] (train x test) for test positions (default: all), with `train_index` /
        `test_index` (source indices of rows and columns) and the costs."""
        return attribute(self.task, self.method, self.ensemble, store=self.store, device=self.device,
                         test_positions=test_positions, progress=self.progress)

    def top_k(self, test_position: int, k: int = 10, *, opponents: bool = False) -> pd.DataFrame:
        """The k training examples with the highest scores for one test position (lowest with `opponents`):
        rank, train position, source index, label and class name (classification) and score."""
        dataset = load_dataset(self.task.dataset)
        if not 0 < k <= dataset.n_train:
            raise UserError(f"k must be in 1..{dataset.n_train}, got {k}")
        column = self.attribute([test_position]).scores[:, 0]
        order = torch.argsort(column, descending=not opponents, stable=True)[:k]
        frame = pd.DataFrame({"rank": range(1, k + 1), "train_position": order.numpy(),
                              "source_index": dataset.train_index[order].numpy()})
        if not self.task.sequence:  # class labels (sequence tasks have a token sequence per example)
            labels = dataset.y_train[order]
            frame["label"] = labels.numpy()
            frame["class_name"] = [dataset.class_names[int(c)] for c in labels]
        frame["score"] = column[order].numpy()
        return frame
