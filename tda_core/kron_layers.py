"""Layer types the Kronecker projection covers: one small adapter per module type, registered by type.

For a covered layer the per-example weight gradient is G = sum_t g_t a_t^T over its positions t (tokens,
pixels), with g_t the output gradient and a_t the input (a constant 1 appended for a bias). The Kronecker JL
feature r of that layer is u_r^T G v_r / sqrt(k): two separate sketches (u for the output side, v for the
input side) multiplied, never a params x k matrix. An adapter says, for its module type, which parameters
it covers, the two sides' sizes, and how to turn one call's input and output gradient into the [B, k]
contribution. To cover a new layer type, write one adapter and `register_layer` it here.
"""
from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F
from torch import nn


@dataclasses.dataclass
class KronLayer:
    """One covered layer inside a Kronecker projection: its module, side sizes and Gaussian sketches."""

    name: str
    module: nn.Module
    adapter: LayerAdapter
    d_out: int
    d_in: int  # includes the bias column when the layer has a bias
    u: torch.Tensor  # [d_out, k] standard Gaussian, sketches output gradients
    v: torch.Tensor  # [d_in, k] standard Gaussian, sketches inputs

    @property
    def k(self) -> int:
        return self.u.shape[1]


def combine_sketches(gu: torch.Tensor, av: torch.Tensor) -> torch.Tensor:
    """[B, T, k] sketches of output gradients and inputs -> [B, k], summed over positions T."""
    return (gu * av).sum(1) / math.sqrt(gu.shape[-1])


def combine_gradient(layer: KronLayer, grad_w: torch.Tensor) -> torch.Tensor:
    """[B, out, in] weight gradients G -> [B, k] with feature r = u_r^T G v_r (smaller side contracted last)."""
    if layer.d_out <= layer.d_in:
        return ((grad_w @ layer.v) * layer.u).sum(1) / math.sqrt(layer.k)
    return ((grad_w.transpose(1, 2) @ layer.u) * layer.v).sum(1) / math.sqrt(layer.k)


def positions_features(layer: KronLayer, g: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """[B, k] from per-position output gradients g [B, T, out] and inputs a [B, T, in]: by summing sketches
    over positions, or, when positions outnumber what the weight gradient costs, by forming it first."""
    if a.shape[1] * (layer.d_out + layer.d_in) > layer.d_out * layer.d_in:
        return combine_gradient(layer, torch.bmm(g.transpose(1, 2), a))
    return combine_sketches(g @ layer.u, a @ layer.v)


def _with_bias_column(module: nn.Module, a: torch.Tensor) -> torch.Tensor:
    return torch.cat([a, torch.ones_like(a[..., :1])], dim=-1) if module.bias is not None else a


class LayerAdapter:
    """What the Kronecker projection needs to know about one module type."""

    module_type: type[nn.Module] = nn.Module

    def supports(self, module: nn.Module) -> bool:
        """False for configurations the adapter cannot express (their parameters count as uncovered)."""
        return True

    def param_names(self, module: nn.Module) -> list[str]:
        """Local names of the parameters the adapter covers (all must be differentiated)."""
        return ["weight"] + (["bias"] if getattr(module, "bias", None) is not None else [])

    def dims(self, module: nn.Module) -> tuple[int, int]:
        """(output side, input side) of the weight gradient; the input side counts a bias column."""
        raise NotImplementedError

    def positions(self, module: nn.Module, output: torch.Tensor) -> int:
        """Positions per example in one call (tokens, pixels), from the call's output."""
        return output.numel() // output.shape[0] // output.shape[-1]

    def features(self, layer: KronLayer, inp: torch.Tensor, gout: torch.Tensor) -> torch.Tensor:
        """[B, k] contribution of one call of the layer, from its input and its output's gradient."""
        raise NotImplementedError


class LinearAdapter(LayerAdapter):
    """nn.Linear over any leading dimensions (each leading position is a position)."""

    module_type = nn.Linear

    def dims(self, module: nn.Module) -> tuple[int, int]:
        return module.out_features, module.in_features + (module.bias is not None)

    def features(self, layer: KronLayer, inp: torch.Tensor, gout: torch.Tensor) -> torch.Tensor:
        b = gout.shape[0]
        a = _with_bias_column(layer.module, inp.reshape(b, -1, inp.shape[-1]))
        return positions_features(layer, gout.reshape(b, -1, gout.shape[-1]), a)


class Conv2dAdapter(LayerAdapter):
    """nn.Conv2d (zero padding, one group): each output pixel is a position over its unfolded input patch."""

    module_type = nn.Conv2d

    def supports(self, module: nn.Module) -> bool:
        return module.groups == 1 and module.padding_mode == "zeros" and not isinstance(module.padding, str)

    def dims(self, module: nn.Module) -> tuple[int, int]:
        kh, kw = module.kernel_size
        return module.out_channels, module.in_channels * kh * kw + (module.bias is not None)

    def positions(self, module: nn.Module, output: torch.Tensor) -> int:
        return output.numel() // output.shape[0] // output.shape[1]

    def features(self, layer: KronLayer, inp: torch.Tensor, gout: torch.Tensor) -> torch.Tensor:
        m = layer.module
        a = F.unfold(inp, m.kernel_size, m.dilation, m.padding, m.stride).transpose(1, 2)  # [B, L, C*kh*kw]
        return positions_features(layer, gout.flatten(2).transpose(1, 2), _with_bias_column(m, a))


class EmbeddingAdapter(LayerAdapter):
    """nn.Embedding: the gradient of its table [vocab, dim] scatters each token's output gradient to its row;
    the output side is the embedding dimension, the input side the vocabulary (a one-hot input)."""

    module_type = nn.Embedding

    def param_names(self, module: nn.Module) -> list[str]:
        return ["weight"]

    def dims(self, module: nn.Module) -> tuple[int, int]:
        return module.embedding_dim, module.num_embeddings

    def features(self, layer: KronLayer, inp: torch.Tensor, gout: torch.Tensor) -> torch.Tensor:
        m, b = layer.module, gout.shape[0]
        tokens = inp.reshape(b, -1)
        g = gout.reshape(b, tokens.shape[1], -1)
        if m.padding_idx is not None:
            g = g * (tokens != m.padding_idx).unsqueeze(-1)
        if tokens.shape[1] == 1:
            return combine_sketches(g @ layer.u, layer.v[tokens])
        grad_t = g.new_zeros(b, layer.d_in, layer.d_out).scatter_add_(
            1, tokens.unsqueeze(-1).expand(-1, -1, layer.d_out), g)  # [B, vocab, dim]
        return combine_gradient(layer, grad_t.transpose(1, 2))


LAYER_ADAPTERS: dict[type[nn.Module], LayerAdapter] = {}


def register_layer(adapter: LayerAdapter) -> LayerAdapter:
    """Cover a module type (and its subclasses) in the Kronecker projection."""
    LAYER_ADAPTERS[adapter.module_type] = adapter
    return adapter


def adapter_for(module: nn.Module) -> LayerAdapter | None:
    """The adapter of a module's type (nearest registered base class), or None when it is not covered."""
    for cls in type(module).__mro__:
        if cls in LAYER_ADAPTERS:
            adapter = LAYER_ADAPTERS[cls]
            return adapter if adapter.supports(module) else None
    return None


for _adapter in (LinearAdapter(), Conv2dAdapter(), EmbeddingAdapter()):
    register_layer(_adapter)
