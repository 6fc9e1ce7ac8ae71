"""Options and helpers shared by CLI commands."""
from __future__ import annotations

import argparse
import json
import sys
from typing import Any

import pandas as pd

from ..errors import UserError


def common_options() -> argparse.ArgumentParser:
    """--store, --data-dir, --device, --json and --tasks-file, accepted by every command."""
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--store", help="artifact store folder (default $TDA_STORE or ~/.cache/tda-explorer/store)")
    p.add_argument("--data-dir", help="data folder (default $TDA_DATA_DIR or ~/.cache/tda-explorer/data)")
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu or cuda[:N]")
    p.add_argument("--json", action="store_true", help="print machine-readable JSON instead of a table")
    p.add_argument("--tasks-file", help="a Python file registering your own tasks (default $TDA_TASKS_FILE)")
    return p


def parse_seeds(text: str) -> list[int]:
    """'0-4' -> [0..4]; '0,3,7' -> [0, 3, 7]; '5' -> [5]."""
    seeds: list[int] = []
    try:
        for part in text.split(","):
            if "-" in part.strip()[1:]:
                lo, hi = part.split("-", 1)
                seeds.extend(range(int(lo), int(hi) + 1))
            else:
                seeds.append(int(part))
    except ValueError:
        raise UserError(f"cannot read seeds {text!r}; write e.g. 0-4 or 0,3,7") from None
    if not seeds:
        raise UserError("no seeds given; write e.g. --seeds 0-4")
    return seeds


def emit(rows: list[dict[str, Any]] | dict[str, Any], as_json: bool) -> None:
    """Print rows as JSON or as an aligned table."""
    if as_json:
        json.dump(rows, sys.stdout, indent=1, default=str)
        sys.stdout.write("\n")
    else:
        frame = pd.DataFrame(rows if isinstance(rows, list) else [rows])
        print(frame.to_string(index=False))
