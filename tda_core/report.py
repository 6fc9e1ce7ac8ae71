"""A results report anyone can regenerate: a sweep's rows and their paired comparisons, as CSV and Markdown.

`make_report` runs (or resumes) a sweep, then compares every setting with naive I = 1 of its method and
projection and with its projection-seed control (the same I with P = its members per model), each a paired
bootstrap on the stored per-example LDS. It writes `<out>.csv` (the rows), `<out>_paired.csv` (the
comparisons) and `<out>.md` (both as tables, with the ground truth's ceiling and the command that made them).
"""
from __future__ import annotations

import shlex
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from .comparison import DEFAULT_RESAMPLES
from .context import resolve
from .experiments import DAMPING_GRID, applicable, compare_stored, setting_key, sweep, sweep_settings
from .progress import Progress
from .results import setting_label
from .specs import EnsembleSpec, EvalSpec, MethodSpec, TaskSpec, ensemble_kind

# results-table column -> header shown in Markdown (tests/test_docs.py reads the README's tables back through it)
HEADERS = {"setting": "setting", "lds": "LDS", "lds_sem": "per-example SE", "lds_rep_se": "replicate SE",
           "replicates": "replicates", "n_trained": "trained models", "n_members": "members", "train_s": "train s",
           "serve_s": "serve s", "space_mb": "space MB", "versus": "versus", "difference": "difference",
           "low": "95% low", "high": "95% high", "verdict": "verdict", "damping": "c"}
TABLE_COLUMNS = ("setting", "lds", "lds_sem", "lds_rep_se", "damping", "n_trained", "n_members", "train_s", "serve_s",
                 "space_mb")
PAIRED_COLUMNS = ("setting", "versus", "difference", "low", "high", "verdict")
DIGITS = {"damping": 1, "lds": 3, "lds_sem": 3, "lds_rep_se": 3, "train_s": 1, "serve_s": 1, "space_mb": 1, "difference": 3,
          "low": 3, "high": 3}


def baselines(method: MethodSpec, ensemble: EnsembleSpec) -> dict[str, EnsembleSpec]:
    """What a setting is compared with: naive I = 1, and the projection-seed control with the same trained models
    and as many projections per model as the setting has members per model (when that is more than one)."""
    out = {}
    if (ensemble.kind, ensemble.I) != ("naive", 1):
        out["naive I=1"] = EnsembleSpec("naive", I=1, seed=ensemble.seed)
    per_model = ensemble_kind(ensemble.kind).members_per_model(ensemble)
    if ensemble.kind not in ("naive", "proj-seeds") and per_model > 1:
        out["proj-seeds control"] = EnsembleSpec("proj-seeds", I=ensemble.I, P=per_model, seed=ensemble.seed)
    return out


def paired_table(store, keyed: dict[tuple[MethodSpec, EnsembleSpec], str], labels: dict[str, str],  # noqa: ANN001
                 resamples: int = DEFAULT_RESAMPLES, seed: int = 0) -> pd.DataFrame:
    """For every setting in `keyed` ((method, ensemble) -> setting key) and each of its baselines also in
    `keyed`: the LDS difference with its 95% interval, from the stored per-example LDS."""
    rows = []
    for (method, ensemble), key in keyed.items():
        for name, base in baselines(method, ensemble).items():
            if (method, base) not in keyed:
                continue
            cmp = compare_stored(store, key, keyed[(method, base)], resamples=resamples, seed=seed)
            verdict = {"A better": "better", "B better": "worse"}.get(cmp.verdict, cmp.verdict)
            rows.append({"setting": labels[key], "versus": name, "difference": cmp.difference, "low": cmp.low,
                         "high": cmp.high, "verdict": verdict, "n": cmp.n, "lds": cmp.lds_a,
                         "lds_baseline": cmp.lds_b})
    return pd.DataFrame(rows, columns=["setting", "versus", "difference", "low", "high", "verdict", "n", "lds",
                                       "lds_baseline"])


