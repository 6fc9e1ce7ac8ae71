"""LoRA adapters with peft: configuration on a model's declared targets, fine-tuning, and the store.

Adapters are stored (never merged copies); a member is the base model plus one adapter, nothing else.
BatchNorm layers keep the base model's running statistics: fine-tuning runs them in eval mode (dropout
stays on through explicit masks), so the function fine-tuned is the one attributed, and a member loaded
from the store is bit-identical to the member just tuned. Adapters of models with BatchNorm carry
`BATCHNORM_SCHEME` in their store keys (adapters tuned with train-mode BatchNorm differ); keys of models
without BatchNorm are as they were.
"""
from __future__ import annotations

import copy
import time

import torch
from torch import nn

from .data import Dataset
from .errors import UserError
from .features import derive_seed
from .models.dropout import draw_masks, mask_shapes, use_masks
from .objectives import per_example_loss
from .specs import EnsembleSpec, TaskSpec
from .store import Store, spec_key
from .training import TrainedModel, dropout_rates

ADAPTER_KIND = "adapters"
BATCHNORM_SCHEME = "running statistics of the base model (eval-mode BatchNorm while fine-tuning)"


def lora_config(model: nn.Module, ensemble: EnsembleSpec):  # noqa: ANN201 - a peft LoraConfig
    """peft LoRA configuration on the model's declared target modules."""
    from peft import LoraConfig

    targets = list(getattr(model, "lora_targets", ()))
    if not targets:
        raise UserError(f"model {type(model).__name__} names no LoRA target modules; use another ensemble kind")
    return LoraConfig(r=ensemble.lora_rank, lora_alpha=ensemble.lora_alpha, target_modules=targets,
                      lora_dropout=0.0, bias="none")


def with_adapter(model: nn.Module, ensemble: EnsembleSpec, seed: int = 0) -> nn.Module:
    """A peft model: a copy of `model` with a fresh adapter whose initialisation (A) is drawn from `seed`."""
    from peft import get_peft_model

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # peft draws A from the global RNG
        return get_peft_model(copy.deepcopy(model), lora_config(model, ensemble))


def load_or_finetune_lora(task: TaskSpec, ensemble: EnsembleSpec, base: TrainedModel, dataset: Dataset,
                          store: Store, device: torch.device, seed: int) -> tuple[nn.Module, float, int, str, bool]:
    """A peft model (base + adapter `seed`): the adapter from the store, or fine-tuned now and stored.

    Returns (peft model, fine-tuning seconds as recorded, adapter bytes, adapter store key, loaded).
    """
    from peft import get_peft_model_state_dict, set_peft_model_state_dict

    config = lora_config(base.model, ensemble)
    batchnorm = {"batchnorm": BATCHNORM_SCHEME} if _batchnorms(base.model) else {}
    key = spec_key({"checkpoint": base.key, "rank": ensemble.lora_rank, "alpha": ensemble.lora_alpha,
                    "epochs": ensemble.lora_epochs, "lr": ensemble.lora_lr, "targets": sorted(config.target_modules),
                    "seed": seed, **batchnorm})
    peft_model = with_adapter(base.model, ensemble, seed).to(device)

    def compute():
        t0 = time.perf_counter()
        _finetune(peft_model, task, dataset, ensemble, seed, device)
        meta = {"finetune_s": time.perf_counter() - t0, "checkpoint": base.key, "seed": seed}
        return get_peft_model_state_dict(peft_model), meta

    art, loaded = store.get_or_create(ADAPTER_KIND, key, compute)
    if loaded:
        set_peft_model_state_dict(peft_model, {k: v.to(device) for k, v in art.tensors.items()})
    return peft_model.eval(), float(art.meta["finetune_s"]), art.nbytes, key, loaded


def _batchnorms(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def _finetune(peft_model: nn.Module, task: TaskSpec, dataset: Dataset, ensemble: EnsembleSpec, seed: int,
              device: torch.device) -> None:
    """Adam on the adapter weights over the full training set, with the model's own dropout and its BatchNorm
    layers in eval mode (normalising by, and leaving unchanged, the base model's running statistics)."""
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
    for bn in _batchnorms(peft_model):
        bn.eval()
    for _ in range(ensemble.lora_epochs):
        for idx in torch.randperm(len(x), generator=shuffle).split(task.recipe.batch_size):
            idx = idx.to(device)
            with use_masks(inner, draw_masks(shapes, rates, len(idx), mask_gen)):
                loss = per_example_loss(peft_model(x[idx]), y[idx], task.sequence).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    peft_model.eval()
