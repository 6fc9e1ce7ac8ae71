"""Where every second of a sweep goes: training, features, Q, kernel, solves, products, combination, store I/O.

Usage: python -m benchmarks.profile_sweep [--task mnist-mlp] [--methods trak,grad-dot] [--grid paper]
                                          [--proj kron] [--settings N] [--out FILE]
Runs `tda_core.experiments.sweep` on a fresh temporary store holding only the task's ground truth (copied from
the store `$TDA_STORE`, trained there once if missing), so base models, LoRA fine-tunes, features and scores are
all computed inside the profile. Named functions of the core are wrapped by timers that count exclusive time
(a callee's seconds go to the callee's category, not the caller's); what no timer covers is the rest: Python,
member building, sizing and planning. Prints one markdown table (category, seconds, share, calls, seconds per
call) plus the wall time, the load average before and after, and the serving seconds the results table reports
(`serve_s` summed over its rows), so the costs the product records can be checked against the wall clock.
`--settings N` profiles the first N settings of the grid (a representative subset when the machine is busy).
"""
from __future__ import annotations

import argparse
import functools
import importlib
import os
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable

import torch

# (module, attribute path, category): exclusive time of each call goes to its category ("a | b": a, or b when
# the call's `label` argument starts with "test"). Names missing from the code being profiled are skipped (so
# one script profiles the code before and after a change).
TIMED = [
    ("tda_core.training", "train_many", "training: base models"),
    ("tda_core.lora", "_finetune", "training: LoRA fine-tunes"),
    ("tda_core.attribution", "compute_features", "training-set features | test-set features"),
    ("tda_core.projections", "DenseJL.build", "feature-map setup"),
    ("tda_core.projections", "KronProjection.build", "feature-map setup"),
    ("tda_core.projections", "ExactGradients.build", "feature-map setup"),
    ("tda_core.ensembles", "mask_averaged_q", "Q (forward-only, D masked passes)"),
    ("tda_core.methods", "gram_matrix", "kernel Phi^T Phi"),
    ("tda_core.methods", "damped_solves", "damped solves (all c)"),
    ("tda_core.methods", "score_products", "score products (all c)"),
    ("tda_core.methods", "member_scores", "other scoring (trace, Grad-Dot, Q)"),
    ("tda_core.methods", "MemberAverage.add", "combination (member average)"),
    ("tda_core.methods", "MemberAverage.result", "combination (member average)"),
    ("tda_core.attribution", "_finish", "combination (member average)"),
    ("tda_core.store", "_sha256", "store: SHA-256 of tensor files"),
    ("tda_core.store", "Store.save", "store: writes"),
    ("tda_core.store", "Store.append_rows", "store: writes"),
    ("tda_core.store", "Store.load", "store: reads"),
    ("tda_core.store", "Store.read_table", "store: reads"),
    ("tda_core.evaluation", "lds_against", "LDS evaluation"),
    ("tda_core.evaluation", "ground_truth_ceiling", "LDS evaluation"),
    ("tda_core.attribution", "plan", "planning (sizing models)"),
]
REST = "Python, member building, everything untimed"


