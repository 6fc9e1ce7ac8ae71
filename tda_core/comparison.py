"""Paired comparison of two settings: the LDS difference with a bootstrap interval and a plain verdict.

Two settings scored against the same ground truth on the same test examples are paired: example z's LDS under
A and under B share z's difficulty. The interval resamples test examples (the same draw for A and B) and,
where a setting has R >= 2 seed replicates, its replicates too, so it carries both the test-set and the
training-seed variation. Seeded: the same inputs give the same interval.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from .errors import UserError

DEFAULT_RESAMPLES = 10_000
LEVEL = 0.95


@dataclasses.dataclass(frozen=True)
class PairedComparison:
    """A - B in LDS with its bootstrap interval, on the `n` test examples both settings define."""

    label_a: str
    label_b: str
    lds_a: float
    lds_b: float
    difference: float  # lds_a - lds_b
    low: float
    high: float
    n: int
    resamples: int
    seed: int
    level: float = LEVEL

    @property
    def verdict(self) -> str:
        """'A better', 'B better', or 'not distinguishable at 95%' (the interval contains 0)."""
        if self.low > 0:
            return "A better"
        if self.high < 0:
            return "B better"
        return f"not distinguishable at {self.level:.0%}"

    def describe(self) -> str:
        return (f"{self.label_a} - {self.label_b}: {self.difference:+.4f} "
                f"[{self.low:+.4f}, {self.high:+.4f}] ({self.level:.0%}, {self.n} test examples): {self.verdict}")

    def row(self) -> dict:
        """A flat record for tables and JSON."""
        return dataclasses.asdict(self) | {"verdict": self.verdict}


def _as_replicates(values: np.ndarray) -> np.ndarray:
    values = np.asarray(values, dtype=np.float64)
    return values[None] if values.ndim == 1 else values


def paired_bootstrap(per_example_a: np.ndarray, per_example_b: np.ndarray, *, resamples: int = DEFAULT_RESAMPLES,
                     seed: int = 0, level: float = LEVEL, labels: tuple[str, str] = ("A", "B")) -> PairedComparison:
    """Bootstrap interval of mean(A) - mean(B) over test examples.

    `per_example_*`: per-example LDS, [n] or [replicates, n] on the same test examples in the same order.
    Each resample draws n examples with replacement (shared by A and B) and each setting's replicates with
    replacement; the interval is the percentile interval of the resampled differences. Examples undefined
    (NaN) in either setting are left out.
    """
    a, b = _as_replicates(per_example_a), _as_replicates(per_example_b)
    if a.shape[1] != b.shape[1]:
        raise UserError(f"the two settings were scored on different test examples ({a.shape[1]} vs {b.shape[1]})")
    if resamples < 1:
        raise UserError(f"resamples must be >= 1, got {resamples}")
    keep = np.isfinite(a).all(0) & np.isfinite(b).all(0)
    a, b = a[:, keep], b[:, keep]
    n = a.shape[1]
    if n < 2:
        raise UserError("fewer than two test examples have an LDS under both settings; nothing to compare")
    rng = np.random.default_rng([seed, 2024])
    diffs = np.empty(resamples)
    for start in range(0, resamples, 500):
        size = min(500, resamples - start)
        examples = rng.integers(0, n, (size, n))
        mean_a = a[rng.integers(0, len(a), (size, len(a)))].mean(1)  # [size, n]: replicate-resampled means
        mean_b = b[rng.integers(0, len(b), (size, len(b)))].mean(1)
        rows = np.arange(size)[:, None]
        diffs[start:start + size] = (mean_a[rows, examples] - mean_b[rows, examples]).mean(1)
    tail = (1.0 - level) / 2
    low, high = np.quantile(diffs, [tail, 1.0 - tail])
    lds_a, lds_b = float(a.mean()), float(b.mean())
    return PairedComparison(labels[0], labels[1], lds_a, lds_b, lds_a - lds_b, float(low), float(high), n,
                            resamples, seed, level)
