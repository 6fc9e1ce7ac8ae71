"""Where data and artifacts live. Both defaults sit under ~/.cache/tda-explorer and can be overridden."""
from __future__ import annotations

import os
from pathlib import Path

CACHE_ROOT = Path.home() / ".cache" / "tda-explorer"


def data_dir(override: str | os.PathLike | None = None) -> Path:
    """Data directory: `override` (e.g. --data-dir), else $TDA_DATA_DIR, else ~/.cache/tda-explorer/data."""
    if override:
        return Path(override).expanduser()
    return Path(os.environ.get("TDA_DATA_DIR") or CACHE_ROOT / "data").expanduser()


def store_dir(override: str | os.PathLike | None = None) -> Path:
    """Artifact store: `override` (e.g. --store), else $TDA_STORE, else ~/.cache/tda-explorer/store."""
    if override:
        return Path(override).expanduser()
    return Path(os.environ.get("TDA_STORE") or CACHE_ROOT / "store").expanduser()
