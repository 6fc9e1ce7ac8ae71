"""Content-addressed artifact store: tensors as safetensors, metadata as JSON.

Layout: ``<root>/<kind>/<key>.safetensors`` plus ``<key>.json``. The JSON marker is written
last and holds the tensor file's size and SHA-256 plus a checksum of its own fields, so a
half-written, truncated, zero-filled or bit-flipped artifact (tensors or marker) is detected on
load, reported in one line, removed and recomputed. Every write is atomic and durable: a temp
file is written, fsynced, renamed over the target and the folder fsynced, so after a crash or a
power loss a marker never points at tensors that did not reach the disk. Per-key file locks
keep concurrent processes from computing one key twice. A full or read-only store raises
`StoreError` (one line naming the store and what to do) and leaves no partial files behind.
Kinds, keys and table names are plain names: nothing can address a file outside the root.
"""
from __future__ import annotations

import dataclasses
import errno
import hashlib
import json
import logging
import os
import re
import secrets
import socket
from collections.abc import Callable, Iterable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from filelock import FileLock
from safetensors.torch import load_file
from safetensors.torch import save as safetensors_bytes

from .errors import UserError
from .paths import store_dir

FORMAT_VERSION = 1
log = logging.getLogger(__name__)
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.=-]{0,127}")  # a kind, key or table name: one plain path component
MARKER_CHECKSUM = "marker_sha256"
_ORPHANS_REPORTED: set[tuple[Path, str, str]] = set()  # tensors without a marker, reported once per process
_HOST = socket.gethostname().replace(".", "_") or "host"
FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
READ_ONLY_ERRNOS = (errno.EROFS, errno.EACCES, errno.EPERM)


def canonical(obj: Any) -> Any:
    """A JSON-ready canonical form of specs: dataclasses become dicts, tuples lists."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: canonical(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, dict):
        return {str(k): canonical(v) for k, v in sorted(obj.items(), key=lambda kv: str(kv[0]))}
    if isinstance(obj, (list, tuple)):
        return [canonical(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    return obj


def spec_key(spec: Any) -> str:
    """Stable hash of a spec's canonical JSON plus the store format version."""
    text = json.dumps({"format": FORMAT_VERSION, "spec": canonical(spec)}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:24]


class StoreError(UserError):
    """The store cannot be written (full, read-only, no permission): what happened and what to do, in one line."""


def store_problem(root: Path, exc: OSError) -> StoreError | None:
    """The one-line StoreError for a full or unwritable store, or None when `exc` is neither."""
    what = exc.strerror or str(exc)
    if exc.errno in FULL_ERRNOS:
        advice = "free some space there, or point --store / TDA_STORE at a disk with more room"
    elif exc.errno in READ_ONLY_ERRNOS:
        advice = ("make it writable, or point --store / TDA_STORE at a writable folder "
                  "(what is already stored there can still be read)")
    else:
        return None
    return StoreError(f"cannot write to the store at {root}: {what}; {advice}. Finished artifacts are kept")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _marker_digest(record: dict[str, Any]) -> str:
    """Checksum of a marker's fields (all but the checksum itself), in canonical JSON."""
    body = {k: v for k, v in record.items() if k != MARKER_CHECKSUM}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _temp_name(path: Path) -> Path:
    """A temp file beside `path` naming its writer (host, pid), so leftovers of dead writers can be removed."""
    return path.with_name(f".{path.name}.{_HOST}.{os.getpid()}.{secrets.token_hex(4)}.tmp")


def _remove_dead_temps(path: Path) -> None:
    """Delete temp files of `path` left by writers on this host that no longer run (a killed process)."""
    for tmp in path.parent.glob(f".{path.name}.*.tmp"):
        parts = tmp.name[len(path.name) + 2:].split(".")
        if len(parts) != 4 or parts[0] != _HOST or not parts[1].isdigit():
            continue
        try:
            os.kill(int(parts[1]), 0)
        except ProcessLookupError:
            tmp.unlink(missing_ok=True)
        except PermissionError:
            pass  # alive, someone else's


