"""Music Transformer: a decoder-only causal transformer over performance events with relative attention.

Relative position attention follows Huang et al. (2018): each layer learns one embedding per
relative distance (shared by its heads), and the "skewing" trick turns ``Q E^T`` into the
per-pair term without a (T, T, d) tensor. Attention is written with plain tensor ops and
every dropout is a `MaskableDropout`, so the model trains under `torch.func.vmap` and its
dropout masks can be fixed per ensemble member.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..data.midi_codec import VOCAB_SIZE, WINDOW
from .dropout import MaskableDropout

# The benchmark's model: 13.1M parameters, attention-probability dropout (for a GPU).
PAPER_SIZE = {"d_model": 512, "n_layers": 6, "n_heads": 8, "d_ff": 1024, "attn_dropout": 0.1}
# The CPU default: 0.16M parameters; no attention-probability dropout (it alone cost ~40% of a CPU step).
CPU_SIZE = {"d_model": 64, "n_layers": 2, "n_heads": 2, "d_ff": 256, "attn_dropout": 0.0}


def skew(rel: torch.Tensor) -> torch.Tensor:
    """(..., T, T) logits against relative distances -(T-1)..0 -> (..., T, T) logits of query i, key j,
    holding rel[i, T - 1 - (i - j)] where j <= i (entries above the diagonal are meaningless)."""
    t = rel.shape[-1]
    padded = F.pad(rel, (1, 0))  # (..., T, T + 1)
    return padded.reshape(*rel.shape[:-2], t + 1, t)[..., 1:, :]


class RelativeLogits(nn.Module):
    """Logits q . E_j of the queries against a slice E of a relative-position table, before skewing.

    Parameter-free (the table stays on `SelfAttention`, under its name): a call site through which hooks see the
    queries and the gradient of these logits, so the Kronecker projection covers the table like a layer."""

    def forward(self, q: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
        return q @ table.transpose(0, 1)


class SelfAttention(nn.Module):
    """Causal multi-head self-attention, with learned relative position embeddings when `relative`.

    Dropout on the attention probabilities (rate `attn_dropout`) exists only when that rate is > 0:
    it is the costliest dropout on a CPU, (heads, T, T) per example."""

    def __init__(self, d_model: int, n_heads: int, max_len: int, dropout: float, attn_dropout: float,
                 relative: bool) -> None:
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"d_model={d_model} is not divisible by n_heads={n_heads}")
        self.n_heads, self.d_head = n_heads, d_model // n_heads
        self.qkv = nn.Linear(d_model, 3 * d_model)
        # one embedding per distance -(max_len - 1)..0, shared by the heads
        self.rel = nn.Parameter(torch.randn(max_len, self.d_head) * 0.02) if relative else None
        self.rel_logits = RelativeLogits() if relative else None
        self.attn_drop = MaskableDropout(attn_dropout) if attn_dropout > 0 else nn.Identity()
        self.proj = nn.Linear(d_model, d_model)
        self.out_drop = MaskableDropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(x).reshape(b, t, 3, self.n_heads, self.d_head).permute(2, 0, 3, 1, 4)
        q = q / math.sqrt(self.d_head)
        scores = q @ k.transpose(-2, -1)  # (b, h, t, t)
        if self.rel is not None:
            scores = scores + skew(self.rel_logits(q, self.rel[self.rel.shape[0] - t:]))
        future = torch.ones(t, t, dtype=torch.bool, device=x.device).triu(1)
        attn = self.attn_drop(torch.softmax(scores.masked_fill(future, float("-inf")), dim=-1))
        out = (attn @ v).transpose(1, 2).reshape(b, t, d)
        return self.out_drop(self.proj(out))


class FeedForward(nn.Module):
    """Two linear layers with GELU, dropout on the output."""

    def __init__(self, d_model: int, d_ff: int, dropout: float) -> None:
        super().__init__()
        self.fc1 = nn.Linear(d_model, d_ff)
        self.fc2 = nn.Linear(d_ff, d_model)
        self.drop = MaskableDropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(F.gelu(self.fc1(x))))


class Block(nn.Module):
    """Pre-norm transformer block: x + attention(norm x), then x + feed-forward(norm x)."""

    def __init__(self, d_model: int, n_heads: int, d_ff: int, max_len: int, dropout: float, attn_dropout: float,
                 relative: bool) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(d_model)
        self.attn = SelfAttention(d_model, n_heads, max_len, dropout, attn_dropout, relative)
        self.norm2 = nn.LayerNorm(d_model)
        self.ff = FeedForward(d_model, d_ff, dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.ff(self.norm2(x))


class MusicTransformer(nn.Module):
    """Token ids (B, T) or (T,) -> next-token logits (B, T, vocab) or (T, vocab).

    Positions: relative attention (`relative=True`, the Music Transformer's) or learned absolute
    embeddings. Dropout layers: the embedding, and per block the attention output, the feed-forward
    output and (when `attn_dropout` > 0) the attention probabilities.
    LoRA targets: every Linear (qkv, proj, fc1, fc2 per block, head)."""

    def __init__(self, vocab_size: int = VOCAB_SIZE, d_model: int = CPU_SIZE["d_model"],
                 n_layers: int = CPU_SIZE["n_layers"], n_heads: int = CPU_SIZE["n_heads"],
                 d_ff: int = CPU_SIZE["d_ff"], max_len: int = WINDOW, dropout: float = 0.1,
                 attn_dropout: float = CPU_SIZE["attn_dropout"], relative: bool = True) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab_size, d_model)
        self.pos = None if relative else nn.Embedding(max_len, d_model)
        self.embed_drop = MaskableDropout(dropout)
        self.blocks = nn.ModuleList(Block(d_model, n_heads, d_ff, max_len, dropout, attn_dropout, relative)
                                    for _ in range(n_layers))
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab_size)
        self.scale = math.sqrt(d_model)
        for name, p in self.named_parameters():
            if name.endswith("weight") and p.dim() == 2:
                nn.init.normal_(p, std=0.02)
            elif name.endswith("bias"):
                nn.init.zeros_(p)

    @property
    def dropout_layers(self) -> tuple[str, ...]:
        return tuple(name for name, m in self.named_modules() if isinstance(m, MaskableDropout))

    @property
    def lora_targets(self) -> tuple[str, ...]:
        return tuple(name for name, m in self.named_modules() if isinstance(m, nn.Linear))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        single = tokens.dim() == 1
        tokens = tokens[None] if single else tokens
        x = self.embed(tokens) * self.scale
        if self.pos is not None:
            x = x + self.pos.weight[: tokens.shape[-1]]
        x = self.embed_drop(x)
        for block in self.blocks:
            x = block(x)
        logits = self.head(self.norm(x))
        return logits[0] if single else logits
