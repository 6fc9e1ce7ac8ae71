"""Your own tasks: a model and arrays from Python, an image folder, or a tasks file that the CLI and the app load.

A task registered here goes through everything a built-in task does (store, `attribute`, `run`, `sweep`,
the explorer's pages). Its store keys depend on its data and its model: the task's dataset and model names
carry digests (of the arrays, or of the folder's settings; of the model's source, layout and seed-0
weights), and every key also holds the fingerprint of the data's contents.

- `register_task(name, model_fn, x_train, y_train, x_test, y_test, recipe)`: classification on your arrays.
- `register_image_folder(name, path)`: a class-per-subfolder image folder with a built-in model; with
  `record_in=store` (`python -m tda_core add-image-folder`) it is recorded in the store, so later
  processes (the CLI, the app) register it again.
- `load_user_tasks()`: runs the tasks file (`--tasks-file` or $TDA_TASKS_FILE), a Python file calling the
  two functions above, and registers the store's image folders. Cheap when nothing changed.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import re
import runpy
import traceback
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from .data.base import REGISTRY, Dataset, DatasetInfo, SourceStatus, register
from .data.image_folder import MAX_PIXELS, folder_format, list_image_folder, load_image_folder
from .errors import UserError, unknown_choice
from .features import GradientSource, all_param_names, compute_features
from .models import MODELS
from .specs import Recipe, TaskSpec
from .store import Store
from .tasks import TASKS
from .tasks import register_task as _add_task
from .user_models import explain_gradient_failure, model_digest, prepare_model

TASKS_FILE_ENV = "TDA_TASKS_FILE"
FOLDER_TABLE = "user_tasks"  # the store's table of image folders added with `add-image-folder`
FOLDER_MODELS = {"mlp": TASKS["mnist-mlp"].recipe, "resnet9": TASKS["cifar2-resnet9"].recipe}  # default recipes
BUILT_IN = frozenset(TASKS)
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
ORIGINS: dict[str, str] = {}  # user task name -> where it was registered
_origin = ["Python"]
_tasks_files: dict[Path, int] = {}  # tasks file -> mtime (ns) when it was last run
log = logging.getLogger(__name__)


def _check_name(name: str) -> None:
    if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name):
        raise UserError(f"task name {name!r} must start with a letter or digit and hold only letters, digits, "
                        "'.', '_' and '-'")
    if name in BUILT_IN:
        raise UserError(f"{name!r} is a built-in task; choose another name (built-in: {', '.join(sorted(BUILT_IN))})")


def _install(task: TaskSpec, dataset_info: DatasetInfo) -> TaskSpec:
    """Register the task and its dataset, dropping the registry entries an earlier version of it left."""
    old = TASKS.get(task.name)
    if old is not None and old.dataset != task.dataset:
        REGISTRY.pop(old.dataset, None)
    if old is not None and old.model != task.model and "@" in old.model:  # a user model of the earlier version
        MODELS.pop(old.model, None)
    register(dataset_info)
    ORIGINS[task.name] = _origin[-1]
    return _add_task(task)


def _digest(*parts: torch.Tensor | str) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(part.encode() if isinstance(part, str) else part.contiguous().numpy().tobytes())
    return h.hexdigest()[:12]


# --- your model, your arrays ---------------------------------------------------------------------
def _as_tensor(value: Any, dtype: torch.dtype | None, what: str) -> torch.Tensor:
    """A contiguous tensor of `dtype`; None: int64 for integer arrays (token ids), else float32."""
    try:
        array = np.asarray(value.detach().cpu() if torch.is_tensor(value) else value)
        if dtype is None:
            dtype = torch.int64 if array.dtype.kind in "iub" else torch.float32
        return torch.as_tensor(array, dtype=dtype).contiguous()
    except (TypeError, ValueError) as exc:
        raise UserError(f"{what} must be a numeric array: {exc}") from None


def _arrays(x_train, y_train, x_test, y_test, train_index, test_index) -> tuple[torch.Tensor, ...]:
    xs = [_as_tensor(x, None, n) for x, n in ((x_train, "x_train"), (x_test, "x_test"))]
    ys = [_as_tensor(y, torch.int64, n) for y, n in ((y_train, "y_train"), (y_test, "y_test"))]
    for x, y, split in zip(xs, ys, ("train", "test")):
        if y.dim() != 1 or len(x) != len(y):
            raise UserError(f"y_{split} must be one class label per example: x_{split} has {len(x)} rows, "
                            f"y_{split} has shape {tuple(y.shape)}")
        if len(x) < 2:
            raise UserError(f"the {split} split needs at least two examples, got {len(x)}")
    if xs[0].shape[1:] != xs[1].shape[1:]:
        raise UserError(f"x_train examples have shape {tuple(xs[0].shape[1:])} but x_test {tuple(xs[1].shape[1:])}")
    indices = []
    for index, x, split in ((train_index, xs[0], "train"), (test_index, xs[1], "test")):
        idx = torch.arange(len(x)) if index is None else _as_tensor(index, torch.int64, f"{split}_index").reshape(-1)
        if len(idx) != len(x) or len(torch.unique(idx)) != len(idx):
            raise UserError(f"{split}_index must hold one distinct source index per {split} example")
        indices.append(idx)
    return xs[0], ys[0], xs[1], ys[1], indices[0], indices[1]


def _dataset_kind(x: torch.Tensor) -> str:
    """'image' for (N, 1 or 3, H, W) values in [0, 1] (the app shows them as images), else 'features'."""
    image = x.dim() == 4 and x.shape[1] in (1, 3) and float(x.min()) >= 0.0 and float(x.max()) <= 1.0
    return "image" if image else "features"


def _check_model(task: TaskSpec, dataset: Dataset, n_classes: int) -> None:
    """One forward pass, one `train_many` step and per-sample gradients on two examples; errors name the cause."""
    from .training import init_model, train_many

    model = init_model(task, 0).eval()
    x, y = dataset.x_train[:2], dataset.y_train[:2]
    try:
        with torch.no_grad():
            out = model(x)
    except Exception as exc:  # noqa: BLE001 - the user's model: say what it was given
        raise UserError(f"the model fails on two training examples of shape {tuple(x.shape)} and dtype {x.dtype} "
                        f"({type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''})"
                        ) from None
    if not torch.is_tensor(out) or out.dim() != 2 or out.shape[0] != 2 or out.shape[1] < n_classes:
        shape = tuple(out.shape) if torch.is_tensor(out) else type(out).__name__
        raise UserError(f"the model must return logits of shape (batch, classes) with at least {n_classes} classes; "
                        f"on two examples it returned {shape}")
    tiny = Dataset(dataset.name, dataset.kind, x, y, x, y, dataset.train_index[:2], dataset.train_index[:2],
                   dataset.class_names, dataset.source)
    try:
        train_many(dataclasses.replace(task, recipe=dataclasses.replace(task.recipe, epochs=1, batch_size=2)),
                   tiny, [0, 1], device="cpu")  # two models: the batched (vmap) path ground truths take
        compute_features(GradientSource(model, all_param_names(model), False), x, y)  # exact gradients
    except UserError:
        raise
    except Exception as exc:  # noqa: BLE001 - turned into a message naming the cause
        raise explain_gradient_failure(model, x, exc) from None


def register_task(name: str, model_fn: Callable[[], nn.Module], x_train: Any, y_train: Any, x_test: Any, y_test: Any,
                  recipe: Recipe | Mapping[str, Any], *, class_names: Sequence[str] | None = None,
                  train_index: Any = None, test_index: Any = None, lora_targets: Sequence[str] | None = None,
                  description: str = "") -> TaskSpec:
    """Register a classification task on your model and arrays; returns its `TaskSpec`.

    `model_fn()` builds a fresh model whose initial weights come from torch's global RNG (as torch.nn layers
    do), so every seed gives its own reproducible model; it maps a batch of `x` to logits (batch, classes).
    Plain `nn.Dropout` layers are found and made maskable (Dropout Ensembles); LoRA targets default to the
    Linear and Conv2d layers. `x_*`: arrays (N, ...), float (images as (N, C, H, W) in [0, 1]) or integer
    (token ids, kept int64); `y_*`: int labels (N,); `*_index`: each example's source index in your data (default 0..N-1). Scores are always
    train x test. Registering a name again replaces the task (its artifacts are keyed apart).
    """
    _check_name(name)
    if not callable(model_fn):
        raise UserError("model_fn must be a function that builds a fresh model, e.g. lambda: MyNet()")
    recipe = recipe if isinstance(recipe, Recipe) else Recipe(**dict(recipe))
    x_tr, y_tr, x_te, y_te, i_tr, i_te = _arrays(x_train, y_train, x_test, y_test, train_index, test_index)
    labels = torch.cat([y_tr, y_te])
    n_classes = len(class_names) if class_names is not None else int(labels.max()) + 1
    if int(labels.min()) < 0 or int(labels.max()) >= n_classes:
        raise UserError(f"labels must lie in 0..{n_classes - 1} ({n_classes} class names), got "
                        f"{int(labels.min())}..{int(labels.max())}")
    names = tuple(class_names) if class_names is not None else tuple(str(c) for c in range(n_classes))

    def build() -> nn.Module:
        model = model_fn()
        if not isinstance(model, nn.Module):
            raise UserError(f"model_fn must return a torch.nn.Module, got {type(model).__name__}")
        return prepare_model(model, lora_targets)

    build()  # refuses unsupported dropout layers and unknown LoRA targets before anything is registered
    data_name = f"{name}@{_digest(x_tr, y_tr, x_te, y_te, i_tr, i_te, json.dumps(names))}"
    model_name = f"{name}@{_digest(model_digest(model_fn), json.dumps(lora_targets))}"
    kind = _dataset_kind(x_tr)
    source = f"arrays registered from Python ({len(x_tr)} train / {len(x_te)} test, {kind} {tuple(x_tr.shape[1:])})"
    dataset = Dataset(data_name, kind, x_tr, y_tr, x_te, y_te, i_tr, i_te, names, source)
    task = TaskSpec(name, data_name, model_name, (), recipe, description=description or
                    f"your model on your data: {len(x_tr)}/{len(x_te)} examples, {n_classes} classes")
    if TASKS.get(name) == task:
        return task
    added = model_name not in MODELS
    MODELS[model_name] = build
    try:
        _check_model(task, dataset, n_classes)
    except Exception:
        if added:
            MODELS.pop(model_name)
        raise
    info = DatasetInfo(data_name, kind, source, lambda root, download: dataset,
                       lambda root: SourceStatus("found", "registered from Python"))
    return _install(task, info)


# --- image folders ---------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class FolderTask:
    """How an image folder becomes a task (what `add-image-folder` records in the store)."""

    name: str
    path: str
    size: int
    channels: int
    model: str = "mlp"
    width: float = 0.25  # resnet9 only
    recipe: Recipe | None = None  # None: the model's default (FOLDER_MODELS)
    test_fraction: float = 0.2
    seed: int = 0
    max_pixels: int = MAX_PIXELS


def register_image_folder(name: str, path: str | Path, *, model: str = "mlp", width: float = 0.25,
                          recipe: Recipe | None = None, size: int | None = None, channels: int | None = None,
                          test_fraction: float = 0.2, seed: int = 0, max_pixels: int = MAX_PIXELS,
                          record_in: Store | None = None) -> TaskSpec:
    """Register an image folder (class-per-subfolder) as a task with a built-in model (mlp or resnet9).

    Size and channels are read from the image headers unless given; the images are decoded when the task's
    data is first loaded, and files that cannot be read are skipped and counted in one warning. ResNet-9's
    channel counts scale with `width` (0.25: CPU-sized). Without train/ and test/ subfolders a
    `test_fraction` of every class is held out (drawn from `seed`). `record_in`: also record the folder in
    this store, so later processes (`python -m tda_core ...`, the app) register it again.
    """
    _check_name(name)
    if model not in FOLDER_MODELS:
        raise unknown_choice("image-folder model", model, sorted(FOLDER_MODELS))
    listing = list_image_folder(path)
    if size is None or channels is None:
        found_size, found_channels = folder_format(listing, max_pixels)
        size, channels = size or found_size, channels or found_channels
    if model == "resnet9" and size < 8:
        raise UserError(f"ResNet-9 pools three times and needs images of at least 8x8; these are {size}x{size}")
    folder = FolderTask(name, str(listing.root), int(size), int(channels), model, float(width), recipe,
                        float(test_fraction), int(seed), int(max_pixels))
    if record_in is None:
        return _register_folder(folder)
    with _registering(f"image folder {folder.path}"):
        task = _register_folder(folder)
    row = dataclasses.asdict(folder)
    row["recipe"] = json.dumps(dataclasses.asdict(recipe)) if recipe else ""
    record_in.append_rows(FOLDER_TABLE, [row])
    return task


def _register_folder(folder: FolderTask) -> TaskSpec:
    listing = list_image_folder(folder.path)
    classes = listing.classes
    digest = _digest(json.dumps(dataclasses.asdict(folder), sort_keys=True, default=str), json.dumps(classes))
    data_name = f"{folder.name}@{digest}"
    if folder.model == "mlp":
        kwargs = (("in_features", folder.channels * folder.size ** 2), ("n_classes", len(classes)))
    else:
        kwargs = (("n_classes", len(classes)), ("width", folder.width), ("in_channels", folder.channels))
    recipe = folder.recipe or FOLDER_MODELS[folder.model]
    task = TaskSpec(folder.name, data_name, folder.model, kwargs, recipe,
                    description=f"image folder {listing.root} ({len(classes)} classes: {', '.join(classes)}; "
                                f"{folder.size}x{folder.size}x{folder.channels}) + {folder.model}")
    if TASKS.get(folder.name) == task:
        return task

    def load(root: Path, download: bool) -> Dataset:
        return load_image_folder(data_name, folder.path, folder.size, folder.channels,
                                 test_fraction=folder.test_fraction, seed=folder.seed, max_pixels=folder.max_pixels)

    def locate(root: Path) -> SourceStatus:
        return SourceStatus("found" if Path(folder.path).is_dir() else "missing", folder.path)

    return _install(task, DatasetInfo(data_name, "image", f"image folder {folder.path}", load, locate))


def folder_records(store: Store) -> list[FolderTask]:
    """The image folders recorded in the store (the last record of a name wins)."""
    table = store.read_table(FOLDER_TABLE)
    if table.empty:
        return []
    out = []
    for row in table.drop_duplicates("name", keep="last").to_dict("records"):
        recipe = Recipe(**json.loads(row["recipe"])) if isinstance(row["recipe"], str) and row["recipe"] else None
        out.append(FolderTask(str(row["name"]), str(row["path"]), int(row["size"]), int(row["channels"]),
                              str(row["model"]), float(row["width"]), recipe, float(row["test_fraction"]),
                              int(row["seed"]), int(row["max_pixels"])))
    return out


# --- tasks files and loading ------------------------------------------------------------------------
@contextmanager
def _registering(origin: str) -> Iterator[None]:
    _origin.append(origin)
    try:
        yield
    finally:
        _origin.pop()


def run_tasks_file(path: str | Path) -> None:
    """Run a tasks file (a Python file calling `register_task` / `register_image_folder`) unless unchanged."""
    file = Path(path).expanduser().resolve()
    if not file.is_file():
        raise UserError(f"tasks file {file} does not exist (set by --tasks-file or ${TASKS_FILE_ENV})")
    mtime = file.stat().st_mtime_ns
    if _tasks_files.get(file) == mtime:
        return
    with _registering(f"tasks file {file}"):
        try:
            runpy.run_path(str(file), run_name="__tda_tasks__")
        except UserError as exc:
            raise UserError(f"tasks file {file}: {exc}") from None
        except Exception as exc:  # noqa: BLE001 - the user's file: one line saying where it broke
            lines = [f.lineno for f in traceback.extract_tb(exc.__traceback__) if Path(f.filename) == file]
            where = f" line {lines[-1]}" if lines else ""
            raise UserError(f"tasks file {file}{where}: {type(exc).__name__}: {exc}") from None
    _tasks_files[file] = mtime


def load_user_tasks(tasks_file: str | Path | None = None, store: Store | None = None) -> list[str]:
    """Register the tasks of the tasks file (`tasks_file`, else $TDA_TASKS_FILE) and the image folders the store
    records; returns the names of all user tasks now registered. Cheap when nothing changed (the app calls it
    on every rerun)."""
    path = tasks_file or os.environ.get(TASKS_FILE_ENV)
    if path:
        run_tasks_file(path)
    for folder in folder_records(store or Store()):
        with _registering(f"image folder {folder.path}"):
            try:
                _register_folder(folder)
            except UserError as exc:  # a folder moved away must not break every other command
                log.warning("image-folder task %r is not available: %s", folder.name, exc)
    return sorted(ORIGINS)


def task_table() -> pd.DataFrame:
    """Every registered task: name, origin (built-in, Python, tasks file, image folder), dataset, model, recipe."""
    rows = []
    for name, task in sorted(TASKS.items()):
        r = task.recipe
        rows.append({"task": name, "origin": ORIGINS.get(name, "built-in"), "dataset": task.dataset,
                     "model": task.model, "recipe": f"{r.optimizer} lr {r.lr:g}, batch {r.batch_size}, "
                                                    f"{r.epochs} epochs", "description": task.description})
    return pd.DataFrame(rows)


# --- other processes -----------------------------------------------------------------------------------
def user_registrations() -> dict[str, dict]:
    """This process's user tasks with their datasets and models, for another process (a Ray worker) to install
    with `install_registrations` (built-in tasks are there already)."""
    tasks = {name: TASKS[name] for name in ORIGINS if name in TASKS}
    return {"tasks": tasks,
            "datasets": {t.dataset: REGISTRY[t.dataset] for t in tasks.values() if t.dataset in REGISTRY},
            "models": {t.model: MODELS[t.model] for t in tasks.values() if t.model in MODELS}}


def install_registrations(registrations: Mapping[str, Mapping]) -> None:
    """Register what `user_registrations` gathered in another process."""
    for registry, entries in ((TASKS, registrations["tasks"]), (REGISTRY, registrations["datasets"]),
                              (MODELS, registrations["models"])):
        registry.update(entries)
