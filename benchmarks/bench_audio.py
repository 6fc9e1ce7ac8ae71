"""Seconds to render a music window as WAV: the soundfont piano against the sine-wave fallback.

Usage: python -m benchmarks.bench_audio [--windows 20] [--repeats 3]
Renders the first `windows` test windows of Bach chorales (the first 60 music21 files) and of a synthetic
MAESTRO-shaped folder (scripts/make_maestro_like.py: two hands, pedal, about 5 notes a second) with
`to_wav_bytes`, both renderers, best of `repeats`; prints seconds per 10 s of audio, the window lengths, the
sample rate and the load average before and after. Converted corpora go to a temporary store.
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from scripts.make_maestro_like import layout, write_maestro_like
from tda_core.data import music
from tda_core.data.snippets import SAMPLE_RATE, audio_renderer, snippet, to_wav_bytes
from tda_core.store import Store


def seconds_per_10s(snips: list, soundfont: str | Path, repeats: int) -> float:
    """Render time per 10 s of audio over `snips` (best of `repeats` per window)."""
    total, audio = 0.0, 0.0
    for snip in snips:
        best = np.inf
        for _ in range(repeats):
            t0 = time.perf_counter()
            to_wav_bytes(snip, soundfont=soundfont)
            best = min(best, time.perf_counter() - t0)
        total, audio = total + best, audio + snip.duration
    return 10 * total / audio


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--windows", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    piano = audio_renderer()
    print(f"renderer {piano.name} ({Path(piano.soundfont).name}), {SAMPLE_RATE} Hz mono; "
          f"load average {os.getloadavg()[0]:.2f}")
    with tempfile.TemporaryDirectory() as root:
        store = Store(Path(root) / "store")
        csv = write_maestro_like(Path(root) / "data", layout(1, 4, 0, 1500))
        corpora = {"chorales": music.convert_chorales(store, limit=60),
                   "maestro-like": music.convert_maestro(csv, store)}
        for name, corpus in corpora.items():
            dataset, _ = music.music_dataset(name, corpus, name)
            snips = [snippet(dataset, "test", i) for i in range(min(args.windows, dataset.n_test))]
            lengths = np.array([s.duration for s in snips])
            notes = sum(len(s.notes) for s in snips) / lengths.sum()
            piano_s = seconds_per_10s(snips, piano.soundfont, args.repeats)
            sine_s = seconds_per_10s(snips, Path(root) / "no-soundfont.sf2", args.repeats)
            print(f"{name:12s} {len(snips)} windows of {lengths.mean():.1f} s on average ({notes:.1f} notes/s): "
                  f"piano {piano_s:.3f} s, sine {sine_s:.3f} s per 10 s of audio", flush=True)
    print(f"load average after {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
