"""ResNet-9, the fast CIFAR network (conv-BN-ReLU blocks, two residual blocks, max-pooling, linear head)."""
from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from .dropout import MaskableDropout
from .stacked import grouped, stacked_conv_bn, stacked_linear


def _conv_bn(c_in: int, c_out: int, pool: bool = False) -> nn.Sequential:
    """Conv 3x3 (no bias), BatchNorm, ReLU, then 2x2 max-pooling when `pool`."""
    layers: list[nn.Module] = [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU()]
    if pool:
        layers.append(nn.MaxPool2d(2))
    return nn.Sequential(*layers)


def _conv_bn_stacked(block: nn.Sequential, name: str, params: Mapping[str, torch.Tensor],
                     buffers: Mapping[str, torch.Tensor], h: torch.Tensor) -> torch.Tensor:
    """`_conv_bn` block `name` for K models in the `grouped` layout."""
    h = torch.relu(stacked_conv_bn(block[0], block[1], (f"{name}.0", f"{name}.1"), params, buffers, h))
    return F.max_pool2d(h, 2) if len(block) > 3 else h


class Residual(nn.Module):
    """x + f(f(x)) with two conv-BN-ReLU blocks."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.block = nn.Sequential(_conv_bn(channels, channels), _conv_bn(channels, channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.block(x)


def _residual_stacked(residual: Residual, name: str, params: Mapping[str, torch.Tensor],
                      buffers: Mapping[str, torch.Tensor], h: torch.Tensor) -> torch.Tensor:
    """`Residual` block `name` for K models in the `grouped` layout."""
    out = h
    for i, block in enumerate(residual.block):
        out = _conv_bn_stacked(block, f"{name}.block.{i}", params, buffers, out)
    return h + out


class ResNet9(nn.Module):
    """ResNet-9 with a dropout layer before the head; `width` scales every channel count (0.25 for CPU)."""

    dropout_layers = ("drop",)

    def __init__(self, n_classes: int = 10, width: float = 1.0, dropout: float = 0.1, in_channels: int = 3) -> None:
        super().__init__()
        c = [max(8, int(round(base * width))) for base in (64, 128, 256, 512)]
        self.prep = _conv_bn(in_channels, c[0])
        self.layer1 = nn.Sequential(_conv_bn(c[0], c[1], pool=True), Residual(c[1]))
        self.layer2 = _conv_bn(c[1], c[2], pool=True)
        self.layer3 = nn.Sequential(_conv_bn(c[2], c[3], pool=True), Residual(c[3]))
        self.pool = nn.AdaptiveMaxPool2d(1)
        self.drop = MaskableDropout(dropout)
        self.head = nn.Linear(c[3], n_classes)
        self.register_buffer("mean", torch.tensor([0.4914, 0.4822, 0.4465]).view(1, 3, 1, 1)[:, :in_channels])
        self.register_buffer("std", torch.tensor([0.2470, 0.2435, 0.2616]).view(1, 3, 1, 1)[:, :in_channels])

    @property
    def lora_targets(self) -> tuple[str, ...]:
        return tuple(name for name, m in self.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = (x - self.mean) / self.std
        x = self.layer3(self.layer2(self.layer1(self.prep(x))))
        return self.head(self.drop(self.pool(x).flatten(1)))

    def forward_stacked(self, params: Mapping[str, torch.Tensor], buffers: Mapping[str, torch.Tensor],
                        x: torch.Tensor, masks: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """K ResNet-9s at once (see `models.stacked`): grouped convolutions and BatchNorms over the K models'
        channels, per-model running statistics; x (K, B, C, H, W) -> logits (K, B, classes)."""
        k, batch = x.shape[:2]
        h = grouped((x - buffers["mean"]) / buffers["std"])
        h = _conv_bn_stacked(self.prep, "prep", params, buffers, h)
        h = _conv_bn_stacked(self.layer1[0], "layer1.0", params, buffers, h)
        h = _residual_stacked(self.layer1[1], "layer1.1", params, buffers, h)
        h = _conv_bn_stacked(self.layer2, "layer2", params, buffers, h)
        h = _conv_bn_stacked(self.layer3[0], "layer3.0", params, buffers, h)
        h = _residual_stacked(self.layer3[1], "layer3.1", params, buffers, h)
        pooled = F.adaptive_max_pool2d(h, 1).reshape(batch, k, -1).transpose(0, 1)  # (K, B, channels)
        return stacked_linear(params, "head", masks["drop"] * pooled)
