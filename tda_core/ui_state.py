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
from .paths import data_dir
from .specs import ENSEMBLE_KINDS, METHODS, PROJECTIONS, EnsembleSpec, MethodSpec, TaskSpec
from .store import Store
from .tasks import TASKS, get_task

METHOD_LABELS = {"trak": "TRAK", "if": "Influence function", "grad-dot": "Grad-Dot", "grad-cos": "Grad-Cos"}
KIND_LABELS = {"naive": "naive (I models)", "dropout": "Dropout (I x D)", "dropout-forward": "Dropout forward-only",
               "lora": "LoRA (I x L)", "proj-seeds": "control: projection seeds (I x P)"}
PROJ_LABELS = {"dense": "dense JL", "kron": "Kronecker JL", "none": "none (exact)"}
DEFAULT_TASK = "mnist-mlp"

LIMITS = {"I": (1, 50), "D": (1, 50), "L": (1, 50), "P": (1, 50), "proj_dim": (1, 65536), "seed": (0, 10_000)}
# widget key -> default value; every page reads the setting through `current_setting()`
DEFAULTS: dict[str, Any] = {
    "task": DEFAULT_TASK, "method": "trak", "proj": "kron", "proj_dim": 2048, "damping": 1.0,
    "kind": "dropout", "I": 1, "D": 5, "L": 5, "P": 5, "dropout_p": 0.0, "lora_rank": 16, "seed": 0,
    "shared_projection": False,
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
    """'TRAK, Kronecker JL k=32, c=1' and the like."""
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
    shared = ", shared projection" if ensemble.shared_projection else ""
    return (f"{ensemble.kind} I={ensemble.I}{budget}{shared} ({ensemble.n_members} members, "
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
    kind = v["kind"]
    # only the knobs of the chosen kind leave their defaults, so equal settings get equal store keys
    extra: dict[str, Any] = {}
    if kind in ("dropout", "dropout-forward"):
        extra = {"D": int(v["D"]), "dropout_p": float(v["dropout_p"]) if v["dropout_p"] else None}
    elif kind == "lora":
        extra = {"L": int(v["L"]), "lora_rank": int(v["lora_rank"])}
    if kind in ("dropout", "lora") and v["shared_projection"]:
        extra["shared_projection"] = True
    elif kind == "proj-seeds":
        extra = {"P": int(v["P"])}
    ensemble = EnsembleSpec(kind=kind, I=int(v["I"]), seed=int(v["seed"]), **extra)
    return Setting(task, method, ensemble)


# --- streamlit side ----------------------------------------------------------------------------------
def values_from_query(query: dict[str, str]) -> dict[str, Any]:
    """Setting values given in a URL (``?task=digits-mlp&kind=naive&I=2``); unknown or invalid ones are ignored."""
    choices = {"task": TASKS, "method": METHODS, "kind": ENSEMBLE_KINDS, "proj": PROJECTIONS}
    out: dict[str, Any] = {}
    for key, text in query.items():
        if key in choices and text in choices[key]:
            out[key] = text
        elif key in LIMITS and text.isdigit() and LIMITS[key][0] <= int(text) <= LIMITS[key][1]:
            out[key] = int(text)
    return out


def init_state() -> None:
    """Put the defaults, or values given in the URL, into st.session_state once per session."""
    if "_initialised" not in st.session_state:
        st.session_state["_initialised"] = True
        for key, value in values_from_query(st.query_params.to_dict()).items():
            st.session_state.setdefault(key, value)
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
        cols[0].number_input("I (trained)", *LIMITS["I"], key="I", help="independently trained base models")
        if kind in ("dropout", "dropout-forward"):
            cols[1].number_input("D (masks)", *LIMITS["D"], key="D", help="dropout masks per base model")
        elif kind == "lora":
            cols[1].number_input("L (adapters)", *LIMITS["L"], key="L", help="LoRA fine-tunes per base model")
        elif kind == "proj-seeds":
            cols[1].number_input("P (seeds)", *LIMITS["P"], key="P", help="projection seeds per base model")
        with st.expander("Projection, damping, details"):
            st.selectbox("Projection", PROJECTIONS, key="proj", format_func=PROJ_LABELS.get,
                         help="Kronecker is the fast path; dense JL is the reference")
            st.number_input("Projection dimension", *LIMITS["proj_dim"], key="proj_dim",
                            help="projection dimension k (features per member)")
            st.number_input("Damping c", 0.0, 1000.0, key="damping", format="%g",
                            help="lambda = c * trace(K) / k")
            st.slider("Dropout rate (0 = the model's own)", 0.0, 0.9, key="dropout_p", step=0.05)
            st.number_input("LoRA rank", 1, 256, key="lora_rank")
            st.toggle("Members of a model share one projection", key="shared_projection",
                      help="Dropout / LoRA only: isolates the mask or adapter effect from projection noise")
            st.number_input("Seed", *LIMITS["seed"], key="seed")


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
    """Adapts the `progress(done, total, label)` protocol to Streamlit: on the first report a status box
    opens where the object was made, with one bar per stage (the label before ':') and elapsed time;
    `finish()` folds it into a one-line summary. Nothing is drawn when no work is reported."""

    def __init__(self, title: str = "Computing") -> None:
        self.title = title
        self.slot = st.empty()
        self.box: Any = None
        self.bars: dict[str, Any] = {}
        self.started = time.perf_counter()

    def __call__(self, done: int, total: int, label: str) -> None:
        if self.box is None:
            self.started = time.perf_counter()
            self.box = self.slot.status(f"{self.title}...", expanded=True)
        stage = label.split(":")[0]
        if stage not in self.bars:
            self.bars[stage] = self.box.progress(0.0, text=label)
        fraction = min(1.0, done / total) if total else 1.0
        elapsed = time.perf_counter() - self.started
        self.bars[stage].progress(fraction, text=f"{label} · {done}/{total} · {elapsed:.1f} s")

    def finish(self) -> None:
        """Close the status box (if any work was reported) with the total time."""
        if self.box is not None:
            self.box.update(label=f"{self.title}: done in {time.perf_counter() - self.started:.1f} s",
                            state="complete", expanded=False)


@st.cache_resource(show_spinner="Loading dataset...")
def _cached_dataset(name: str, root: str):  # noqa: ANN202 - a tda_core Dataset
    return load_dataset(name, root)


def cached_dataset(name: str):  # noqa: ANN201 - a tda_core Dataset
    """A dataset from the current data directory, loaded once per app process."""
    return _cached_dataset(name, str(data_dir()))


@st.cache_resource
def cached_device() -> str:
    """The device `auto` resolves to, described for people."""
    from .device import describe_device, resolve_device

    return describe_device(resolve_device("auto"))


@st.cache_resource(show_spinner=False, max_entries=32)
def _cached_attribution(task: TaskSpec, method: MethodSpec, ensemble: EnsembleSpec,
                        store_root: str):  # noqa: ANN202 - Attribution
    from .attribution import attribute

    return attribute(task, method, ensemble, store=Store(store_root))


def cached_attribution_of(task: TaskSpec, method: MethodSpec, ensemble: EnsembleSpec,
                          progress: StreamlitProgress | None = None):  # noqa: ANN201 - Attribution
    """An Attribution of the current store, kept in memory once loaded.

    What is missing is computed first, outside the cache, so progress bars draw where the page wants
    them (cached functions must not draw into outside blocks); the cache then holds the stored result.
    """
    from .attribution import attribute, scores_stored

    store = Store()
    if not scores_stored(task, method, ensemble, store):
        attribute(task, method, ensemble, store=store, progress=progress)
        if progress is not None:
            progress.finish()
    return _cached_attribution(task, method, ensemble, str(store.root))


def cached_attribution(setting: Setting, progress: StreamlitProgress | None = None):  # noqa: ANN201
    """The Attribution of a setting (see `cached_attribution_of`)."""
    return cached_attribution_of(setting.task, setting.method, setting.ensemble, progress)


@st.cache_resource(show_spinner=False, max_entries=8)
def _cached_ground_truth(task: TaskSpec, spec, store_root: str):  # noqa: ANN001, ANN202
    from .evaluation import ground_truth

    return ground_truth(task, spec, store=Store(store_root))


def cached_ground_truth(task: TaskSpec, spec, progress: StreamlitProgress | None = None):  # noqa: ANN001, ANN201
    """Subset-retraining ground truth of the current store: missing models trained first (with progress)."""
    from .evaluation import ground_truth, missing_models

    store = Store()
    if missing_models(task, spec, store=store):
        ground_truth(task, spec, store=store, progress=progress)
        if progress is not None:
            progress.finish()
    return _cached_ground_truth(task, spec, str(store.root))


@st.cache_resource(show_spinner=False, max_entries=16)
def _cached_predictions(task: TaskSpec, ensemble: EnsembleSpec, store_root: str):  # noqa: ANN202
    from .explore import base_predictions

    return base_predictions(task, ensemble, Store(store_root))


def cached_predictions(setting: Setting):  # noqa: ANN201 - numpy array of predicted classes
    """Predicted test classes of the setting's first base model (loaded from the store, trained if missing)."""
    return _cached_predictions(setting.task, setting.ensemble, str(Store().root))


def show_examples(dataset, split: str, positions: list[int], captions: list[str], size: int = 84,  # noqa: ANN001
                  per_row: int | None = None, key: str = "") -> None:
    """Draw examples: image thumbnails in rows (`per_row`, default: what fits a full-width page), or music
    windows as piano roll, audio player and MIDI download (`key` tells apart repeated groups on a page)."""
    from . import explore

    if not positions:
        st.caption("(none)")
        return
    if dataset.kind == "image":
        per_row = max(1, min(len(positions), per_row or 1100 // (size + 16)))
        for start in range(0, len(positions), per_row):
            cols = st.columns(per_row, gap="small")
            chunk = positions[start:start + per_row]
            for col, image, text in zip(cols, explore.thumbnails(dataset, split, chunk, size),
                                        captions[start:start + per_row]):
                col.image(image, caption=text, width=size, output_format="PNG")
        return
    per_row = per_row or 2
    for start in range(0, len(positions), per_row):
        cols = st.columns(per_row)
        for col, pos, text in zip(cols, positions[start:start + per_row], captions[start:start + per_row]):
            figure, wav, midi = cached_snippet(dataset.name, split, int(pos), text)
            with col.container(border=True):
                st.plotly_chart(figure, width="stretch", key=f"roll-{key}-{split}-{pos}")
                st.audio(wav, format="audio/wav")
                st.download_button("MIDI", midi, f"{dataset.name}-{split}-{pos}.mid", mime="audio/midi",
                                   icon=":material/download:", key=f"midi-{key}-{split}-{pos}")


@st.cache_data(show_spinner="Rendering music...", max_entries=256)
def cached_snippet(dataset_name: str, split: str, position: int, title: str) -> tuple[Any, bytes, bytes]:
    """(piano-roll figure, WAV bytes, MIDI bytes) of one music window of the current data directory."""
    from .data import snippets

    snip = snippets.snippet(cached_dataset(dataset_name), split, position)
    figure = snippets.piano_roll(snip, title=title)
    figure.update_layout(height=240, title_font_size=13, margin={"l": 40, "r": 10, "t": 36, "b": 30})
    figure.update_traces(marker_showscale=False)
    return figure, snippets.to_wav_bytes(snip), snippets.to_midi_bytes(snip)


def is_ready(setting: Setting) -> bool:
    """True when the setting's scores are in the store or were computed in this session."""
    from .attribution import scores_stored

    if setting in st.session_state.setdefault("_computed", set()):
        return True
    with friendly_errors():
        return scores_stored(setting.task, setting.method, setting.ensemble)


def plan_summary(work) -> str:  # noqa: ANN001 - a WorkPlan
    """One markdown line: models to train, members, features and memory."""
    from .explore import human_bytes

    return (f"**{len(work.models_to_train)}** model(s) to train ({len(work.models_stored)} stored) · "
            f"**{len(work.members)}** member(s) · {work.n_params:,} parameters → {work.feature_dim:,} features · "
            f"peak memory ~{human_bytes(work.peak_bytes)} of {human_bytes(work.budget_bytes)} · "
            f"feature cache ~{human_bytes(work.disk_bytes)}")


def obtain_attribution(setting: Setting, key: str):  # noqa: ANN201 - Attribution | None
    """The setting's Attribution when it is stored (or was computed in this session); otherwise the work it
    implies and a button to compute it. Returns None while nothing is computed."""
    if not is_ready(setting):
        with friendly_errors():
            work = plan_setting(setting)
        st.info(f"Not computed yet: **{setting.label}**  \n{plan_summary(work)}", icon=":material/hourglass_empty:")
        if not work.fits:
            st.error(f"{work.message}\n\n**Next step:** lower I, D or L, or the projection dimension.")
            return None
        if not st.button("Compute", key=f"compute-{key}", type="primary", icon=":material/play_arrow:"):
            return None
    with friendly_errors():
        attribution = cached_attribution(setting, StreamlitProgress("Training and attributing"))
    st.session_state["_computed"].add(setting)
    return attribution


def plan_setting(setting: Setting):  # noqa: ANN201 - a WorkPlan
    """The work a setting implies right now (what is stored changes, so this is not cached)."""
    from .attribution import plan

    return plan(setting.task, setting.method, setting.ensemble)


@st.cache_resource(show_spinner="Scoring against the ground truth...", max_entries=32)
def _cached_run(task: TaskSpec, method: MethodSpec, ensemble: EnsembleSpec, spec,  # noqa: ANN001
                store_root: str):  # noqa: ANN202 - experiments.Result
    from .experiments import run

    return run(task, method, ensemble, spec, store=Store(store_root))


def cached_run(setting: Setting, spec):  # noqa: ANN001, ANN201 - EvalSpec -> experiments.Result
    """LDS and costs of a setting whose scores and ground truth are stored (a read plus the LDS)."""
    return _cached_run(setting.task, setting.method, setting.ensemble, spec, str(Store().root))


def gallery(dataset, table, key: str) -> None:  # noqa: ANN001 - Dataset, example_table rows
    """A table of test examples with thumbnails; selecting a row makes it the chosen test example."""
    from . import explore

    shown = table.head(500)
    st.session_state[f"_{key}_positions"] = shown["position"].tolist()

    def choose() -> None:
        rows = st.session_state[key].selection.rows
        if rows:
            st.session_state["test_pos"] = st.session_state[f"_{key}_positions"][rows[0]]

    images = [explore.png_data_uri(explore.thumbnail(dataset.image("test", p), 28)) for p in shown["position"]]
    st.dataframe(shown.assign(image=images)[["image", *shown.columns]], hide_index=True, width="stretch",
                 height=320, key=key, on_select=choose, selection_mode="single-row",
                 column_config={"image": st.column_config.ImageColumn("", width="small")})
