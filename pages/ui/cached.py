"""Loaders cached across reruns: datasets, attributions, ground truths, runs, predictions, music snippets.

Everything they return is computed by tda_core; what is missing is computed outside the cache first, so
progress draws where the page wants it (cached functions must not draw into outside blocks).
"""
from __future__ import annotations

from typing import Any

import numpy as np
import streamlit as st

from tda_core.attribution import Attribution, WorkPlan, attribute, plan, scores_stored
from tda_core.data import Dataset, load_dataset, snippets
from tda_core.device import describe_device, resolve_device
from tda_core.evaluation import GroundTruth, ground_truth, missing_models
from tda_core.examples import base_predictions
from tda_core.experiments import Result, run
from tda_core.paths import data_dir
from tda_core.progress import Progress
from tda_core.settings import Setting
from tda_core.specs import EnsembleSpec, EvalSpec, MethodSpec, TaskSpec
from tda_core.store import Store


def _finish(progress: Progress | None) -> None:
    if progress is not None and hasattr(progress, "finish"):
        progress.finish()


@st.cache_resource(show_spinner="Loading dataset...")
def _cached_dataset(name: str, root: str) -> Dataset:
    return load_dataset(name, root)


def cached_dataset(name: str) -> Dataset:
    """A dataset from the current data directory, loaded once per app process."""
    return _cached_dataset(name, str(data_dir()))


@st.cache_resource
def cached_device() -> str:
    """The device `auto` resolves to, described for people."""
    return describe_device(resolve_device("auto"))


@st.cache_resource(show_spinner=False, max_entries=32)
def _cached_attribution(task: TaskSpec, method: MethodSpec, ensemble: EnsembleSpec, store_root: str) -> Attribution:
    return attribute(task, method, ensemble, store=Store(store_root))


def cached_attribution_of(task: TaskSpec, method: MethodSpec, ensemble: EnsembleSpec,
                          progress: Progress | None = None) -> Attribution:
    """An Attribution of the current store (computed first when missing), kept in memory once loaded."""
    store = Store()
    if not scores_stored(task, method, ensemble, store):
        attribute(task, method, ensemble, store=store, progress=progress)
        _finish(progress)
    return _cached_attribution(task, method, ensemble, str(store.root))


def cached_attribution(setting: Setting, progress: Progress | None = None) -> Attribution:
    """The Attribution of a setting (see `cached_attribution_of`)."""
    return cached_attribution_of(setting.task, setting.method, setting.ensemble, progress)


def all_stored(task: TaskSpec, settings: list[tuple[MethodSpec, EnsembleSpec]]) -> bool:
    """True when every (method, ensemble) attribution of `task` is already in the store."""
    store = Store()
    return all(scores_stored(task, method, ensemble, store) for method, ensemble in settings)


@st.cache_resource(show_spinner=False, max_entries=8)
def _cached_ground_truth(task: TaskSpec, spec: EvalSpec, store_root: str) -> GroundTruth:
    return ground_truth(task, spec, store=Store(store_root))


def has_ground_truth(task: TaskSpec, spec: EvalSpec) -> bool:
    """True when the ground truth is in the store (so showing LDS costs nothing)."""
    return missing_models(task, spec, store=Store()) == 0


def cached_ground_truth(task: TaskSpec, spec: EvalSpec, progress: Progress | None = None) -> GroundTruth:
    """Subset-retraining ground truth of the current store: missing models trained first (with progress)."""
    store = Store()
    if missing_models(task, spec, store=store):
        ground_truth(task, spec, store=store, progress=progress)
        _finish(progress)
    return _cached_ground_truth(task, spec, str(store.root))


@st.cache_resource(show_spinner=False, max_entries=16)
def _cached_predictions(task: TaskSpec, ensemble: EnsembleSpec, store_root: str) -> np.ndarray:
    return base_predictions(task, ensemble, Store(store_root))


def cached_predictions(setting: Setting) -> np.ndarray:
    """Predicted test classes of the setting's first base model (loaded from the store, trained if missing)."""
    return _cached_predictions(setting.task, setting.ensemble, str(Store().root))


@st.cache_data(show_spinner="Rendering music...", max_entries=256)
def cached_snippet(dataset_name: str, split: str, position: int, title: str) -> tuple[Any, bytes, bytes]:
    """(piano-roll figure, WAV bytes, MIDI bytes) of one music window of the current data directory."""
    snip = snippets.snippet(cached_dataset(dataset_name), split, position)
    figure = snippets.piano_roll(snip, title=title)
    figure.update_layout(height=240, title_font_size=13, margin={"l": 40, "r": 10, "t": 36, "b": 30})
    figure.update_traces(marker_showscale=False)
    return figure, snippets.to_wav_bytes(snip), snippets.to_midi_bytes(snip)


def plan_setting(setting: Setting) -> WorkPlan:
    """The work a setting implies right now (what is stored changes, so this is not cached)."""
    return plan(setting.task, setting.method, setting.ensemble)


@st.cache_resource(show_spinner="Scoring against the ground truth...", max_entries=32)
def _cached_run(task: TaskSpec, method: MethodSpec, ensemble: EnsembleSpec, spec: EvalSpec,
                store_root: str) -> Result:
    return run(task, method, ensemble, spec, store=Store(store_root))


def cached_run(setting: Setting, spec: EvalSpec) -> Result:
    """LDS and costs of a setting whose scores and ground truth are stored (a read plus the LDS)."""
    return _cached_run(setting.task, setting.method, setting.ensemble, spec, str(Store().root))
