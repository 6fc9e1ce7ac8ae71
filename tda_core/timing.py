"""Named seconds: a block's wall-clock seconds added to a mapping under a name."""
from __future__ import annotations

import time
from collections.abc import Iterator, MutableMapping
from contextlib import contextmanager


@contextmanager
def timed(seconds: MutableMapping[str, float] | None, name: str) -> Iterator[None]:
    """Add the seconds the block takes to `seconds[name]` (nothing when `seconds` is None)."""
    t0 = time.perf_counter()
    try:
        yield
    finally:
        if seconds is not None:
            seconds[name] = seconds.get(name, 0.0) + time.perf_counter() - t0
