"""`python -m tda_core ...`: one subcommand module per area, each with a `register` function."""
from __future__ import annotations

import argparse
import importlib
import logging
import os
import re
import sys
from pathlib import Path

from ..errors import UserError
from ..executors import using
from ..paths import store_dir
from ..store import Store, store_problem
from ..user_tasks import load_user_tasks
from .common import common_options, executor_from_args

COMMAND_MODULES = ("core", "attribution", "evaluation", "music", "openness")


def one_line(text: object) -> str:
    """`text` on one line: control characters (a newline or carriage return typed into a value) become spaces."""
    return re.sub(r"[\x00-\x1f\x7f]+", " ", str(text))


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a bad argument prints one line (no usage block) and exits 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"error: {self.prog}: {one_line(message)} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="python -m tda_core", description="Ensemble TDA Explorer: train, attribute, evaluate.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    common = common_options()
    for name in COMMAND_MODULES:
        importlib.import_module(f"{__name__}.{name}").register(sub, common)
    return parser


def os_error_message(exc: OSError, store: Path) -> str:
    """One line for a file-system error: a full or read-only store says so and what to do; any other
    file names the path and the cause."""
    path = Path(exc.filename) if exc.filename else None
    if path is None or path.absolute().is_relative_to(store.absolute()):
        problem = store_problem(store, exc)
        if problem is not None:
            return str(problem)
    return f"cannot use {path or 'a file'}: {exc.strerror or exc}"


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; user mistakes and file-system problems print one line and exit 2, never a traceback."""
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
        print(f"error: {one_line(exc)}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # the reader of our output went away (e.g. `| head`): nothing left to say
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except OSError as exc:
        print(f"error: {one_line(os_error_message(exc, store_dir(args.store)))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; finished artifacts are kept in the store", file=sys.stderr)
        return 130
    return 0