def atomic_write(path: Path, data: bytes) -> None:
    """Write `data` to `path` durably and atomically: temp file, fsync, rename, fsync of the folder.

    On any failure the temp file is removed and `path` is left as it was."""
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_dead_temps(path)
    tmp = _temp_name(path)
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            _write_all(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    finally:
        tmp.unlink(missing_ok=True)


@dataclasses.dataclass
class Artifact:
    """One stored artifact: its tensors, its metadata and where it lives."""

    kind: str
    key: str
    tensors: dict[str, torch.Tensor]
    meta: dict[str, Any]
    nbytes: int


class _Corrupt(Exception):
    """An artifact that fails verification: the reason, in a few words."""


class Store:
    """The one place artifacts (checkpoints, features, scores, ground truth, tables) go."""

    def __init__(self, root: str | os.PathLike | None = None) -> None:
        self.root = store_dir(root)

    def __repr__(self) -> str:
        return f"Store({str(self.root)!r})"

    def _base(self, kind: str, key: str) -> Path:
        for what, name in (("kind", kind), ("key", key)):
            if not isinstance(name, str) or not NAME.fullmatch(name) or ".." in name:
                raise UserError(f"store {what} {name!r} is not a plain name (letters, digits, '_', '-', '.', '='; "
                                "no '/', no '..'); it could point outside the store")
        return self.root / kind / key

    @contextmanager
    def _writing(self) -> Iterator[None]:
        """Turn a full or read-only store into a one-line StoreError."""
        try:
            yield
        except OSError as exc:
            problem = store_problem(self.root, exc)
            if problem is None:
                raise
            raise problem from exc

    def has(self, kind: str, key: str) -> bool:
        """True when a complete artifact (JSON marker present) is stored."""
        return self._base(kind, key).with_suffix(".json").exists()

    @contextmanager
    def lock(self, kind: str, key: str) -> Iterator[None]:
        """Exclusive lock on one key, across processes (and threads)."""
        lock_path = self._base(kind, key).with_suffix(".lock")
        with self._writing():
            lock_path.parent.mkdir(parents=True, exist_ok=True)
            lock = FileLock(str(lock_path))
            lock.acquire()
        try:
            yield
        finally:
            lock.release()

    @contextmanager
    def lock_keys(self, kind: str, keys: Iterable[str]) -> Iterator[None]:
        """Locks on several keys of one kind, taken in sorted order (so two holders never deadlock)."""
        with ExitStack() as stack:
            for key in sorted(set(keys)):
                stack.enter_context(self.lock(kind, key))
            yield

    def save(self, kind: str, key: str, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> Artifact:
        """Write tensors then the marker, each durably and atomically; the marker is the completion mark.

        Raises StoreError when the store is full or read-only (nothing of this artifact is left behind)."""
        base = self._base(kind, key)
        tensors = {name: t.detach().to("cpu").contiguous() for name, t in tensors.items()}
        data = safetensors_bytes(tensors)
        tensor_path, json_path = base.with_suffix(".safetensors"), base.with_suffix(".json")
        record = {"format": FORMAT_VERSION, "kind": kind, "key": key, "sha256": hashlib.sha256(data).hexdigest(),
                  "size": len(data), "meta": meta}
        record = json.loads(json.dumps(record, default=str))  # the form a load will see
        record[MARKER_CHECKSUM] = _marker_digest(record)
        with self._writing():
            try:
                atomic_write(tensor_path, data)
                atomic_write(json_path, json.dumps(record, indent=1).encode())
            except BaseException:
                if not json_path.exists():  # tensors without their marker would be an orphan
                    tensor_path.unlink(missing_ok=True)
                raise
        return Artifact(kind, key, tensors, record["meta"], len(data))

    def _verified_record(self, json_path: Path) -> dict[str, Any]:
        try:
            record = json.loads(json_path.read_bytes().decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise _Corrupt(f"marker is not valid JSON: {exc}") from None
        if not isinstance(record, dict) or not isinstance(record.get("meta"), dict) or "sha256" not in record:
            raise _Corrupt("marker lacks its fields")
        if (MARKER_CHECKSUM in record) != ("size" in record):  # markers written before checksums have neither
            raise _Corrupt("marker fields damaged")
        if MARKER_CHECKSUM in record and record[MARKER_CHECKSUM] != _marker_digest(record):
            raise _Corrupt("marker checksum mismatch")
        return record

    def _verify(self, kind: str, key: str) -> tuple[dict[str, Any], dict[str, torch.Tensor], int]:
        base = self._base(kind, key)
        json_path, tensor_path = base.with_suffix(".json"), base.with_suffix(".safetensors")
        record = self._verified_record(json_path)
        if not tensor_path.exists():
            raise _Corrupt("its tensor file is missing")
        size = tensor_path.stat().st_size
        if "size" in record and record["size"] != size:
            raise _Corrupt(f"tensor file has {size} bytes, its marker says {record['size']} (truncated or extended)")
        if record["sha256"] != _sha256(tensor_path):
            raise _Corrupt("tensor checksum mismatch")
        try:
            tensors = load_file(str(tensor_path))
        except Exception as exc:  # noqa: BLE001 - unreadable despite a matching checksum
            raise _Corrupt(f"tensor file unreadable: {exc}") from None
        return record, tensors, size

    def load(self, kind: str, key: str) -> Artifact | None:
        """Load an artifact; a missing one gives None, a corrupt one is reported, removed and gives None."""
        base = self._base(kind, key)
        if not base.with_suffix(".json").exists():
            if base.with_suffix(".safetensors").exists() and (self.root, kind, key) not in _ORPHANS_REPORTED:
                _ORPHANS_REPORTED.add((self.root, kind, key))
                log.warning("store: %s/%s has tensors but no marker (an interrupted write); it will be recomputed",
                            kind, key)
            return None
        try:
            record, tensors, size = self._verify(kind, key)
        except _Corrupt as exc:
            self._discard(kind, key, str(exc))
            return None
        except FileNotFoundError:  # removed by another process between the checks
            return None
        return Artifact(kind, key, tensors, record["meta"], size)

    def _discard(self, kind: str, key: str, reason: str) -> None:
        try:
            self.remove(kind, key)
            outcome = "removed; it will be recomputed"
        except OSError as exc:
            outcome = f"could not remove it ({exc.strerror or exc})"
        log.warning("store: artifact %s/%s is corrupt (%s); %s", kind, key, reason, outcome)

    def remove(self, kind: str, key: str) -> None:
        """Delete an artifact's files if present (the marker first, so no marker outlives its tensors)."""
        base = self._base(kind, key)
        for suffix in (".json", ".safetensors"):
            base.with_suffix(suffix).unlink(missing_ok=True)

    def get_or_create(self, kind: str, key: str,
                      compute: Callable[[], tuple[dict[str, torch.Tensor], dict[str, Any]]]) -> tuple[Artifact, bool]:
        """Load `kind/key`, or compute and save it under the key's lock. Returns (artifact, loaded_from_store)."""
        found = self.load(kind, key)
        if found is not None:
            return found, True
        with self.lock(kind, key):
            found = self.load(kind, key)  # another process may have finished it meanwhile
            if found is not None:
                return found, True
            tensors, meta = compute()
            return self.save(kind, key, tensors, meta), False

    def keys(self, kind: str) -> list[str]:
        """Keys of the complete artifacts of one kind."""
        folder = self._base(kind, "x").parent
        return sorted(p.stem for p in folder.glob("*.json")) if folder.exists() else []

    def meta(self, kind: str, key: str) -> dict[str, Any] | None:
        """An artifact's metadata without reading its tensors (None when absent or its marker is damaged)."""
        path = self._base(kind, key).with_suffix(".json")
        if not path.exists():
            return None
        try:
            return self._verified_record(path)["meta"]
        except _Corrupt as exc:
            log.warning("store: artifact %s/%s is corrupt (%s)", kind, key, exc)
            return None

    def summary(self) -> pd.DataFrame:
        """One row per artifact kind: how many and how many bytes."""
        rows = []
        if self.root.exists():
            for folder in sorted(p for p in self.root.iterdir() if p.is_dir()):
                files = [f for f in folder.iterdir() if f.suffix in (".safetensors", ".json", ".csv")]
                count = len([f for f in files if f.suffix in (".json", ".csv")])
                if count:
                    size = sum(f.stat().st_size for f in files)
                    rows.append({"kind": folder.name, "artifacts": count, "bytes": size})
        return pd.DataFrame(rows, columns=["kind", "artifacts", "bytes"])

    # --- result tables -------------------------------------------------------------------
    def table_path(self, name: str) -> Path:
        return self._base("tables", name).with_suffix(".csv")

    def append_rows(self, name: str, rows: list[dict[str, Any]], unique_by: str | None = None) -> int:
        """Append rows to a CSV results table (durable atomic rewrite under the table's lock); returns how many.

        With `unique_by`, rows whose value in that column is already in the table are left out (so two
        processes recording the same result write it once)."""
        path = self.table_path(name)
        with self.lock("tables", name):
            old = self.read_table(name)
            if unique_by is not None and unique_by in old:
                present = set(old[unique_by].astype(str))
                rows = [r for r in rows if str(r.get(unique_by)) not in present]
            if not rows:
                return 0
            new = pd.concat([old, pd.DataFrame(rows)], ignore_index=True)
            with self._writing():
                atomic_write(path, new.to_csv(index=False).encode())
        return len(rows)

    def read_table(self, name: str) -> pd.DataFrame:
        """A results table, empty when nothing was written yet; an unreadable one raises UserError naming it."""
        path = self.table_path(name)
        if not path.exists():
            return pd.DataFrame()
        try:
            return pd.read_csv(path)
        except (ValueError, UnicodeDecodeError) as exc:  # pandas' parser errors are ValueErrors
            raise UserError(f"the results table {path} cannot be read ({type(exc).__name__}: "
                            f"{str(exc).splitlines()[0] if str(exc) else ''}); move it aside and re-run "
                            "(a sweep recomputes only what is missing)") from None
