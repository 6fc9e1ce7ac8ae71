"""Background jobs: long work (attributions, ground truths, sweeps, member scores) in a detached worker process.

A job is a kind (an entry of `JOB_KINDS`) and JSON parameters; its id is the hash of both, so two callers asking
for the same work (two browser tabs, the app and a script) get the same job: `start` attaches to a running one
instead of starting it again. The worker (`python -m tda_core.jobs STORE JOB_ID`) runs the core function with a
progress sink that writes the job's record to the store (kind ``jobs``, atomic JSON), so any process sees how far
it got. `cancel` stops the worker's process group; the worker turns the signal into an interruption, so the
store's atomic writes leave finished artifacts whole and unfinished ones absent, and a later start resumes.
"""
from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from .errors import UserError, unknown_choice
from .executors import using
from .ray_executor import executor_from_environment
from .specs import EnsembleSpec, EvalSpec, MethodSpec, Recipe, TaskSpec
from .store import Store, canonical, spec_key

JOB_KIND = "jobs"  # store kind of the job records
ROOT = Path(__file__).resolve().parents[1]
ACTIVE = ("starting", "running")
START_GRACE_S = 60.0  # a job still 'starting' after this long without a worker is reported as failed
WRITE_INTERVAL_S = 0.5  # progress is written at most this often (and whenever a stage completes)
MAX_STAGES = 4  # progress stages kept in a record (the most recently reported)


# --- specs as JSON and back --------------------------------------------------------------------------------
def _tuples(value: Any) -> Any:
    return tuple(_tuples(v) for v in value) if isinstance(value, list) else value


def task_from_json(data: dict[str, Any]) -> TaskSpec:
    """A TaskSpec from its canonical JSON (the full spec, so a job computes what its caller meant)."""
    return TaskSpec(**{**data, "model_kwargs": _tuples(data["model_kwargs"]), "recipe": Recipe(**data["recipe"])})


@dataclasses.dataclass(frozen=True)
class JobSpec:
    """What a job computes: its kind, JSON parameters, and a title for people."""

    kind: str
    params: dict[str, Any]
    title: str

    @property
    def job_id(self) -> str:
        return spec_key({"job": self.kind, "params": self.params})


def attribute_job(task: TaskSpec, settings: Sequence[tuple[MethodSpec, EnsembleSpec]], title: str,
                  members: Sequence[tuple[MethodSpec, EnsembleSpec]] = ()) -> JobSpec:
    """Attribute each (method, ensemble) of `task`, then compute each member's own scores of the `members`
    settings (stored results are read, so a rerun is cheap)."""
    params = {"task": task, "settings": [list(s) for s in settings]}
    if members:
        params["members"] = [list(s) for s in members]
    return JobSpec("attribute", canonical(params), title)


def ground_truth_job(task: TaskSpec, spec: EvalSpec) -> JobSpec:
    """Train the subset models of a ground truth."""
    return JobSpec("ground_truth", canonical({"task": task, "eval": spec}),
                   f"Ground truth for {task.name}: {spec.M * spec.runs} subset models (alpha {spec.alpha:g})")


def sweep_job(task: TaskSpec, methods: Sequence[str], grid: str, projections: Sequence[str], spec: EvalSpec,
              damping: float | None, replicates: int = 1) -> JobSpec:
    """Run every setting of a grid not yet in the results table."""
    params = {"task": task, "methods": list(methods), "grid": grid, "projections": list(projections), "eval": spec,
              "damping": damping, "replicates": replicates}
    return JobSpec("sweep", canonical(params), f"Sweep of the {grid} grid on {task.name} "
                                                f"({', '.join(methods)}; {', '.join(projections)})")


def members_job(task: TaskSpec, method: MethodSpec, ensemble: EnsembleSpec, title: str) -> JobSpec:
    """Each member's own scores of an ensemble (for the teaching views)."""
    return attribute_job(task, [], title, members=[(method, ensemble)])


def _run_attribute(params: dict, store: Store, progress: Callable) -> str:
    from .attribution import attribute, member_attribution

    task = task_from_json(params["task"])
    for method, ensemble in params["settings"]:
        attribute(task, MethodSpec(**method), EnsembleSpec(**ensemble), store=store, progress=progress)
    for method, ensemble in params.get("members", []):
        member_attribution(task, MethodSpec(**method), EnsembleSpec(**ensemble), store=store, progress=progress)
    return (f"{len(params['settings'])} attribution(s) and the member scores of "
            f"{len(params.get('members', []))} ensemble(s) stored")


def _run_ground_truth(params: dict, store: Store, progress: Callable) -> str:
    from .evaluation import ground_truth

    truth = ground_truth(task_from_json(params["task"]), EvalSpec(**params["eval"]), store=store, progress=progress)
    return f"ground truth of {truth.targets.shape[0]} subsets stored"


