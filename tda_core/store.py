"""Content-addressed artifact store: tensors as safetensors, metadata as JSON.

Layout: ``<root>/<kind>/<key>.safetensors`` plus ``<key>.json``. The JSON is written last
and holds the SHA-256 of the tensor file, so a half-written or corrupted artifact is
detected on load, reported, removed and recomputed. Writes are atomic (temp file +
rename) and guarded by a per-key file lock so concurrent processes never duplicate work.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from filelock import FileLock
from safetensors.torch import load_file, save_file

from .paths import store_dir

FORMAT_VERSION = 1
log = logging.getLogger(__name__)


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


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(Path(tmp))
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


@dataclasses.dataclass
class Artifact:
    """One stored artifact: its tensors, its metadata and where it lives."""

    kind: str
    key: str
    tensors: dict[str, torch.Tensor]
    meta: dict[str, Any]
    nbytes: int


class Store:
    """The one place artifacts (checkpoints, features, scores, ground truth, tables) go."""

    def __init__(self, root: str | os.PathLike | None = None) -> None:
        self.root = store_dir(root)

    def __repr__(self) -> str:
        return f"Store({str(self.root)!r})"

    def _base(self, kind: str, key: str) -> Path:
        return self.root / kind / key

    def has(self, kind: str, key: str) -> bool:
        """True when a complete artifact (JSON marker present) is stored."""
        return self._base(kind, key).with_suffix(".json").exists()

    @contextmanager
    def lock(self, kind: str, key: str) -> Iterator[None]:
        """Exclusive lock on one key, across processes."""
        lock_path = self._base(kind, key).with_suffix(".lock")
        lock_path.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(str(lock_path)):
            yield

    def save(self, kind: str, key: str, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> Artifact:
        """Write tensors then metadata, each atomically; the JSON is the completion marker."""
        base = self._base(kind, key)
        tensors = {name: t.detach().to("cpu").contiguous() for name, t in tensors.items()}
        tensor_path = base.with_suffix(".safetensors")
        _atomic_write(tensor_path, lambda p: save_file(tensors, str(p)))
        record = {"format": FORMAT_VERSION, "kind": kind, "key": key,
                  "sha256": _sha256(tensor_path), "meta": meta}
        _atomic_write(base.with_suffix(".json"), lambda p: p.write_text(json.dumps(record, indent=1, default=str)))
        return Artifact(kind, key, tensors, meta, tensor_path.stat().st_size)

    def load(self, kind: str, key: str) -> Artifact | None:
        """Load an artifact; a missing one gives None, a corrupt one is reported, removed and gives None."""
        base = self._base(kind, key)
        json_path, tensor_path = base.with_suffix(".json"), base.with_suffix(".safetensors")
        if not json_path.exists():
            return None
        try:
            record = json.loads(json_path.read_text())
            if record.get("sha256") != _sha256(tensor_path):
                raise ValueError("checksum mismatch")
            tensors = load_file(str(tensor_path))
        except Exception as exc:  # noqa: BLE001 - any damage means: recompute
            log.warning("store: artifact %s/%s is corrupt (%s); removing it so it is recomputed", kind, key, exc)
            self.remove(kind, key)
            return None
        return Artifact(kind, key, tensors, record["meta"], tensor_path.stat().st_size)

    def remove(self, kind: str, key: str) -> None:
        """Delete an artifact's files if present."""
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
        folder = self.root / kind
        return sorted(p.stem for p in folder.glob("*.json")) if folder.exists() else []

    def meta(self, kind: str, key: str) -> dict[str, Any] | None:
        """An artifact's metadata without reading its tensors."""
        path = self._base(kind, key).with_suffix(".json")
        return json.loads(path.read_text())["meta"] if path.exists() else None

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
        return self.root / "tables" / f"{name}.csv"

    def append_rows(self, name: str, rows: list[dict[str, Any]]) -> None:
        """Append rows to a CSV results table (atomic rewrite under the table's lock)."""
        path = self.table_path(name)
        with self.lock("tables", name):
            old = pd.read_csv(path) if path.exists() else pd.DataFrame()
            new = pd.concat([old, pd.DataFrame(rows)], ignore_index=True)
            _atomic_write(path, lambda p: new.to_csv(p, index=False))

    def read_table(self, name: str) -> pd.DataFrame:
        """A results table, empty when nothing was written yet."""
        path = self.table_path(name)
        return pd.read_csv(path) if path.exists() else pd.DataFrame()
