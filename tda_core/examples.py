"""Test examples as a table: position, source index, label and the model's prediction, with filters."""
from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from .data import Dataset, load_dataset
from .ensembles import base_seeds
from .errors import UserError
from .specs import EnsembleSpec, TaskSpec
from .store import Store
from .training import load_or_train


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


def feature_preview(dataset: Dataset, split: str, positions: list[int], n_values: int = 8) -> pd.DataFrame:
    """Examples of a dataset without a picture or a sound (your own feature vectors): position, label and the
    first `n_values` input values, one row each (for the app's galleries)."""
    x, y, _ = dataset.split(split)
    rows = []
    for p in positions:
        values = x[int(p)].flatten()
        row = {"position": int(p)}
        if y.dim() == 1:
            row["label"] = dataset.class_names[int(y[int(p)])] if dataset.class_names else int(y[int(p)])
        row |= {f"x[{i}]": round(float(v), 4) for i, v in enumerate(values[:n_values])}
        if len(values) > n_values:
            row["values"] = f"{len(values)} in all"
        rows.append(row)
    return pd.DataFrame(rows)


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


def base_predictions(task: TaskSpec, ensemble: EnsembleSpec, store: Store | None = None) -> np.ndarray:
    """Predicted test classes of an ensemble's first base model (from the store; trained if missing)."""
    dataset = load_dataset(task.dataset)
    (first,) = load_or_train(task, base_seeds(ensemble)[:1], store=store, dataset=dataset)
    return predict(first.model, dataset.x_test)
