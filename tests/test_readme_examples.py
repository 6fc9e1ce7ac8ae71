"""The README's Python examples ("Use it from Python", "Bring your own model or data") run as written
(with the built-in digits-mlp recipe shortened to 5 epochs, to keep the suite fast)."""
from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest

from tda_core.tasks import TASKS

README = Path(__file__).resolve().parents[1] / "README.md"
SECTIONS = ("## Use it from Python", "## Bring your own model or data")


def python_blocks(section: str) -> list[str]:
    """The ```python blocks of one README section (up to the next second-level heading)."""
    text = README.read_text()
    start = text.index(section + "\n")
    end = text.find("\n## ", start + len(section))
    return re.findall(r"```python\n(.*?)```", text[start:end if end > 0 else None], flags=re.S)


@pytest.mark.slow
def test_readme_python_blocks_run(tmp_path, monkeypatch, capsys, user_registries):
    monkeypatch.chdir(tmp_path)
    digits = TASKS["digits-mlp"]
    monkeypatch.setitem(TASKS, "digits-mlp", dataclasses.replace(digits, recipe=dataclasses.replace(digits.recipe,
                                                                                                    epochs=5)))
    blocks = [b for s in SECTIONS for b in python_blocks(s)]
    assert len(blocks) == 4
    namespace: dict = {"__name__": "readme"}
    for block in blocks:  # one namespace, in order, as a reader pastes them
        exec(compile(block, str(README), "exec"), namespace)
    out = capsys.readouterr().out
    assert "torch.Size([1500, 3])" in out
    lds = [float(v) for v in re.findall(r"LDS (-?\d\.\d+) \+-", out)]
    assert len(lds) == 2 and all(v > 0.1 for v in lds), out  # digits-mlp and the user's CNN, on M = 10 subsets
    dattri_mean = float(re.search(r"dattri's LDS over all test examples: (-?\d\.\d+)", out).group(1))
    assert dattri_mean > 0.1
    assert {"digits-cnn", "digits-linear"} <= set(TASKS)
