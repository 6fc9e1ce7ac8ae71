"""Layer types the Kronecker projection covers: one small adapter per module type, registered by type.

For a Kronecker layer (Linear, Conv2d, Embedding) the per-example weight gradient is G = sum_t g_t a_t^T over
its positions t (tokens, pixels), with g_t the output gradient and a_t the input (a constant 1 appended for a
bias). The Kronecker JL feature r of that layer is u_r^T G v_r / sqrt(k): two separate sketches (u for the
output side, v for the input side) multiplied. With many positions the weight gradient is formed first and
contracted with both sides, or, when the projection holds them, with the layer's Kronecker columns u_r (x) v_r
in one matrix product.

The relative-position table of attention is such a layer too (its logits q E^T, with (head, query) positions).
Small parameter blocks (BatchNorm and LayerNorm scales and shifts) are exact blocks: their exact per-example
gradient g [B, n] is projected by a dense standard Gaussian P [n, k], g P / sqrt(k), and added to the same k
features. The projection matrix of the whole model is then the Kronecker columns with these dense rows
appended: still an unbiased JL projection, over every parameter.

An adapter says, for its module type, which parameters it covers, which call it reads (`call_site`), how to
draw its sketches and how to turn one call's input and output gradient into the [B, k] contribution, or into
the exact per-example gradients of its parameters (`gradients`: the dense projection's rows, from the same
hooked pass). To cover a new layer type, write one adapter and `register_layer` it here; parameters of types no
adapter covers are listed by name as `uncovered` by the projection.
"""
from __future__ import annotations

import dataclasses
import math
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from .features import derive_seed
from .models.music_transformer import SelfAttention


@dataclasses.dataclass
class KronLayer:
    """One covered layer inside a Kronecker projection: its module, adapter and Gaussian sketches."""

    name: str
    module: nn.Module
    adapter: LayerAdapter
    u: torch.Tensor  # [d_out, k] standard Gaussian, sketches output gradients (exact block: [n_block, k])
    v: torch.Tensor | None  # [d_in, k] standard Gaussian, sketches inputs (None for an exact block)
    hold_columns: bool = False  # keep the Kronecker columns for formed weight gradients (memory allowing)
    columns: torch.Tensor | None = None  # [d_out * d_in, k]: column r is u_r (x) v_r, built on first use

    @property
    def k(self) -> int:
        return self.u.shape[1]

    @property
    def d_out(self) -> int:
        return self.u.shape[0]

    @property
    def d_in(self) -> int:  # includes the bias column when the layer has a bias
        return 0 if self.v is None else self.v.shape[0]

    @property
    def site(self) -> nn.Module:
        """The module whose calls are hooked."""
        return self.adapter.call_site(self.module)


