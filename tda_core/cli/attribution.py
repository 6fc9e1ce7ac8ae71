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
from ..specs import (
    ENSEMBLE_KINDS,
    FORWARD_GRADIENTS,
    HESSIANS,
    LORA_GRADIENTS,
    MASK_MODES,
    METHODS,
    PROJ_DTYPES,
    PROJECTIONS,
    EnsembleSpec,
    MethodSpec,
)
from ..store import Store
from ..tasks import get_task
from .common import emit

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


def _specs(args: argparse.Namespace) -> tuple[MethodSpec, EnsembleSpec]:
    method = MethodSpec(name=args.method, proj=args.proj, proj_dim=args.proj_dim, damping=args.damping,
                        seed=args.proj_seed, hessian=args.hessian, proj_dtype=args.proj_dtype)
    ensemble = EnsembleSpec(kind=args.ensemble, I=args.I, D=args.D, L=args.L, P=args.P, dropout_p=args.dropout_p,
                            masks=args.masks, lora_rank=args.lora_rank, lora_epochs=args.lora_epochs,
                            lora_grad=args.lora_grad, shared_projection=args.shared_projection,
                            forward_grad=args.forward_grad)
    return method, ensemble


def cmd_attribute(args: argparse.Namespace) -> None:
    task = get_task(args.task)
    method, ensemble = _specs(args)
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
               "scores_shape": list(result.scores.shape), "saved": str(saved) if saved else None}
    if args.json:
        emit(summary, True)
        return
    print(f"{task.name} {method.name} ({method.proj}) over {ensemble.kind}: {c.n_members} member(s) from "
          f"{c.n_trained} trained model(s) on {c.device}; damping c={result.damping}")
    print(f"train {c.train_s:.2f} s, serve {c.serve_s:.2f} s (this call {c.serve_now_s:.2f} s), "
          f"space {c.space_bytes / 2**20:.1f} MiB")
    emit(summary["top"], False)
    if saved:
        print(f"scores {tuple(result.scores.shape)} written to {saved}")


def register(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("attribute", parents=[common], help="attribution scores of an ensemble, with costs")
    p.add_argument("--task", required=True, help="task name, e.g. mnist-mlp")
    p.add_argument("--method", default="trak", choices=METHODS)
    p.add_argument("--ensemble", default="naive", choices=ENSEMBLE_KINDS)
    p.add_argument("--I", type=int, default=1, help="independently trained models")
    p.add_argument("--D", type=int, default=1, help="dropout masks per model (dropout, dropout-forward)")
    p.add_argument("--L", type=int, default=1, help="LoRA fine-tunes per model (lora)")
    p.add_argument("--P", type=int, default=1, help="projection seeds per model (proj-seeds control)")
    p.add_argument("--proj", default="dense", choices=PROJECTIONS, help="dense JL, Kronecker-structured JL or none")
    p.add_argument("--proj-dim", type=int, default=2048, help="projection dimension k")
    p.add_argument("--proj-dtype", default="bfloat16", choices=PROJ_DTYPES,
                   help="dense projection arithmetic: bfloat16 inputs with float32 accumulation (default; fast on "
                        "GPUs and AMX / AVX512-BF16 CPUs) or float32 (faster on CPUs without bfloat16 units)")
    p.add_argument("--proj-seed", type=int, default=0, help="seed of the projections")
    p.add_argument("--damping", type=float, default=1.0, help="relative damping c: lambda = c trace(K) / k")
    p.add_argument("--hessian", default="fisher", choices=HESSIANS,
                   help="IF curvature: fisher (feature space, labels sampled from the model), or by CG on the full "
                        "parameters (--proj none, small models) gauss-newton or exact (the Hessian; indefinite at "
                        "small damping)")
    p.add_argument("--dropout-p", type=float, help="dropout rate of the members (default: the model's own)")
    p.add_argument("--masks", default="fixed", choices=MASK_MODES, help="one mask per member or per example")
    p.add_argument("--lora-rank", type=int, default=16)
    p.add_argument("--lora-epochs", type=int, default=3)
    p.add_argument("--lora-grad", default="merged", choices=LORA_GRADIENTS,
                   help="gradients over the merged weights or the adapter only")
    p.add_argument("--forward-grad", default="plain", choices=FORWARD_GRADIENTS,
                   help="dropout-forward features: plain gradient (default) or gradient of the mask-averaged target")
    p.add_argument("--shared-projection", action="store_true",
                   help="members of one base model share its projection (isolates the mask / adapter effect)")
    p.add_argument("--n-test", type=int, help="score only the first N test examples")
    p.add_argument("--show", type=int, default=5, help="test examples whose top-5 training examples are printed")
    p.add_argument("--save-scores", metavar="PATH", help="write scores and source indices (.npz or .safetensors)")
    p.set_defaults(func=cmd_attribute)
