"""`python -m tda_core datasets` and `train`: output, store reuse, one-line errors."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tda_core.cli import main
from tda_core.cli.common import parse_seeds
from tda_core.errors import UserError
from tda_core.tasks import TASKS


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tda_core", *args], capture_output=True, text=True,
                          env=os.environ.copy(), timeout=300)


def test_parse_seeds():
    assert parse_seeds("0-4") == [0, 1, 2, 3, 4]
    assert parse_seeds("0,3,7") == [0, 3, 7]
    with pytest.raises(UserError, match="0-4"):
        parse_seeds("a-b")


def test_datasets_table_reports_sources(capsys):
    assert main(["datasets", "--json"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert rows["digits"]["source"] == "embedded" and rows["digits"]["train/test"] == "1500/297"
    assert rows["mnist"]["source"] == "embedded" and "MNIST" in rows["mnist"]["where"]
    assert rows["cifar2"]["source"] == "missing" and "cifar-10-batches-py" in rows["cifar2"]["where"]


def test_train_then_load_from_store(monkeypatch, capsys):
    import dataclasses
    task = TASKS["digits-mlp"]
    short = dataclasses.replace(task, recipe=dataclasses.replace(task.recipe, epochs=2))
    monkeypatch.setitem(TASKS, "digits-mlp", short)
    assert main(["train", "--task", "digits-mlp", "--seeds", "0-1", "--json"]) == 0
    first = json.loads(capsys.readouterr().out)
    assert [r["seed"] for r in first] == [0, 1] and not any(r["from_store"] for r in first)
    assert all(0.3 < r["test_accuracy"] <= 1 for r in first)
    assert main(["train", "--task", "digits-mlp", "--seeds", "0-1", "--json"]) == 0
    second = json.loads(capsys.readouterr().out)
    assert all(r["from_store"] for r in second)
    assert [r["key"] for r in second] == [r["key"] for r in first]
    assert [r["test_accuracy"] for r in second] == [r["test_accuracy"] for r in first]


def test_user_errors_are_one_line_without_traceback():
    proc = run_cli("train", "--task", "mnist-cnn")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "error: unknown task 'mnist-cnn'; valid choices: " + ", ".join(sorted(TASKS))]
    proc = run_cli("train", "--task", "digits-mlp", "--device", "tpu")
    assert proc.returncode == 2 and "valid choices: auto, cpu, cuda" in proc.stderr and "Traceback" not in proc.stderr


def test_every_command_has_help():
    from tda_core.cli import build_parser
    parser = build_parser()
    commands = parser._subparsers._group_actions[0].choices
    assert {"datasets", "train"} <= set(commands)
    for name, sub in commands.items():
        assert sub.format_help().startswith("usage:"), name
