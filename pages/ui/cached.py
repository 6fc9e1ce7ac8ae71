"""Loaders cached across reruns: datasets, attributions, member scores, ground truths, runs, predictions, music
snippets, reference results.

Everything they return is computed by tda_core. Long work (training, attributing, ground truths) never runs
here: pages start it as a background job (tda_core/jobs.py, `widgets.job_panel`) and load it once it is stored.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
import streamlit as st

from tda_core.attribution import (Attribution, MemberAttribution, WorkPlan, attribute, member_attribution,
                                  members_stored, plan, scores_stored)
from tda_core.data import Dataset, load_dataset, snippets
from tda_core.device import describe_device, resolve_device
from tda_core.evaluation import GroundTruth, ground_truth, missing_models
from tda_core.examples import base_predictions
from tda_core.experiments import Result, run
from tda_core.paths import data_dir
from tda_core.reference import ReferenceFile, ReferenceResults, load_references, reference_files
from tda_core.score_analysis import member_agreement
from tda_core.settings import Setting, describe_ensemble
from tda_core.specs import EnsembleSpec, EvalSpec, MethodSpec, TaskSpec
from tda_core.store import Store
from tda_core.teaching import ensemble_ladder


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


def cached_attribution_of(task: TaskSpec, method: MethodSpec, ensemble: EnsembleSpec) -> Attribution:
    """A stored Attribution of the current store, kept in memory once loaded (check `scores_stored` first: a
    missing one is computed in the script run)."""
    return _cached_attribution(task, method, ensemble, str(Store().root))


def cached_attribution(setting: Setting) -> Attribution:
    """The stored Attribution of a setting (see `cached_attribution_of`)."""
    return cached_attribution_of(setting.task, setting.method, setting.ensemble)


@st.cache_resource(show_spinner=False, max_entries=8)
def _cached_members(task: TaskSpec, method: MethodSpec, ensemble: EnsembleSpec, store_root: str) -> MemberAttribution:
    return member_attribution(task, method, ensemble, store=Store(store_root))


def has_members(task: TaskSpec, method: MethodSpec, ensemble: EnsembleSpec) -> bool:
    """True when each member's own scores of the ensemble are stored."""
    return members_stored(task, method, ensemble, store=Store())


def cached_members(task: TaskSpec, method: MethodSpec, ensemble: EnsembleSpec) -> MemberAttribution:
    """The stored member scores of an ensemble (check `has_members` first)."""
    return _cached_members(task, method, ensemble, str(Store().root))


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


def cached_ground_truth(task: TaskSpec, spec: EvalSpec) -> GroundTruth:
    """The stored subset-retraining ground truth of the current store (check `has_ground_truth` first)."""
    return _cached_ground_truth(task, spec, str(Store().root))


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


@st.cache_resource(show_spinner=False, max_entries=16)
def _cached_references(task: str, mtime: float) -> tuple[list[ReferenceFile], ReferenceResults]:
    files = reference_files(task)
    return files, load_references(files)


def cached_references(task: str) -> tuple[list[ReferenceFile], ReferenceResults]:
    """(the reference files of a task, their rows) from the committed manifest, re-read when it changes."""
    from tda_core.reference import MANIFEST

    return _cached_references(task, MANIFEST.stat().st_mtime if MANIFEST.exists() else 0.0)


@st.cache_data(show_spinner=False, max_entries=8)
def _cached_agreement(task: TaskSpec, method: MethodSpec, ensemble: EnsembleSpec, store_root: str) -> pd.DataFrame:
    members = member_attribution(task, method, ensemble, store=Store(store_root))
    return member_agreement([members.member(j) for j in range(len(members.labels))], members.average())


def cached_agreement(task: TaskSpec, method: MethodSpec, ensemble: EnsembleSpec) -> pd.DataFrame:
    """How the stored members of an ensemble agree with each other and with the ensemble (mean Spearman)."""
    return _cached_agreement(task, method, ensemble, str(Store().root))


@st.cache_data(show_spinner=False, max_entries=8)
def _cached_ladder(task: TaskSpec, method: MethodSpec, ensembles: tuple[EnsembleSpec, ...], spec: EvalSpec,
                   store_root: str) -> pd.DataFrame:
    store = Store(store_root)
    truth = ground_truth(task, spec, store=store)
    scored = [(describe_ensemble(e), attribute(task, method, e, store=store).scores) for e in ensembles]
    return ensemble_ladder(scored, truth)


def cached_ladder(task: TaskSpec, method: MethodSpec, ensembles: list[EnsembleSpec], spec: EvalSpec) -> pd.DataFrame:
    """LDS of stored ensembles against a stored ground truth, one row each."""
    return _cached_ladder(task, method, tuple(ensembles), spec, str(Store().root))
