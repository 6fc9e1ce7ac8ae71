"""Frozen, validated specs for every step: what to train, which ensemble, which method, how to evaluate.

Invalid values raise `UserError` naming the valid choices. `spec_key(spec)` (store.py) turns
any of them into a stable store key.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

from .errors import UserError, unknown_choice

OPTIMIZERS = ("sgd", "adam")
MASK_MODES = ("fixed", "fresh")
LORA_GRADIENTS = ("merged", "adapter")
DENSE_KINDS = ("gaussian", "rademacher")
FORWARD_GRADIENTS = ("plain", "mask-mean")
PROJ_DTYPES = ("float32", "bfloat16")


CEILING_REASONS = {  # why a count has a ceiling (README: "Reliability and security")
    "I": "independently trained models, each a full training run",
    "D": "dropout masks per model, each a gradient pass over the training set",
    "L": "LoRA fine-tunes per model, each a training run",
    "P": "projection seeds per model, each a gradient pass over the training set",
    "lora_rank": "as the adapter rank (a rank above the layer widths adds nothing)",
    "M": "subset models, each a full training run",
    "runs": "trainings per subset",
}


def method_record(name: str):  # noqa: ANN201 - a tda_core.methods.Method
    """The registered TDA method `name` (tda_core/methods.py); unknown names list the valid ones."""
    from .methods import METHODS

    return METHODS.get(name)


def ensemble_kind(name: str):  # noqa: ANN201 - a tda_core.ensembles.EnsembleKind
    """The registered ensemble kind `name` (tda_core/ensembles.py); unknown names list the valid ones."""
    from .ensembles import ENSEMBLES

    return ENSEMBLES.get(name)


def projection_class(name: str):  # noqa: ANN201 - a tda_core.projections.FeatureMap subclass
    """The registered projection `name` (tda_core/projections.py); unknown names list the valid ones."""
    from .projections import PROJECTIONS

    return PROJECTIONS.get(name)


def _positive(name: str, value: Any, limit: int | None = None) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise UserError(f"{name} must be a positive integer, got {value!r}")
    if limit is not None and value > limit:
        raise UserError(f"{name}={value} is above the ceiling of {limit} {CEILING_REASONS.get(name, '')}".rstrip())


@dataclasses.dataclass(frozen=True)
class Recipe:
    """How one model is trained."""

    epochs: int
    batch_size: int
    lr: float
    optimizer: str = "sgd"
    momentum: float = 0.9
    weight_decay: float = 0.0

    def __post_init__(self) -> None:
        if self.optimizer not in OPTIMIZERS:
            raise unknown_choice("optimizer", self.optimizer, OPTIMIZERS)
        _positive("epochs", self.epochs)
        _positive("batch_size", self.batch_size)
        if not self.lr > 0:
            raise UserError(f"lr must be > 0, got {self.lr}")


@dataclasses.dataclass(frozen=True)
class TaskSpec:
    """A dataset, a model architecture and its training recipe (e.g. `mnist-mlp`)."""

    name: str
    dataset: str
    model: str
    model_kwargs: tuple[tuple[str, Any], ...]
    recipe: Recipe
    sequence: bool = False  # True for next-token tasks (music)
    description: str = ""

    @property
    def kwargs(self) -> dict[str, Any]:
        return dict(self.model_kwargs)


@dataclasses.dataclass(frozen=True)
class EnsembleSpec:
    """Which members are built from I base models.

    naive: I members. dropout: I x D fixed-mask members. dropout-forward: I members whose
    forward-only quantities average D masks. lora: I x L LoRA fine-tunes. proj-seeds: I x P
    projection seeds (the control for projection noise).
    """

    kind: str = "naive"
    I: int = 1  # noqa: E741 - the paper's name
    D: int = 1
    L: int = 1
    P: int = 1
    dropout_p: float | None = None  # None: the model's own rate
    masks: str = "fixed"
    lora_rank: int = 16
    lora_alpha: float = 32.0
    lora_epochs: int = 3
    lora_lr: float = 1e-3
    lora_grad: str = "merged"
    shared_projection: bool = False
    forward_grad: str = "plain"  # dropout-forward: plain gradient, or gradient of the mask-averaged target
    seed: int = 0

    def __post_init__(self) -> None:
        ensemble_kind(self.kind)
        for name in ("I", "D", "L", "P", "lora_rank"):
            _positive(name, getattr(self, name), 1000)
        if not isinstance(self.lora_epochs, int) or self.lora_epochs < 0:
            raise UserError(f"lora_epochs must be a non-negative integer (0 = adapter left at B = 0), "
                            f"got {self.lora_epochs!r}")
        if self.masks not in MASK_MODES:
            raise unknown_choice("mask mode", self.masks, MASK_MODES)
        if self.forward_grad not in FORWARD_GRADIENTS:
            raise unknown_choice("dropout-forward gradient", self.forward_grad, FORWARD_GRADIENTS)
        if self.lora_grad not in LORA_GRADIENTS:
            raise unknown_choice("LoRA gradient mode", self.lora_grad, LORA_GRADIENTS)
        if self.dropout_p is not None and not 0.0 <= self.dropout_p < 1.0:
            raise UserError(f"dropout_p must be in [0, 1), got {self.dropout_p}")

    @property
    def n_trained(self) -> int:
        """Independently trained base models."""
        return self.I

    @property
    def n_members(self) -> int:
        """Members whose scores are averaged."""
        return self.I * ensemble_kind(self.kind).members_per_model(self)


@dataclasses.dataclass(frozen=True)
class MethodSpec:
    """A TDA method with its projection and damping (TRAK: lambda = damping * trace(K) / k).

    proj: dense JL, Kronecker-structured JL (kron: rank-one sketches of every layer's input and
    output gradient) or none (exact gradients). proj_dtype (dense): bfloat16 gradients times a bfloat16
    matrix, accumulated by the kernel and rounded to bfloat16 (relative error ~2e-3), or float32 throughout;
    on a CPU also the precision of TRAK's and IF's kernel and score products on projected features
    (bfloat16 products summed in float32; tda_core/methods.py `kernel_dtype`). hessian (IF only):
    empirical Fisher in feature space, or by conjugate gradient on the full parameters the Gauss-Newton
    matrix or the exact Hessian (both need proj 'none'; small models).
    """

    name: str = "trak"
    proj: str = "dense"
    proj_dim: int = 2048
    damping: float | None = 1.0  # relative damping c; None = tune on a validation split
    seed: int = 0
    dense_kind: str = "gaussian"
    hessian: str = "fisher"
    proj_dtype: str = "bfloat16"  # dense; LDS measured equal to float32 (0.231 vs 0.231), ~2x faster here

    def __post_init__(self) -> None:
        record = method_record(self.name)
        projection_class(self.proj)
        _positive("proj_dim", self.proj_dim)
        if self.dense_kind not in DENSE_KINDS:
            raise unknown_choice("dense projection", self.dense_kind, DENSE_KINDS)
        if self.proj_dtype not in PROJ_DTYPES:
            raise unknown_choice("projection dtype", self.proj_dtype, PROJ_DTYPES)
        if self.hessian != "fisher":
            from .methods import METHODS, hessians

            if self.hessian not in hessians():
                raise unknown_choice("Hessian", self.hessian, hessians())
            if self.hessian not in record.variants or self.proj != "none":
                having = [name for name, m in METHODS.items() if self.hessian in m.variants]
                raise UserError(f"hessian {self.hessian!r} (CG on the full parameters) is an option of "
                                f"{', '.join(having)} on exact gradients: use --method {having[0]} --proj none, "
                                "or --hessian fisher")
        if self.damping is not None and not 0 <= self.damping < math.inf:
            raise UserError(f"damping must be a finite number >= 0 (or None to tune it), got {self.damping}")


@dataclasses.dataclass(frozen=True)
class EvalSpec:
    """LDS ground truth: M subsets of size alpha * n, R runs each, drawn from `seed`."""

    M: int = 50
    alpha: float = 0.5
    runs: int = 1
    seed: int = 0

    def __post_init__(self) -> None:
        _positive("M", self.M, 10000)
        _positive("runs", self.runs, 100)
        if not 0.0 < self.alpha < 1.0:
            raise UserError(f"alpha must be in (0, 1), got {self.alpha}")
        if not isinstance(self.seed, int) or self.seed < 0:
            raise UserError(f"the evaluation seed must be an integer >= 0, got {self.seed!r}")
