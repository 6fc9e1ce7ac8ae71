"""Widgets shared by the pages: background jobs with self-refreshing progress panels, a progress box for short
inline work, example galleries (images, or music as piano roll + audio)."""
from __future__ import annotations

import time
from typing import Any

import pandas as pd
import streamlit as st

from tda_core import jobs
from tda_core.attribution import Attribution, scores_stored
from tda_core.data import Dataset
from tda_core.data.snippets import audio_renderer
from tda_core.examples import feature_preview
from tda_core.jobs import JobSpec, JobStatus
from tda_core.settings import Setting
from tda_core.store import Store

from .cached import cached_attribution, cached_snippet, plan_setting
from .present import plan_summary, png_data_uri, thumbnail, thumbnails
from .state import friendly_errors

REFRESH_S = 1.0  # how often a job's progress panel redraws itself


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


# --- background jobs ------------------------------------------------------------------------------------
def _draw_job(status: JobStatus, compact: bool = False) -> None:
    """A job's stages as progress bars with the elapsed time and a Cancel button."""
    with st.container(border=True):
        st.markdown(f"**{status.title}**  \n:material/hourglass_top: {status.status}, {status.elapsed_s:.0f} s — "
                    "runs in the background: browse other pages meanwhile, it keeps going")
        for label, done, total in status.stages[:2 if compact else None]:
            st.progress(min(1.0, done / total) if total else 1.0, text=f"{label} · {done}/{total}")
        if not status.stages:
            st.progress(0.0, text="starting the worker (loading data and models)...")
        if st.button("Cancel", key=f"cancel-{status.job_id}-{'side' if compact else 'main'}",
                     icon=":material/cancel:"):
            jobs.cancel(Store(), status.job_id)
            st.rerun()


def _job_fragment(job_id: str, compact: bool) -> None:
    status = jobs.status(Store(), job_id)
    if status is None or not status.active:
        st.rerun()  # the job ended: redraw the whole page, which now finds its result in the store
    _draw_job(status, compact)


def job_panel(spec: JobSpec, next_step: str = "") -> JobStatus | None:
    """The job computing `spec`, as it stands: while it runs, a panel that refreshes itself every second (the rest
    of the page stays still) and reruns the page when the job ends; a failed or cancelled job as a message with
    `next_step`. None when it was never started here. Another browser tab asking for the same work sees the same
    job."""
    status = jobs.find(spec, Store())
    if status is None:
        return None
    if status.active:
        st.fragment(_job_fragment, run_every=REFRESH_S)(status.job_id, False)
    elif status.status == "failed":
        st.error(f"**{status.title}** failed: {status.message}" + (f"\n\n**Next step:** {next_step}"
                                                                   if next_step else ""), icon=":material/error:")
    elif status.status == "cancelled":
        st.info(f"**{status.title}** was cancelled after {status.elapsed_s:.0f} s; what it finished is stored, so "
                "starting it again resumes.", icon=":material/cancel:")
    return status


def start_job(spec: JobSpec) -> None:
    """Start (or attach to) a background job and redraw the page around its progress panel."""
    with friendly_errors():
        jobs.start(spec, Store())
    st.rerun()


def _sidebar_jobs() -> None:
    running = jobs.active_jobs(Store())
    if not running:
        st.rerun()
    st.markdown(f"### Running ({len(running)})")
    for status in running:
        _draw_job(status, compact=True)


def jobs_sidebar() -> None:
    """Every running job of the store in the sidebar, on every page, refreshing itself while any runs."""
    if jobs.active_jobs(Store()):
        with st.sidebar:
            st.fragment(_sidebar_jobs, run_every=2 * REFRESH_S)()


def show_examples(dataset: Dataset, split: str, positions: list[int], captions: list[str], size: int = 96,
                  per_row: int | None = None, key: str = "") -> None:
    """Draw examples: image thumbnails `size` pixels wide in one row that wraps to the screen's width, or music
    windows as piano roll, audio player and MIDI download, `per_row` to a row (`key` tells apart repeated groups
    on a page)."""
    if not positions:
        st.caption("(none)")
        return
    if dataset.kind == "image":
        st.image(thumbnails(dataset, split, positions, size), caption=captions, width=size, output_format="PNG")
        return
    if dataset.kind != "music":  # feature vectors: no picture or sound, their first values as a table
        st.dataframe(feature_preview(dataset, split, positions).assign(example=captions), hide_index=True,
                     width="stretch")
        return
    per_row = per_row or 2
    if notice := audio_renderer().notice:  # the piano could not load: say so once above the players
        st.caption(notice)
    for start in range(0, len(positions), per_row):
        cols = st.columns(per_row)
        for col, pos, text in zip(cols, positions[start:start + per_row], captions[start:start + per_row]):
            figure, wav, midi = cached_snippet(dataset.name, split, int(pos), text)
            with col.container(border=True):
                st.plotly_chart(figure, width="stretch", key=f"roll-{key}-{split}-{pos}")
                st.audio(wav, format="audio/wav")
                st.download_button("MIDI", midi, f"{dataset.name}-{split}-{pos}.mid", mime="audio/midi",
                                   icon=":material/download:", key=f"midi-{key}-{split}-{pos}")


def gallery(dataset: Dataset, table: pd.DataFrame, key: str) -> None:
    """A table of test examples (rows of `tda_core.examples.example_table`) with thumbnails; selecting a row makes
    it the chosen test example (inside a fragment, only the fragment reruns)."""
    shown = table.head(500)
    st.session_state[f"_{key}_positions"] = shown["position"].tolist()

    def choose() -> None:
        rows = st.session_state[key].selection.rows
        if rows:
            st.session_state["test_pos"] = st.session_state[f"_{key}_positions"][rows[0]]

    images = [png_data_uri(thumbnail(dataset.image("test", p), 28)) for p in shown["position"]]
    st.dataframe(shown.assign(image=images)[["image", *shown.columns]], hide_index=True, width="stretch",
                 height=320, key=key, on_select=choose, selection_mode="single-row",
                 column_config={"image": st.column_config.ImageColumn("", width="small")})


def is_ready(setting: Setting) -> bool:
    """True when the setting's scores are in the store."""
    with friendly_errors():
        return scores_stored(setting.task, setting.method, setting.ensemble)


def attribution_job(setting: Setting) -> JobSpec:
    """The background job that computes a setting's attribution."""
    return jobs.attribute_job(setting.task, [(setting.method, setting.ensemble)],
                              f"Attributing {setting.task.name}: {setting.label}")


def obtain_attribution(setting: Setting, key: str, button: str = "Compute") -> Attribution | None:
    """The setting's Attribution when it is stored; otherwise the work it implies and a button that computes it in
    the background (with its progress panel while it runs). Returns None while nothing is stored."""
    if is_ready(setting):
        with friendly_errors():
            return cached_attribution(setting)
    spec = attribution_job(setting)
    status = job_panel(spec, next_step="change the setting in the sidebar, or press the button to try again")
    if status is not None and status.active:
        return None
    with friendly_errors():
        work = plan_setting(setting)
    st.info(f"Not computed yet: **{setting.label}**  \n{plan_summary(work)}", icon=":material/hourglass_empty:")
    if not work.fits:
        st.error(f"{work.message}\n\n**Next step:** lower I, D or L, or the projection dimension.")
        return None
    if st.button(button, key=f"compute-{key}", type="primary", icon=":material/play_arrow:",
                 help="runs in the background: the other pages stay usable, and the result is stored"):
        start_job(spec)
    return None
