"""Ensemble kinds: how members are built from I base models, one registry entry per kind.

A member is a model state plus the masks its gradients see and the seed of its projection.
Projection seeds come from (method seed, base seed, j): member j of a base model gets its own
projection, or projection 0 with `shared_projection` (so a mask or adapter effect is measured
alone). Naive members and proj-seeds member 0 use projection 0, hence proj-seeds with P = 1 is
the naive ensemble and a shared-projection member with p = 0 (or B = 0) is its base member.

Kinds: naive (I members), dropout (I x D fixed- or fresh-mask members), dropout-forward (I members whose
forward-only Q averages D masks), lora (I x L peft adapters, tda_core/lora.py) and proj-seeds (I x P
projection seeds: the control for projection noise). To add a kind, write its member builder here and
`register_kind` it; specs, the planner, the engine, the CLI and the app read it from `ENSEMBLES`.
"""
from __future__ import annotations

import copy
import dataclasses
import itertools
import time
from collections.abc import Callable, Iterator

import pandas as pd
import torch
from torch import nn

from .context import resolve
from .data import Dataset, load_dataset
from .errors import UserError
from .features import GradientSource, all_param_names, derive_seed, mask_averaged_probabilities
from .lora import load_or_finetune_lora, with_adapter
from .models.dropout import draw_masks, fixed_masks, mask_shapes
from .progress import Progress
from .registry import Registry
from .specs import EnsembleSpec, MethodSpec, TaskSpec, method_record
from .store import Store
from .training import TrainedModel, dropout_rates, evaluate, load_or_train

ForwardQ = Callable[[Dataset, torch.device], torch.Tensor]


@dataclasses.dataclass
class Member:
    """One member: what to differentiate on the train and test side, its projection seed and its costs."""

    description: str
    base: TrainedModel
    train_source: GradientSource
    test_source: GradientSource
    proj_seed: int
    variant: dict  # identifies the gradient function (part of the feature-cache key)
    forward_q: ForwardQ | None = None  # dropout-forward: Q = 1 - p averaged over D masked forward passes
    finetune_s: float = 0.0  # fine-tuning seconds as recorded when the adapter was trained
    finetune_now_s: float = 0.0  # seconds spent fine-tuning in this call (0 when the adapter was stored)
    adapter_bytes: int = 0
    adapter_key: str | None = None


@dataclasses.dataclass(frozen=True)
class MemberContext:
    """What a kind's member builder may use."""

    task: TaskSpec
    ensemble: EnsembleSpec
    method: MethodSpec
    dataset: Dataset
    store: Store
    device: torch.device
    test_positions: torch.Tensor

    def plain_source(self, model: nn.Module) -> GradientSource:
        """All trainable parameters of `model`, no masks."""
        return GradientSource(model, all_param_names(model), self.task.sequence)

    def member(self, base: TrainedModel, j: int, train: GradientSource, test: GradientSource | None = None,
               variant: dict | None = None, shared: bool = False, **extra) -> Member:
        """Member j of `base`: its label, and projection j (projection 0 when `shared`)."""
        return Member(member_label(self.ensemble, base.seed, j), base, train, test or train,
                      projection_seed(self.method, base.seed, 0 if shared else j),
                      variant or {"grad": "plain"}, **extra)


Builder = Callable[[MemberContext, TrainedModel], Iterator[Member]]


@dataclasses.dataclass(frozen=True)
class EnsembleKind:
    """One ensemble kind: how many members per base model, how they are built, and what it is called."""

    name: str
    label: str
    build: Builder  # the members of one base model, in order
    members_per_model: Callable[[EnsembleSpec], int] = lambda ensemble: 1
    budget: str | None = None  # the EnsembleSpec field a user sets per base model (D, L, P), if any
    budget_label: str = ""  # what one unit of the budget is ("dropout masks", ...)
    fields: tuple[str, ...] = ()  # other EnsembleSpec fields this kind reads
    member_suffix: Callable[[EnsembleSpec, int], str] = lambda ensemble, j: ""  # label of member j of a model
    differentiated: Callable[[nn.Module, EnsembleSpec], nn.Module] | None = None  # what members differentiate
    check: Callable[[TaskSpec, MethodSpec, EnsembleSpec], None] | None = None  # refuse what it cannot do
    description: str = ""
    # stored work member j of a model needs before it is built (LoRA: its adapter's fine-tune), run as a task of
    # its own before the members, so that members can then be built one at a time (what it returns is unused)
    prepare: Callable[[MemberContext, TrainedModel, int], object] | None = None


