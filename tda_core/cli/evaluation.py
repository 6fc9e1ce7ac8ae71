"""`ground-truth`, `run`, `sweep` and `counterfactual`: LDS evaluation from the command line."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pandas as pd
import torch

from ..attribution import attribute
from ..data import load_dataset
from ..ensembles import base_seeds
from ..errors import UserError
from ..evaluation import DEFAULT_CHUNK, counterfactual, ground_truth, missing_models
from .. import experiments
from ..experiments import COST_LABELS, DAMPING_GRID, GRIDS
from ..progress import tqdm_progress
from ..specs import (
    ENSEMBLE_KINDS,
    FORWARD_GRADIENTS,
    LORA_GRADIENTS,
    MASK_MODES,
    METHODS,
    PROJECTIONS,
    EnsembleSpec,
    EvalSpec,
    MethodSpec,
)
from ..store import Store
from ..tasks import get_task
from .common import emit

TABLE_COLUMNS = ("method", "proj", "ensemble", "I", "D", "L", "P", "shared_projection", "lds", "lds_sem", "damping",
                 "train_s", "serve_s", "space_bytes", "n_members")


def _eval_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--task", required=True, help="task name, e.g. mnist-mlp")
    p.add_argument("--M", type=int, default=50, help="subsets of the training set (default 50)")
    p.add_argument("--alpha", type=float, default=0.5, help="subset size as a fraction of the training set")
    p.add_argument("--runs", type=int, default=1, help="trainings per subset, targets averaged (default 1)")
    p.add_argument("--eval-seed", type=int, default=0, help="seed of the subsets and the validation split")


def _setting_options(p: argparse.ArgumentParser, damping_help: str) -> None:
    p.add_argument("--method", default="trak", choices=METHODS)
    p.add_argument("--proj", default="kron", choices=PROJECTIONS, help="dense JL, Kronecker-structured JL or none")
    p.add_argument("--proj-dim", type=int, default=2048)
    p.add_argument("--proj-seed", type=int, default=0)
    p.add_argument("--damping", type=float, help=damping_help)
    p.add_argument("--ensemble", default="naive", choices=ENSEMBLE_KINDS)
    p.add_argument("--I", type=int, default=1, help="independently trained models")
    p.add_argument("--D", type=int, default=1, help="dropout masks per model")
    p.add_argument("--L", type=int, default=1, help="LoRA fine-tunes per model")
    p.add_argument("--P", type=int, default=1, help="projection seeds per model (control)")
    p.add_argument("--masks", default="fixed", choices=MASK_MODES)
    p.add_argument("--lora-rank", type=int, default=16)
    p.add_argument("--lora-epochs", type=int, default=3)
    p.add_argument("--lora-grad", default="merged", choices=LORA_GRADIENTS)
    p.add_argument("--forward-grad", default="plain", choices=FORWARD_GRADIENTS,
                   help="dropout-forward: plain gradient, or gradient of the mask-averaged target")
    p.add_argument("--shared-projection", action="store_true", help="members of a base model share its projection")


def _eval_spec(args: argparse.Namespace) -> EvalSpec:
    return EvalSpec(M=args.M, alpha=args.alpha, runs=args.runs, seed=args.eval_seed)


def _setting(args: argparse.Namespace) -> tuple[MethodSpec, EnsembleSpec]:
    method = MethodSpec(name=args.method, proj=args.proj, proj_dim=args.proj_dim, damping=args.damping,
                        seed=args.proj_seed)
    ensemble = EnsembleSpec(kind=args.ensemble, I=args.I, D=args.D, L=args.L, P=args.P, masks=args.masks,
                            lora_rank=args.lora_rank, lora_epochs=args.lora_epochs, lora_grad=args.lora_grad,
                            forward_grad=args.forward_grad, shared_projection=args.shared_projection)
    return method, ensemble


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
          "train_s": round(truth.meta["train_s"], 2), "device": truth.meta["device"], "key": truth.key}, args.json)


def cmd_run(args: argparse.Namespace) -> None:
    task, spec, store = get_task(args.task), _eval_spec(args), Store(args.store)
    method, ensemble = _setting(args)
    result = experiments.run(task, method, ensemble, spec, store=store, device=args.device,
                 progress=None if args.json else tqdm_progress())
    row = result.row() | {"provenance": result.provenance,
                          "validation_lds": {str(c): v for c, v in result.validation_lds.items()}}
    if args.record:
        store.append_rows("results", [result.row()])
    if args.json:
        print(json.dumps(row, default=str))
        return
    tuned = " (tuned on the validation split)" if result.damping_tuned else ""
    print(f"{task.name} {method.name} ({method.proj}) over {ensemble.kind} I={ensemble.I}: LDS {result.lds:.4f} "
          f"+- {result.lds_sem:.4f} on {result.n_eval} test examples; damping c={result.damping}{tuned}")
    emit({k: row[k] for k in ("train_s", "serve_s", "space_bytes", "n_trained", "n_members", "device")}, False)


def cmd_sweep(args: argparse.Namespace) -> None:
    task, spec, store = get_task(args.task), _eval_spec(args), Store(args.store)
    methods = _split(args.methods, METHODS, "method")
    projections = _split(args.proj, PROJECTIONS, "projection")
    if args.x not in COST_LABELS:
        raise UserError(f"unknown x axis {args.x!r}; valid choices: {', '.join(COST_LABELS)}")
    pairs = experiments.sweep_settings(methods, args.grid, projections, args.damping)
    sp = experiments.plan_sweep(task, pairs, spec, store=store, device=args.device)
    print(sp.describe(), file=sys.stderr)
    if not sp.fits:
        raise UserError(sp.message)
    if args.dry_run:
        return
    frame = experiments.sweep(task, methods, args.grid, projections=projections, eval_spec=spec, damping=args.damping,
                  store=store, device=args.device, progress=None if args.json else tqdm_progress())
    _show(frame, args)


def _write_figure(frame: pd.DataFrame, path: str, x: str) -> None:
    out = Path(path)
    fig = experiments.sweep_figure(frame, x, log_x=x in ("train_s", "serve_s", "space_bytes"))
    if out.suffix == ".html":
        fig.write_html(out, include_plotlyjs="cdn")
    elif out.suffix in (".png", ".svg"):
        try:
            fig.write_image(out, scale=2 if out.suffix == ".png" else 1)
        except (ImportError, ValueError, RuntimeError) as exc:
            raise UserError(f"writing {out.suffix} needs kaleido==1.5.0 and a Chrome or Chromium ({exc}); "
                            "write .html instead") from None
    else:
        raise UserError(f"cannot write a figure to {out.name!r}; use .html, .png or .svg")
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
    frame = read_results_csv(args.csv) if args.csv else Store(args.store).read_table(experiments.RESULTS_TABLE)
    for column, text in (("task", args.task), ("method", args.methods), ("proj", args.proj)):
        if text and not frame.empty:
            frame = frame[frame[column].isin(text.split(","))]
    if args.device_match and not frame.empty:
        frame = frame[frame["device"].str.contains(args.device_match, regex=False)]
    _show(frame.drop_duplicates("setting_key", keep="last") if "setting_key" in frame else frame, args)


def cmd_counterfactual(args: argparse.Namespace) -> None:
    task, store = get_task(args.task), Store(args.store)
    method, ensemble = _setting(args)
    n_train = load_dataset(task.dataset).n_train
    if not 0 < args.k < n_train or args.draws < 1:
        raise UserError(f"--k must be between 1 and {n_train - 1} and --draws at least 1; got {args.k} and {args.draws}")
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
    _setting_options(p, "relative damping c; default: tuned on a validation split of the test set "
                        f"over {', '.join(map(str, DAMPING_GRID))}")
    p.add_argument("--record", action="store_true", help="also append the row to the store's results table")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("sweep", parents=[common], help="a grid of settings -> the results table (resumable)")
    _eval_options(p)
    p.add_argument("--methods", default="trak", help="comma-separated methods: " + ", ".join(METHODS))
    p.add_argument("--grid", default="paper", choices=sorted(GRIDS))
    p.add_argument("--proj", default="kron", help="comma-separated projections: " + ", ".join(PROJECTIONS))
    p.add_argument("--damping", type=float, help="fix c for TRAK / IF (default: tuned on the validation split)")
    p.add_argument("--plot", metavar="FILE", help="write the LDS-vs-cost figure (.html; .png/.svg with kaleido)")
    p.add_argument("--x", default="train_s", help="cost on the figure's x axis: " + ", ".join(COST_LABELS))
    p.add_argument("--dry-run", action="store_true", help="print the estimate of the work and stop")
    p.set_defaults(func=cmd_sweep)

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
    _setting_options(p, "relative damping c (default 1)")
    p.add_argument("--test", type=int, default=0, help="test position to explain")
    p.add_argument("--k", type=int, default=20, help="training examples removed")
    p.add_argument("--draws", type=int, default=5, help="random removals to compare with")
    p.add_argument("--draw-seed", type=int, default=0)
    p.add_argument("--seeds", type=lambda t: [int(s) for s in t.split(",")],
                   help="training seeds of the retrained models (default: the ensemble's base seeds)")
    p.set_defaults(func=cmd_counterfactual)
