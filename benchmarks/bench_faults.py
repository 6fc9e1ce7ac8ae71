"""Faults on purpose, measured: per fault kind, faults injected, runs recovered, data lost (must be 0) and
seconds of work redone.

Usage: python -m benchmarks.bench_faults [--trials 20] [--race-trials 5] [--seed 0] [--out docs/faults.md]

Every trial runs the real CLI (or the core calls an app session makes) on the tiny digits task of
tests/fault_harness.py in a fresh store:
- kill-<command>: SIGKILL `train`, `ground-truth`, `attribute` or `sweep` at a random time during its work
  (uniform over the uninterrupted run's work time), then rerun it. Recovered: the rerun exits 0 and the store
  equals the uninterrupted run's (every artifact, within float tolerance of a model retrained in another batch),
  with no temp or orphan files left. Lost: an artifact that loaded with wrong contents after the kill, or a
  rerun that failed or differs. Redone: seconds between the killed run's last durable write and the kill.
- kill-at-<point>: the sweep SIGKILLs itself at its n-th write of that point (n random): before an artifact,
  halfway through a tensor file, between tensors and marker, before a results-table row.
- damage-<file>-<how>: a random artifact of a finished sweep is truncated, zero-filled, bit-flipped at a random
  position or deleted; the artifacts derived from it are removed and the sweep rerun. Recovered: one warning
  names the artifact and the store equals the uninterrupted run's. Redone: rerun seconds over an undamaged rerun.
- race-<command>-<n>: n processes (half CLI, half app sessions) start the same work at the same moment.
  Recovered: every process exits 0 with the same result, no expensive artifact (model, subset model, features)
  was computed twice, and the results table holds every setting once. Lost: a differing result or table row.
- full-disk (tmpfs, needs root) and enospc (injected at a random write): `train` of 4 models on a store that
  holds 2 and has no room; then room is made and it is rerun. Recovered: one error line naming the store and
  exit 2, nothing half-written, the 2 models intact, and the rerun equals the uninterrupted run.
- read-only: the same on a read-only store (tmpfs remounted read-only as root, chmod otherwise).
- midi-mutated: MIDI files with random byte edits or extreme contents: loaded or refused with MidiError; the
  worst time and memory per file.
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import errno
import io
import logging
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
import tracemalloc
from collections.abc import Iterator
from pathlib import Path

from tests import fault_harness as fh

SWEEP = fh.COMMANDS["sweep"]
TRAIN_SOME, TRAIN_ALL = ["train", "--task", fh.TINY, "--seeds", "0-1"], ["train", "--task", fh.TINY, "--seeds", "0-3"]
WRITE_POINTS = ("save", "tensor", "marker", "table")
DERIVED = ("scores", "ground_truth", "lds")  # recomputed from the others in milliseconds
SECTIONS = ("kills", "write-points", "damage", "races", "full-read-only", "midi")


@dataclasses.dataclass
class Row:
    """One fault kind's totals."""

    kind: str
    injected: int = 0
    recovered: int = 0
    lost: int = 0
    redone_s: float = 0.0
    note: str = ""

    def line(self) -> str:
        return f"| {self.kind} | {self.injected} | {self.recovered} | {self.lost} | {self.redone_s:.2f} | {self.note} |"


class Warnings(logging.Handler):
    """Collects the store's warnings during a rerun."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def rerun_and_check(args: list[str], store: Path, reference: dict) -> bool:
    """Rerun `args` in this process; True when it exits 0 and leaves the store equal to the reference's."""
    return (fh.run_here(args, store, quiet=True) == 0 and fh.same_as_reference(store, reference) == []
            and not fh.leftovers(store))


def uninterrupted(z: fh.Zygote, scratch: Path) -> dict[str, tuple[Path, dict, float, int]]:
    """Per command: (store, its artifacts, seconds of work, durable writes) of an uninterrupted worker run."""
    out = {}
    for name, args in fh.COMMANDS.items():
        store, audit = scratch / f"ref-{name}", scratch / f"ref-{name}.audit"
        rc, _, err = z.run(args, store, audit)
        if rc != 0:
            raise SystemExit(f"reference run of {name} failed: {err}")
        rows = fh.events(audit)
        begun = next(r["t"] for r in rows if r.get("event") == "start")
        writes = [r for r in rows if "kind" in r]
        out[name] = (store, fh.stored(store), writes[-1]["t"] - begun, len(writes))
    return out


