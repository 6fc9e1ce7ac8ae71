"""Members from base models: naive, dropout (fixed or fresh masks), dropout-forward, LoRA, proj-seeds.

A member is a model state plus the masks its gradients see and the seed of its projection.
Projection seeds come from (method seed, base seed, j): member j of a base model gets its own
projection, or projection 0 with `shared_projection` (so a mask or adapter effect is measured
alone). Naive members and proj-seeds member 0 use projection 0, hence proj-seeds with P = 1 is
the naive ensemble and a shared-projection member with p = 0 (or B = 0) is its base member.
LoRA adapters are fine-tuned with peft and stored (never merged copies); gradients are taken
over the merged weights (default) or over the adapter weights only.
"""
from __future__ import annotations

import copy
import dataclasses
import time
from collections.abc import Iterator

import torch
from peft import LoraConfig, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
from torch import nn

from .data import Dataset
from .errors import UserError
from .features import GradientSource, all_param_names, derive_seed, mask_averaged_probabilities
from .models.dropout import draw_masks, fixed_masks, mask_shapes, use_masks
from .objectives import per_example_loss
from .specs import EnsembleSpec, MethodSpec, TaskSpec
from .store import Store, spec_key
from .training import TrainedModel, dropout_rates

ADAPTER_KIND = "adapters"


@dataclasses.dataclass
class Member:
    """One member: what to differentiate on the train and test side, its projection seed and its costs."""

    description: str
    base: TrainedModel
    train_source: GradientSource
    test_source: GradientSource
    proj_seed: int
    variant: dict  # identifies the gradient function (part of the feature-cache key)
    q_masks: list[dict[str, torch.Tensor]] | None = None  # dropout-forward: the D masks averaged into Q
    finetune_s: float = 0.0  # fine-tuning seconds as recorded when the adapter was trained
    finetune_now_s: float = 0.0  # seconds spent fine-tuning in this call (0 when the adapter was stored)
    adapter_bytes: int = 0
    adapter_key: str | None = None


def base_seeds(ensemble: EnsembleSpec) -> list[int]:
    """Seeds of the I independently trained base models."""
    return [ensemble.seed + i for i in range(ensemble.I)]


def projection_seed(method: MethodSpec, base_seed: int, j: int) -> int:
    """Seed of projection j of a base model."""
    return derive_seed(method.seed, "projection", base_seed, j)


def member_labels(ensemble: EnsembleSpec) -> list[str]:
    """One description per member, in the order members are built."""
    inner = {"naive": (1, ""), "dropout": (ensemble.D, "mask seed"), "dropout-forward": (1, ""),
             "lora": (ensemble.L, "adapter seed"), "proj-seeds": (ensemble.P, "projection")}[ensemble.kind]
    labels = []
    for s in base_seeds(ensemble):
        for j in range(inner[0]):
            extra = f", {inner[1]} {j}" if inner[1] else ""
            if ensemble.kind == "dropout-forward":
                extra = f", Q over {ensemble.D} masks"
            labels.append(f"model seed {s}{extra}")
    return labels


def _rates(model: nn.Module, ensemble: EnsembleSpec) -> dict[str, float]:
    rates = dropout_rates(model)
    if not rates:
        raise UserError(f"model {type(model).__name__} has no dropout layers; use --ensemble naive, lora or proj-seeds")
    return rates if ensemble.dropout_p is None else {k: ensemble.dropout_p for k in rates}


def _fresh_masks(shapes, rates, n: int, seed: int, split: str) -> dict[str, torch.Tensor]:
    return draw_masks(shapes, rates, n, torch.Generator().manual_seed(derive_seed(seed, split)))


