"""Snippets people can see and hear: a window as MIDI bytes, a plotly piano roll and WAV audio.

Audio is synthesised in-process with pretty_midi's additive synthesis (no soundfont needed).
"""
from __future__ import annotations

import dataclasses
import io
import wave

import numpy as np
import pretty_midi

from ..errors import UserError
from .base import Dataset
from .midi_codec import Note, decode_notes, midi_bytes, notes_to_midi, window_tokens

SAMPLE_RATE = 22050
RELEASE_S = 0.1  # audio kept after the last note ends (pretty_midi's fade-out)


@dataclasses.dataclass(frozen=True)
class Snippet:
    """One window decoded: its tokens and notes, and where it came from."""

    split: str
    position: int  # position in the split
    source_index: int
    tokens: np.ndarray
    notes: tuple[Note, ...]

    @property
    def duration(self) -> float:
        """Seconds from the window's start to the end of its last note."""
        return max((n.end for n in self.notes), default=0.0)

    def midi(self) -> pretty_midi.PrettyMIDI:
        return notes_to_midi(self.notes)


def snippet(dataset: Dataset, split: str, position: int) -> Snippet:
    """Window `position` of a split of a music dataset, decoded to notes."""
    if dataset.kind != "music":
        raise ValueError(f"dataset {dataset.name!r} holds {dataset.kind}, not music")
    x, y, index = dataset.split(split)
    if not 0 <= position < len(x):
        raise UserError(f"index {position} is out of range: the {split} split has {len(x)} windows (0..{len(x) - 1})")
    tokens = window_tokens(x[position].numpy(), y[position].numpy())
    return Snippet(split, position, int(index[position]), tokens, tuple(decode_notes(tokens)))


def to_midi_bytes(snip: Snippet) -> bytes:
    """The snippet as a standard MIDI file (piano)."""
    return midi_bytes(snip.midi())


def to_wav_bytes(snip: Snippet, sample_rate: int = SAMPLE_RATE) -> bytes:
    """The snippet as 16-bit mono WAV, lasting its duration plus a short release."""
    audio = snip.midi().synthesize(fs=sample_rate)[: int(round((snip.duration + RELEASE_S) * sample_rate))]
    peak = float(np.abs(audio).max()) if len(audio) else 0.0
    pcm = (audio / peak * 0.9 * 32767).astype(np.int16) if peak > 0 else audio.astype(np.int16)
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(sample_rate)
        w.writeframes(pcm.tobytes())
    return buf.getvalue()


def piano_roll(snip: Snippet, title: str | None = None):
    """A plotly piano roll: one bar per note, time (s) on x, pitch on y, velocity as colour."""
    import plotly.graph_objects as go

    notes = snip.notes
    fig = go.Figure(go.Bar(
        base=[n.start for n in notes], x=[n.end - n.start for n in notes], y=[n.pitch for n in notes],
        orientation="h", width=0.9,
        marker={"color": [n.velocity for n in notes], "colorscale": "Viridis", "cmin": 0, "cmax": 127,
                "colorbar": {"title": "velocity"}},
        customdata=[(pretty_midi.note_number_to_name(n.pitch), n.velocity, n.end - n.start) for n in notes],
        hovertemplate="%{customdata[0]} at %{base:.2f} s, %{customdata[2]:.2f} s, velocity %{customdata[1]}"
                      "<extra></extra>"))
    fig.update_layout(title=title or f"{snip.split} window {snip.position} (source {snip.source_index})",
                      xaxis_title="time (s)", yaxis_title="pitch (MIDI)", bargap=0, template="plotly_white",
                      height=360, margin={"l": 50, "r": 20, "t": 40, "b": 40})
    return fig