class ExclusiveTimer:
    """Wraps functions so each call's seconds, minus those of timed callees, go to the function's category."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)
        self._stack: list[list[float]] = []  # per active call: [start, seconds spent in timed callees]
        self._undo: list[tuple[object, str, object]] = []

    def timed(self, fn: Callable, category: str) -> Callable:
        first, _, test = category.partition(" | ")

        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            self._stack.append([time.perf_counter(), 0.0])
            try:
                return fn(*args, **kwargs)
            finally:
                start, inner = self._stack.pop()
                spent = time.perf_counter() - start
                name = test if test and str(kwargs.get("label", "")).startswith("test") else first
                self.seconds[name] += spent - inner
                self.calls[name] += 1
                if self._stack:
                    self._stack[-1][1] += spent
        return wrapper

    def install(self, timed: list[tuple[str, str, str]]) -> list[str]:
        """Wrap every (module, attribute path, category) found; returns the names that were not found."""
        missing = []
        for module_name, path, category in timed:
            owner = importlib.import_module(module_name)
            *parents, name = path.split(".")
            for part in parents:
                owner = getattr(owner, part)
            raw = owner.__dict__.get(name) if isinstance(owner, type) else getattr(owner, name, None)
            if raw is None:
                missing.append(f"{module_name}.{path}")
                continue
            if isinstance(raw, classmethod):
                wrapped = classmethod(self.timed(raw.__func__, category))
            else:
                wrapped = self.timed(raw, category)
            self._undo.append((owner, name, raw))
            setattr(owner, name, wrapped)
            # modules that imported the function by name call that binding: wrap it there too
            if not isinstance(owner, type):
                for other in ("tda_core.attribution", "tda_core.experiments", "tda_core.ensembles",
                              "tda_core.methods", "tda_core.evaluation", "tda_core.training", "tda_core.lora"):
                    mod = importlib.import_module(other)
                    if mod is not owner and getattr(mod, name, None) is raw:
                        self._undo.append((mod, name, raw))
                        setattr(mod, name, wrapped)
        return missing

    def uninstall(self) -> None:
        for owner, name, raw in reversed(self._undo):
            setattr(owner, name, raw)
        self._undo.clear()


def load_average() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def table(seconds: dict[str, float], calls: dict[str, int], wall: float) -> list[str]:
    """Markdown rows, in the order of `TIMED`, then the rest and the wall time."""
    order = list(dict.fromkeys(part for _, _, category in TIMED for part in category.split(" | ")))
    lines = ["| where | seconds | share | calls | s per call |", "|---|---:|---:|---:|---:|"]
    for category in order:
        s = seconds.get(category, 0.0)
        n = calls.get(category, 0)
        lines.append(f"| {category} | {s:.1f} | {100 * s / wall:.1f}% | {n} | {s / n if n else 0:.3f} |")
    rest = wall - sum(seconds.values())
    lines.append(f"| {REST} | {rest:.1f} | {100 * rest / wall:.1f}% | | |")
    lines.append(f"| **wall** | **{wall:.1f}** | 100% | | |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default="mnist-mlp")
    parser.add_argument("--methods", default="trak,grad-dot")
    parser.add_argument("--grid", default="paper")
    parser.add_argument("--proj", default="kron")
    parser.add_argument("--settings", type=int, default=0, help="profile only the first N settings (0: all)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", help="also write the table to this markdown file")
    args = parser.parse_args()

    from tda_core import experiments
    from tda_core.evaluation import GROUND_TRUTH_KIND, ground_truth
    from tda_core.specs import EvalSpec
    from tda_core.store import Store
    from tda_core.tasks import get_task

    task, spec = get_task(args.task), EvalSpec()
    source = Store()
    truth = ground_truth(task, spec, store=source, device=args.device)
    pairs = experiments.applicable(task, experiments.sweep_settings(args.methods.split(","), args.grid,
                                                                     args.proj.split(",")))
    if args.settings:
        pairs = pairs[:args.settings]
    load_before = load_average()
    with tempfile.TemporaryDirectory() as tmp:
        store = Store(tmp)
        art = source.load(GROUND_TRUTH_KIND, truth.key)
        store.save(GROUND_TRUTH_KIND, truth.key, art.tensors, art.meta)
        timer = ExclusiveTimer()
        missing = timer.install(TIMED)
        t0 = time.perf_counter()
        try:  # the body of `sweep`, over the chosen settings
            experiments.plan_sweep(task, pairs, spec, store=store, device=args.device)
            for method, ensemble in pairs:
                result = experiments.run(task, method, ensemble, spec, store=store, device=args.device, truth=truth)
                store.append_rows(experiments.RESULTS_TABLE, [result.row()])
        finally:
            wall = time.perf_counter() - t0
            timer.uninstall()
        rows = store.read_table(experiments.RESULTS_TABLE)
    serve = float(rows["serve_s"].sum())
    members = int(rows["n_members"].sum())
    head = [f"{task.name}, {args.proj} projection, methods {args.methods}, grid {args.grid}: {len(pairs)} settings, "
            f"{members} member passes, torch threads {torch.get_num_threads()}, load average before {load_before}, "
            f"after {load_average()}",
            f"results table: serve_s summed {serve:.1f} s ({serve / max(members, 1):.3f} s per member pass)",
            *(["not in this code: " + ", ".join(missing)] if missing else [])]
    text = "\n".join(head + [""] + table(timer.seconds, timer.calls, wall))
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