def build_members(task: TaskSpec, ensemble: EnsembleSpec, method: MethodSpec, bases: list[TrainedModel],
                  dataset: Dataset, store: Store, device: torch.device,
                  test_positions: torch.Tensor) -> Iterator[Member]:
    """Yield the members in order (LoRA adapters are fine-tuned or loaded as they are reached)."""
    labels = iter(member_labels(ensemble))
    for base in bases:
        model, s = base.model, base.seed
        plain = GradientSource(model, all_param_names(model), task.sequence)
        if ensemble.kind in ("naive", "proj-seeds"):
            for j in range(ensemble.P if ensemble.kind == "proj-seeds" else 1):
                yield Member(next(labels), base, plain, plain, projection_seed(method, s, j), {"grad": "plain"})
        elif ensemble.kind in ("dropout", "dropout-forward"):
            rates = _rates(model, ensemble)
            shapes = mask_shapes(model, dataset.x_train[:1].to(device))
            mask_seeds = [derive_seed(ensemble.seed, "mask", s, d) for d in range(ensemble.D)]
            if ensemble.kind == "dropout-forward":
                q_masks = [fixed_masks(shapes, rates, ms, device) for ms in mask_seeds]
                if ensemble.forward_grad == "plain":  # plain gradient (the naive member's), Q over the masks
                    yield Member(next(labels), base, plain, plain, projection_seed(method, s, 0),
                                 {"grad": "plain"}, q_masks=q_masks)
                else:  # gradient of the mask-averaged target; its p is the mask-averaged p
                    avg = GradientSource(model, plain.param_names, task.sequence, average_masks=q_masks)
                    yield Member(next(labels), base, avg, avg, projection_seed(method, s, 0),
                                 {"grad": "mask-mean", "mask_seeds": mask_seeds, "rates": rates})
                continue
            for d, ms in enumerate(mask_seeds):
                variant = {"masks": ensemble.masks, "mask_seed": ms, "rates": rates}
                if ensemble.masks == "fixed":
                    m = fixed_masks(shapes, rates, ms, device)
                    tr = te = GradientSource(model, plain.param_names, task.sequence, m)
                else:
                    test_m = _fresh_masks(shapes, rates, dataset.n_test, ms, "test")
                    tr = GradientSource(model, plain.param_names, task.sequence,
                                        _fresh_masks(shapes, rates, dataset.n_train, ms, "train"), True)
                    te = GradientSource(model, plain.param_names, task.sequence,
                                        {k: v[test_positions] for k, v in test_m.items()}, True)
                j = 0 if ensemble.shared_projection else d
                yield Member(next(labels), base, tr, te, projection_seed(method, s, j), variant)
        else:  # lora
            for li in range(ensemble.L):
                t0 = time.perf_counter()
                peft_model, finetune_s, nbytes, key, loaded = load_or_finetune_lora(
                    task, ensemble, base, dataset, store, device, derive_seed(ensemble.seed, "lora", s, li))
                finetune_now_s = 0.0 if loaded else time.perf_counter() - t0
                if ensemble.lora_grad == "merged":
                    net = copy.deepcopy(peft_model).merge_and_unload().eval().requires_grad_(True)  # peft froze it
                    src = GradientSource(net, all_param_names(net), task.sequence)
                else:
                    src = GradientSource(peft_model.eval(), all_param_names(peft_model), task.sequence)
                j = 0 if ensemble.shared_projection else li
                yield Member(next(labels), base, src, src, projection_seed(method, s, j),
                             {"adapter": key, "grad": ensemble.lora_grad}, finetune_s=finetune_s,
                             finetune_now_s=finetune_now_s, adapter_bytes=nbytes, adapter_key=key)


# --- LoRA ---------------------------------------------------------------------------------------
def lora_config(model: nn.Module, ensemble: EnsembleSpec) -> LoraConfig:
    """peft LoRA configuration on the model's declared target modules."""
    targets = list(getattr(model, "lora_targets", ()))
    if not targets:
        raise UserError(f"model {type(model).__name__} names no LoRA target modules; use another ensemble kind")
    return LoraConfig(r=ensemble.lora_rank, lora_alpha=ensemble.lora_alpha, target_modules=targets,
                      lora_dropout=0.0, bias="none")


def load_or_finetune_lora(task: TaskSpec, ensemble: EnsembleSpec, base: TrainedModel, dataset: Dataset,
                          store: Store, device: torch.device, seed: int) -> tuple[nn.Module, float, int, str, bool]:
    """A peft model (base + adapter `seed`): the adapter from the store, or fine-tuned now and stored.

    Returns (peft model, fine-tuning seconds as recorded, adapter bytes, adapter store key, loaded).
    """
    config = lora_config(base.model, ensemble)
    key = spec_key({"checkpoint": base.key, "rank": ensemble.lora_rank, "alpha": ensemble.lora_alpha,
                    "epochs": ensemble.lora_epochs, "lr": ensemble.lora_lr, "targets": sorted(config.target_modules),
                    "seed": seed})
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # adapter initialisation (A) is drawn from the global RNG
        peft_model = get_peft_model(copy.deepcopy(base.model), config).to(device)

    def compute():
        t0 = time.perf_counter()
        _finetune(peft_model, task, dataset, ensemble, seed, device)
        meta = {"finetune_s": time.perf_counter() - t0, "checkpoint": base.key, "seed": seed}
        return get_peft_model_state_dict(peft_model), meta

    art, loaded = store.get_or_create(ADAPTER_KIND, key, compute)
    if loaded:
        set_peft_model_state_dict(peft_model, {k: v.to(device) for k, v in art.tensors.items()})
    return peft_model.eval(), float(art.meta["finetune_s"]), art.nbytes, key, loaded


def _finetune(peft_model: nn.Module, task: TaskSpec, dataset: Dataset, ensemble: EnsembleSpec, seed: int,
              device: torch.device) -> None:
    """Adam on the adapter weights over the full training set, with the model's own dropout."""
    inner = peft_model.base_model.model
    params = [p for p in peft_model.parameters() if p.requires_grad]
    if ensemble.lora_epochs == 0:
        return
    opt = torch.optim.Adam(params, lr=ensemble.lora_lr)
    x, y = dataset.x_train.to(device), dataset.y_train.to(device)
    shapes, rates = mask_shapes(inner, x[:1]), dropout_rates(inner)
    shuffle = torch.Generator().manual_seed(derive_seed(seed, "shuffle"))
    mask_gen = torch.Generator(device=device).manual_seed(derive_seed(seed, "dropout"))
    peft_model.train()
    for _ in range(ensemble.lora_epochs):
        for idx in torch.randperm(len(x), generator=shuffle).split(task.recipe.batch_size):
            idx = idx.to(device)
            with use_masks(inner, draw_masks(shapes, rates, len(idx), mask_gen)):
                loss = per_example_loss(peft_model(x[idx]), y[idx], task.sequence).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    peft_model.eval()


# --- dropout-forward ----------------------------------------------------------------------------
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