ENSEMBLES: Registry[EnsembleKind] = Registry("ensemble")


def register_kind(kind: EnsembleKind) -> EnsembleKind:
    """Add an ensemble kind."""
    return ENSEMBLES.register(kind.name, kind)


def base_seeds(ensemble: EnsembleSpec) -> list[int]:
    """Seeds of the I independently trained base models."""
    return [ensemble.seed + i for i in range(ensemble.I)]


def projection_seed(method: MethodSpec, base_seed: int, j: int) -> int:
    """Seed of projection j of a base model."""
    return derive_seed(method.seed, "projection", base_seed, j)


def member_label(ensemble: EnsembleSpec, base_seed: int, j: int) -> str:
    """Description of member j of the base model with seed `base_seed`."""
    return f"model seed {base_seed}{ENSEMBLES.get(ensemble.kind).member_suffix(ensemble, j)}"


def member_labels(ensemble: EnsembleSpec) -> list[str]:
    """One description per member, in the order members are built."""
    return [member_label(ensemble, s, j) for s in base_seeds(ensemble) for j in range(members_per_model(ensemble))]


def check_setting(task: TaskSpec, method: MethodSpec, ensemble: EnsembleSpec) -> None:
    """Raise a UserError when the ensemble kind cannot serve this task and method."""
    kind = ENSEMBLES.get(ensemble.kind)
    if kind.check is not None:
        kind.check(task, method, ensemble)


def differentiated_model(model: nn.Module, ensemble: EnsembleSpec) -> nn.Module:
    """The module whose trainable parameters the members of this ensemble differentiate (for sizing)."""
    kind = ENSEMBLES.get(ensemble.kind)
    return kind.differentiated(model, ensemble) if kind.differentiated else model


def build_members(task: TaskSpec, ensemble: EnsembleSpec, method: MethodSpec, bases: list[TrainedModel],
                  dataset: Dataset, store: Store, device: torch.device,
                  test_positions: torch.Tensor) -> Iterator[Member]:
    """Yield the members in order (LoRA adapters are fine-tuned or loaded as they are reached)."""
    ctx = MemberContext(task, ensemble, method, dataset, store, device, test_positions)
    build = ENSEMBLES.get(ensemble.kind).build
    for base in bases:
        yield from build(ctx, base)


def members_per_model(ensemble: EnsembleSpec) -> int:
    """Members built from each base model."""
    return ENSEMBLES.get(ensemble.kind).members_per_model(ensemble)


def needs_preparing(ensemble: EnsembleSpec) -> bool:
    """True when the kind has stored work to do per member before members are built (`EnsembleKind.prepare`)."""
    return ENSEMBLES.get(ensemble.kind).prepare is not None


def prepare_member(ctx: MemberContext, base: TrainedModel, j: int) -> None:
    """The kind's stored work for member j of `base` (see `EnsembleKind.prepare`)."""
    prepare = ENSEMBLES.get(ctx.ensemble.kind).prepare
    if prepare is not None:
        prepare(ctx, base, j)


def build_member(ctx: MemberContext, base: TrainedModel, j: int) -> Member:
    """Member j of `base` alone (the builder passes the earlier ones, which cost little once prepared)."""
    return next(itertools.islice(ENSEMBLES.get(ctx.ensemble.kind).build(ctx, base), j, None))


# --- naive and the projection-seed control ------------------------------------------------------------
def _naive_members(ctx: MemberContext, base: TrainedModel) -> Iterator[Member]:
    yield ctx.member(base, 0, ctx.plain_source(base.model))


def _projection_seed_members(ctx: MemberContext, base: TrainedModel) -> Iterator[Member]:
    plain = ctx.plain_source(base.model)
    for j in range(ctx.ensemble.P):
        yield ctx.member(base, j, plain)


# --- dropout ------------------------------------------------------------------------------------------
def _rates(model: nn.Module, ensemble: EnsembleSpec) -> dict[str, float]:
    rates = dropout_rates(model)
    if not rates:
        raise UserError(f"model {type(model).__name__} has no dropout layers; use --ensemble naive, lora or proj-seeds")
    return rates if ensemble.dropout_p is None else {k: ensemble.dropout_p for k in rates}


def _mask_seeds(ctx: MemberContext, base: TrainedModel) -> list[int]:
    return [derive_seed(ctx.ensemble.seed, "mask", base.seed, d) for d in range(ctx.ensemble.D)]


