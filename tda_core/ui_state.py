"""The app's shared state: the chosen setting (task, method, ensemble) kept in `st.session_state`,
the sidebar that edits it, cached loaders, a progress adapter and the user-error guard.

Only the app imports this module (it needs streamlit); the computations it calls live in tda_core.
"""
from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import streamlit as st

from .data import load_dataset
from .errors import UserError
from .specs import ENSEMBLE_KINDS, METHODS, PROJECTIONS, EnsembleSpec, MethodSpec, TaskSpec
from .tasks import TASKS, get_task

METHOD_LABELS = {"trak": "TRAK", "if": "Influence function", "grad-dot": "Grad-Dot", "grad-cos": "Grad-Cos"}
KIND_LABELS = {"naive": "naive (I models)", "dropout": "Dropout (I x D)", "dropout-forward": "Dropout forward-only",
               "lora": "LoRA (I x L)", "proj-seeds": "control: projection seeds (I x P)"}
PROJ_LABELS = {"dense": "dense JL", "kron": "Kronecker per layer", "none": "none (exact)"}
DEFAULT_TASK = "mnist-mlp"

# widget key -> default value; every page reads the setting through `current_setting()`
DEFAULTS: dict[str, Any] = {
    "task": DEFAULT_TASK, "method": "trak", "proj": "kron", "proj_dim": 32, "damping": 1.0,
    "kind": "dropout", "I": 1, "D": 5, "L": 5, "P": 5, "dropout_p": 0.0, "lora_rank": 16, "seed": 0,
}


@dataclasses.dataclass(frozen=True)
class Setting:
    """One chosen setting: task, method and ensemble (hashable, so it can key caches)."""

    task: TaskSpec
    method: MethodSpec
    ensemble: EnsembleSpec

    @property
    def label(self) -> str:
        return describe(self.method, self.ensemble)


def describe_method(method: MethodSpec) -> str:
    """'TRAK, Kronecker per layer k=32, c=1' and the like."""
    name = METHOD_LABELS[method.name]
    if method.name in ("trak", "if"):
        proj = PROJ_LABELS[method.proj] + (f" k={method.proj_dim}" if method.proj != "none" else "")
        damping = "c tuned" if method.damping is None else f"c={method.damping:g}"
        return f"{name}, {proj}, {damping}"
    return name


def describe_ensemble(ensemble: EnsembleSpec) -> str:
    """'dropout I=2 D=5 (10 members, 2 trained)' and the like."""
    budget = {"naive": "", "dropout": f" D={ensemble.D}", "dropout-forward": f" D={ensemble.D}",
              "lora": f" L={ensemble.L}", "proj-seeds": f" P={ensemble.P}"}[ensemble.kind]
    return (f"{ensemble.kind} I={ensemble.I}{budget} ({ensemble.n_members} members, "
            f"{ensemble.n_trained} trained)")


def describe(method: MethodSpec, ensemble: EnsembleSpec) -> str:
    """A one-line label of a whole setting."""
    return f"{describe_method(method)} · {describe_ensemble(ensemble)}"


def make_setting(values: dict[str, Any]) -> Setting:
    """Build validated specs from widget values (missing keys take `DEFAULTS`); bad values raise UserError."""
    v = {**DEFAULTS, **values}
    task = get_task(v["task"])
    method = MethodSpec(name=v["method"], proj=v["proj"], proj_dim=int(v["proj_dim"]),
                        damping=None if v["damping"] is None else float(v["damping"]))
    dropout_p = None if not v["dropout_p"] else float(v["dropout_p"])
    ensemble = EnsembleSpec(kind=v["kind"], I=int(v["I"]), D=int(v["D"]), L=int(v["L"]), P=int(v["P"]),
                            dropout_p=dropout_p, lora_rank=int(v["lora_rank"]), seed=int(v["seed"]))
    return Setting(task, method, ensemble)


# --- streamlit side ----------------------------------------------------------------------------------
def init_state() -> None:
    """Put the defaults into st.session_state once per session."""
    for key, value in DEFAULTS.items():
        st.session_state.setdefault(key, value)
    if st.session_state["task"] not in TASKS:
        st.session_state["task"] = DEFAULT_TASK


def sidebar() -> None:
    """The setting editor shown on every page; its values persist across pages."""
    init_state()
    with st.sidebar:
        st.markdown("### Setting")
        st.selectbox("Task", sorted(TASKS), key="task", help="dataset + model + training recipe")
        st.selectbox("TDA method", METHODS, key="method", format_func=METHOD_LABELS.get)
        st.selectbox("Ensemble", ENSEMBLE_KINDS, key="kind", format_func=KIND_LABELS.get)
        kind = st.session_state["kind"]
        cols = st.columns(2)
        cols[0].number_input("I (trained)", 1, 50, key="I", help="independently trained base models")
        if kind in ("dropout", "dropout-forward"):
            cols[1].number_input("D (masks)", 1, 50, key="D", help="dropout masks per base model")
        elif kind == "lora":
            cols[1].number_input("L (adapters)", 1, 50, key="L", help="LoRA fine-tunes per base model")
        elif kind == "proj-seeds":
            cols[1].number_input("P (seeds)", 1, 50, key="P", help="projection seeds per base model")
        with st.expander("Projection, damping, details"):
            st.selectbox("Projection", PROJECTIONS, key="proj", format_func=PROJ_LABELS.get,
                         help="Kronecker is the fast path; dense JL is the reference")
            st.number_input("Projection dimension", 1, 65536, key="proj_dim",
                            help="k for dense; per-layer side for Kronecker (k x k per layer)")
            st.number_input("Damping c", 0.0, 1000.0, key="damping", format="%g",
                            help="lambda = c * trace(K) / k")
            st.slider("Dropout rate (0 = the model's own)", 0.0, 0.9, key="dropout_p", step=0.05)
            st.number_input("LoRA rank", 1, 256, key="lora_rank")
            st.number_input("Seed", 0, 10_000, key="seed")


