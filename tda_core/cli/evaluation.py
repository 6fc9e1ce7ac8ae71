"""`ground-truth`, `run`, `sweep` and `counterfactual`: LDS evaluation from the command line."""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from ..attribution import attribute
from ..data import load_dataset
from ..ensembles import base_seeds
from ..errors import UserError
from ..evaluation import DEFAULT_CHUNK, counterfactual, ground_truth, missing_models
from .. import experiments
from ..experiments import DAMPING_GRID, GRIDS
from ..comparison import DEFAULT_RESAMPLES
from ..report import make_report
from ..results import COST_LABELS, RESULTS_TABLE, lds_cost_figure
from ..settings import ENSEMBLE_KEYS, METHOD_KEYS, parse_setting
from ..progress import tqdm_progress
from ..methods import METHODS
from ..projections import PROJECTIONS
from ..specs import EvalSpec
from ..store import Store
from ..tasks import get_task
from .common import emit
from .setting_options import add_projection_options, add_setting_options, method_template, setting_from_args

TABLE_COLUMNS = ("method", "proj", "ensemble", "I", "D", "L", "P", "shared_projection", "lds", "lds_sem", "damping",
                 "train_s", "serve_s", "space_bytes", "n_members")


def _eval_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--task", required=True, help="task name, e.g. mnist-mlp")
    p.add_argument("--M", type=int, default=50, help="subsets of the training set (default 50)")
    p.add_argument("--alpha", type=float, default=0.5, help="subset size as a fraction of the training set")
    p.add_argument("--runs", type=int, default=1, help="trainings per subset, targets averaged (default 1)")
    p.add_argument("--eval-seed", type=int, default=0, help="seed of the subsets and the validation split")


def _replicate_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--replicates", type=int, default=1,
                   help="seed replicates: replicate r trains its own base models (ensemble seed + 1000 r) with their "
                        "own masks, adapters and projections; LDS is averaged and its spread across replicates reported")


def damping_grid(text: str) -> tuple[float, ...]:
    """A --damping-grid value: comma-separated positive numbers, e.g. '0.1,1,10,100'."""
    try:
        values = tuple(sorted({float(t) for t in text.split(",") if t.strip()}))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a comma-separated list of numbers: {text!r}") from None
    if not values or min(values) <= 0:
        raise argparse.ArgumentTypeError(f"damping values must be positive numbers, got {text!r}")
    return values


def _damping_grid_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--damping-grid", type=damping_grid, default=DAMPING_GRID, metavar="C1,C2,...",
                   help="relative dampings c that TRAK / IF tune over on the validation split (default "
                        f"{','.join(f'{c:g}' for c in DAMPING_GRID)}); the grid is part of each row's setting key")


def _grid_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--methods", default="trak", help="comma-separated methods: " + ", ".join(METHODS.names()))
    p.add_argument("--grid", default="paper", choices=sorted(GRIDS))
    p.add_argument("--proj", default="kron", help="comma-separated projections: " + ", ".join(PROJECTIONS.names()))
    add_projection_options(p)
    _replicate_option(p)
    _damping_grid_option(p)


def _eval_spec(args: argparse.Namespace) -> EvalSpec:
    return EvalSpec(M=args.M, alpha=args.alpha, runs=args.runs, seed=args.eval_seed)


def _split(text: str, valid: tuple[str, ...] | list[str], what: str) -> list[str]:
    items = [t.strip() for t in text.split(",") if t.strip()]
    bad = [t for t in items if t not in valid]
    if bad or not items:
        raise UserError(f"unknown {what} {', '.join(bad) or repr(text)}; valid choices: {', '.join(valid)}")
    return items