def kills(z: fh.Zygote, refs: dict, trials: int, rng: random.Random, scratch: Path) -> list[Row]:
    rows = []
    for name, args in fh.COMMANDS.items():
        _, reference, work_s, total = refs[name]
        row, kept, finished_first = Row(f"kill-{name}"), [], 0
        for t in range(trials):
            store, audit = scratch / f"kill-{name}-{t}", scratch / f"kill-{name}-{t}.audit"
            worker = z.start(args, store, audit)
            killed_at = fh.kill_after(worker, rng.uniform(0.0, work_s))
            if killed_at is None:
                finished_first += 1
                continue
            row.injected += 1
            kept.append(len(fh.durable_writes(audit)))
            wrong = fh.wrong_artifacts(store, reference)
            row.redone_s += fh.lost_seconds(audit, worker.pid, killed_at)
            ok = rerun_and_check(args, store, reference)
            row.recovered += ok
            row.lost += bool(wrong) or not ok
            shutil.rmtree(store, ignore_errors=True)
        partial = sum(0 < k < total for k in kept)
        row.note = (f"work {work_s:.2f} s; {partial} kills left some of the {total} writes durable (mean "
                    f"{sum(kept) / max(len(kept), 1):.1f}); {finished_first} runs finished before their kill")
        rows.append(row)
    return rows


def write_point_kills(z: fh.Zygote, refs: dict, trials: int, rng: random.Random, scratch: Path) -> list[Row]:
    _, reference, _, _ = refs["sweep"]
    counts = {"save": len(reference), "tensor": len(reference), "marker": len(reference),
              "table": len(fh.table_rows(refs["sweep"][0]))}
    rows = []
    for point in WRITE_POINTS:
        row = Row(f"kill-at-{point}")
        for t in range(trials):
            store, audit = scratch / f"at-{point}-{t}", scratch / f"at-{point}-{t}.audit"
            worker = z.start(SWEEP, store, audit, fault=f"{point}:{rng.randint(1, counts[point])}")
            rc = worker.wait()[0]
            died = time.time()
            if rc != -9:
                continue
            row.injected += 1
            wrong = fh.wrong_artifacts(store, reference)
            row.redone_s += fh.lost_seconds(audit, worker.pid, died)
            ok = rerun_and_check(SWEEP, store, reference) and table_matches(store, refs["sweep"][0])
            row.recovered += ok
            row.lost += bool(wrong) or not ok
            shutil.rmtree(store, ignore_errors=True)
        row.note = f"n drawn from 1..{counts[point]}"
        rows.append(row)
    return rows


def table_matches(store: Path, reference_store: Path) -> bool:
    """Every setting once, with the reference's LDS."""
    got, want = fh.table_rows(store), fh.table_rows(reference_store)
    if sorted(got["setting_key"]) != sorted(want["setting_key"]):
        return False
    lds = dict(zip(got["setting_key"], got["lds"]))
    return all(abs(lds[k] - v) < 1e-6 for k, v in zip(want["setting_key"], want["lds"]))


def without_derived(store: Path, keep: tuple[str, str] | None = None) -> None:
    """Remove the results table and the derived artifacts (all but `keep`), so a sweep rerun reads the rest."""
    (store / "tables" / "results.csv").unlink(missing_ok=True)
    for kind in DERIVED:
        for path in (store / kind).glob("*") if (store / kind).exists() else []:
            if keep is None or (kind, path.stem) != keep:
                path.unlink()