def _run_sweep(params: dict, store: Store, progress: Callable) -> str:
    from .experiments import sweep

    frame = sweep(task_from_json(params["task"]), params["methods"], params["grid"],
                  projections=params["projections"], eval_spec=EvalSpec(**params["eval"]), damping=params["damping"],
                  replicates=params["replicates"], store=store, progress=progress)
    return f"{len(frame)} settings in the results table"


JOB_KINDS: dict[str, Callable[[dict, Store, Callable], str]] = {
    "attribute": _run_attribute, "ground_truth": _run_ground_truth, "sweep": _run_sweep}


# --- records ----------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class JobStatus:
    """A job as its record says (with a worker that died unnoticed reported as failed)."""

    job_id: str
    kind: str
    title: str
    status: str  # starting, running (ACTIVE); done, failed, cancelled
    pid: int | None
    started: float
    updated: float
    finished: float | None
    stages: list[tuple[str, int, int]]  # (label, done, total), oldest first
    message: str

    @property
    def active(self) -> bool:
        return self.status in ACTIVE

    @property
    def elapsed_s(self) -> float:
        return (self.finished or time.time()) - self.started

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> JobStatus:
        return cls(record["id"], record["kind"], record["title"], record["status"], record.get("pid"),
                   record["started"], record.get("updated", record["started"]), record.get("finished"),
                   [tuple(s) for s in record.get("stages", [])], record.get("message", ""))


def log_path(store: Store, job_id: str) -> Path:
    """Where the worker's output goes."""
    return store.root / JOB_KIND / f"{job_id}.log"


def _record(store: Store, job_id: str) -> dict[str, Any] | None:
    return store.meta(JOB_KIND, job_id)


def _save(store: Store, record: dict[str, Any]) -> None:
    store.save(JOB_KIND, record["id"], {}, record | {"updated": time.time()})


def _update(store: Store, job_id: str, **changes: Any) -> dict[str, Any]:
    """Merge `changes` into a job's record under its lock (readers see the old or the new record, never half)."""
    with store.lock(JOB_KIND, job_id):
        record = (_record(store, job_id) or {}) | changes
        _save(store, record)
        return record


def _alive(pid: int | None, job_id: str) -> bool:
    """True while the worker process `pid` of `job_id` runs (an exited child of ours is reaped here)."""
    if not pid:
        return False
    try:
        return os.waitpid(pid, os.WNOHANG)[0] != pid  # our child: running until reaped here
    except ChildProcessError:
        pass  # not our child: ask the system
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    cmdline = Path(f"/proc/{pid}/cmdline")
    if cmdline.exists():  # a reused pid runs something else
        try:
            return job_id in cmdline.read_bytes().decode(errors="replace")
        except OSError:
            return False
    return True


def status(store: Store, job_id: str) -> JobStatus | None:
    """The job's status, None when it was never started in this store."""
    record = _record(store, job_id)
    if record is None:
        return None
    if record["status"] in ACTIVE and not _alive(record.get("pid"), job_id):
        starting = record["status"] == "starting" and time.time() - record["started"] < START_GRACE_S
        if not starting and _record(store, job_id)["status"] in ACTIVE:  # re-read: it may have just finished
            record = _update(store, job_id, status="failed", finished=time.time(),
                             message="the worker process ended without reporting; its output is in "
                                     f"{log_path(store, job_id)}")
        else:
            record = _record(store, job_id)
    return JobStatus.from_record(record)


def find(spec: JobSpec, store: Store) -> JobStatus | None:
    """The status of the job that computes `spec`, None when it was never started."""
    return status(store, spec.job_id)


def all_jobs(store: Store) -> list[JobStatus]:
    """Every job of the store, the most recently started first."""
    found = [status(store, key) for key in store.keys(JOB_KIND)]
    return sorted((s for s in found if s is not None), key=lambda s: -s.started)


def active_jobs(store: Store) -> list[JobStatus]:
    """Jobs whose worker is starting or running."""
    return [s for s in all_jobs(store) if s.active]


