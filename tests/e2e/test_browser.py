"""Real-browser check: the app served by `streamlit run`, every page opened in headless Chromium.

Skipped where Debian's chromium or Playwright is missing. On the embedded digits task with a fresh
store, the Build page's Run button is pressed (one small model, five dropout members) and the
browser's Compute for the comparison setting, so the pages draw real proponents.
"""
from __future__ import annotations

import importlib.util
import shutil
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="chromium not installed (apt-get install chromium)"),
    pytest.mark.skipif(importlib.util.find_spec("playwright") is None, reason="playwright not installed"),
]


def test_every_page_renders_without_errors_in_chromium(tmp_path, capsys):
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import screenshots
    finally:
        sys.path.remove(str(ROOT / "scripts"))
    out = tmp_path / "shots"
    status = screenshots.main(["--task", "digits-mlp", "--compute", "--store", str(tmp_path / "store"),
                               "--out", str(out), "--chromium", CHROMIUM, "--timeout", "400"])
    printed = capsys.readouterr()
    assert status == 0, printed.err
    names = sorted(p.name for p in out.glob("*.png"))
    pages = ("browse", "browse-compare", "browse-reverse", "build", "home", "lds_cost", "learn")
    assert names == sorted(f"digits-mlp-{page}.png" for page in pages)
    assert all((out / n).stat().st_size > 20_000 for n in names)  # real renders, not blank pages
    drawn = int(next(line for line in printed.out.splitlines() if "images drawn" in line).split()[1])
    assert drawn >= 17  # the test digit plus 8 proponents and 8 opponents