def damages(refs: dict, trials: int, rng: random.Random, scratch: Path) -> list[Row]:
    ref_store, reference, _, _ = refs["sweep"]
    keys = sorted(k for k in reference if k[0] != "lds")  # a sweep rewrites per-example LDS records, never reads them
    baseline = []
    for t in range(3):
        store = scratch / f"baseline-{t}"
        shutil.copytree(ref_store, store)
        without_derived(store)
        t0 = time.perf_counter()
        fh.run_here(SWEEP, store, quiet=True)
        baseline.append(time.perf_counter() - t0)
        shutil.rmtree(store)
    base_s = sorted(baseline)[1]
    handler, log = Warnings(), logging.getLogger("tda_core.store")
    log.addHandler(handler)
    log.setLevel(logging.WARNING)
    log.propagate = False  # collected here, not printed
    rows = []
    for suffix in (".safetensors", ".json"):
        for how in fh.DAMAGES:
            row, kinds = Row(f"damage-{suffix[1:]}-{how}"), collections.Counter()
            for t in range(trials):
                kind, key = keys[rng.randrange(len(keys))]
                kinds[kind] += 1
                store = scratch / f"damage-{suffix[1:]}-{how}-{t}"
                shutil.copytree(ref_store, store)
                fh.damage(store / kind / f"{key}{suffix}", how, rng.uniform(0.05, 0.95))
                without_derived(store, keep=(kind, key))
                handler.messages.clear()
                t0 = time.perf_counter()
                ok = rerun_and_check(SWEEP, store, reference) and table_matches(store, ref_store)
                row.redone_s += max(0.0, time.perf_counter() - t0 - base_s)
                named = [m for m in handler.messages if key in m]
                row.injected += 1
                row.recovered += ok and len(named) == 1 and "recomputed" in named[0]
                row.lost += not ok
                shutil.rmtree(store)
            row.note = "artifacts: " + ", ".join(f"{k} {n}" for k, n in sorted(kinds.items()))
            rows.append(row)
    log.removeHandler(handler)
    log.propagate = True
    return rows


def _app(call: str, out: Path, ensemble: dict) -> dict:
    return {"call": call, "task": fh.TINY, "out": str(out), "ensemble": ensemble, "eval": {"M": 8},
            "method": {"name": "grad-dot", "proj": "kron", "proj_dim": 64} if call == "attribute" else
            {"name": "grad-dot", "proj": "kron", "damping": None}}  # as the CLI's attribute / the sweep's settings