def cmd_ground_truth(args: argparse.Namespace) -> None:
    task, spec, store = get_task(args.task), _eval_spec(args), Store(args.store)
    todo = missing_models(task, spec, store=store, device=args.device)
    if not args.json:
        print(f"{task.name}: {spec.M} subsets x {spec.runs} run(s) of {spec.alpha:g} of the training set; "
              f"{todo} model(s) to train, {spec.M * spec.runs - todo} stored", file=sys.stderr)
    truth = ground_truth(task, spec, store=store, device=args.device, chunk=args.chunk,
                         progress=None if args.json else tqdm_progress())
    emit({"task": task.name, "M": spec.M, "alpha": spec.alpha, "runs": spec.runs, "seed": spec.seed,
          "subsets": list(truth.subsets.shape), "targets": list(truth.targets.shape), "target": truth.meta["target"],
          "train_s": round(truth.meta["train_s"], 2), "wall_s": round(truth.meta.get("wall_s", float("nan")), 2),
          "workers": truth.meta.get("workers", 1), "device": truth.meta["device"], "key": truth.key}, args.json)


def cmd_run(args: argparse.Namespace) -> None:
    task, spec, store = get_task(args.task), _eval_spec(args), Store(args.store)
    method, ensemble = setting_from_args(args)
    result = experiments.run(task, method, ensemble, spec, store=store, device=args.device,
                             dampings=args.damping_grid, replicates=args.replicates,
                             progress=None if args.json else tqdm_progress())
    row = result.row() | {"provenance": result.provenance, "uncovered": result.uncovered,
                          "validation_lds": {str(c): v for c, v in result.validation_lds.items()}}
    if args.record:
        store.append_rows("results", [result.row()])
    if args.json:
        print(json.dumps(row, default=str))
        return
    tuned = " (tuned on the validation split)" if result.damping_tuned else ""
    spread = "" if result.replicates == 1 else f", +- {result.lds_rep_se:.4f} across {result.replicates} replicates"
    ceiling = "" if np.isnan(result.ceiling.ceiling) else f"; ground-truth ceiling {result.ceiling.ceiling:.3f}"
    print(f"{task.name} {method.name} ({method.proj}) over {ensemble.kind} I={ensemble.I}: LDS {result.lds:.4f} "
          f"+- {result.lds_sem:.4f} on {result.n_eval} test examples{spread}; damping c={result.damping}{tuned}"
          f"{ceiling}")
    emit({k: row[k] for k in ("train_s", "serve_s", "space_bytes", "n_trained", "n_members", "device")}, False)


def _sweep_args(args: argparse.Namespace) -> dict:
    methods = _split(args.methods, METHODS.names(), "method")
    projections = _split(args.proj, PROJECTIONS.names(), "projection")
    return {"methods": methods, "grid": args.grid, "projections": projections, "template": method_template(args),
            "replicates": args.replicates, "dampings": args.damping_grid}


FIGURE_SUFFIXES = (".html", ".png", ".svg")


def _check_figure_path(path: str | None) -> None:
    """A figure's file type, checked before any work."""
    if path and Path(path).suffix not in FIGURE_SUFFIXES:
        raise UserError(f"cannot write a figure to {Path(path).name!r}; use {', '.join(FIGURE_SUFFIXES)}")


def cmd_sweep(args: argparse.Namespace) -> None:
    task, spec, store = get_task(args.task), _eval_spec(args), Store(args.store)
    if args.x not in COST_LABELS:
        raise UserError(f"unknown x axis {args.x!r}; valid choices: {', '.join(COST_LABELS)}")
    _check_figure_path(args.plot)
    a = _sweep_args(args)
    pairs = experiments.sweep_settings(a["methods"], args.grid, a["projections"], args.damping, template=a["template"])
    sp = experiments.plan_sweep(task, pairs, spec, store=store, device=args.device, replicates=args.replicates,
                                dampings=args.damping_grid)
    print(sp.describe(), file=sys.stderr)
    if not sp.fits:
        raise UserError(sp.message)
    if args.dry_run:
        return
    frame = experiments.sweep(task, a["methods"], args.grid, projections=a["projections"], eval_spec=spec,
                              damping=args.damping, template=a["template"], replicates=args.replicates,
                              dampings=args.damping_grid, store=store, device=args.device,
                              progress=None if args.json else tqdm_progress())
    _show(frame, args)


