"""The `ray` executor: tasks run as Ray core tasks on this machine's cores (a local Ray started here, listening on
127.0.0.1 only) or on a cluster (`address`: its head's host:port, or `auto`; default $TDA_RAY_ADDRESS).

What goes over the network: tda_core's code (to a cluster, once per connection, as a runtime-env package), each
run's inputs once (`ray.put` of every distinct task argument: the dataset, a base model, the ground truth a
sweep scores against), the user's own task registrations, and the results. Artifacts take one of two ways:

- `shared` store (default): every node sees the driver's store folder. Workers write through the store's
  atomic, locked writes under keys the driver handed out; the driver checks that it sees what they wrote.
- `driver` store (no shared filesystem): each node keeps its own store (its TDA_STORE) as a cache and returns
  what a task wrote through Ray's object store; the driver saves it. Reads a node misses are served from the
  driver's store by a small actor on the driver's node, each artifact put into Ray's object store once.

Either way the driver saves each result as it arrives, so an interrupted run resumes at task granularity.
Resources: `workers` tasks run at once (default: one per CPU of the cluster); each asks for the cluster's CPUs /
workers (torch threads set to match) and, for CUDA runs, GPUs / workers of a GPU, so several small trainings
share one GPU. A task whose worker dies is retried (`max_retries`), a task raising a `UserError` fails the run
with that message, and a run stopped by Ctrl-C (or the app's Stop) cancels its outstanding tasks.
"""
from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .context import Context
from .device import resolve_device
from .errors import UserError, unknown_choice
from .executors import LOCAL, Executor, OnResult, Task
from .store import Store

if TYPE_CHECKING:
    from .store import Artifact

ADDRESS_ENV = "TDA_RAY_ADDRESS"
STORE_MODES = ("shared", "driver")
MAX_RETRIES = 3
_REMOTE: list[Any] = []  # the remote wrapper of `_run_task`, made once per process


def ray_module(localhost: bool = False) -> Any:
    """`ray`, imported on first use; with `localhost`, a Ray started by this process listens on 127.0.0.1 only."""
    if localhost:
        os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # read when ray is imported: the loopback address
    import ray
    import ray._private.ray_constants as constants

    if localhost:
        constants.ENABLE_RAY_CLUSTER = False  # the same when ray was imported before
    return ray


def start_local_ray(num_cpus: int | None = None, num_gpus: int | None = None) -> None:
    """Start a Ray on this machine only (127.0.0.1, no dashboard) with `num_cpus` (default: all) cores."""
    import tda_core

    ray = ray_module(localhost=True)
    # workers import this project from where the driver found it, whatever their working directory
    here = str(Path(tda_core.__file__).resolve().parents[1])
    path = os.pathsep.join(p for p in (here, os.environ.get("PYTHONPATH", "")) if p)
    ray.init(num_cpus=num_cpus or os.cpu_count() or 1, num_gpus=num_gpus, include_dashboard=False,
             log_to_driver=False, logging_level=logging.ERROR, runtime_env={"env_vars": {"PYTHONPATH": path}})


