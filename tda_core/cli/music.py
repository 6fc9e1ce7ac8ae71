"""`snippet`: write a music window as MIDI, WAV and/or a piano-roll HTML page."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..data import load_dataset
from ..data.music import window_source
from ..data.snippets import audio_renderer, piano_roll, snippet, to_midi_bytes, to_wav_bytes
from ..errors import UserError
from ..tasks import get_task
from .common import emit


def cmd_snippet(args: argparse.Namespace) -> None:
    task = get_task(args.task)
    if not task.sequence:
        raise UserError(f"task {task.name!r} is not a music task; use chorales-mt or maestro-mt")
    if not (args.out or args.wav or args.html):
        raise UserError("nothing to write: give --out x.mid, --wav x.wav and/or --html x.html")
    dataset = load_dataset(task.dataset, args.data_dir)
    snip = snippet(dataset, args.split, args.index)
    written, audio = [], {}
    if args.out:
        Path(args.out).write_bytes(to_midi_bytes(snip))
        written.append(args.out)
    if args.wav:
        Path(args.wav).write_bytes(to_wav_bytes(snip))
        written.append(args.wav)
        renderer = audio_renderer()
        audio = {"audio": renderer.name}
        if renderer.notice:
            print(renderer.notice, file=sys.stderr)
    if args.html:
        piano_roll(snip).write_html(args.html, include_plotlyjs=True)  # works offline
        written.append(args.html)
    source = window_source(task.dataset, snip.source_index, args.data_dir)
    emit({"task": task.name, "split": args.split, "index": args.index, **source, "notes": len(snip.notes),
          "seconds": round(snip.duration, 2), **audio, "written": ", ".join(written)}, args.json)


def register(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("snippet", parents=[common], help="write a training or test window of a music task "
                                                         "as MIDI / WAV / piano-roll HTML")
    p.add_argument("--task", required=True, help="a music task: chorales-mt or maestro-mt")
    p.add_argument("--split", default="test", choices=("train", "test"))
    p.add_argument("--index", type=int, default=0, help="position of the window in the split")
    p.add_argument("--out", help="MIDI file to write (.mid)")
    p.add_argument("--wav", help="WAV file to write: a piano (the General MIDI soundfont shipped with "
                                 "pretty_midi), or sine tones when it cannot be loaded")
    p.add_argument("--html", help="piano-roll HTML page to write (plotly)")
    p.set_defaults(func=cmd_snippet)
