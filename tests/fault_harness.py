"""Fault injection: a worker that runs the CLI (or the core calls an app session makes) with tiny tasks, an
audit log and optional injected faults; and the driver side that starts, kills, races and checks workers.

Run as ``python -m tests.fault_harness cli <CLI args>`` or ``... app <JSON call>`` from the repository root; the
driver forks workers from a ``python -m tests.fault_harness zygote`` process that has imported everything once.
Environment of a worker:
  TDA_FAULT_AUDIT  a file; every completed marker or table write appends {"t", "pid", "kind", "key"} to it,
                   and the worker appends {"event": "start"} when its imports are done
  TDA_FAULT_BARRIER  n: wait until n workers sharing the audit log have started, then all begin together
  TDA_FAULT_AT     "<point>:<n>": at the n-th write of that point the worker SIGKILLs itself there, or for
                   "enospc" fails it with ENOSPC after half its bytes. Points: "save" (start of Store.save, before
                   anything of the artifact is written), "tensor" (half of the tensor temp file written),
                   "marker" (tensors in place, marker not yet written), "table" (before a results-table write),
                   "enospc" (any atomic write)
The tiny task is digits-mlp with a 2-epoch recipe (`digits-tiny`); the tiny grid has three settings.
"""
from __future__ import annotations

import dataclasses
import errno
import functools
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
TINY = "digits-tiny"
EVAL = ["--M", "8"]
TOLERANCE = dict(rtol=1e-4, atol=1e-5)  # a model retrained in a different batch of vmapped models
EXPENSIVE = ("checkpoints", "ground_truth_models", "features", "adapters")  # each must be computed once

# The four long-running commands, each small enough for the normal suite (a few seconds of work).
COMMANDS: dict[str, list[str]] = {
    "train": ["train", "--task", TINY, "--seeds", "0-3"],
    "ground-truth": ["ground-truth", "--task", TINY, *EVAL, "--chunk", "2"],
    "attribute": ["attribute", "--task", TINY, "--method", "grad-dot", "--ensemble", "dropout", "--I", "2", "--D",
                  "2", "--proj", "kron", "--proj-dim", "64"],
    "sweep": ["sweep", "--task", TINY, *EVAL, "--methods", "grad-dot", "--grid", "tiny", "--proj", "kron"],
}


def register_tiny() -> None:
    """`digits-tiny` (digits-mlp, 2 epochs) and the `tiny` sweep grid, in this process."""
    from tda_core import experiments, tasks
    from tda_core.specs import EnsembleSpec

    base = tasks.get_task("digits-mlp")
    tasks.register_task(dataclasses.replace(base, name=TINY, recipe=dataclasses.replace(base.recipe, epochs=2)))
    experiments.GRIDS["tiny"] = lambda: [EnsembleSpec("naive", I=1), EnsembleSpec("naive", I=2),
                                         EnsembleSpec("dropout", I=1, D=2)]


@contextmanager
def tiny_registered() -> Iterator[None]:
    """`register_tiny` for the duration of a with-block; the registries are restored in place afterwards."""
    from tda_core import experiments, tasks

    saved = [(registry, dict(registry)) for registry in (tasks.TASKS, experiments.GRIDS)]
    register_tiny()
    try:
        yield
    finally:
        for registry, before in saved:
            registry.clear()
            registry.update(before)


# --- the worker ------------------------------------------------------------------------------------
def _audit(path: str, record: dict[str, Any]) -> None:
    line = json.dumps({"t": time.time(), "pid": os.getpid(), **record}) + "\n"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        os.write(fd, line.encode())  # one O_APPEND write: lines of concurrent workers never interleave
    finally:
        os.close(fd)