def markdown(frame: pd.DataFrame) -> str:
    """A GitHub Markdown table of `frame` under `HEADERS`, numbers rounded by `DIGITS` (NaN blank)."""
    def cell(column: str, v: object) -> str:
        if isinstance(v, (float, np.floating)):
            return "" if np.isnan(v) else f"{v:.{DIGITS.get(column, 3)}f}"
        return str(v)

    lines = ["| " + " | ".join(HEADERS.get(c, c) for c in frame.columns) + " |", "|" + "---|" * len(frame.columns)]
    lines += ["| " + " | ".join(cell(c, v) for c, v in zip(frame.columns, row)) + " |"
              for row in frame.itertuples(False)]
    return "\n".join(lines) + "\n"


def damping_note(frame: pd.DataFrame, dampings: Sequence[float]) -> str:
    """Where the tuned dampings of `frame`'s rows fall on the grid: interior, or which rows sit at an end."""
    tuned = frame[frame["damping_tuned"].astype(bool)] if "damping_tuned" in frame else frame.iloc[:0]
    grid = ", ".join(f"{c:g}" for c in dampings)
    if tuned.empty:
        return f"No setting tuned its damping (grid c in {{{grid}}})."
    at_edge = tuned[tuned["damping"].isin([min(dampings), max(dampings)])]
    where = ("every tuned c is interior to the grid" if at_edge.empty else
             "tuned c at an end of the grid for " + "; ".join(f"{label} (c = {c:g})" for label, c in
                                                             zip(at_edge["setting"], at_edge["damping"])))
    return f"Damping c tuned on the validation split over {{{grid}}}: {where}."


def with_space_mb(frame: pd.DataFrame) -> pd.DataFrame:
    """`frame` with `space_mb` = space in megabytes (10^6 bytes)."""
    return frame.assign(space_mb=frame["space_bytes"] / 1e6)


def make_report(task: str | TaskSpec, methods: Sequence[str], grid: str, out: str | Path, *,
                projections: Sequence[str] = ("kron",), eval_spec: EvalSpec = EvalSpec(),
                template: MethodSpec | None = None, replicates: int = 1, dampings: Sequence[float] = DAMPING_GRID,
                store=None, device: str = "auto", command: str | None = None,  # noqa: ANN001
                progress: Progress | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Sweep (resumable), compare, and write `<out>.csv`, `<out>_paired.csv` and `<out>.md`."""
    task, ctx = resolve(task, store, device, progress)
    frame = sweep(task, methods, grid, projections=projections, eval_spec=eval_spec, template=template,
                  replicates=replicates, dampings=dampings, store=ctx.store, device=ctx.device, progress=progress)
    frame = frame.assign(setting=frame.apply(setting_label, axis=1))
    pairs = applicable(task, sweep_settings(methods, grid, projections, template=template))
    keyed = {(m, e): setting_key(task, m, e, eval_spec, ctx.device, dampings, replicates=replicates) for m, e in pairs}
    paired = paired_table(ctx.store, keyed, dict(zip(frame["setting_key"], frame["setting"])))
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    frame.to_csv(out.with_suffix(".csv"), index=False)
    paired.to_csv(out.with_name(out.name + "_paired.csv"), index=False)
    command = command or "python -m tda_core " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    ceiling, reliability = frame["ceiling"].iloc[0], frame["reliability"].iloc[0]
    text = [f"# {task.name}: {grid} grid, {', '.join(methods)} ({', '.join(projections)})", "",
            f"Made by `{command}`.", "",
            f"Ground truth: M = {eval_spec.M} subsets of alpha = {eval_spec.alpha}, R = {eval_spec.runs} run(s) each; "
            f"LDS on the evaluation split ({int(frame['n_eval'].iloc[0])} test examples), damping tuned on the "
            f"validation split. Seed replicates per setting: {replicates}. Ground-truth reliability "
            f"{reliability:.3f}, LDS ceiling {ceiling:.3f} (sqrt of the reliability; NaN with one run per subset).",
            "", damping_note(frame, dampings),
            "", "## Settings", "", markdown(with_space_mb(frame)[list(TABLE_COLUMNS)]),
            "## Paired differences (95% bootstrap intervals over test examples and replicates)", "",
            markdown(paired[list(PAIRED_COLUMNS)])]
    out.with_suffix(".md").write_text("\n".join(text))
    return frame, paired