def start(spec: JobSpec, store: Store) -> JobStatus:
    """Start the job in a detached worker process, or attach to it when it is already running."""
    if spec.kind not in JOB_KINDS:
        raise unknown_choice("job kind", spec.kind, list(JOB_KINDS))
    job_id = spec.job_id
    current = status(store, job_id)
    if current is not None and current.active:
        return current
    with store.lock(JOB_KIND, job_id):
        record = _record(store, job_id)
        if record is not None and record["status"] in ACTIVE:  # another caller started it meanwhile
            return JobStatus.from_record(record)
        now = time.time()
        record = {"id": job_id, "kind": spec.kind, "title": spec.title, "params": spec.params, "status": "starting",
                  "pid": None, "started": now, "finished": None, "stages": [], "message": ""}
        _save(store, record)
        log = log_path(store, job_id)
        with open(log, "wb") as out:
            process = subprocess.Popen([sys.executable, "-m", "tda_core.jobs", str(store.root), job_id], cwd=ROOT,
                                       stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                       start_new_session=True)
        record["pid"] = process.pid
        _save(store, record)
    return JobStatus.from_record(record)


def cancel(store: Store, job_id: str, grace_s: float = 10.0) -> JobStatus | None:
    """Stop a running job: SIGTERM to its process group (the worker records 'cancelled'), SIGKILL after
    `grace_s`. Finished artifacts stay in the store; a later start resumes from them."""
    current = status(store, job_id)
    if current is None or not current.active:
        return current
    if current.pid:
        try:
            os.killpg(current.pid, signal.SIGTERM)
        except (ProcessLookupError, PermissionError):
            pass
        deadline = time.time() + grace_s
        while _alive(current.pid, job_id) and time.time() < deadline:
            time.sleep(0.1)
        if _alive(current.pid, job_id):
            try:
                os.killpg(current.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
    with store.lock(JOB_KIND, job_id):
        record = _record(store, job_id)
        if record["status"] in ACTIVE:
            record |= {"status": "cancelled", "finished": time.time(), "message": "cancelled"}
            _save(store, record)
    return status(store, job_id)


def wait(store: Store, job_id: str, timeout_s: float = 600.0, poll_s: float = 0.25) -> JobStatus:
    """Block until the job finishes (or `timeout_s` passes: then its current status)."""
    deadline = time.time() + timeout_s
    current = status(store, job_id)
    while current is not None and current.active and time.time() < deadline:
        time.sleep(poll_s)
        current = status(store, job_id)
    if current is None:
        raise UserError(f"no job {job_id} in {store.root}")
    return current


# --- the worker -------------------------------------------------------------------------------------------
class JobProgress:
    """The `progress(done, total, label)` protocol, written into the job's record (throttled)."""

    def __init__(self, store: Store, job_id: str, interval_s: float = WRITE_INTERVAL_S) -> None:
        self.store, self.job_id, self.interval_s = store, job_id, interval_s
        self.stages: dict[str, tuple[str, int, int]] = {}
        self.last = 0.0

    def __call__(self, done: int, total: int, label: str) -> None:
        stage = label.split(":")[0]
        self.stages[stage] = (label, int(done), int(total))  # a known stage keeps its place
        if len(self.stages) > MAX_STAGES:  # keep the outermost stage and the most recent ones
            keys = list(self.stages)
            for key in keys[1:len(keys) - MAX_STAGES + 1]:
                del self.stages[key]
        if time.time() - self.last >= self.interval_s or done >= total:
            self.flush()

    def flush(self, **changes: Any) -> None:
        self.last = time.time()
        _update(self.store, self.job_id, stages=[list(s) for s in self.stages.values()], **changes)


def _interrupt(signum: int, frame: Any) -> None:  # noqa: ARG001 - signal handler signature
    raise KeyboardInterrupt


def work(store: Store, job_id: str) -> str:
    """Run a job in this process, recording its progress and outcome; returns its final status."""
    record = _record(store, job_id)
    if record is None:
        raise UserError(f"no job {job_id} in {store.root}")
    progress = JobProgress(store, job_id)
    progress.flush(status="running", pid=os.getpid())
    try:
        with using(executor_from_environment()):  # the Ray cluster at $TDA_RAY_ADDRESS when the app has one
            message, outcome = JOB_KINDS[record["kind"]](record["params"], store, progress), "done"
    except KeyboardInterrupt:
        message, outcome = "cancelled; finished artifacts are kept in the store", "cancelled"
    except UserError as exc:
        message, outcome = str(exc), "failed"
    except Exception as exc:  # noqa: BLE001 - any failure is reported in the record, the traceback in the log
        traceback.print_exc()
        message, outcome = f"{type(exc).__name__}: {exc}", "failed"
    progress.flush(status=outcome, finished=time.time(), message=message)
    return outcome


def main(argv: list[str] | None = None) -> int:
    """Worker entry point: `python -m tda_core.jobs STORE JOB_ID`."""
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2:
        print("usage: python -m tda_core.jobs STORE JOB_ID", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, _interrupt)
    outcome = work(Store(argv[0]), argv[1])
    return 0 if outcome == "done" else 1


if __name__ == "__main__":
    sys.exit(main())