def races(z: fh.Zygote, refs: dict, trials: int, scratch: Path) -> list[Row]:
    from safetensors.torch import load_file

    rows = []
    for name in ("attribute", "sweep"):
        ref_store, reference, _, _ = refs[name]
        for n in (2, 4):
            row, twice_total = Row(f"race-{name}-{n}"), 0
            for t in range(trials):
                store, audit = scratch / f"race-{name}-{n}-{t}", scratch / f"race-{name}-{n}-{t}.audit"
                outs = [scratch / f"race-{name}-{n}-{t}-{i}.out" for i in range(n)]
                workers = []
                for i in range(n):
                    if i % 2 == 0 and name == "attribute":
                        workers.append(z.start([*fh.COMMANDS[name], "--save-scores", str(outs[i]) + ".safetensors"],
                                               store, audit, barrier=n))
                    elif i % 2 == 0:
                        workers.append(z.start(fh.COMMANDS[name], store, audit, barrier=n))
                    elif name == "attribute":
                        workers.append(z.start([], store, audit, barrier=n, app=_app(
                            "attribute", Path(str(outs[i]) + ".safetensors"), {"kind": "dropout", "I": 2, "D": 2})))
                    else:
                        workers.append(z.start([], store, audit, barrier=n, app=_app(
                            "run", outs[i], [{"kind": "naive", "I": 2}, {"kind": "dropout", "I": 1, "D": 2}][i // 2])))
                codes = [w.wait()[0] for w in workers]
                row.injected += 1
                counts = collections.Counter(fh.durable_writes(audit))
                twice = sum(1 for (kind, _), c in counts.items() if c > 1 and kind in fh.EXPENSIVE)
                twice_total += twice
                if name == "attribute":
                    scores = [load_file(str(o) + ".safetensors")["scores"] for o in outs]
                    same = all(bool((s == scores[0]).all()) for s in scores)
                else:
                    same = table_matches(store, ref_store)
                equal = fh.same_as_reference(store, reference) == []
                ok = codes == [0] * n and same and equal
                row.recovered += ok and not twice
                row.lost += not (same and equal)
                shutil.rmtree(store, ignore_errors=True)
            row.note = (f"{n // 2 + n % 2} CLI + {n // 2} app processes; expensive artifacts computed twice: "
                        f"{twice_total}")
            rows.append(row)
    return rows


def full_and_read_only(refs: dict, trials: int, rng: random.Random, scratch: Path) -> list[Row]:
    _, reference, _, _ = refs["train"]
    kinds = ["enospc"] + (["full-disk"] if fh.can_mount() else [])
    kinds += ["read-only"] if fh.can_mount() or os.geteuid() != 0 else []  # chmod does not stop root
    rows = []
    for kind in kinds:
        row = Row(kind)
        for t in range(trials):
            place = scratch / f"{kind}-{t}"
            with (fh.small_disk(place, "4m") if fh.can_mount() else _folder(place)) as disk:
                one_store_fault(kind, disk / "store", reference, row, rng)
        row.note = {"enospc": "ENOSPC injected at write 1-4 of the 4 the command makes",
                    "full-disk": "4 MiB tmpfs with 0-48 KiB left (a checkpoint takes 70 KB)",
                    "read-only": ("tmpfs remounted read-only" if fh.can_mount() else "chmod a-w")
                    + "; refused before any training"}[kind]
        rows.append(row)
    return rows


def one_store_fault(kind: str, store: Path, reference: dict, row: Row, rng: random.Random) -> None:
    """`train` of 4 models on a store holding 2 that is full (`enospc`, `full-disk`) or read-only, then again
    once it is writable: counted into `row`."""
    from tda_core import store as store_module

    assert fh.run_here(TRAIN_SOME, store) == 0
    before, disk, real_write_all = fh.stored(store), store.parent, store_module._write_all
    if kind == "enospc":
        nth, calls = rng.randint(1, 4), [0]

        def failing(fd: int, data: bytes) -> None:
            calls[0] += 1
            if calls[0] == nth:
                real_write_all(fd, data[: len(data) // 2])
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            real_write_all(fd, data)

        store_module._write_all = failing
    elif kind == "full-disk":
        fh.fill(disk, leave=rng.randint(0, 48 * 1024))
    else:
        set_read_only(disk, True)
    err = io.StringIO()
    t0 = time.perf_counter()
    try:
        with contextlib.redirect_stderr(err):
            rc = fh.run_here(TRAIN_ALL, store)
    finally:
        store_module._write_all = real_write_all
    spent = time.perf_counter() - t0
    lines = [line for line in err.getvalue().splitlines() if line.strip()]
    after = fh.stored(store)
    intact = before.keys() <= after.keys() and all(fh.tensors_differ(after[k], v) is None for k, v in before.items())
    clean = not fh.leftovers(store)
    if kind == "full-disk":
        (disk / "filler").unlink()
    elif kind == "read-only":
        set_read_only(disk, False)
    row.injected += 1
    row.redone_s += spent if kind != "read-only" else 0.0
    refused = rc == 2 and len(lines) == 1 and str(store) in lines[0]
    row.recovered += refused and intact and clean and rerun_and_check(TRAIN_ALL, store, reference)
    row.lost += not (intact and clean)


@contextlib.contextmanager
def _folder(path: Path) -> Iterator[Path]:
    path.mkdir(parents=True, exist_ok=True)
    yield path


def set_read_only(disk: Path, read_only: bool) -> None:
    """Make a folder read-only or writable again: a remount of its tmpfs as root, chmod otherwise."""
    if fh.can_mount():
        subprocess.run(["mount", "-o", f"remount,{'ro' if read_only else 'rw'}", str(disk)], check=True)
        return
    for p in [disk, *disk.rglob("*")]:
        p.chmod(p.stat().st_mode & ~0o222 if read_only else p.stat().st_mode | 0o200)


def mutated_midi(files: int, rng: random.Random) -> Row:
    import mido

    from tda_core.data import midi_codec as mc

    notes = [mc.Note(48 + (i * 5) % 40, i * 0.2, i * 0.2 + 0.15 + (i % 3) * 0.2, 30 + (i * 7) % 90) for i in range(60)]
    good = mc.midi_bytes(mc.notes_to_midi(notes))
    outcome, worst_s, worst_b = collections.Counter(), 0.0, 0
    for _ in range(files):
        if rng.random() < 0.5:
            data = bytearray(good)
            for _ in range(rng.randint(1, 6)):
                data[rng.randrange(22, len(data))] = rng.randrange(256)
        else:
            mid = mido.MidiFile(file=io.BytesIO(good))
            mid.ticks_per_beat = rng.choice([mid.ticks_per_beat, 1, 32767])
            track = mid.tracks[-1]
            for _ in range(rng.randint(1, 4)):
                at = rng.randrange(len(track))
                if rng.random() < 0.5:
                    track[at] = track[at].copy(time=rng.choice([0x0FFFFFFF, 9_999_000, 10**6]))
                else:
                    track.insert(at, mido.MetaMessage("set_tempo", tempo=rng.choice([1, 0xFFFFFF])))
            buf = io.BytesIO()
            mid.save(file=buf)
            data = buf.getvalue()
        tracemalloc.start()
        t0 = time.perf_counter()
        try:
            mc.load_midi_tokens(bytes(data))
            outcome["loaded"] += 1
        except mc.MidiError:
            outcome["refused"] += 1
        except Exception as exc:  # noqa: BLE001 - anything else is a failure of the loader
            outcome[f"crashed ({type(exc).__name__})"] += 1
        worst_s = max(worst_s, time.perf_counter() - t0)
        worst_b = max(worst_b, tracemalloc.get_traced_memory()[1])
        tracemalloc.stop()
    crashed = files - outcome["loaded"] - outcome["refused"]
    return Row("midi-mutated", files, files - crashed, crashed, 0.0,
               f"{outcome['loaded']} loaded, {outcome['refused']} refused (MidiError); worst {worst_s:.2f} s and "
               f"{worst_b / 2**20:.0f} MiB per file")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=20, help="trials per fault kind (default 20)")
    parser.add_argument("--race-trials", type=int, default=5, help="trials per race (default 5)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--only", help="comma-separated sections to run (default all): " + ", ".join(SECTIONS))
    parser.add_argument("--out", help="also write the table as Markdown here (e.g. docs/faults.md)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR, format="%(levelname)s: %(message)s")
    rng, load_before, t_start = random.Random(args.seed), os.getloadavg()[0], time.time()
    scratch = Path(tempfile.mkdtemp(prefix="bench-faults-"))
    z = fh.Zygote(scratch / "zygote")
    try:
        sections = {"kills": lambda: kills(z, refs, args.trials, rng, scratch),
                    "write-points": lambda: write_point_kills(z, refs, args.trials, rng, scratch),
                    "damage": lambda: damages(refs, args.trials, rng, scratch),
                    "races": lambda: races(z, refs, args.race_trials, scratch),
                    "full-read-only": lambda: full_and_read_only(refs, args.trials, rng, scratch),
                    "midi": lambda: [mutated_midi(args.trials * 20, rng)]}
        chosen = args.only.split(",") if args.only else list(SECTIONS)
        if set(chosen) - set(SECTIONS):
            raise SystemExit(f"unknown section(s) {set(chosen) - set(SECTIONS)}; choose from {', '.join(SECTIONS)}")
        refs = uninterrupted(z, scratch) if set(chosen) - {"midi"} else {}
        if refs:  # this process reruns commands too: its first calls of torch.func must not count as redone work
            fh.run_here(SWEEP, scratch / "warm-up", quiet=True)
        table = ["| fault | injected | recovered | data lost | seconds redone | notes |", "|---|---|---|---|---|---|"]
        print("\n".join(table), flush=True)
        rows: list[Row] = []
        for name in chosen:
            for row in sections[name]():
                rows.append(row)
                table.append(row.line())
                print(row.line(), flush=True)
    finally:
        z.close()
        shutil.rmtree(scratch, ignore_errors=True)
    faults = [r for r in rows if r.kind != "midi-mutated"]
    summary = (f"{sum(r.injected for r in faults)} faults injected, {sum(r.recovered for r in faults)} recovered, "
               f"data lost in {sum(r.lost for r in faults)}; {time.time() - t_start:.0f} s, load average "
               f"{load_before:.2f} before and {os.getloadavg()[0]:.2f} after")
    print(summary)
    if args.out:
        command = "python -m benchmarks.bench_faults " + " ".join(sys.argv[1:])
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
        Path(args.out).write_text(f"# Fault injection: last run\n\n`{command}` at commit {commit}, "
                                  f"{time.strftime('%Y-%m-%d %H:%M')}; {summary}.\n\n" + "\n".join(table) + "\n")


if __name__ == "__main__":
    main()
