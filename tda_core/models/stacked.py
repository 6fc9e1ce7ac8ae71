"""Building blocks for `forward_stacked`: K models of one architecture computed at once.

A model class may define ``forward_stacked(params, buffers, x, masks)``: `params` and `buffers` hold every
parameter and buffer stacked over K models (``(K, *shape)``, under the module's own names), x is
``(K, B, ...)`` (each model its own batch), `masks` ``(K, B, ...)`` per dropout layer; it returns the K models'
outputs ``(K, B, ...)`` in training mode, updating BatchNorm running statistics in `buffers` per model.
`tda_core.training.train_many` uses it instead of `vmap` where it exists.
"""
from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn


def stacked_linear(params: Mapping[str, torch.Tensor], name: str, x: torch.Tensor) -> torch.Tensor:
    """x (K, B, in) through K Linear layers `name`: one batched product, weights (K, out, in), biases (K, out)."""
    return torch.baddbmm(params[f"{name}.bias"].unsqueeze(1), x, params[f"{name}.weight"].transpose(1, 2))


def grouped(x: torch.Tensor) -> torch.Tensor:
    """(K, B, C, H, W) images -> (B, K * C, H, W) channels-last: the K models' channels side by side, so one
    grouped convolution (groups = K) and one BatchNorm over K * C channels compute every model at once."""
    k, b = x.shape[:2]
    return x.transpose(0, 1).reshape(b, k * x.shape[2], *x.shape[3:]).contiguous(memory_format=torch.channels_last)


def stacked_conv_bn(conv: nn.Conv2d, bn: nn.BatchNorm2d, names: tuple[str, str], params: Mapping[str, torch.Tensor],
                    buffers: Mapping[str, torch.Tensor], h: torch.Tensor) -> torch.Tensor:
    """Conv2d (no bias) then BatchNorm2d in training mode, for K models in the `grouped` layout; `conv` and `bn`
    give the hyperparameters, `names` their module names. Running statistics are updated per model in place."""
    conv_name, bn_name = names
    weight = params[f"{conv_name}.weight"]
    h = F.conv2d(h, weight.flatten(0, 1), stride=conv.stride, padding=conv.padding, groups=weight.shape[0])
    buffers[f"{bn_name}.num_batches_tracked"].add_(1)
    return F.batch_norm(h, buffers[f"{bn_name}.running_mean"].view(-1), buffers[f"{bn_name}.running_var"].view(-1),
                        params[f"{bn_name}.weight"].flatten(), params[f"{bn_name}.bias"].flatten(),
                        training=True, momentum=bn.momentum, eps=bn.eps)
