"""The benchmark MLP: in-128-64-classes, ReLU, dropout after each hidden layer."""
from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from .dropout import MaskableDropout
from .stacked import stacked_linear


class MLP(nn.Module):
    """784-128-64-10 in the MNIST benchmark; the input size follows the dataset."""

    dropout_layers = ("drop1", "drop2")
    lora_targets = ("fc1", "fc2", "fc3")

    def __init__(self, in_features: int = 784, hidden: tuple[int, int] = (128, 64), n_classes: int = 10,
                 dropout: float = 0.1) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden[0])
        self.drop1 = MaskableDropout(dropout)
        self.fc2 = nn.Linear(hidden[0], hidden[1])
        self.drop2 = MaskableDropout(dropout)
        self.fc3 = nn.Linear(hidden[1], n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.drop1(torch.relu(self.fc1(x.flatten(1))))
        h = self.drop2(torch.relu(self.fc2(h)))
        return self.fc3(h)

    def forward_stacked(self, params: Mapping[str, torch.Tensor], buffers: Mapping[str, torch.Tensor],
                        x: torch.Tensor, masks: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """K MLPs as batched matrix products (see `models.stacked`): x (K, B, ...) -> logits (K, B, classes)."""
        h = masks["drop1"] * torch.relu(stacked_linear(params, "fc1", x.flatten(2)))
        h = masks["drop2"] * torch.relu(stacked_linear(params, "fc2", h))
        return stacked_linear(params, "fc3", h)
