"""Snippet audio: a soundfont piano (TimGM6mb.sf2 from pretty_midi) with sine waves as the fallback."""
from __future__ import annotations

import io
import sys
import wave

import numpy as np
import pytest

from tda_core.data import snippets
from tda_core.data.midi_codec import Note
from tda_core.data.snippets import PIANO, RELEASE_S, SAMPLE_RATE, SINE, SOUNDFONT, Snippet, audio_renderer, to_wav_bytes

A3 = 220.0  # Hz, MIDI 57


@pytest.fixture(autouse=True)
def _fresh_renderer():
    audio_renderer.cache_clear()
    yield
    audio_renderer.cache_clear()


def held_note(pitch: int = 57, seconds: float = 1.5) -> Snippet:
    return Snippet("test", 0, 0, np.zeros(0, dtype=np.int64), (Note(pitch, 0.0, seconds, 100),))


def samples(data: bytes) -> tuple[int, np.ndarray]:
    with wave.open(io.BytesIO(data)) as w:
        assert (w.getnchannels(), w.getsampwidth()) == (1, 2)
        return w.getframerate(), np.frombuffer(w.readframes(w.getnframes()), dtype=np.int16).astype(np.float64)


def harmonic_energy(pcm: np.ndarray, rate: int, f0: float) -> np.ndarray:
    """Spectral energy within 3% of each harmonic k * f0 below Nyquist, over the held part (0.1-1.4 s)."""
    seg = pcm[int(0.1 * rate):int(1.4 * rate)]
    power = np.abs(np.fft.rfft(seg * np.hanning(len(seg)))) ** 2
    freqs = np.fft.rfftfreq(len(seg), 1 / rate)
    ks = np.arange(1, int(rate / 2 / f0) + 1)
    return np.array([power[np.abs(freqs - k * f0) < 0.03 * k * f0].sum() for k in ks]) / power.sum()


def test_piano_has_overtones_where_the_sine_fallback_has_none(tmp_path):
    piano = audio_renderer()
    assert piano.name == PIANO and piano.notice is None and piano.soundfont == str(SOUNDFONT)
    note = held_note()
    rate, pcm = samples(to_wav_bytes(note))
    assert rate == SAMPLE_RATE and len(pcm) == round((note.duration + RELEASE_S) * rate)
    assert np.sqrt(np.mean(pcm[: int(1.4 * rate)] ** 2)) > 1000  # audible while held
    energy = harmonic_energy(pcm, rate, A3)
    assert energy.sum() > 0.9  # a pitched A3: nearly all energy sits on its harmonics
    assert energy[1:].sum() / energy.sum() > 0.2  # measured 0.52: a piano, not a sine
    assert (energy[1:] > 1e-3).sum() >= 3  # several overtones, not one stray partial
    assert to_wav_bytes(note) == to_wav_bytes(note)  # deterministic

    missing = tmp_path / "gone.sf2"
    sine = audio_renderer(missing)
    assert sine.name == SINE and "gone.sf2" in sine.notice and "FileNotFoundError" in sine.notice
    assert "\n" not in sine.notice and "sine" in sine.notice
    rate, pcm = samples(to_wav_bytes(note, soundfont=missing))
    assert len(pcm) == round((note.duration + RELEASE_S) * rate) and np.sqrt(np.mean(pcm ** 2)) > 1000
    energy = harmonic_energy(pcm, rate, A3)
    assert energy.sum() > 0.99 and energy[1:].sum() / energy.sum() < 1e-3  # a pure sine


def test_a_soundfont_that_is_not_one_or_a_missing_renderer_falls_back(tmp_path, monkeypatch):
    garbage = tmp_path / "broken.sf2"
    garbage.write_bytes(b"RIFX" + bytes(100))
    renderer = audio_renderer(garbage)
    assert renderer.name == SINE and "broken.sf2" in renderer.notice and "RuntimeError" in renderer.notice
    assert samples(to_wav_bytes(held_note(), soundfont=garbage))[1].any()
    unreadable = tmp_path / "folder.sf2"
    unreadable.mkdir()
    assert audio_renderer(unreadable).name == SINE
    monkeypatch.setitem(sys.modules, "midirenderer", None)  # the renderer's wheel is not installed
    audio_renderer.cache_clear()
    renderer = audio_renderer()
    assert renderer.name == SINE and "not installed" in renderer.notice and "requirements.txt" in renderer.notice
    assert samples(to_wav_bytes(held_note()))[1].any()


def test_silent_window_gives_a_short_silent_wav():
    empty = Snippet("test", 0, 0, np.zeros(0, dtype=np.int64), ())
    rate, pcm = samples(snippets.to_wav_bytes(empty))
    assert len(pcm) == round(RELEASE_S * rate) and not pcm.any()
