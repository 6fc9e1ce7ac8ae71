"""Model registry. Each model names its dropout layers (`dropout_layers`) and LoRA targets (`lora_targets`)."""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from ..errors import unknown_choice
from .mlp import MLP
from .music_transformer import MusicTransformer
from .resnet9 import ResNet9

MODELS: dict[str, Callable[..., nn.Module]] = {"mlp": MLP, "resnet9": ResNet9, "music-transformer": MusicTransformer}


def build_model(name: str, **kwargs: Any) -> nn.Module:
    """Instantiate a registered model; unknown names list the valid ones."""
    if name not in MODELS:
        raise unknown_choice("model", name, sorted(MODELS))
    return MODELS[name](**kwargs)


def n_parameters(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