def gaussian(d: int, width: int, seed: int, device: torch.device) -> torch.Tensor:
    """A [d, width] standard Gaussian from `seed` (drawn on the CPU, so identical on every device)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(d, width, generator=g).to(device)


def combine_sketches(gu: torch.Tensor, av: torch.Tensor) -> torch.Tensor:
    """[B, T, k] sketches of output gradients and inputs -> [B, k], summed over positions T (`gu` is
    overwritten: callers pass a fresh product)."""
    products = gu.mul_(av)
    summed = products.squeeze(1) if products.shape[1] == 1 else products.sum(1)
    return summed.div_(math.sqrt(gu.shape[-1]))


def kronecker_columns(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """[d_out * d_in, k]: column r is vec(u_r v_r^T), row-major like a weight [d_out, d_in] flattened."""
    return (u.unsqueeze(1) * v.unsqueeze(0)).reshape(-1, u.shape[1])


def combine_gradient(layer: KronLayer, grad_w: torch.Tensor) -> torch.Tensor:
    """[B, out, in] weight gradients G -> [B, k] with feature r = u_r^T G v_r: one matrix product with the held
    Kronecker columns, else both sides contracted per example (the smaller side last)."""
    if layer.hold_columns:
        if layer.columns is None:
            layer.columns = kronecker_columns(layer.u, layer.v)
        return grad_w.reshape(grad_w.shape[0], -1) @ layer.columns / math.sqrt(layer.k)
    b, small_last = grad_w.shape[0], layer.d_out <= layer.d_in
    side = grad_w if small_last else grad_w.transpose(1, 2)  # [B, small side, large side]
    first, last = (layer.v, layer.u) if small_last else (layer.u, layer.v)
    sketched = (side.reshape(-1, side.shape[2]) @ first).view(b, side.shape[1], -1)  # one product for the chunk
    return sketched.mul_(last).sum(1) / math.sqrt(layer.k)


def weight_bias_gradients(module: nn.Module, g: torch.Tensor, a: torch.Tensor) -> list[torch.Tensor]:
    """Exact per-example gradients [B, out * in] of a weight (and [B, out] of its bias, if any) from per-position
    output gradients g [B, T, out] and inputs a [B, T, in]: sum_t g_t a_t^T and sum_t g_t."""
    grads = [torch.bmm(g.transpose(1, 2), a).flatten(1)]
    return grads + ([g.sum(1)] if getattr(module, "bias", None) is not None else [])


def positions_features(layer: KronLayer, g: torch.Tensor, a: torch.Tensor, bias: bool = False) -> torch.Tensor:
    """[B, k] from per-position output gradients g [B, T, out] and inputs a [B, T, in] (`bias`: the layer's
    input side has a bias column after a's, whose input is 1): by summing sketches over positions, or, when
    positions outnumber what the weight gradient costs, by forming it first (laid out so that its smaller side
    comes first in memory). The sketch of a bias column is its row of v, added rather than multiplied in."""
    if a.shape[1] * (layer.d_out + layer.d_in) > layer.d_out * layer.d_in:
        if bias:
            a = torch.cat([a, torch.ones_like(a[..., :1])], dim=-1)
        if layer.d_out <= layer.d_in or layer.hold_columns:
            return combine_gradient(layer, torch.bmm(g.transpose(1, 2), a))
        return combine_gradient(layer, torch.bmm(a.transpose(1, 2), g).transpose(1, 2))
    av = torch.matmul(a, layer.v[:-1]).add_(layer.v[-1]) if bias else a @ layer.v
    return combine_sketches(g @ layer.u, av)


class LayerAdapter:
    """What the Kronecker projection needs to know about one module type."""

    module_type: type[nn.Module] = nn.Module
    # True for the types covered since every parameter is (norms, position tables): the features of models with
    # them changed, so their store keys carry the projection's coverage entry; MLP keys do not
    extends_coverage: ClassVar[bool] = False

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
        """Positions per example in one call (tokens, pixels), from the call's output: a call's [B, positions, k]
        sketches bound the examples per chunk."""
        return output.numel() // output.shape[0] // output.shape[-1]

    def sketches(self, name: str, module: nn.Module, k: int, seed: int,
                 device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(u [d_out, k], v [d_in, k]): the layer's Gaussian factors, drawn from (seed, layer name, side)."""
        d_out, d_in = self.dims(module)
        return (gaussian(d_out, k, derive_seed(seed, name, "out"), device),
                gaussian(d_in, k, derive_seed(seed, name, "in"), device))

    def call_site(self, module: nn.Module) -> nn.Module:
        """The module whose calls' first input and output gradient the features need (hooked): the module
        itself, or a parameter-free child through which it applies its parameter."""
        return module

    def features(self, layer: KronLayer, inp: torch.Tensor, gout: torch.Tensor) -> torch.Tensor:
        """[B, k] contribution of one call of the layer, from its first input and its output's gradient."""
        raise NotImplementedError

    def gradients(self, module: nn.Module, inp: torch.Tensor, gout: torch.Tensor) -> list[torch.Tensor]:
        """Exact per-example gradients [B, numel] of the covered parameters (`param_names` order) from one call."""
        raise NotImplementedError


class LinearAdapter(LayerAdapter):
    """nn.Linear over any leading dimensions (each leading position is a position)."""

    module_type = nn.Linear

    def dims(self, module: nn.Module) -> tuple[int, int]:
        return module.out_features, module.in_features + (module.bias is not None)

    def features(self, layer: KronLayer, inp: torch.Tensor, gout: torch.Tensor) -> torch.Tensor:
        g, a = self._positions(inp, gout)
        return positions_features(layer, g, a, layer.module.bias is not None)

    def gradients(self, module: nn.Module, inp: torch.Tensor, gout: torch.Tensor) -> list[torch.Tensor]:
        return weight_bias_gradients(module, *self._positions(inp, gout))

    @staticmethod
    def _positions(inp: torch.Tensor, gout: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(g [B, T, out], a [B, T, in]): every leading position of the call a position."""
        b = gout.shape[0]
        return gout.reshape(b, -1, gout.shape[-1]), inp.reshape(b, -1, inp.shape[-1])


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
        return positions_features(layer, *self._positions(layer.module, inp, gout), layer.module.bias is not None)

    def gradients(self, module: nn.Module, inp: torch.Tensor, gout: torch.Tensor) -> list[torch.Tensor]:
        return weight_bias_gradients(module, *self._positions(module, inp, gout))  # weight [out, C, kh, kw] order

    @staticmethod
    def _positions(m: nn.Conv2d, inp: torch.Tensor, gout: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(g [B, L, out], a [B, L, C*kh*kw]): output pixels as positions over their unfolded input patches."""
        a = F.unfold(inp, m.kernel_size, m.dilation, m.padding, m.stride).transpose(1, 2)
        return gout.flatten(2).transpose(1, 2), a


class EmbeddingAdapter(LayerAdapter):
    """nn.Embedding: the gradient of its table [vocab, dim] scatters each token's output gradient to its row;
    the output side is the embedding dimension, the input side the vocabulary (a one-hot input)."""

    module_type = nn.Embedding

    def param_names(self, module: nn.Module) -> list[str]:
        return ["weight"]

    def dims(self, module: nn.Module) -> tuple[int, int]:
        return module.embedding_dim, module.num_embeddings

    def features(self, layer: KronLayer, inp: torch.Tensor, gout: torch.Tensor) -> torch.Tensor:
        tokens, g = self._tokens(layer.module, inp, gout)
        if tokens.shape[1] == 1:
            return combine_sketches(g @ layer.u, layer.v[tokens])
        return combine_gradient(layer, self._table_gradient(layer.module, tokens, g).transpose(1, 2))

    def gradients(self, module: nn.Module, inp: torch.Tensor, gout: torch.Tensor) -> list[torch.Tensor]:
        return [self._table_gradient(module, *self._tokens(module, inp, gout)).flatten(1)]

    @staticmethod
    def _tokens(m: nn.Embedding, inp: torch.Tensor, gout: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(tokens [B, T], their output gradients [B, T, dim], zero at the padding index)."""
        b = gout.shape[0]
        tokens = inp.reshape(b, -1)
        g = gout.reshape(b, tokens.shape[1], -1)
        if m.padding_idx is not None:
            g = g * (tokens != m.padding_idx).unsqueeze(-1)
        return tokens, g

    @staticmethod
    def _table_gradient(m: nn.Embedding, tokens: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        """[B, vocab, dim]: each token's output gradient scattered to its row of the table."""
        return g.new_zeros(g.shape[0], m.num_embeddings, g.shape[2]).scatter_add_(
            1, tokens.unsqueeze(-1).expand(-1, -1, g.shape[2]), g)


class ExactBlockAdapter(LayerAdapter):
    """A small parameter block covered by its exact per-example gradient [B, n] (its parameters' gradients
    flattened in `param_names` order), projected by a dense standard Gaussian [n, k] / sqrt(k)."""

    extends_coverage = True

    def positions(self, module: nn.Module, output: torch.Tensor) -> int:
        return 1  # no [B, positions, k] sketches: its [B, n] gradient is the size of a parameter block

    def sketches(self, name: str, module: nn.Module, k: int, seed: int,
                 device: torch.device) -> tuple[torch.Tensor, None]:
        n = sum(getattr(module, p).numel() for p in self.param_names(module))
        return gaussian(n, k, derive_seed(seed, name, "block"), device), None

    def gradient(self, module: nn.Module, x: torch.Tensor, gout: torch.Tensor) -> torch.Tensor:
        """Exact per-example gradient [B, n] of the block's parameters, from one call's input and output gradient."""
        raise NotImplementedError

    def features(self, layer: KronLayer, inp: torch.Tensor, gout: torch.Tensor) -> torch.Tensor:
        return self.gradient(layer.module, inp, gout) @ layer.u / math.sqrt(layer.k)

    def gradients(self, module: nn.Module, inp: torch.Tensor, gout: torch.Tensor) -> list[torch.Tensor]:
        sizes = [getattr(module, p).numel() for p in self.param_names(module)]
        return list(self.gradient(module, inp, gout).split(sizes, dim=1))


def _scale_shift_gradient(names: list[str], normalised: torch.Tensor, gout: torch.Tensor) -> torch.Tensor:
    """[B, n] gradients of an affine y = x_hat * weight + bias, given x_hat and dL/dy as [B, positions, n]."""
    grads = {"weight": (gout * normalised).sum(1), "bias": gout.sum(1)}
    return torch.cat([grads[name] for name in names], dim=1)


class BatchNormAdapter(ExactBlockAdapter):
    """BatchNorm (1d, 2d, 3d) normalising by its running statistics, as in eval mode, where each example's
    gradient is its own: scale sum_pixels g * x_hat, shift sum_pixels g, per channel."""

    module_type = nn.modules.batchnorm._BatchNorm

    def supports(self, module: nn.Module) -> bool:
        return module.track_running_stats and module.running_mean is not None

    def param_names(self, module: nn.Module) -> list[str]:
        return ["weight", "bias"] if module.affine else []

    def gradient(self, module: nn.Module, x: torch.Tensor, gout: torch.Tensor) -> torch.Tensor:
        b, c = x.shape[:2]
        normalised = F.batch_norm(x, module.running_mean, module.running_var, training=False, eps=module.eps)
        return _scale_shift_gradient(self.param_names(module), normalised.reshape(b, c, -1).transpose(1, 2),
                                     gout.reshape(b, c, -1).transpose(1, 2))


class LayerNormAdapter(ExactBlockAdapter):
    """nn.LayerNorm: each position normalised over the trailing `normalized_shape`; scale and shift gradients
    summed over positions."""

    module_type = nn.LayerNorm

    def param_names(self, module: nn.Module) -> list[str]:
        return [name for name in ("weight", "bias") if getattr(module, name, None) is not None]

    def gradient(self, module: nn.Module, x: torch.Tensor, gout: torch.Tensor) -> torch.Tensor:
        n = math.prod(module.normalized_shape)
        normalised = F.layer_norm(x, module.normalized_shape, eps=module.eps).reshape(x.shape[0], -1, n)
        return _scale_shift_gradient(self.param_names(module), normalised, gout.reshape(x.shape[0], -1, n))


class RelativePositionAdapter(LayerAdapter):
    """The relative-position table E [max_len, d_head] of a `SelfAttention` (shared by its heads), through its
    `rel_logits` call q E_slice^T: a linear layer without bias whose positions are (head, query) pairs, whose
    outputs are the last t rows of the table (distances) and whose input side is d_head."""

    module_type = SelfAttention
    extends_coverage = True

    def param_names(self, module: nn.Module) -> list[str]:
        return ["rel"] if module.rel is not None else []

    def call_site(self, module: nn.Module) -> nn.Module:
        return module.rel_logits

    def dims(self, module: nn.Module) -> tuple[int, int]:
        return tuple(module.rel.shape)

    def features(self, layer: KronLayer, inp: torch.Tensor, gout: torch.Tensor) -> torch.Tensor:
        return positions_features(layer, *self._positions(layer.module, inp, gout))

    def gradients(self, module: nn.Module, inp: torch.Tensor, gout: torch.Tensor) -> list[torch.Tensor]:
        return weight_bias_gradients(module.rel_logits, *self._positions(module, inp, gout))  # no bias

    @staticmethod
    def _positions(m: SelfAttention, inp: torch.Tensor, gout: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(g [B, heads * queries, max_len], queries [B, heads * queries, d_head]); a window shorter than the
        table leaves the rows before its last t without gradient."""
        b, t = gout.shape[0], gout.shape[-1]
        g = gout.reshape(b, -1, t)
        if t < m.rel.shape[0]:
            g = F.pad(g, (m.rel.shape[0] - t, 0))
        return g, inp.reshape(b, -1, inp.shape[-1])


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


for _adapter in (LinearAdapter(), Conv2dAdapter(), EmbeddingAdapter(), BatchNormAdapter(), LayerNormAdapter(),
                 RelativePositionAdapter()):
    register_layer(_adapter)
