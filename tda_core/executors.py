"""Executors: where independent pieces of work run. `local` (this process, one after another: the default) and
`ray` (Ray core tasks over this machine's cores or a cluster, tda_core/ray_executor.py); one `EXECUTORS` entry each.

A `Task` is `fn(ctx, *args)`: a module-level function of specs (task, dataset, seeds, the store keys it is to
write) that reads and writes artifacts through `ctx.store` and returns what the driver needs. The loops that fan
out work (ground-truth chunks, base models, adapter fine-tunes, member featurization and scoring, sweep settings)
build tasks and call `ctx.executor.for_each(tasks, ctx, on_result)`; `on_result(i, value)` runs in the calling
process (the driver) as each task finishes, so results are saved as they arrive and only the driver appends to
results tables. The local executor runs task i, then calls `on_result(i, ...)`, in order: exactly the loop it
replaces. Which executor a call uses: its `executor=` argument, else the one set with `using(...)` (the CLI's
`--executor`), else local.
"""
from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

from .registry import Registry

if TYPE_CHECKING:
    from .context import Context

T = TypeVar("T")
OnResult = Callable[[int, Any], None]


@dataclass(frozen=True)
class Task:
    """One independent piece of work: `fn(ctx, *args)`, with `fn` a module-level function (a remote executor
    sends it by name) and `args` specs, tensors or datasets (sent once per distinct object)."""

    fn: Callable[..., Any]
    args: tuple[Any, ...] = ()


class Executor(ABC):
    """Runs tasks and hands their results to the driver as they finish."""

    name = ""

    @property
    def workers(self) -> int:
        """How many tasks run at once (loops size their chunks by it)."""
        return 1

    @abstractmethod
    def for_each(self, tasks: Sequence[Task], ctx: Context, on_result: OnResult) -> None:
        """Run every task; call `on_result(i, value)` here, in the driver, as task i finishes. A task's error
        stops the run with that error; tasks still outstanding are cancelled (also on Ctrl-C)."""

    def describe(self) -> str:
        """A human label, e.g. 'local' or 'ray (local, 2 workers)'."""
        return self.name

    def close(self) -> None:
        """Release what the executor started (a local Ray); a no-op for the local executor."""


class LocalExecutor(Executor):
    """Tasks run in this process, one after another, with the caller's context (its progress bars included)."""

    name = "local"

    def for_each(self, tasks: Sequence[Task], ctx: Context, on_result: OnResult) -> None:
        for i, task in enumerate(tasks):
            on_result(i, task.fn(ctx, *task.args))


def _ray_executor(**options: Any) -> Executor:
    from .ray_executor import RayExecutor  # Ray is imported only when it is used

    return RayExecutor(**options)


EXECUTORS: Registry[Callable[..., Executor]] = Registry("executor")


def register_executor(name: str, factory: Callable[..., Executor]) -> Callable[..., Executor]:
    """Add an executor: `factory(**options)` builds it (`make_executor(name, **options)`)."""
    return EXECUTORS.register(name, factory)


register_executor("local", LocalExecutor)
register_executor("ray", _ray_executor)

LOCAL = LocalExecutor()
_CURRENT: ContextVar[Executor | None] = ContextVar("tda_executor", default=None)


def make_executor(name: str = "local", **options: Any) -> Executor:
    """An executor by name (`EXECUTORS`), built with its options (ray: address, workers, store)."""
    return EXECUTORS.get(name)(**options)


def current_executor() -> Executor:
    """The executor set by the innermost `using(...)`, else the local one."""
    return _CURRENT.get() or LOCAL


def as_executor(executor: Executor | str | None = None) -> Executor:
    """An executor from what a caller passed: an Executor, a name (default options) or None (the current one)."""
    if executor is None:
        return current_executor()
    return make_executor(executor) if isinstance(executor, str) else executor


@contextmanager
def using(executor: Executor) -> Iterator[Executor]:
    """Make `executor` the default of every call inside the block (the caller closes it)."""
    token = _CURRENT.set(executor)
    try:
        yield executor
    finally:
        _CURRENT.reset(token)


def chunks(items: Sequence[T], size: int, workers: int) -> list[list[T]]:
    """`items` in consecutive chunks of at most `size`, and small enough that `workers` tasks share them
    (one chunk of everything up to `size` for the local executor, as before)."""
    if not items:
        return []
    size = max(1, min(size, math.ceil(len(items) / max(1, workers))))
    return [list(items[start:start + size]) for start in range(0, len(items), size)]


def in_order(consume: OnResult) -> OnResult:
    """An `on_result` that passes results to `consume` in task order, holding back those that finish early
    (for results that must be combined in order, such as members averaged like the local loop does)."""
    held: dict[int, Any] = {}
    position = [0]

    def on_result(i: int, value: Any) -> None:
        held[i] = value
        while position[0] in held:
            consume(position[0], held.pop(position[0]))
            position[0] += 1

    return on_result