def cmd_compare(args: argparse.Namespace) -> None:
    task, spec = get_task(args.task), _eval_spec(args)
    template = dataclasses.replace(method_template(args), proj="kron", damping=None)
    setting_a, setting_b = (parse_setting(text, template) for text in (args.setting_a, args.setting_b))
    cmp = experiments.compare(task, setting_a, setting_b, spec, replicates=args.replicates, split=args.split,
                              resamples=args.resamples, seed=args.boot_seed, dampings=args.damping_grid,
                              store=Store(args.store),
                              device=args.device, progress=None if args.json else tqdm_progress())
    if args.json:
        print(json.dumps(cmp.row(), default=str))
        return
    print(f"A: {cmp.label_a}: LDS {cmp.lds_a:.4f}")
    print(f"B: {cmp.label_b}: LDS {cmp.lds_b:.4f}")
    print(f"A - B = {cmp.difference:+.4f}, {cmp.level:.0%} interval [{cmp.low:+.4f}, {cmp.high:+.4f}] "
          f"({cmp.n} {args.split} examples, {cmp.resamples} paired bootstrap resamples): {cmp.verdict}")


def cmd_report(args: argparse.Namespace) -> None:
    task, spec = get_task(args.task), _eval_spec(args)
    a = _sweep_args(args)
    frame, paired = make_report(task, a["methods"], args.grid, args.out, projections=a["projections"], eval_spec=spec,
                                template=a["template"], replicates=args.replicates, dampings=a["dampings"],
                                store=Store(args.store),
                                device=args.device, progress=None if args.json else tqdm_progress())
    print(f"{len(frame)} settings, {len(paired)} paired comparisons: {args.out}.csv, {args.out}_paired.csv, "
          f"{args.out}.md", file=sys.stderr)
    if args.json:
        print(paired.to_json(orient="records"))
    else:
        print(paired.round(4).to_string(index=False))


def _write_figure(frame: pd.DataFrame, path: str, x: str) -> None:
    """The LDS-vs-cost figure as HTML, PNG or SVG (the file type was checked by `_check_figure_path`)."""
    out = Path(path)
    fig = lds_cost_figure(frame, x, log_x=x in ("train_s", "serve_s", "space_bytes"))
    fig.update_layout(width=560 * frame["proj"].nunique() + 200)
    if out.suffix == ".html":
        fig.write_html(out, include_plotlyjs="cdn")
    else:
        try:
            fig.write_image(out, scale=2 if out.suffix == ".png" else 1)
        except (ImportError, ValueError, RuntimeError) as exc:
            raise UserError(f"writing {out.suffix} needs kaleido==1.5.0 and a Chrome or Chromium ({exc}); "
                            "write .html instead") from None
    print(f"figure written to {out}", file=sys.stderr)


def markdown_table(frame: pd.DataFrame) -> str:
    """A GitHub Markdown table of a frame's rows."""
    lines = ["| " + " | ".join(map(str, frame.columns)) + " |", "|" + "---|" * len(frame.columns)]
    lines += ["| " + " | ".join("" if pd.isna(v) else str(v) for v in row) + " |" for row in frame.itertuples(False)]
    return "\n".join(lines) + "\n"


def _show(frame: pd.DataFrame, args: argparse.Namespace) -> None:
    """Figure (--plot), Markdown table (--markdown) and the rows on stdout (table or --json)."""
    if frame.empty:
        raise UserError("no results match; run `python -m tda_core sweep ...` first")
    if args.x not in COST_LABELS:
        raise UserError(f"unknown x axis {args.x!r}; valid choices: {', '.join(COST_LABELS)}")
    if args.plot:
        _write_figure(frame, args.plot, args.x)
    shown = frame[[c for c in TABLE_COLUMNS if c in frame]].round({"lds": 3, "lds_sem": 3, "train_s": 1,
                                                                    "serve_s": 2})
    if getattr(args, "markdown", None):
        Path(args.markdown).write_text(markdown_table(shown))
        print(f"table written to {args.markdown}", file=sys.stderr)
    if args.json:
        print(frame.to_json(orient="records"))
    else:
        print(shown.to_string(index=False))


