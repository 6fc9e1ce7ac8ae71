"""The options that describe one setting (method, projection, ensemble), shared by every command that takes one.

Choices come from the registries (methods, projections, ensemble kinds), so a registered method or kind is
a valid `--method` / `--ensemble` everywhere at once.
"""
from __future__ import annotations

import argparse
import dataclasses

from ..ensembles import ENSEMBLES
from ..methods import METHODS, hessians
from ..projections import PROJECTIONS
from ..specs import (
    DENSE_KINDS,
    FORWARD_GRADIENTS,
    LORA_GRADIENTS,
    MASK_MODES,
    PROJ_DTYPES,
    EnsembleSpec,
    MethodSpec,
)


def add_projection_options(p: argparse.ArgumentParser) -> None:
    """--proj-dim, --proj-dtype, --dense-kind and --proj-seed."""
    p.add_argument("--proj-dim", type=int, default=2048, help="projection dimension k")
    p.add_argument("--proj-dtype", default="bfloat16", choices=PROJ_DTYPES,
                   help="dense projection arithmetic: bfloat16 gradients times a bfloat16 matrix, accumulated by the "
                        "kernel and rounded to bfloat16 (default; relative error ~2e-3, LDS unchanged, fast on CPUs "
                        "with bfloat16 units and on GPUs) or float32 throughout; on a CPU it is also the precision "
                        "of TRAK's and IF's kernel and score products on projected features (bfloat16 products "
                        "summed in float32, solves in float32)")
    p.add_argument("--dense-kind", default="gaussian", choices=DENSE_KINDS, help="dense projection entries")
    p.add_argument("--proj-seed", type=int, default=0, help="seed of the projections")


def method_template(args: argparse.Namespace) -> MethodSpec:
    """A MethodSpec holding the parsed projection options (name, projection and damping left at defaults)."""
    return MethodSpec(proj_dim=args.proj_dim, proj_dtype=args.proj_dtype, dense_kind=args.dense_kind,
                      seed=args.proj_seed)


def add_setting_options(p: argparse.ArgumentParser, *, default_proj: str, default_damping: float | None,
                        damping_help: str) -> None:
    """--method, projection options, --damping and every ensemble option."""
    budgets = ", ".join(f"{k.budget}: {k.budget_label} per model ({name})" for name, k in ENSEMBLES.items()
                        if k.budget)
    p.add_argument("--method", default="trak", choices=METHODS.names(),
                   help="; ".join(f"{name}: {m.label}" for name, m in METHODS.items()))
    p.add_argument("--proj", default=default_proj, choices=PROJECTIONS.names(),
                   help="; ".join(f"{name}: {cls.label}" for name, cls in PROJECTIONS.items()))
    add_projection_options(p)
    p.add_argument("--damping", type=float, default=default_damping, help=damping_help)
    p.add_argument("--hessian", default="fisher", choices=hessians(),
                   help="IF curvature: fisher (feature space, labels sampled from the model), or by CG on the full "
                        "parameters (--proj none, small models) gauss-newton or exact (the Hessian; indefinite at "
                        "small damping)")
    p.add_argument("--ensemble", default="naive", choices=ENSEMBLES.names(),
                   help="; ".join(f"{name}: {k.label}" for name, k in ENSEMBLES.items()))
    p.add_argument("--I", type=int, default=1, help="independently trained models")
    for field in dict.fromkeys(k.budget for _, k in ENSEMBLES.items() if k.budget):
        p.add_argument(f"--{field}", type=int, default=1, help=budgets)
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
    p.add_argument("--ensemble-seed", type=int, default=0, help="seed of the base models, masks and adapters")


def setting_from_args(args: argparse.Namespace) -> tuple[MethodSpec, EnsembleSpec]:
    """The validated (method, ensemble) specs of parsed setting options."""
    method = dataclasses.replace(method_template(args), name=args.method, proj=args.proj, damping=args.damping,
                                 hessian=args.hessian)
    budgets = {field: getattr(args, field) for field in dict.fromkeys(k.budget for _, k in ENSEMBLES.items()
                                                                      if k.budget)}
    ensemble = EnsembleSpec(kind=args.ensemble, I=args.I, dropout_p=args.dropout_p, masks=args.masks,
                            lora_rank=args.lora_rank, lora_epochs=args.lora_epochs, lora_grad=args.lora_grad,
                            shared_projection=args.shared_projection, forward_grad=args.forward_grad,
                            seed=args.ensemble_seed, **budgets)
    return method, ensemble
