"""Loss and attribution target for both task families.

Classification: ``y`` is (N,) class ids; target = margin log(p / (1 - p)) of the correct class.
Sequences: ``y`` is (N, T) next tokens with IGNORE at padding; target = mean token log-likelihood.
All functions also work on a single example (no batch dimension), as inside ``vmap(grad(...))``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE = -100


def token_log_likelihood(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean log-likelihood of the non-ignored tokens over the last label dimension."""
    logp = torch.log_softmax(logits, dim=-1)
    valid = y != IGNORE
    picked = logp.gather(-1, torch.where(valid, y, 0).unsqueeze(-1)).squeeze(-1)
    return (picked * valid).sum(-1) / valid.sum(-1).clamp(min=1)


def margin(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """log(p_y / (1 - p_y)) = z_y - logsumexp of the other logits (stable)."""
    z_y = logits.gather(-1, y.unsqueeze(-1)).squeeze(-1)
    others = logits.scatter(-1, y.unsqueeze(-1), float("-inf"))
    return z_y - torch.logsumexp(others, dim=-1)


def per_example_loss(logits: torch.Tensor, y: torch.Tensor, sequence: bool) -> torch.Tensor:
    """Training loss per example: cross-entropy, averaged over tokens for sequences."""
    if sequence:
        return -token_log_likelihood(logits, y)
    return F.cross_entropy(logits, y, reduction="none") if logits.dim() == 2 else F.cross_entropy(logits, y)


def target(logits: torch.Tensor, y: torch.Tensor, sequence: bool) -> torch.Tensor:
    """What is attributed: the correct-class margin, or the mean token log-likelihood."""
    return token_log_likelihood(logits, y) if sequence else margin(logits, y)


def correct_probability(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """p of the correct class (classification), used for TRAK's Q = 1 - p."""
    return torch.softmax(logits, dim=-1).gather(-1, y.unsqueeze(-1)).squeeze(-1)
