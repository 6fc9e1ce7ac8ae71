"""Ensemble TDA Explorer's computation core: training data attribution with efficient ensembles.

The public API (imported lazily, so ``import tda_core`` stays cheap):

- specs: `TaskSpec`, `Recipe`, `MethodSpec`, `EnsembleSpec`, `EvalSpec`; `get_task(name)`;
- `Store`: the artifact store (checkpoints, features, scores, ground truth, result tables);
- `plan`, `attribute` -> `Attribution`; `ground_truth` -> `GroundTruth`; `lds` -> `LDS`; `run` -> `Result`;
  `sweep` -> a results DataFrame; `compare` -> `PairedComparison` (two settings on one ground truth: the LDS
  difference with a paired bootstrap interval and a verdict);
- `EnsembleAttributor(task, method, ensemble, **options).fit()`, `.attribute(test_positions)`, `.top_k(...)`;
- your own tasks: `register_task` (a model and arrays), `register_image_folder`,
  `load_user_tasks` (the tasks file and the image folders recorded in the store);
- other tools: `scores_lds` (LDS of a score file), `read_score_file`, `export_ground_truth`.

Every score matrix is train x test: rows are training examples, columns test examples, and each comes
with the source indices of both (`train_index`, `test_index`).
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "TaskSpec": "specs", "Recipe": "specs", "MethodSpec": "specs", "EnsembleSpec": "specs", "EvalSpec": "specs",
    "get_task": "tasks", "Store": "store", "UserError": "errors",
    "plan": "attribution", "attribute": "attribution", "Attribution": "attribution",
    "ground_truth": "evaluation", "GroundTruth": "evaluation", "lds": "evaluation", "LDS": "evaluation",
    "run": "experiments", "sweep": "experiments", "Result": "experiments", "compare": "experiments",
    "PairedComparison": "comparison",
    "EnsembleAttributor": "attributor",
    "register_task": "user_tasks", "register_image_folder": "user_tasks",
    "load_user_tasks": "user_tasks",
    "scores_lds": "interop", "read_score_file": "interop", "export_ground_truth": "interop",
}
__all__ = list(_EXPORTS)

if TYPE_CHECKING:
    from .attribution import Attribution, attribute, plan
    from .attributor import EnsembleAttributor
    from .errors import UserError
    from .evaluation import LDS, GroundTruth, ground_truth, lds
    from .comparison import PairedComparison
    from .experiments import Result, compare, run, sweep
    from .interop import export_ground_truth, read_score_file, scores_lds
    from .specs import EnsembleSpec, EvalSpec, MethodSpec, Recipe, TaskSpec
    from .store import Store
    from .tasks import get_task
    from .user_tasks import load_user_tasks, register_image_folder, register_task


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'tda_core' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
