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


def executor_from_args(args: argparse.Namespace) -> Executor:
    """The executor the common options ask for."""
    if args.executor == "ray":
        return make_executor("ray", address=args.ray_address, workers=args.workers, store=args.ray_store)
    if args.ray_address or args.workers is not None or args.ray_store != "shared":
        raise UserError("--ray-address, --workers and --ray-store need --executor ray")
    return make_executor(args.executor)


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
