"""Snippets people can see and hear: a window as MIDI bytes, a plotly piano roll and WAV audio.

Audio is a piano: the acoustic grand (General MIDI program 0, "Piano 1") of the TimGM6mb soundfont that
ships inside pretty_midi, rendered in-process by `midirenderer` (a pip wheel, no system package). When the
soundfont or the renderer cannot be loaded, pretty_midi's sine-wave synthesis stands in and
`audio_renderer().notice` says so in one line.
"""
from __future__ import annotations

import dataclasses
import functools
import io
import math
import wave
from pathlib import Path

import numpy as np
import pretty_midi
from scipy.signal import resample_poly

from ..errors import UserError
from .base import Dataset
from .midi_codec import Note, decode_notes, midi_bytes, notes_to_midi, window_tokens

SAMPLE_RATE = 22050
RELEASE_S = 0.3  # audio kept after the last note ends, so the piano's release is heard
SOUNDFONT = Path(pretty_midi.__file__).parent / "TimGM6mb.sf2"
PIANO, SINE = "piano", "sine"


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


@dataclasses.dataclass(frozen=True)
class AudioRenderer:
    """How snippets are voiced: `piano` (the soundfont) or `sine` (the fallback), with a notice for the latter."""

    name: str
    soundfont: str
    notice: str | None  # one line to show beside the audio when the piano could not be loaded
    font: bytes = dataclasses.field(default=b"", repr=False)


@functools.lru_cache(maxsize=4)
def audio_renderer(soundfont: str | Path = SOUNDFONT) -> AudioRenderer:
    """The piano when `midirenderer` imports and renders a test note from `soundfont`; otherwise sine waves
    with a one-line notice saying why. Decided once per soundfont path (the font's bytes are kept)."""
    try:
        import midirenderer
    except ImportError as exc:
        return _sine(soundfont, f"the renderer is not installed ({type(exc).__name__}: {exc}; "
                                f"pip install -r requirements.txt)")
    try:
        font = Path(soundfont).read_bytes()
        midirenderer.render_wave_from(font, midi_bytes(notes_to_midi([Note(60, 0.0, 0.1, 64)])))
    except (OSError, RuntimeError, ValueError) as exc:
        return _sine(soundfont, f"the soundfont {Path(soundfont).name} could not be loaded "
                                f"({type(exc).__name__}: {exc})")
    return AudioRenderer(PIANO, str(soundfont), None, font)


def _sine(soundfont: str | Path, reason: str) -> AudioRenderer:
    notice = f"Audio is plain sine tones, not a piano: {reason}."
    return AudioRenderer(SINE, str(soundfont), " ".join(notice.split()))


def _piano_audio(snip: Snippet, font: bytes, sample_rate: int, seconds: float) -> np.ndarray:
    """The snippet played by the soundfont's program 0, mono float at `sample_rate`, `seconds` long."""
    import midirenderer

    midi = snip.midi()
    # an idle controller event at the end keeps the renderer going through the notes' release
    midi.instruments[0].control_changes.append(pretty_midi.ControlChange(64, 0, seconds))
    with wave.open(io.BytesIO(midirenderer.render_wave_from(font, midi_bytes(midi)))) as w:
        rate, channels = w.getframerate(), w.getnchannels()
        pcm = np.frombuffer(w.readframes(w.getnframes()), dtype="<i2").reshape(-1, channels)
    mono = pcm.astype(np.float64).mean(axis=1) / 32768.0
    g = math.gcd(sample_rate, rate)
    return resample_poly(mono, sample_rate // g, rate // g) if rate != sample_rate else mono


def to_wav_bytes(snip: Snippet, sample_rate: int = SAMPLE_RATE, soundfont: str | Path = SOUNDFONT) -> bytes:
    """The snippet as 16-bit mono WAV, lasting its duration plus a short release: the soundfont's piano, or
    sine waves when it cannot be loaded (see `audio_renderer`). Peak-normalised; deterministic."""
    renderer = audio_renderer(soundfont)
    seconds = snip.duration + RELEASE_S
    n = int(round(seconds * sample_rate))
    if renderer.name == PIANO:
        audio = _piano_audio(snip, renderer.font, sample_rate, seconds)
    else:
        audio = snip.midi().synthesize(fs=sample_rate)
    audio = np.pad(audio[:n], (0, max(0, n - len(audio))))
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