def _install_hooks() -> None:
    from tda_core import store as store_module

    audit = os.environ.get("TDA_FAULT_AUDIT")
    point, _, nth = os.environ.get("TDA_FAULT_AT", "").partition(":")
    counts: dict[str, int] = {}

    def hit(name: str) -> bool:
        counts[name] = counts.get(name, 0) + 1
        return point == name and counts[name] == int(nth)

    def die() -> None:
        os.kill(os.getpid(), signal.SIGKILL)

    real_write, real_save = store_module.atomic_write, store_module.Store.save

    def atomic_write(path: Path, data: bytes) -> None:
        if path.suffix == ".safetensors" and hit("tensor"):
            store_module._temp_name(path).write_bytes(data[: len(data) // 2])
            die()
        if (path.suffix == ".json" and hit("marker")) or (path.suffix == ".csv" and hit("table")):
            die()
        if hit("enospc"):
            real_write_all = store_module._write_all

            def half_then_full(fd: int, payload: bytes) -> None:
                real_write_all(fd, payload[: len(payload) // 2])
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

            store_module._write_all = half_then_full
            try:
                real_write(path, data)
            finally:
                store_module._write_all = real_write_all
        real_write(path, data)
        if audit and path.suffix in (".json", ".csv"):
            _audit(audit, {"kind": path.parent.name, "key": path.stem})

    def save(self, kind, key, tensors, meta):  # noqa: ANN001, ANN202 - Store.save's signature
        if hit("save"):
            die()
        return real_save(self, kind, key, tensors, meta)

    store_module.atomic_write = atomic_write
    store_module.Store.save = save
    if audit:
        _audit(audit, {"event": "start"})
        together = int(os.environ.get("TDA_FAULT_BARRIER", "0"))
        while len([r for r in events(Path(audit)) if r.get("event") == "start"]) < together:
            time.sleep(0.01)  # racers begin their work at the same moment


def _app_call(spec: dict[str, Any]) -> int:
    """What an app session computes: an attribution (browse page) or a run recorded in the table (build page)."""
    from safetensors.torch import save_file

    from tda_core.attribution import attribute
    from tda_core.experiments import run
    from tda_core.results import append_results, is_recorded
    from tda_core.specs import EnsembleSpec, EvalSpec, MethodSpec
    from tda_core.store import Store

    method, ensemble = MethodSpec(**spec["method"]), EnsembleSpec(**spec["ensemble"])
    if spec["call"] == "attribute":
        result = attribute(spec["task"], method, ensemble, store=Store())
        save_file({"scores": result.scores.contiguous()}, spec["out"])
    else:
        result = run(spec["task"], method, ensemble, EvalSpec(**spec["eval"]), store=Store())
        if not is_recorded(result.setting_key, Store()):  # as the build page does
            append_results(Store(), [result.row()])
        Path(spec["out"]).write_text(json.dumps({"lds": result.lds}))
    return 0


def worker_main(argv: list[str]) -> int:
    register_tiny()
    _install_hooks()
    if argv[0] == "app":
        return _app_call(json.loads(argv[1]))
    from tda_core.cli import main

    return main(argv[1:])


# --- the driver side -------------------------------------------------------------------------------
def zygote_main() -> int:
    """Import everything and warm it up once (on a throw-away store), then fork a worker per request (a fresh
    interpreter costs seconds of imports and first calls; a fork costs milliseconds, and a forked worker is
    killed, locks and writes like a fresh one). With one thread per process (OMP_NUM_THREADS=1) the warm-up
    leaves no threads behind, so forking is safe.

    Requests and replies are JSON lines on stdin / stdout: {"op": "spawn", "argv", "env", "stdout", "stderr"}
    -> {"pid"}; {"op": "wait", "pid", "block"} -> {"rc"} (None while running; -9 when SIGKILLed)."""
    import contextlib
    import io

    import tda_core.results  # noqa: F401 - imported before forking, so workers start at once
    from tda_core.cli import main

    register_tiny()
    warm = Path(tempfile.mkdtemp(prefix="zygote-warm-up-"))
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        for name in ("sweep", "attribute"):  # first calls of torch.func cost seconds; the workers start warm
            main([*COMMANDS[name], "--store", str(warm), "--json"])
    shutil.rmtree(warm)
    replies = os.fdopen(os.dup(1), "w")
    for line in sys.stdin:
        request = json.loads(line)
        if request["op"] == "spawn":
            sys.stdout.flush()
            sys.stderr.flush()
            pid = os.fork()
            if pid == 0:
                _forked_worker(request)
            reply: dict[str, Any] = {"pid": pid}
        else:
            done, status = os.waitpid(request["pid"], 0 if request["block"] else os.WNOHANG)
            reply = {"rc": os.waitstatus_to_exitcode(status) if done else None}
        replies.write(json.dumps(reply) + "\n")
        replies.flush()
    return 0


def _forked_worker(request: dict[str, Any]) -> None:
    code = 1
    try:
        os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
        os.dup2(os.open(request["stdout"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644), 1)
        os.dup2(os.open(request["stderr"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644), 2)
        os.environ.clear()
        os.environ.update(request["env"])
        result = worker_main(request["argv"])
        code = result if isinstance(result, int) else 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except BaseException:  # noqa: BLE001 - report it like a crashed interpreter would
        import traceback

        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


@dataclasses.dataclass
class Worker:
    """A started worker process and where it writes."""

    zygote: "Zygote"
    pid: int
    audit: Path
    out: Path
    err: Path
    rc: int | None = None

    def poll(self) -> int | None:
        """Its exit code (negative: killed by that signal), or None while it runs."""
        if self.rc is None:
            self.rc = self.zygote.ask({"op": "wait", "pid": self.pid, "block": False})["rc"]
        return self.rc

    def wait(self) -> tuple[int, str, str]:
        """Wait for it: (exit code, stdout, stderr)."""
        if self.rc is None:
            self.rc = self.zygote.ask({"op": "wait", "pid": self.pid, "block": True})["rc"]
        return self.rc, self.out.read_text(), self.err.read_text()

    def kill(self) -> None:
        os.kill(self.pid, signal.SIGKILL)


class Zygote:
    """A process that forks workers on request (`zygote_main`); close it when done."""

    def __init__(self, scratch: Path) -> None:
        self.scratch = scratch
        scratch.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen([sys.executable, "-m", "tests.fault_harness", "zygote"], cwd=REPO, env=env,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.count = 0

    def ask(self, request: dict[str, Any]) -> dict[str, Any]:
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError("the fault-harness zygote died")
        return json.loads(line)

    def start(self, args: list[str], store: Path, audit: Path, *, app: dict | None = None,
              fault: str | None = None, barrier: int = 0) -> Worker:
        """Start a worker on `store` running the CLI with `args` (or the app call `app`); with `barrier`, it
        begins its work only once that many workers on the same audit log have started."""
        env = {**os.environ, "TDA_STORE": str(store), "TDA_FAULT_AUDIT": str(audit),
               "TDA_FAULT_BARRIER": str(barrier)}
        env.pop("TDA_FAULT_AT", None)
        if fault:
            env["TDA_FAULT_AT"] = fault
        self.count += 1
        out, err = self.scratch / f"{self.count}.out", self.scratch / f"{self.count}.err"
        argv = ["app", json.dumps(app)] if app is not None else ["cli", *args]
        pid = self.ask({"op": "spawn", "argv": argv, "env": env, "stdout": str(out), "stderr": str(err)})["pid"]
        return Worker(self, pid, audit, out, err)

    def run(self, args: list[str], store: Path, audit: Path, **kw: Any) -> tuple[int, str, str]:
        """Start a worker and wait for it: (exit code, stdout, stderr)."""
        return self.start(args, store, audit, **kw).wait()

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(60)


def events(audit: Path, pid: int | None = None) -> list[dict[str, Any]]:
    """The audit log's records (of one process, or all)."""
    if not audit.exists():
        return []
    rows = [json.loads(line) for line in audit.read_text().splitlines() if line.strip()]
    return [r for r in rows if pid is None or r["pid"] == pid]


def wait_for_start(worker: Worker, timeout: float = 120) -> float:
    """Block until the worker's set-up is done; the time its work began."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        begun = [r["t"] for r in events(worker.audit, worker.pid) if r.get("event") == "start"]
        if begun:
            return begun[0]
        if worker.poll() is not None:
            raise RuntimeError(f"worker exited early: {worker.wait()}")
        time.sleep(0.002)
    raise TimeoutError("worker did not start")


def kill_after(worker: Worker, seconds: float) -> float | None:
    """SIGKILL the worker `seconds` after its work began; the kill time, or None when it finished first."""
    begun = wait_for_start(worker)
    while time.time() < begun + seconds:
        time.sleep(min(0.002, max(0.0, begun + seconds - time.time())))
    if worker.poll() is not None:
        worker.wait()
        return None
    worker.kill()
    killed_at = time.time()
    rc = worker.wait()[0]
    return killed_at if rc == -signal.SIGKILL else None


def lost_seconds(audit: Path, pid: int, killed_at: float) -> float:
    """Work a killed worker had done since its last durable write (marker or table row): redone by a rerun."""
    mine = events(audit, pid)
    last = max((r["t"] for r in mine), default=killed_at)
    return max(0.0, killed_at - last)


def durable_writes(audit: Path, pid: int | None = None) -> list[tuple[str, str]]:
    """(kind, key) of every completed marker or table write in the audit log."""
    return [(r["kind"], r["key"]) for r in events(audit, pid) if "kind" in r]


# --- checks on a store -----------------------------------------------------------------------------
def stored(root: Path) -> dict[tuple[str, str], dict[str, Any]]:
    """Every artifact that passes the store's checks, by (kind, key): its tensors. Read-only: a damaged
    artifact is left in place (and left out)."""
    from tda_core.store import Store, _Corrupt

    store = Store(root)
    out = {}
    for folder in sorted(p for p in root.iterdir() if p.is_dir()) if root.exists() else []:
        for key in store.keys(folder.name):
            try:
                out[(folder.name, key)] = store._verify(folder.name, key)[1]
            except _Corrupt:
                pass
    return out


def tensors_differ(a: dict[str, Any], b: dict[str, Any]) -> str | None:
    """None when two artifacts' tensors agree within TOLERANCE, else what differs."""
    import torch

    if set(a) != set(b):
        return f"tensor names {sorted(a)} vs {sorted(b)}"
    for name in a:
        x, y = a[name], b[name]
        if x.shape != y.shape or x.dtype != y.dtype:
            return f"{name}: {tuple(x.shape)} {x.dtype} vs {tuple(y.shape)} {y.dtype}"
        if x.is_floating_point():
            if not torch.allclose(x.double(), y.double(), **TOLERANCE, equal_nan=True):
                return f"{name}: max difference {float((x.double() - y.double()).abs().max()):.3g}"
        elif not torch.equal(x, y):
            return f"{name}: integers differ"
    return None


def wrong_artifacts(root: Path, reference: dict[tuple[str, str], dict[str, Any]]) -> list[str]:
    """Artifacts of a store that load but whose contents differ from the reference run's (must be none)."""
    wrong = []
    for (kind, key), tensors in stored(root).items():
        if (kind, key) not in reference:
            wrong.append(f"{kind}/{key}: not produced by the reference run")
        elif (why := tensors_differ(tensors, reference[(kind, key)])) is not None:
            wrong.append(f"{kind}/{key}: {why}")
    return wrong


def same_as_reference(root: Path, reference: dict[tuple[str, str], dict[str, Any]]) -> list[str]:
    """Differences between a store and the reference run's store: missing, extra or different artifacts."""
    found = stored(root)
    problems = [f"{k[0]}/{k[1]}: missing" for k in reference if k not in found]
    return problems + wrong_artifacts(root, reference)


def table_rows(root: Path) -> "Any":
    """The results table of a store (a DataFrame)."""
    from tda_core.store import Store

    return Store(root).read_table("results")


def leftovers(root: Path) -> list[str]:
    """Temp files and tensor files without a marker (half-written artifacts)."""
    if not root.exists():
        return []
    temps = [str(p.relative_to(root)) for p in root.rglob("*.tmp")]
    orphans = [str(p.relative_to(root)) for p in root.rglob("*.safetensors") if not p.with_suffix(".json").exists()]
    return temps + orphans


# --- shared by the tests and the benchmark ----------------------------------------------------------
def run_here(args: list[str], store: Path, quiet: bool = False) -> int:
    """The CLI in this process on `store`, with the tiny task and one thread (as the workers run); `quiet`
    also swallows what it writes to stderr."""
    import contextlib
    import io

    import torch

    from tda_core.cli import main

    threads = torch.get_num_threads()
    with (tiny_registered(), contextlib.redirect_stdout(io.StringIO()),
          contextlib.redirect_stderr(io.StringIO()) if quiet else contextlib.nullcontext()):
        torch.set_num_threads(1)
        try:
            return main([*args, "--store", str(store), "--json"])
        finally:
            torch.set_num_threads(threads)


def markers(root: Path) -> dict[str, tuple[int, int]]:
    """(inode, mtime) of every marker: what a rerun must leave untouched when it resumes."""
    return {str(p.relative_to(root)): (p.stat().st_ino, p.stat().st_mtime_ns) for p in root.rglob("*.json")}


DAMAGES = ("truncate", "zero-fill", "bit-flip", "delete")


def damage(path: Path, how: str, where: float = 0.75) -> None:
    """Damage a file: cut it at `where` (a fraction of its length), zero it, flip one bit there, or delete it."""
    data = bytearray(path.read_bytes())
    at = min(len(data) - 1, int(where * len(data)))
    if how == "truncate":
        path.write_bytes(bytes(data[:at]))
    elif how == "zero-fill":
        path.write_bytes(bytes(len(data)))
    elif how == "bit-flip":  # at 0.75: in the payload of a tensor file, in the meta of a marker
        data[at] ^= 0x10
        path.write_bytes(bytes(data))
    elif how == "delete":
        path.unlink()
    else:
        raise ValueError(how)


@functools.cache
def can_mount() -> bool:
    """True when this process may mount a tmpfs (root with mount rights): real full and read-only disks."""
    if os.geteuid() != 0 or shutil.which("mount") is None:
        return False
    probe = Path(tempfile.mkdtemp(prefix="tda-mount-probe-"))
    ok = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(probe)], capture_output=True)
    if ok.returncode == 0:
        subprocess.run(["umount", str(probe)], check=True)
    probe.rmdir()
    return ok.returncode == 0


@contextmanager
def small_disk(where: Path, size: str = "2m") -> Iterator[Path]:
    """A tmpfs of `size` mounted at `where` (needs `can_mount()`), unmounted afterwards."""
    where.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)], check=True)
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=True)


def fill(disk: Path, leave: int) -> None:
    """Fill a disk with a filler file, leaving about `leave` bytes free."""
    free = shutil.disk_usage(disk).free
    (disk / "filler").write_bytes(bytes(max(0, free - leave)))


if __name__ == "__main__":
    sys.exit(zygote_main() if sys.argv[1:] == ["zygote"] else worker_main(sys.argv[1:]))