def read_results_csv(path: str) -> pd.DataFrame:
    """Rows of a results CSV given with --csv; one that is not a results table raises UserError naming it."""
    try:
        frame = pd.read_csv(path)
    except (ValueError, UnicodeDecodeError) as exc:  # pandas' parser errors are ValueErrors
        raise UserError(f"cannot read {path} as a results table ({type(exc).__name__}: "
                        f"{str(exc).splitlines()[0] if str(exc) else 'empty'})") from None
    missing = [c for c in ("task", "method", "proj", "ensemble", "I", "D", "L", "P", "lds", "lds_sem", "device",
                           *COST_LABELS) if c not in frame]
    if missing:
        raise UserError(f"{path} is not a results table: it lacks the column(s) {', '.join(missing)}")
    return frame


def cmd_results(args: argparse.Namespace) -> None:
    _check_figure_path(args.plot)
    frame = read_results_csv(args.csv) if args.csv else Store(args.store).read_table(RESULTS_TABLE)
    for column, text in (("task", args.task), ("method", args.methods), ("proj", args.proj)):
        if text and not frame.empty:
            frame = frame[frame[column].isin(text.split(","))]
    if args.device_match and not frame.empty:
        frame = frame[frame["device"].str.contains(args.device_match, regex=False)]
    _show(frame.drop_duplicates("setting_key", keep="last") if "setting_key" in frame else frame, args)


def cmd_counterfactual(args: argparse.Namespace) -> None:
    task, store = get_task(args.task), Store(args.store)
    method, ensemble = setting_from_args(args)
    n_train = load_dataset(task.dataset).n_train
    if not 0 < args.k < n_train or args.draws < 1:
        raise UserError(f"--k must be between 1 and {n_train - 1} and --draws at least 1; got {args.k} and "
                        f"{args.draws}")
    att = attribute(task, method, ensemble, store=store, device=args.device, test_positions=torch.tensor([args.test]),
                    progress=None if args.json else tqdm_progress())
    seeds = base_seeds(ensemble) if args.seeds is None else args.seeds
    cf = counterfactual(task, att.scores[:, 0], args.test, args.k, seeds=seeds, n_random=args.draws,
                        seed=args.draw_seed, store=store, device=args.device,
                        progress=None if args.json else tqdm_progress())
    row = cf.row() | {"method": method.name, "proj": method.proj, "ensemble": ensemble.kind, "I": ensemble.I,
                      "damping": att.damping, "removed_train_indices": att.train_index[cf.removed].tolist()}
    if args.json:
        print(json.dumps(row, default=str))
        return
    print(f"test example {args.test}: target {cf.base:+.3f} with the full training set (seeds {cf.seeds})")
    print(f"  without its top-{args.k} proponents: change {cf.top_change:+.3f}")
    print(f"  without {args.k} random examples:   change {cf.random_mean:+.3f} on average over {args.draws} draws "
          f"(each: {', '.join(f'{v:+.3f}' for v in cf.random_changes)})")
    print(f"  share of random removals that lowered it as much: {cf.fraction_random_below:.2f}")


