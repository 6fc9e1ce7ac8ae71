"""The security review of the README's "Reliability and security" section, as checks on the source and config."""
from __future__ import annotations

import ast
import re
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCES = sorted(p for folder in ("tda_core", "pages", "scripts", "benchmarks") for p in (ROOT / folder).rglob("*.py"))
SOURCES.append(ROOT / "app.py")
UNSAFE_LOADS = {  # calls that can run code from the file they read
    "pickle.load", "pickle.loads", "torch.load", "joblib.load", "dill.load", "dill.loads", "cloudpickle.load",
    "cloudpickle.loads", "shelve.open", "marshal.load", "marshal.loads", "pandas.read_pickle", "pd.read_pickle",
    "numpy.load", "np.load", "yaml.load", "yaml.unsafe_load", "torch.jit.load", "eval", "exec",
}


def _calls(tree: ast.AST) -> list[tuple[str, ast.Call]]:
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            parts, f = [], node.func
            while isinstance(f, ast.Attribute):
                parts.append(f.attr)
                f = f.value
            if isinstance(f, ast.Name):
                out.append((".".join([f.id, *reversed(parts)]), node))
    return out


def test_the_sources_are_all_read():
    assert len(SOURCES) > 40 and (ROOT / "tda_core" / "store.py") in SOURCES


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_pickle_or_torch_load_of_files(path):
    """No unpickling loader anywhere; np.load only with allow_pickle left False."""
    tree = ast.parse(path.read_text(), str(path))
    for name, call in _calls(tree):
        if name in ("np.load", "numpy.load"):
            pickle_arg = [k for k in call.keywords if k.arg == "allow_pickle"]
            assert all(isinstance(k.value, ast.Constant) and k.value.value is False for k in pickle_arg), \
                f"{path.name}:{call.lineno}: np.load with allow_pickle"
            continue
        assert name not in UNSAFE_LOADS, f"{path.name}:{call.lineno}: {name}"


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_unpickler_allows_only_named_classes(path):
    """The one unpickler (CIFAR's python batches) overrides find_class with an allow-list."""
    tree = ast.parse(path.read_text(), str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef) and any("Unpickler" in ast.unparse(b) for b in node.bases):
            methods = {m.name: m for m in node.body if isinstance(m, ast.FunctionDef)}
            assert "find_class" in methods, f"{path.name}: {node.name} without find_class"
            assert "UnpicklingError" in ast.unparse(methods["find_class"]), f"{node.name} refuses nothing"


def test_the_cifar_unpickler_refuses_code():
    import io
    import os
    import pickle

    from tda_core.data.images import _ArrayOnlyUnpickler

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo never",))

    with pytest.raises(pickle.UnpicklingError, match="refusing to load"):
        _ArrayOnlyUnpickler(io.BytesIO(pickle.dumps(Evil(), protocol=2))).load()


def test_no_shell_commands_in_the_library():
    for path in [p for p in SOURCES if "tda_core" in p.parts or p.name == "app.py" or "pages" in p.parts]:
        text = path.read_text()
        assert not re.search(r"shell\s*=\s*True|os\.system\(|os\.popen\(", text), path.name


def test_streamlit_keeps_xsrf_protection_and_listens_on_localhost_only():
    config = tomllib.loads((ROOT / ".streamlit" / "config.toml").read_text())
    server = config.get("server", {})
    assert server.get("enableXsrfProtection", True) is True
    assert server.get("enableCORS", True) is True
    assert server.get("address") in ("localhost", "127.0.0.1")


def test_store_paths_stay_in_the_store(tmp_path):
    from tda_core.errors import UserError
    from tda_core.store import Store

    store = Store(tmp_path)
    for kind, key in (("..", "x"), ("k", "../../x"), ("k", "/abs"), ("k", "a/b"), ("k", "..")):
        with pytest.raises(UserError, match="not a plain name"):
            store.has(kind, key)
    assert store._base("checkpoints", "0123abcd").resolve().is_relative_to(tmp_path.resolve())