def _mask_shapes(ctx: MemberContext, model: nn.Module) -> dict[str, tuple[int, ...]]:
    return mask_shapes(model, ctx.dataset.x_train[:1].to(ctx.device))


def _fresh_masks(shapes, rates, n: int, seed: int, split: str) -> dict[str, torch.Tensor]:  # noqa: ANN001
    return draw_masks(shapes, rates, n, torch.Generator().manual_seed(derive_seed(seed, split)))


def _dropout_members(ctx: MemberContext, base: TrainedModel) -> Iterator[Member]:
    ens, model = ctx.ensemble, base.model
    rates, shapes = _rates(model, ens), _mask_shapes(ctx, model)
    names = all_param_names(model)
    for d, ms in enumerate(_mask_seeds(ctx, base)):
        variant = {"masks": ens.masks, "mask_seed": ms, "rates": rates}
        if ens.masks == "fixed":
            train = test = GradientSource(model, names, ctx.task.sequence, fixed_masks(shapes, rates, ms, ctx.device))
        else:
            test_m = _fresh_masks(shapes, rates, ctx.dataset.n_test, ms, "test")
            train = GradientSource(model, names, ctx.task.sequence,
                                   _fresh_masks(shapes, rates, ctx.dataset.n_train, ms, "train"), True)
            test = GradientSource(model, names, ctx.task.sequence,
                                  {k: v[ctx.test_positions] for k, v in test_m.items()}, True)
        yield ctx.member(base, d, train, test, variant, shared=ens.shared_projection)


# --- dropout, forward-only --------------------------------------------------------------------------------
@torch.no_grad()
def mask_averaged_q(model: nn.Module, masks: list[dict[str, torch.Tensor]], x: torch.Tensor, y: torch.Tensor,
                    device: torch.device, batch: int = 1024) -> torch.Tensor:
    """Q = 1 - p of the correct class averaged over D masked forward passes (forward-only)."""
    model.eval()
    out = []
    for start in range(0, len(x), batch):
        xb, yb = x[start:start + batch].to(device), y[start:start + batch].to(device)
        p = mask_averaged_probabilities(model, masks, xb).gather(-1, yb.unsqueeze(-1)).squeeze(-1)
        out.append(1.0 - p)
    return torch.cat(out)


def _forward_only_check(task: TaskSpec, method: MethodSpec, ensemble: EnsembleSpec) -> None:
    """With the plain gradient the masks enter only TRAK's Q; where there is no Q the member is the naive one."""
    if ensemble.forward_grad != "plain":
        return
    if task.sequence:
        raise UserError("dropout-forward would compute exactly the naive member here: its masks enter only TRAK's "
                        "Q = 1 - p, and sequence targets have no Q; use --ensemble dropout (or --forward-grad "
                        "mask-mean for the gradient of the mask-averaged target)")
    if not method_record(method.name).uses_q:
        raise UserError(f"dropout-forward would compute exactly the naive member with {method.name}: its masks "
                        "enter only TRAK's Q, which this method does not use; use --method trak, --ensemble dropout "
                        "or --forward-grad mask-mean")


def _forward_members(ctx: MemberContext, base: TrainedModel) -> Iterator[Member]:
    ens, model = ctx.ensemble, base.model
    rates, shapes = _rates(model, ens), _mask_shapes(ctx, model)
    mask_seeds = _mask_seeds(ctx, base)
    masks = [fixed_masks(shapes, rates, ms, ctx.device) for ms in mask_seeds]
    if ens.forward_grad == "plain":  # plain gradient (the naive member's), Q over the masks
        def forward_q(dataset: Dataset, device: torch.device) -> torch.Tensor:
            return mask_averaged_q(model, masks, dataset.x_train, dataset.y_train, device)

        yield ctx.member(base, 0, ctx.plain_source(model), forward_q=forward_q)
    else:  # gradient of the mask-averaged target; its p is the mask-averaged p
        average = GradientSource(model, all_param_names(model), ctx.task.sequence, average_masks=masks)
        yield ctx.member(base, 0, average, variant={"grad": "mask-mean", "mask_seeds": mask_seeds, "rates": rates})


# --- LoRA ---------------------------------------------------------------------------------------------
def adapter_seed(ensemble: EnsembleSpec, base_seed: int, li: int) -> int:
    """Seed of adapter li of a base model (its initialisation and its fine-tuning order and masks)."""
    return derive_seed(ensemble.seed, "lora", base_seed, li)


