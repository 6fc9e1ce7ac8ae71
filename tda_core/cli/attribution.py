"""`attribute`: scores of an ensemble, its costs and the top training examples per test example."""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np
import torch

from ..attribution import Attribution, attribute, plan
from ..data import load_dataset
from ..errors import UserError
from ..progress import tqdm_progress
from ..store import Store
from ..tasks import get_task
from .common import emit
from .setting_options import add_setting_options, setting_from_args

SCORE_FORMATS = (".npz", ".safetensors")


def scores_path(path: str) -> Path:
    """Where --save-scores writes, checked before any work: a .npz or .safetensors name."""
    out = Path(path).expanduser()
    if out.suffix not in SCORE_FORMATS:
        raise UserError(f"cannot write scores to {out.name!r}; use a name ending in {' or '.join(SCORE_FORMATS)}")
    return out


def save_scores(result: Attribution, path: str) -> Path:
    """Write scores [n_train, n_test] with the source indices of rows and columns (.npz or .safetensors)."""
    out = scores_path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tensors = {"scores": result.scores.contiguous(), "train_index": result.train_index.contiguous(),
               "test_index": result.test_index.contiguous()}
    if out.suffix == ".npz":
        np.savez(out, **{k: v.numpy() for k, v in tensors.items()})
    else:
        from safetensors.torch import save_file

        save_file(tensors, str(out), metadata={"task": result.task.name, "method": result.method.name,
                                               "ensemble": result.ensemble.kind, "damping": str(result.damping)})
    return out


def cmd_attribute(args: argparse.Namespace) -> None:
    task = get_task(args.task)
    method, ensemble = setting_from_args(args)
    store = Store(args.store)
    if args.data_dir:  # the library reads the data folder from the environment
        os.environ["TDA_DATA_DIR"] = args.data_dir
    if args.save_scores:
        scores_path(args.save_scores)
    n_available = load_dataset(task.dataset).n_test
    if args.n_test is not None and not 1 <= args.n_test <= n_available:
        raise UserError(f"--n-test must be between 1 and {n_available} (the test examples of {task.dataset})")
    test_positions = torch.arange(args.n_test) if args.n_test else None
    wp = plan(task, method, ensemble, store, device=args.device, n_test=args.n_test)
    if not args.json:
        print(wp.describe(), file=sys.stderr)
    if not wp.fits:
        raise UserError(wp.message)
    result = attribute(task, method, ensemble, store=store, device=args.device, test_positions=test_positions,
                       progress=None if args.json else tqdm_progress())
    saved = save_scores(result, args.save_scores) if args.save_scores else None
    c = result.costs
    summary = {"task": task.name, "method": method.name, "proj": method.proj, "ensemble": ensemble.kind,
               "n_trained": c.n_trained, "n_members": c.n_members, "damping": result.damping,
               "train_s": round(c.train_s, 3), "serve_s": round(c.serve_s, 3), "serve_now_s": round(c.serve_now_s, 3),
               "space_bytes": c.space_bytes, "device": c.device, "from_store": c.from_store,
               "breakdown": {k: round(v, 3) for k, v in c.breakdown.items()}, "members": result.members,
               "top": [{"test_index": int(result.test_index[j]), "top_train_indices": result.top(j, 5)}
                       for j in range(min(args.show, len(result.test_index)))],
               "scores_shape": list(result.scores.shape), "saved": str(saved) if saved else None,
               "uncovered": result.uncovered}
    if args.json:
        emit(summary, True)
        return
    print(f"{task.name} {method.name} ({method.proj}) over {ensemble.kind}: {c.n_members} member(s) from "
          f"{c.n_trained} trained model(s) on {c.device}; damping c={result.damping}")
    print(f"train {c.train_s:.2f} s, serve {c.serve_s:.2f} s (this call {c.serve_now_s:.2f} s), "
          f"space {c.space_bytes / 2**20:.1f} MiB")
    if result.uncovered:
        print(f"the {method.proj} projection left out {len(result.uncovered)} parameter tensor(s) no layer adapter "
              f"covers: {', '.join(result.uncovered)}")
    emit(summary["top"], False)
    if saved:
        print(f"scores {tuple(result.scores.shape)} written to {saved}")


def register(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("attribute", parents=[common], help="attribution scores of an ensemble, with costs")
    p.add_argument("--task", required=True, help="task name, e.g. mnist-mlp")
    add_setting_options(p, default_proj="dense", default_damping=1.0,
                        damping_help="relative damping c: lambda = c trace(K) / k")
    p.add_argument("--n-test", type=int, help="score only the first N test examples")
    p.add_argument("--show", type=int, default=5, help="test examples whose top-5 training examples are printed")
    p.add_argument("--save-scores", metavar="PATH", help="write scores and source indices (.npz or .safetensors)")
    p.set_defaults(func=cmd_attribute)
