"""Options and helpers shared by CLI commands."""
from __future__ import annotations

import argparse
import json
import sys
from typing import Any

import pandas as pd

from ..errors import UserError
from ..executors import EXECUTORS, Executor, make_executor
from ..ray_executor import ADDRESS_ENV, STORE_MODES


def common_options() -> argparse.ArgumentParser:
    """--store, --data-dir, --device, --json and --tasks-file, accepted by every command."""
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--store", help="artifact store folder (default $TDA_STORE or ~/.cache/tda-explorer/store)")
    p.add_argument("--data-dir", help="data folder (default $TDA_DATA_DIR or ~/.cache/tda-explorer/data)")
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu or cuda[:N]")
    p.add_argument("--json", action="store_true", help="print machine-readable JSON instead of a table")
    p.add_argument("--tasks-file", help="a Python file registering your own tasks (default $TDA_TASKS_FILE)")
    p.add_argument("--executor", default="local", choices=EXECUTORS.names(),
                   help="where independent tasks (subset-model chunks, base models, fine-tunes, members, sweep "
                        "settings) run: local (this process, default) or ray")
    p.add_argument("--ray-address", help=f"with --executor ray: the cluster's head host:port or auto (default "
                                         f"${ADDRESS_ENV}; none: a local Ray with this machine's cores)")
    p.add_argument("--workers", type=int, help="with --executor ray: tasks at once (default: one per CPU)")
    p.add_argument("--ray-store", default="shared", choices=STORE_MODES,
                   help="with --executor ray: shared (every node sees --store) or driver (no shared filesystem: "
                        "results come back through Ray and are saved here)")
    return p


MAX_SEEDS = 1000  # models in one command, as the ceiling on an ensemble's I


def executor_from_args(args: argparse.Namespace) -> Executor:
    """The executor the common options ask for."""
    if args.executor == "ray":
        return make_executor("ray", address=args.ray_address, workers=args.workers, store=args.ray_store)
    if args.ray_address or args.workers is not None or args.ray_store != "shared":
        raise UserError("--ray-address, --workers and --ray-store need --executor ray")
    return make_executor(args.executor)


def parse_seeds(text: str) -> list[int]:
    """'0-4' -> [0..4]; '0,3,7' -> [0, 3, 7]; '5' -> [5]. Seeds lie in [0, 2**32), at most MAX_SEEDS of them."""
    bounds: list[tuple[int, int]] = []
    try:
        for part in text.split(","):
            lo, hi = part.split("-", 1) if "-" in part.strip()[1:] else (part, part)
            bounds.append((int(lo), int(hi)))
    except ValueError:
        raise UserError(f"cannot read seeds {text!r}; write e.g. 0-4 or 0,3,7") from None
    if any(lo < 0 or hi >= 2**32 for lo, hi in bounds):
        raise UserError(f"seeds must lie between 0 and {2**32 - 1}; got {text!r}")
    if sum(max(0, hi - lo + 1) for lo, hi in bounds) > MAX_SEEDS:
        raise UserError(f"seeds {text!r} are more than {MAX_SEEDS} models (each a full training run); split them")
    seeds = [s for lo, hi in bounds for s in range(lo, hi + 1)]
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
