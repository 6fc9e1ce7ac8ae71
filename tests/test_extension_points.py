"""The shape of the core: one registry entry adds a method (end to end), and the core never imports streamlit."""
from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tda_core.attribution import attribute
from tda_core.cli import main
from tda_core.methods import METHODS, Method, ScoringInputs, loss_weight, register_method
from tda_core.specs import EnsembleSpec, MethodSpec, Recipe
from tda_core.tasks import TASKS, get_task

ROOT = Path(__file__).resolve().parents[1]
TINY = dataclasses.replace(get_task("digits-mlp"), recipe=Recipe(epochs=2, batch_size=64, lr=0.01))


def _scaled_grad_dot(inputs: ScoringInputs, dampings):  # noqa: ANN001, ANN202 - the Scorer protocol
    return {None: 3.0 * (loss_weight(inputs.train)[:, None] * inputs.train.phi) @ inputs.test.phi.T}, None


@pytest.fixture
def toy_method():
    """A method added in one place: one `register_method` call, no other module touched."""
    register_method(Method("scaled-grad-dot", "Grad-Dot x 3", _scaled_grad_dot))
    yield
    METHODS.unregister("scaled-grad-dot")


def test_a_registered_method_runs_through_attribute_and_the_cli(toy_method, store, monkeypatch, capsys):
    positions = torch.arange(3)
    toy = attribute(TINY, MethodSpec("scaled-grad-dot", "kron", proj_dim=64), EnsembleSpec(), store=store,
                    device="cpu", test_positions=positions)
    plain = attribute(TINY, MethodSpec("grad-dot", "kron", proj_dim=64), EnsembleSpec(), store=store, device="cpu",
                      test_positions=positions)
    assert torch.allclose(toy.scores, 3.0 * plain.scores, rtol=1e-4, atol=1e-5)
    assert toy.damping is None and toy.members == ["model seed 0"]

    monkeypatch.setitem(TASKS, "digits-mlp", TINY)
    assert main(["attribute", "--task", "digits-mlp", "--method", "scaled-grad-dot", "--proj", "kron", "--proj-dim",
                 "64", "--n-test", "3", "--device", "cpu", "--store", str(store.root), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["method"] == "scaled-grad-dot" and summary["from_store"]  # the same key as the API call
    capsys.readouterr()
    with pytest.raises(SystemExit):  # argparse's choices come from the registry
        main(["attribute", "--task", "digits-mlp", "--method", "no-such-method"])
    assert "scaled-grad-dot" in capsys.readouterr().err


def test_the_core_never_imports_streamlit():
    modules = sorted(".".join(p.relative_to(ROOT).with_suffix("").parts) for p in (ROOT / "tda_core").rglob("*.py")
                     if p.name not in ("__main__.py",))
    code = ("import importlib, sys\n"
            f"for name in {modules!r}:\n"
            "    importlib.import_module(name)\n"
            "print(len(sys.modules), 'streamlit' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split()[-1] == "False", f"a tda_core module imports streamlit ({len(modules)} modules)"
    assert len(modules) > 20  # every module was imported, not an empty list
