"""`pip install .` and `pip install -e .` from a copy of the project into a fresh virtual environment, then `tda`.

The environment sees the system's site-packages, so the pinned dependencies already installed satisfy
pip (`--no-index`: nothing is downloaded, no torch), and builds with the installed setuptools.
"""
from __future__ import annotations

import shutil
import subprocess
import sys
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
IGNORED = shutil.ignore_patterns(".git", "build", "*.egg-info", "__pycache__", ".pytest_cache", ".tda_*", "docs",
                                 "assets", "tests")


def sh(*args: str | Path, cwd: Path) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(a) for a in args], cwd=cwd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return proc


@pytest.mark.slow
@pytest.mark.parametrize("editable", [False, True], ids=["wheel", "editable"])
def test_pip_install_gives_the_package_and_the_tda_command(tmp_path, editable):
    clone = tmp_path / "clone"
    shutil.copytree(ROOT, clone, ignore=IGNORED)
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(system_site_packages=True, with_pip=False).create(env_dir)
    python, tda = env_dir / "bin" / "python", env_dir / "bin" / "tda"
    install = ["-m", "pip", "install", "--no-index", "--no-build-isolation", "--quiet"]
    sh(python, *install, *(["-e", clone] if editable else [clone]), cwd=tmp_path)

    where = sh(python, "-c", "import tda_core, sys; print(tda_core.__file__); print(sys.prefix)", cwd=tmp_path)
    location, prefix = where.stdout.split()
    assert Path(prefix) == env_dir and Path(sys.prefix) != env_dir
    expected = clone / "tda_core" if editable else env_dir / "lib"
    assert Path(location).is_relative_to(expected), location
    help_text = sh(tda, "--help", cwd=tmp_path).stdout
    for command in ("attribute", "run", "lds", "export-ground-truth", "add-image-folder", "tasks"):
        assert command in help_text
    if not editable:  # tda_core is the only package the wheel installs
        files = sh(python, "-c", "import importlib.metadata as m; print('\\n'.join(str(f) for f in "
                                 "m.files('ensemble-tda-explorer')))", cwd=tmp_path).stdout.split()
        assert {f.split("/")[0] for f in files if not f.startswith("..")} == {
            "tda_core", "ensemble_tda_explorer-0.1.0.dist-info"}
