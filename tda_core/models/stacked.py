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


class _ColumnBatchNorm(torch.autograd.Function):
    """Training-mode batch normalisation of the columns of rows (N, C): returns (normalised rows, mean, biased
    variance). The per-channel sums are torch's ordinary column sums (cascade summation), as accurate as the
    contiguous BatchNorm kernel; torch's channels-last BatchNorm kernel sums each channel in one float32 chain,
    about 1000x less accurate on MNIST (see docs/bench_training_resnet9.md)."""

    @staticmethod
    def forward(ctx, rows: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float):
        n = rows.shape[0]
        mean = rows.sum(0) / n
        centred = rows - mean
        var = centred.square().sum(0) / n
        invstd = torch.rsqrt(var + eps)
        ctx.save_for_backward(centred, invstd, weight)
        ctx.mark_non_differentiable(mean, var)
        return torch.addcmul(bias, centred, invstd * weight), mean, var

    @staticmethod
    def backward(ctx, grad: torch.Tensor, _grad_mean: torch.Tensor, _grad_var: torch.Tensor):
        centred, invstd, weight = ctx.saved_tensors
        n = centred.shape[0]
        grad_bias = grad.sum(0)
        grad_centred = (grad * centred).sum(0)
        scale = invstd * weight
        # (grad - mean(grad) - centred * mean(grad * centred) / var) * scale, in two passes over the rows
        grad_rows = torch.addcmul(grad_bias * (-scale / n), grad, scale)
        grad_rows.addcmul_(centred, grad_centred * invstd.square() * (-scale / n))
        return grad_rows, grad_centred * invstd, grad_bias, None


def batch_norm_channels_last(h: torch.Tensor, running_mean: torch.Tensor, running_var: torch.Tensor,
                             weight: torch.Tensor, bias: torch.Tensor, momentum: float, eps: float) -> torch.Tensor:
    """`F.batch_norm` in training mode of a channels-last (B, C, H, W) tensor, with accurate channel sums;
    the running statistics are updated in place as BatchNorm2d does (unbiased variance, `momentum`)."""
    b, c, height, width = h.shape
    rows = h.permute(0, 2, 3, 1).reshape(-1, c)  # a view for channels-last h
    out, mean, var = _ColumnBatchNorm.apply(rows, weight, bias, eps)
    with torch.no_grad():
        n = rows.shape[0]
        running_mean.mul_(1 - momentum).add_(mean, alpha=momentum)
        running_var.mul_(1 - momentum).add_(var * (n / (n - 1)), alpha=momentum)
    return out.view(b, height, width, c).permute(0, 3, 1, 2)


def stacked_conv_bn(conv: nn.Conv2d, bn: nn.BatchNorm2d, names: tuple[str, str], params: Mapping[str, torch.Tensor],
                    buffers: Mapping[str, torch.Tensor], h: torch.Tensor) -> torch.Tensor:
    """Conv2d (no bias) then BatchNorm2d in training mode, for K models in the `grouped` layout; `conv` and `bn`
    give the hyperparameters, `names` their module names. Running statistics are updated per model in place."""
    conv_name, bn_name = names
    weight = params[f"{conv_name}.weight"]
    h = F.conv2d(h, weight.flatten(0, 1), stride=conv.stride, padding=conv.padding, groups=weight.shape[0])
    buffers[f"{bn_name}.num_batches_tracked"].add_(1)
    return batch_norm_channels_last(h, buffers[f"{bn_name}.running_mean"].view(-1),
                                    buffers[f"{bn_name}.running_var"].view(-1), params[f"{bn_name}.weight"].flatten(),
                                    params[f"{bn_name}.bias"].flatten(), bn.momentum, bn.eps)