def lora_test_losses(task: str | TaskSpec, ensemble: EnsembleSpec, *, store: Store | str | None = None,
                     device: str = "auto", progress: Progress | None = None) -> pd.DataFrame:
    """What a LoRA ensemble's fine-tunes do to the model: test loss and accuracy of each base model
    (`adapter` -1) and of each of its members (the base model plus adapter l), one row each. Base models and
    adapters come from the store, or are trained and fine-tuned (and stored) as for attribution."""
    if ensemble.kind != "lora":
        raise UserError(f"lora_test_losses needs a LoRA ensemble, got kind {ensemble.kind!r}")
    task, ctx = resolve(task, store, device, progress)
    dataset = load_dataset(task.dataset)
    rows = []
    for base in load_or_train(task, base_seeds(ensemble), store=ctx.store, device=ctx.device, dataset=dataset,
                              progress=progress):
        models = [(-1, base.model)] + [
            (li, load_or_finetune_lora(task, ensemble, base, dataset, ctx.store, ctx.device,
                                       adapter_seed(ensemble, base.seed, li))[0]) for li in range(ensemble.L)]
        for li, model in models:
            metrics = evaluate(model, dataset.x_test, dataset.y_test, task.sequence)
            rows.append({"base_seed": base.seed, "adapter": li, "test_loss": metrics["loss"],
                         "test_accuracy": metrics["accuracy"]})
    return pd.DataFrame(rows)


def _adapter(ctx: MemberContext, base: TrainedModel, li: int) -> tuple[nn.Module, float, int, str, bool]:
    return load_or_finetune_lora(ctx.task, ctx.ensemble, base, ctx.dataset, ctx.store, ctx.device,
                                 adapter_seed(ctx.ensemble, base.seed, li))


def _lora_members(ctx: MemberContext, base: TrainedModel) -> Iterator[Member]:
    ens = ctx.ensemble
    for li in range(ens.L):
        t0 = time.perf_counter()
        peft_model, finetune_s, nbytes, key, loaded = _adapter(ctx, base, li)
        finetune_now_s = 0.0 if loaded else time.perf_counter() - t0
        if ens.lora_grad == "merged":
            net = copy.deepcopy(peft_model).merge_and_unload().eval().requires_grad_(True)  # peft froze it
            source = ctx.plain_source(net)
        else:
            source = ctx.plain_source(peft_model.eval())
        yield ctx.member(base, li, source, variant={"adapter": key, "grad": ens.lora_grad},
                         shared=ens.shared_projection, finetune_s=finetune_s, finetune_now_s=finetune_now_s,
                         adapter_bytes=nbytes, adapter_key=key)


def _lora_differentiated(model: nn.Module, ensemble: EnsembleSpec) -> nn.Module:
    return with_adapter(model, ensemble).eval() if ensemble.lora_grad == "adapter" else model


register_kind(EnsembleKind(
    "naive", "naive (I models)", _naive_members,
    description="I independently trained models, one member each"))
register_kind(EnsembleKind(
    "dropout", "Dropout (I x D)", _dropout_members, lambda e: e.D, "D", "dropout masks",
    ("dropout_p", "masks", "shared_projection"), lambda e, j: f", mask seed {j}",
    description="member (i, d): model i with dropout fixed to mask d, on the training and the test side"))
register_kind(EnsembleKind(
    "dropout-forward", "Dropout forward-only", _forward_members, lambda e: 1, "D", "dropout masks",
    ("dropout_p", "forward_grad"), lambda e, j: f", Q over {e.D} masks", check=_forward_only_check,
    description="one member per model; the D masks enter only forward-only quantities (TRAK's Q)"))
register_kind(EnsembleKind(
    "lora", "LoRA (I x L)", _lora_members, lambda e: e.L, "L", "LoRA fine-tunes",
    ("lora_rank", "lora_alpha", "lora_epochs", "lora_lr", "lora_grad", "shared_projection"),
    lambda e, j: f", adapter seed {j}", differentiated=_lora_differentiated,
    description="member (i, l): model i after a short LoRA fine-tune with its own seed", prepare=_adapter))
register_kind(EnsembleKind(
    "proj-seeds", "control: projection seeds (I x P)", _projection_seed_members, lambda e: e.P, "P",
    "projection seeds", (), lambda e, j: f", projection {j}",
    description="the control: the same model with P projection seeds (averages projection noise only)"))