def current_values() -> dict[str, Any]:
    """The widget values of the current setting."""
    init_state()
    return {key: st.session_state[key] for key in DEFAULTS}


def current_setting() -> Setting:
    """The validated current setting (a bad combination shows an error and stops the page)."""
    with friendly_errors():
        return make_setting(current_values())


@contextmanager
def friendly_errors(next_step: str = "") -> Iterator[None]:
    """Show a UserError as a message with its next step and stop the page, never a traceback."""
    try:
        yield
    except UserError as exc:
        st.error(f"{exc}" + (f"\n\n**Next step:** {next_step}" if next_step else ""), icon=":material/error:")
        st.stop()


class StreamlitProgress:
    """Adapts the `progress(done, total, label)` protocol to one st.progress bar per stage, with elapsed time."""

    def __init__(self, container: Any | None = None) -> None:
        self.container = container if container is not None else st.container()
        self.bars: dict[str, Any] = {}
        self.started: dict[str, float] = {}

    def __call__(self, done: int, total: int, label: str) -> None:
        if label not in self.bars:
            self.started[label] = time.perf_counter()
            self.bars[label] = self.container.progress(0.0, text=label)
        elapsed = time.perf_counter() - self.started[label]
        fraction = min(1.0, done / total) if total else 1.0
        self.bars[label].progress(fraction, text=f"{label}: {done}/{total} · {elapsed:.1f} s")


@st.cache_resource(show_spinner="Loading dataset...")
def cached_dataset(name: str):  # noqa: ANN201 - a tda_core Dataset
    """A dataset, loaded once per app process."""
    return load_dataset(name)


@st.cache_resource
def cached_device() -> str:
    """The device `auto` resolves to, described for people."""
    from .device import describe_device, resolve_device

    return describe_device(resolve_device("auto"))


@st.cache_resource(show_spinner=False, max_entries=16)
def cached_attribution(setting: Setting, _progress: StreamlitProgress | None = None):  # noqa: ANN201
    """The Attribution of a setting: loaded from the store (or computed, with progress) once per app process."""
    from .attribution import attribute

    return attribute(setting.task, setting.method, setting.ensemble, progress=_progress)


@st.cache_resource(show_spinner=False, max_entries=16)
def cached_predictions(setting: Setting):  # noqa: ANN201 - numpy array of predicted classes
    """Predicted test classes of the setting's first base model (loaded from the store, trained if missing)."""
    from .explore import base_predictions

    return base_predictions(setting.task, setting.ensemble)


def show_examples(dataset, split: str, positions: list[int], captions: list[str], size: int = 84) -> None:  # noqa: ANN001
    """Draw examples: image thumbnails in a row, or music windows as piano roll, audio and MIDI download."""
    from . import explore

    if not positions:
        st.caption("(none)")
        return
    if dataset.kind == "image":
        st.image(explore.thumbnails(dataset, split, positions, size), caption=captions, width=size)
        return
    from .data import snippets

    for pos, text in zip(positions, captions):
        with st.container(border=True):
            st.caption(text)
            st.plotly_chart(snippets.piano_roll(dataset, split, pos), width="stretch", key=f"roll-{split}-{pos}-{text}")
            st.audio(snippets.wav_bytes(dataset, split, pos), format="audio/wav")
            st.download_button("MIDI", snippets.midi_bytes(dataset, split, pos), f"{split}-{pos}.mid",
                               mime="audio/midi", key=f"midi-{split}-{pos}-{text}")


def _computed(setting: Setting) -> bool:
    return setting in st.session_state.setdefault("_computed", set())


def obtain_attribution(setting: Setting, key: str):  # noqa: ANN201 - Attribution | None
    """The setting's Attribution when it is stored (or was computed in this session); otherwise the work it
    implies and a button to compute it. Returns None while nothing is computed."""
    from .explore import plan_table

    with friendly_errors():
        work = _plan(setting)
    if not (_computed(setting) or work.stored):
        st.info(f"Not computed yet: **{setting.label}**.", icon=":material/hourglass_empty:")
        st.dataframe(plan_table(work), hide_index=True)
        if not work.fits:
            st.error(f"{work.reason} Lower I, D or L, or pick a smaller projection dimension.")
            return None
        if not st.button("Compute", key=f"compute-{key}", type="primary", icon=":material/play_arrow:"):
            return None
    with friendly_errors():
        attribution = cached_attribution(setting, StreamlitProgress())
    st.session_state["_computed"].add(setting)
    return attribution


def _plan(setting: Setting):  # noqa: ANN202 - a WorkPlan
    from .attribution import plan

    return plan(setting.task, setting.method, setting.ensemble)
