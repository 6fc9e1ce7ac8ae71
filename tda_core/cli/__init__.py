"""`python -m tda_core ...`: one subcommand module per area, each with a `register` function."""
from __future__ import annotations

import argparse
import importlib
import logging
import sys

from ..errors import UserError
from ..executors import using
from ..store import Store
from ..user_tasks import load_user_tasks
from .common import common_options, executor_from_args

COMMAND_MODULES = ("core", "attribution", "evaluation", "music", "openness")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m tda_core",
                                     description="Ensemble TDA Explorer: train, attribute, evaluate.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    common = common_options()
    for name in COMMAND_MODULES:
        importlib.import_module(f"{__name__}.{name}").register(sub, common)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; user mistakes print one line and exit 2, never a traceback."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    args = build_parser().parse_args(argv)
    try:
        load_user_tasks(args.tasks_file, Store(args.store))
        executor = executor_from_args(args)
        try:
            with using(executor):  # every call of the command runs its tasks there
                args.func(args)
        finally:
            executor.close()
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; finished artifacts are kept in the store", file=sys.stderr)
        return 130
    return 0