def register(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("ground-truth", parents=[common], help="train the LDS subset models (resumable)")
    _eval_options(p)
    p.add_argument("--chunk", type=int, default=DEFAULT_CHUNK, help="models trained at once (lower it to save memory)")
    p.set_defaults(func=cmd_ground_truth)

    p = sub.add_parser("run", parents=[common], help="one setting: attribution scores and their LDS, with costs")
    _eval_options(p)
    add_setting_options(p, default_proj="kron", default_damping=None,
                        damping_help="relative damping c; default: tuned on a validation split of the test set "
                                     f"over {', '.join(map(str, DAMPING_GRID))}")
    _replicate_option(p)
    _damping_grid_option(p)
    p.add_argument("--record", action="store_true", help="also append the row to the store's results table")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("sweep", parents=[common], help="a grid of settings -> the results table (resumable)")
    _eval_options(p)
    _grid_options(p)
    p.add_argument("--damping", type=float, help="fix c for TRAK / IF (default: tuned on the validation split)")
    p.add_argument("--plot", metavar="FILE", help="write the LDS-vs-cost figure (.html; .png/.svg with kaleido)")
    p.add_argument("--x", default="train_s", help="cost on the figure's x axis: " + ", ".join(COST_LABELS))
    p.add_argument("--dry-run", action="store_true", help="print the estimate of the work and stop")
    p.set_defaults(func=cmd_sweep)

    p = sub.add_parser("compare", parents=[common],
                       help="two settings on one ground truth: the LDS difference with a paired 95%% interval")
    _eval_options(p)
    p.add_argument("setting_a", metavar="SETTING_A",
                   help="key=value pairs, e.g. 'kind=dropout,I=2,D=5' or 'method=grad-dot,proj=dense' (defaults: "
                        f"TRAK, Kronecker, damping tuned, naive I=1; keys: {', '.join([*METHOD_KEYS, *ENSEMBLE_KEYS])})")
    p.add_argument("setting_b", metavar="SETTING_B", help="the second setting, same form")
    add_projection_options(p)
    _replicate_option(p)
    _damping_grid_option(p)
    p.add_argument("--split", default="evaluation", choices=experiments.SPLITS,
                   help="test examples the difference is measured on (validation: for choosing defaults)")
    p.add_argument("--resamples", type=int, default=DEFAULT_RESAMPLES, help="paired bootstrap resamples")
    p.add_argument("--boot-seed", type=int, default=0, help="seed of the bootstrap")
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("report", parents=[common],
                       help="sweep a grid, compare every setting with naive I=1 and its projection-seed control, "
                            "write CSV + Markdown")
    _eval_options(p)
    _grid_options(p)
    p.add_argument("--out", required=True, help="path prefix of the files written (e.g. docs/results_mnist_cpu)")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("results", parents=[common], help="the results table (or a CSV of it): table, figure")
    p.add_argument("--csv", help="read rows from this CSV (e.g. a table exported from another machine)")
    p.add_argument("--task", help="comma-separated tasks to keep")
    p.add_argument("--methods", help="comma-separated methods to keep")
    p.add_argument("--proj", help="comma-separated projections to keep")
    p.add_argument("--device-match", metavar="TEXT", help="keep rows whose device contains TEXT (e.g. cuda, cpu)")
    p.add_argument("--plot", metavar="FILE", help="write the LDS-vs-cost figure (.html; .png/.svg with kaleido)")
    p.add_argument("--x", default="train_s", help="cost on the figure's x axis: " + ", ".join(COST_LABELS))
    p.add_argument("--markdown", metavar="FILE", help="write the table as Markdown")
    p.set_defaults(func=cmd_results)

    p = sub.add_parser("counterfactual", parents=[common],
                       help="retrain without a test example's top-k proponents vs without k random examples")
    p.add_argument("--task", required=True)
    add_setting_options(p, default_proj="kron", default_damping=None, damping_help="relative damping c (default 1)")
    p.add_argument("--test", type=int, default=0, help="test position to explain")
    p.add_argument("--k", type=int, default=20, help="training examples removed")
    p.add_argument("--draws", type=int, default=5, help="random removals to compare with")
    p.add_argument("--draw-seed", type=int, default=0)
    p.add_argument("--seeds", type=lambda t: [int(s) for s in t.split(",")],
                   help="training seeds of the retrained models (default: the ensemble's base seeds)")
    p.set_defaults(func=cmd_counterfactual)
