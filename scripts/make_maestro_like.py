"""Write a MAESTRO-shaped folder of synthetic piano performances, for checks that need MAESTRO's layout.

    python scripts/make_maestro_like.py DATA_DIR [--train 24] [--test 4] [--validation 2] [--notes 1500]

writes DATA_DIR/maestro-v3.0.0/maestro-v3.0.0.csv (MAESTRO's columns; its split column decides train/test)
and one MIDI file per row under year folders. Each piece is played like a pianist would: a melody over
broken chords in one key, rubato, phrase-shaped velocities and the sustain pedal changed with each harmony.
Nothing is downloaded; the same arguments write the same bytes. The real loader then reads it with
`TDA_DATA_DIR=DATA_DIR python -m tda_core datasets` (see scripts/gpu_check.sh).
"""
from __future__ import annotations

import argparse
import io
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import pretty_midi

VERSION = "v3.0.0"
MAJOR, MINOR = (0, 2, 4, 5, 7, 9, 11), (0, 2, 3, 5, 7, 8, 10)
PROGRESSION = (0, 3, 4, 0, 5, 3, 4, 0)  # scale degrees of the bars' chords: I IV V I vi IV V I
BROKEN = b"MThd\x00\x00\x00\x06not a midi file"


def performance(seed: int, n_notes: int) -> pretty_midi.PrettyMIDI:
    """One synthetic piano performance of about `n_notes` notes (seeded): right-hand melody, left-hand
    broken chords, rubato, velocities shaped over four-bar phrases, sustain pedal down through each bar."""
    rng = np.random.default_rng(seed)
    scale = MAJOR if rng.random() < 0.6 else MINOR
    tonic = int(rng.integers(55, 67))
    beat = float(rng.uniform(0.35, 0.65))  # seconds per beat
    piano = pretty_midi.Instrument(program=0, name="Piano")
    degree, t, bar = 7, 0.5, 0

    def pitch(deg: int, base: int) -> int:
        return base + 12 * (deg // 7) + scale[deg % 7]

    while len(piano.notes) < n_notes:
        phrase = np.sin(np.pi * ((bar % 4) + 0.5) / 4)  # louder mid-phrase
        loud = 45 + 35 * phrase + 10 * np.sin(bar / 7.0)
        bar_len = 4 * beat * float(rng.uniform(0.95, 1.08))  # rubato
        root = PROGRESSION[bar % len(PROGRESSION)]
        for k, deg in enumerate((root, root + 4, root + 2, root + 4)):  # left hand: broken chord
            on = t + k * bar_len / 4 + float(rng.normal(0, 0.008))
            piano.notes.append(pretty_midi.Note(int(np.clip(loud - 12 + rng.normal(0, 5), 15, 120)),
                                                pitch(deg, tonic - 24), max(on, 0.0), on + bar_len / 4 * 0.9))
        on = t
        while on < t + bar_len - 1e-6:  # right hand: a stepwise melody, an octave above the tonic
            length = bar_len / 4 * float(rng.choice([0.5, 0.5, 1.0, 1.0, 1.0, 2.0]))
            degree = int(np.clip(degree + rng.choice([-2, -1, -1, 1, 1, 2, 0]), 2, 16))
            chord_tone = rng.random() < 0.3
            p = pitch(root + 7 if chord_tone else degree, tonic)
            vel = int(np.clip(loud + 8 + rng.normal(0, 6), 20, 125))
            piano.notes.append(pretty_midi.Note(vel, p, on + float(rng.normal(0, 0.01)) if on > t else on,
                                                on + length * 1.05))
            on += length
        piano.control_changes += [pretty_midi.ControlChange(64, 100, t + 0.05),  # pedal down after the bass
                                  pretty_midi.ControlChange(64, 0, t + bar_len - 0.04)]  # lifted for the change
        t += bar_len
        bar += 1
    midi = pretty_midi.PrettyMIDI(initial_tempo=60.0 / beat)
    piano.notes = [n for n in piano.notes if n.end > n.start]
    midi.instruments.append(piano)
    return midi


def write_maestro_like(root: str | Path, files: Sequence[tuple[str, str, int]], version: str = VERSION) -> Path:
    """Write `files` = (midi_filename, split, n_notes) rows as root/maestro-<version>/ with its CSV, one seeded
    `performance` per row (seed = row number); n_notes = 0 writes an unreadable file, as a corrupt download
    would be. Returns the CSV's path."""
    folder = Path(root) / f"maestro-{version}"
    rows = []
    for k, (name, split, n_notes) in enumerate(files):
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        duration = 0.0
        if n_notes:
            midi = performance(k, n_notes)
            buf = io.BytesIO()
            midi.write(buf)
            path.write_bytes(buf.getvalue())
            duration = midi.get_end_time()
        else:
            path.write_bytes(BROKEN)
        rows.append({"canonical_composer": "Synthetic", "canonical_title": f"Performance {k}", "split": split,
                     "year": int(name.split("/")[0]) if "/" in name else 2018, "midi_filename": name,
                     "audio_filename": str(Path(name).with_suffix(".wav")), "duration": round(duration, 3)})
    csv = folder / f"maestro-{version}.csv"
    pd.DataFrame(rows).to_csv(csv, index=False)
    return csv


def layout(n_train: int, n_test: int, n_validation: int, n_notes: int) -> list[tuple[str, str, int]]:
    """MAESTRO-like rows: that many train, test and validation files of `n_notes` notes, spread over years."""
    splits = ["train"] * n_train + ["test"] * n_test + ["validation"] * n_validation
    return [(f"{2004 + k % 15}/performance-{k:03d}.midi", split, n_notes) for k, split in enumerate(splits)]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data_dir", help="data folder to write maestro-v3.0.0/ into")
    parser.add_argument("--train", type=int, default=24, help="training files")
    parser.add_argument("--test", type=int, default=4, help="test files")
    parser.add_argument("--validation", type=int, default=2, help="validation files (the loader ignores them)")
    parser.add_argument("--notes", type=int, default=1500, help="notes per file (about 4 event tokens each)")
    args = parser.parse_args(argv)
    csv = write_maestro_like(args.data_dir, layout(args.train, args.test, args.validation, args.notes))
    print(f"wrote {csv} ({args.train + args.test + args.validation} files of {args.notes} notes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
