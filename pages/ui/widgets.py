"""Widgets shared by the pages: a progress box, example galleries (images, or music as piano roll + audio)."""
from __future__ import annotations

import time
from typing import Any

import pandas as pd
import streamlit as st

from tda_core.attribution import Attribution, scores_stored
from tda_core.data import Dataset
from tda_core.data.snippets import audio_renderer
from tda_core.settings import Setting

from .cached import cached_attribution, cached_snippet, plan_setting
from .present import plan_summary, png_data_uri, thumbnail, thumbnails
from .state import friendly_errors


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


def show_examples(dataset: Dataset, split: str, positions: list[int], captions: list[str], size: int = 84,
                  per_row: int | None = None, key: str = "") -> None:
    """Draw examples: image thumbnails in rows (`per_row`, default: what fits a full-width page), or music
    windows as piano roll, audio player and MIDI download (`key` tells apart repeated groups on a page)."""
    if not positions:
        st.caption("(none)")
        return
    if dataset.kind == "image":
        per_row = max(1, min(len(positions), per_row or 1100 // (size + 16)))
        for start in range(0, len(positions), per_row):
            cols = st.columns(per_row, gap="small")
            chunk = positions[start:start + per_row]
            for col, image, text in zip(cols, thumbnails(dataset, split, chunk, size),
                                        captions[start:start + per_row]):
                col.image(image, caption=text, width=size, output_format="PNG")
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
    """A table of test examples (rows of `tda_core.examples.example_table`) with thumbnails; selecting a row makes it the chosen test example."""
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
    """True when the setting's scores are in the store or were computed in this session."""
    if setting in st.session_state.setdefault("_computed", set()):
        return True
    with friendly_errors():
        return scores_stored(setting.task, setting.method, setting.ensemble)


def obtain_attribution(setting: Setting, key: str) -> Attribution | None:
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
