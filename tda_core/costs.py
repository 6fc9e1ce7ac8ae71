"""Cost accounting attached to every attribution: training and serving seconds, bytes, counts.

Serving seconds are reported two ways, both honest: `serve_s` is what the full computation
costs (cached features count with the seconds recorded when they were first computed),
`serve_now_s` is the wall clock this call actually took (less when served from the store). Both are sums of
per-task compute seconds, whatever ran in parallel; `wall_s` (the computation's wall clock when it ran) and
`workers` (tasks that ran at once) are recorded beside them.
"""
from __future__ import annotations

import dataclasses
from collections import defaultdict
from contextlib import AbstractContextManager

from .timing import timed


@dataclasses.dataclass
class Costs:
    """What one attribution cost. Training excludes ground-truth retraining."""

    train_s: float  # base models + fine-tuning, as recorded when they were trained
    serve_s: float  # features + scoring + combination of the full computation
    space_bytes: int  # stored checkpoints / adapters + cached training-set features
    n_trained: int
    n_members: int
    device: str
    breakdown: dict[str, float]  # grads_s, project_s, gen_s, solve_s, finetune_s, base_train_s, ...
    serve_now_s: float = 0.0  # wall clock actually spent serving in this call
    from_store: bool = False  # True when the score matrix itself was read from the store
    wall_s: float = 0.0  # wall clock of the computation when it ran (training and serving)
    workers: int = 1  # tasks that could run at once (the executor's workers)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


class Ledger:
    """Accumulates what an attribution costs while it runs: named seconds, the full serving seconds, bytes."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.serve_s = 0.0  # the full computation's serving seconds (cached parts at their recorded seconds)
        self.space_bytes = 0

    def add(self, timings: dict[str, float], prefix: str = "") -> None:
        for name, s in timings.items():
            self.seconds[prefix + name] += s

    def merge(self, other: Ledger) -> None:
        """Add what another ledger recorded (a member scored in a task of its own)."""
        self.add(other.seconds)
        self.serve_s += other.serve_s
        self.space_bytes += other.space_bytes

    def time(self, name: str) -> AbstractContextManager[None]:
        """Add the seconds of a block to `seconds[name]`."""
        return timed(self.seconds, name)

    def costs(self, n_trained: int, n_members: int, device: str, serve_now_s: float, wall_s: float = 0.0,
              workers: int = 1) -> Costs:
        """The record of a finished computation (training = base models + fine-tuning, as recorded)."""
        breakdown = dict(self.seconds)
        return Costs(train_s=breakdown.get("base_train_s", 0.0) + breakdown.get("finetune_s", 0.0),
                     serve_s=self.serve_s, space_bytes=int(self.space_bytes), n_trained=n_trained,
                     n_members=n_members, device=device, breakdown=breakdown, serve_now_s=serve_now_s,
                     from_store=False, wall_s=wall_s, workers=workers)