class RayExecutor(Executor):
    """Tasks as Ray core tasks (see the module docstring)."""

    name = "ray"

    def __init__(self, address: str | None = None, workers: int | None = None, store: str = "shared",
                 max_retries: int = MAX_RETRIES) -> None:
        if store not in STORE_MODES:
            raise unknown_choice("Ray store mode", store, STORE_MODES)
        if workers is not None and workers < 1:
            raise UserError(f"workers must be a positive number of tasks at once, got {workers}")
        self.address = address or os.environ.get(ADDRESS_ENV) or None
        self.store_mode = store
        self.max_retries = max_retries
        self._workers = workers
        self._resources: tuple[int, float, int] | None = None  # cluster CPUs, GPUs, CPUs of the largest node
        self._started_here = False
        self._servers: dict[str, Any] = {}  # driver-store folder -> the actor serving it

    # --- the cluster ---------------------------------------------------------------------------------
    def _ray(self) -> Any:
        """Ray, connected: to `address`, else to a Ray this process already joined, else a local one started here."""
        ray = ray_module(localhost=self.address is None)
        if not ray.is_initialized():
            if self.address is None:
                start_local_ray()
                self._started_here = True
            else:
                import tda_core

                try:
                    ray.init(address=self.address, runtime_env={"py_modules": [tda_core]}, log_to_driver=False,
                             logging_level=logging.ERROR)
                except (ConnectionError, ValueError, RuntimeError) as exc:
                    raise UserError(f"cannot connect to the Ray cluster at {self.address!r} ({exc}); start it with "
                                    "`ray start --head` (see the README's 'Scaling out')") from None
        if self._resources is None:
            total = ray.cluster_resources()
            nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
            self._resources = (int(total.get("CPU", 0)), float(total.get("GPU", 0.0)),
                               max((int(n.get("CPU", 0)) for n in nodes), default=0))
            if self._resources[0] < 1:
                raise UserError("the Ray cluster has no CPUs to run tasks on")
        return ray

    @property
    def workers(self) -> int:
        self._ray()
        return self._workers or self._resources[0]

    def task_options(self, device: torch.device) -> dict[str, Any]:
        """Ray task options: CPUs (and GPU share for CUDA) so that `workers` tasks run at once, and retries."""
        cpus, gpus, node_cpus = self._resources
        workers = self.workers
        options = {"num_cpus": max(1, min(node_cpus, cpus // workers)), "max_retries": self.max_retries}
        if device.type == "cuda":
            if gpus <= 0:
                raise UserError("the Ray cluster has no GPUs; run with --device cpu or add nodes with GPUs")
            options["num_gpus"] = min(1.0, gpus / workers)
        return options

    def describe(self) -> str:
        where = self.address or "local"
        return f"ray ({where}, {self.workers} workers, {self.store_mode} store)"

    def close(self) -> None:
        if not self._servers and not self._started_here:
            return
        ray = ray_module()
        for server in self._servers.values():
            ray.kill(server)
        self._servers.clear()
        if self._started_here:
            ray.shutdown()
            self._started_here = False
            self._resources = None

    # --- running tasks -------------------------------------------------------------------------------
    def _server(self, store: Store) -> Any:
        """The actor serving `store` to nodes that do not see it, on this (the driver's) node."""
        ray = self._ray()
        root = str(store.root)
        if root not in self._servers:
            from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

            here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
            self._servers[root] = ray.remote(num_cpus=0)(StoreServer).options(scheduling_strategy=here).remote(root)
        return self._servers[root]

    def for_each(self, tasks: Sequence[Task], ctx: Context, on_result: OnResult) -> None:
        if not tasks:
            return
        ray = self._ray()
        options = self.task_options(ctx.device)
        shared = self.store_mode == "shared"
        spec = WorkerSpec(str(ctx.store.root) if shared else None, None if shared else self._server(ctx.store),
                          ctx.device.type, options["num_cpus"])
        if not _REMOTE:
            _REMOTE.append(ray.remote(_run_task))
        remote = _REMOTE[0].options(**options)
        registrations = ray.put(_registrations())
        sent: dict[int, Any] = {}

        def once(arg: Any) -> Any:  # every distinct argument object goes into the object store once
            if isinstance(arg, (bool, int, float, str, type(None))):
                return arg
            if id(arg) not in sent:
                sent[id(arg)] = ray.put(arg)
            return sent[id(arg)]

        pending = {remote.remote(task.fn, spec, registrations, *map(once, task.args)): i
                   for i, task in enumerate(tasks)}
        try:
            while pending:
                ready, _ = ray.wait(list(pending), num_returns=1)
                i = pending.pop(ready[0])
                value, written = self._result(ray, ready[0], tasks[i])
                self._land(ctx.store, written)
                on_result(i, value)
        finally:
            for ref in pending:  # an error, Ctrl-C or the app's Stop: nothing more is started or kept running
                ray.cancel(ref, force=True)

    def _result(self, ray: Any, ref: Any, task: Task) -> tuple[Any, list]:
        """A finished task's (value, what it wrote); its UserError re-raised as is, a dead worker as one line."""
        from ray.exceptions import RaySystemError, RayTaskError, WorkerCrashedError

        try:
            return ray.get(ref)
        except RayTaskError as exc:
            if isinstance(exc.cause, UserError):
                raise exc.cause from None
            if isinstance(exc.cause, RaySystemError):  # e.g. a worker that cannot import tda_core
                cause = str(exc.cause).strip().splitlines()[-1] if str(exc.cause).strip() else "system error"
                raise UserError(f"Ray could not run {task.fn.__name__} on a worker ({cause}); every node needs "
                                "this project importable: `pip install .` there, or run from the repository "
                                "root") from None
            raise
        except WorkerCrashedError:
            raise UserError(f"a Ray worker died {self.max_retries + 1} times running {task.fn.__name__}; finished "
                            "results are kept in the store, so a rerun resumes") from None

    def _land(self, store: Store, written: list) -> None:
        """Driver store: save what the task wrote on its node. Shared store: check that it is visible here."""
        if self.store_mode == "driver":
            for kind, key, tensors, meta in written:
                store.save(kind, key, tensors, meta)
            return
        for kind, key in written:
            if not store.has(kind, key):
                raise UserError(f"a Ray worker wrote {kind}/{key} to {store.root}, but this machine does not see it: "
                                "the nodes do not share the store folder; use --ray-store driver (results come back "
                                "through Ray) or put the store on a shared filesystem")


# --- the worker side ---------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class WorkerSpec:
    """How a worker sets up a task's context: the driver's store folder (shared mode) or the store server
    (driver mode, the node's own store as a cache), the device type and the torch threads."""

    store: str | None
    server: Any
    device: str
    threads: int


class WorkerStore(Store):
    """A worker's store: it records what the task writes; in driver mode, reads it misses are served from the
    driver's store (and kept here)."""

    def __init__(self, root: str | os.PathLike | None, server: Any = None) -> None:
        super().__init__(root)
        self.server = server
        self.written: list[Artifact] = []

    def save(self, kind: str, key: str, tensors: dict[str, torch.Tensor], meta: dict[str, Any], *args: Any,
             **kwargs: Any) -> Artifact:
        art = super().save(kind, key, tensors, meta, *args, **kwargs)
        self.written.append(art)
        return art

    def load(self, kind: str, key: str, *args: Any, **kwargs: Any) -> Artifact | None:
        found = super().load(kind, key, *args, **kwargs)
        if found is None and self.server is not None:
            ray = ray_module()
            reference = ray.get(self.server.fetch.remote(kind, key))
            if reference is not None:
                tensors, meta = ray.get(reference[0])
                found = Store.save(self, kind, key, tensors, meta)  # kept on this node; not handed back
        return found

    def has(self, kind: str, key: str) -> bool:
        if super().has(kind, key):
            return True
        return self.server is not None and ray_module().get(self.server.has.remote(kind, key))

    def handed_back(self) -> list:
        """What the driver gets: every artifact written (driver mode) or the (kind, key) of each (shared mode)."""
        if self.server is None:
            return [(a.kind, a.key) for a in self.written]
        return [(a.kind, a.key, a.tensors, a.meta) for a in self.written]


class StoreServer:
    """The driver's store, read for nodes that do not see its folder (a Ray actor on the driver's node)."""

    def __init__(self, root: str) -> None:
        self.store = Store(root)
        self.sent: dict[tuple[str, str], Any] = {}

    def has(self, kind: str, key: str) -> bool:
        return self.store.has(kind, key)

    def fetch(self, kind: str, key: str) -> list | None:
        """[a reference to (tensors, meta)], put into the object store once; None when the store lacks it."""
        if (kind, key) not in self.sent:
            art = self.store.load(kind, key)
            if art is None:
                return None
            self.sent[(kind, key)] = ray_module().put((art.tensors, art.meta))
        return [self.sent[(kind, key)]]


def _registrations() -> dict[str, dict]:
    from .user_tasks import user_registrations

    return user_registrations()


def _run_task(fn: Any, spec: WorkerSpec, registrations: dict[str, dict], *args: Any) -> tuple[Any, list]:
    """In a Ray worker: install the driver's user tasks, set threads, build the task's context, run it."""
    from .user_tasks import install_registrations

    install_registrations(registrations)
    torch.set_num_threads(max(1, int(spec.threads)))
    store = WorkerStore(spec.store, spec.server)
    value = fn(Context(store, resolve_device(spec.device), None, LOCAL), *args)
    return value, store.handed_back()



def executor_from_environment() -> Executor:
    """The Ray cluster at $TDA_RAY_ADDRESS when it is set (how the app is pointed at one), else the local executor."""
    return RayExecutor() if os.environ.get(ADDRESS_ENV) else LOCAL
