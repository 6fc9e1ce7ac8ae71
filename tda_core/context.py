"""Where work happens: the store, the device, the progress sink and the executor, resolved once at the edge.

Public functions (`attribute`, `ground_truth`, `run`, `sweep`, ...) take a task name or spec plus optional
store and device; `resolve` turns those into a `TaskSpec` and a `Context` in one step, and everything
inside passes the context along instead of resolving again.
"""
from __future__ import annotations

import dataclasses
import os

import torch

from .device import resolve_device
from .executors import Executor, as_executor
from .progress import Progress
from .specs import TaskSpec
from .store import Store


@dataclasses.dataclass(frozen=True)
class Context:
    """The store artifacts go to, the device computations run on, where progress is reported, and the executor
    independent tasks run on (tda_core/executors.py)."""

    store: Store
    device: torch.device
    progress: Progress | None = None
    executor: Executor = dataclasses.field(default_factory=as_executor)

    @classmethod
    def make(cls, store: Store | str | os.PathLike | None = None, device: str | torch.device = "auto",
             progress: Progress | None = None, executor: Executor | str | None = None) -> Context:
        """A context from user-facing values: a Store or its folder (None: the default store), a device name,
        an executor or its name (None: the current one, local unless `executors.using` set another)."""
        store = store if isinstance(store, Store) else Store(store)
        device = resolve_device(device) if isinstance(device, str) else device
        return cls(store, device, progress, as_executor(executor))

    def quiet(self) -> Context:
        """The same context without progress reports."""
        return dataclasses.replace(self, progress=None)


def resolve(task: str | TaskSpec, store: Store | str | os.PathLike | None = None,
            device: str | torch.device = "auto", progress: Progress | None = None,
            executor: Executor | str | None = None) -> tuple[TaskSpec, Context]:
    """(task spec, context) from what a caller passed: a task name or spec, a store, a device name, an executor."""
    from .tasks import get_task

    return (get_task(task) if isinstance(task, str) else task), Context.make(store, device, progress, executor)
