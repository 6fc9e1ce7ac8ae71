"""Real-browser checks: the app served by `streamlit run`, driven in headless Chromium.

One served app and one store are shared by the tests of this module, in order: a first visit on an empty store
(the reference series on LDS vs cost), a click on a plotted point, a link that reproduces the view, a sweep
that keeps running while another page is browsed (and is seen, not restarted, by a second tab), the browser
page at phone width after a Compute in the background, and finally every page rendered by
scripts/screenshots.py without an error. Skipped where Debian's chromium or Playwright is missing.
"""
from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parents[2]
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
TIMEOUT = 300

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="chromium not installed (apt-get install chromium)"),
    pytest.mark.skipif(importlib.util.find_spec("playwright") is None, reason="playwright not installed"),
]

sys.path.insert(0, str(ROOT / "scripts"))
import screenshots  # noqa: E402

sys.path.remove(str(ROOT / "scripts"))

from tda_core import jobs  # noqa: E402
from tda_core.reference import reference_files  # noqa: E402
from tda_core.settings import DEFAULT_TASK  # noqa: E402
from tda_core.store import Store  # noqa: E402


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """(base URL, store, browser): one app on an empty store, shared by this module's tests in order."""
    from playwright.sync_api import sync_playwright

    root = tmp_path_factory.mktemp("e2e")
    store = Store(root / "store")
    env = dict(os.environ, TDA_STORE=str(store.root), TDA_DATA_DIR=str(root / "data"))
    port = screenshots.free_port()
    app = screenshots.start_app(port, env)
    try:
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, args=screenshots.CHROMIUM_ARGS)
            yield f"http://127.0.0.1:{port}", store, browser
            browser.close()
    finally:
        for status in jobs.active_jobs(store):
            jobs.cancel(store, status.job_id)
        app.terminate()
        try:
            app.wait(timeout=10)
        except subprocess.TimeoutExpired:
            app.kill()


def open_page(browser, url: str, width: int = 1400):
    page = browser.new_page(viewport={"width": width, "height": 1000})
    page.goto(url, wait_until="domcontentloaded")
    screenshots.wait_idle(page, TIMEOUT)
    return page


def sidebar_setting(page) -> dict[str, str]:
    """What the sidebar shows: the three choices and the two budgets."""
    sidebar = page.locator('[data-testid="stSidebar"]')
    choices = [s.locator("input").input_value() for s in sidebar.locator('[data-testid="stSelectbox"]').all()[:3]]
    numbers = [n.input_value() for n in sidebar.locator('[data-testid="stNumberInput"] input').all()[:2]]
    return {"task": choices[0], "method": choices[1], "ensemble": choices[2], "budgets": ",".join(numbers)}


def query(page) -> dict[str, str]:
    return {k: v[0] for k, v in parse_qs(urlparse(page.url).query).items()}


def test_a_first_visit_sees_the_reference_results(served):
    base, store, browser = served
    page = open_page(browser, f"{base}/lds_cost?I=2")  # the very first request of the server, on an empty store
    assert not store.read_table("results").shape[0]
    assert not screenshots.errors_on(page)
    # A fresh server with a pages/ folder starts in Streamlit's old-style multipage mode, which runs
    # pages/lds_cost.py by itself: the page still opens inside app.py, with its navigation and sidebar holding the
    # link's setting, and no "Page not found".
    nav = page.locator('[data-testid="stSidebarNav"]').inner_text()
    assert all(title in nav for title in ("Home", "Build & attribute", "Attribution browser", "LDS vs cost")), nav
    assert sidebar_setting(page)["budgets"] == "2,5"
    assert urlparse(page.url).path == "/lds_cost" and query(page) == {"I": "2"}
    assert page.get_by_role("heading", name="LDS vs cost").is_visible()
    assert page.get_by_text("Page not found").count() == 0
    page.locator(".js-plotly-plot .legend text.legendtext").first.wait_for(timeout=TIMEOUT * 1000)  # plotly draws late
    legend = " ".join(t.text_content() for t in page.locator(".js-plotly-plot .legend text.legendtext").all())
    default = reference_files(DEFAULT_TASK)[0]  # the task's first reference file is drawn by default
    assert f"reference: {default.label}" in legend
    rows = len(pd.read_csv(ROOT / default.path))
    assert page.locator(".js-plotly-plot .scatterlayer .points path").count() >= rows  # every row is a point
    assert "No results" not in page.locator('[data-testid="stMain"]').inner_text()
    page.close()


def test_clicking_a_point_selects_its_setting_and_the_link_reproduces_it(served):
    base, _, browser = served
    page = open_page(browser, f"{base}/lds_cost")
    before = sidebar_setting(page)
    page.locator(".js-plotly-plot .scatterlayer .points path").first.wait_for(timeout=TIMEOUT * 1000)
    boxes = [b for b in (p.bounding_box() for p in page.locator(".js-plotly-plot .scatterlayer .points path").all())
             if b and b["width"] > 4]
    box = max(boxes, key=lambda b: b["x"])  # the most expensive setting: not the default one
    page.mouse.click(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
    page.get_by_text("now the sidebar's setting").wait_for(timeout=TIMEOUT * 1000)
    screenshots.wait_idle(page, TIMEOUT)
    after = sidebar_setting(page)
    assert after != before
    picked = page.get_by_text("now the sidebar's setting").inner_text()
    sizes = re.search(r" I(\d+)(?: [DLP](\d+))?", picked)
    assert after["budgets"].split(",")[:1 + bool(sizes.group(2))] == [g for g in sizes.groups() if g]
    assert page.get_by_role("link", name="Browse its attributions").is_visible()
    page.wait_for_timeout(1000)
    link = page.url
    assert query(page).get("I", "1") == sizes.group(1)  # the URL follows (a default value is left out)
    kind = re.search(r"· ([\w-]+)(?: \(shared proj\.\))? I\d", picked).group(1)
    assert query(page).get("kind", "dropout") == kind  # names, as the CLI spells them
    fresh = browser.new_context().new_page()  # a new session: only the URL carries the view
    fresh.set_viewport_size({"width": 1400, "height": 1000})
    fresh.goto(link, wait_until="domcontentloaded")
    screenshots.wait_idle(fresh, TIMEOUT)
    assert sidebar_setting(fresh) == after
    assert not screenshots.errors_on(fresh)
    fresh.close()
    page.close()


def test_a_sweep_keeps_running_while_another_page_is_browsed(served):
    base, store, browser = served
    page = open_page(browser, f"{base}/lds_cost?task=digits-mlp")
    page.get_by_text("Run a grid sweep").click()
    page.get_by_role("button", name="Run the sweep").click()
    page.get_by_role("button", name="Cancel").first.wait_for(timeout=TIMEOUT * 1000)
    page.get_by_role("link", name="Learn").click()  # browse elsewhere while it runs
    screenshots.wait_idle(page, TIMEOUT)
    assert "Learn: what training data attribution is" in page.locator("h1").first.inner_text()
    panel = page.locator('[data-testid="stSidebar"]').get_by_text(re.compile(r"Running \(1\)"))
    panel.wait_for(timeout=TIMEOUT * 1000)

    def progress() -> str:
        return " ".join(p.inner_text() for p in page.locator('[data-testid="stSidebar"] [data-testid="stProgress"]')
                        .all())

    first, deadline = progress(), time.time() + TIMEOUT
    while progress() == first and time.time() < deadline:  # the panel redraws itself as the worker reports
        page.wait_for_timeout(500)
    assert progress() != first, first
    other = open_page(browser, f"{base}/lds_cost?task=digits-mlp")  # a second tab asking for the same sweep
    assert other.get_by_role("button", name="Cancel").count() >= 1  # sees the running job, offers no new start
    (sweep,) = [j for j in jobs.all_jobs(store) if j.kind == "sweep"]
    assert sweep.active
    other.close()
    page.locator('[data-testid="stSidebar"]').get_by_role("button", name="Cancel").first.click()
    page.locator('[data-testid="stSidebar"]').get_by_text(re.compile(r"Running \(")).wait_for(
        state="detached", timeout=TIMEOUT * 1000)
    assert jobs.status(store, sweep.job_id).status == "cancelled"
    page.close()


def test_the_browser_page_computes_in_the_background_and_fits_a_phone(served, tmp_path):
    base, store, browser = served
    page = open_page(browser, f"{base}/browse?task=digits-mlp&kind=naive&I=1", width=screenshots.PHONE_WIDTH)
    page.get_by_role("button", name="Compute").click()
    page.get_by_role("button", name="Cancel").first.wait_for(timeout=TIMEOUT * 1000)
    screenshots.wait_jobs(page, TIMEOUT)  # the panel reruns the page when the job ends
    assert page.get_by_text("Top proponents").is_visible()
    assert page.locator('[data-testid="stImage"] img').count() >= 17  # the test digit, 8 proponents, 8 opponents
    assert screenshots.horizontal_overflow(page) <= 0
    screenshots.screenshot(page, tmp_path / "phone.png", screenshots.PHONE_WIDTH)
    assert not screenshots.errors_on(page)
    page.get_by_role("tab", name="Reverse view").click()  # the tab and the test example live in the URL
    screenshots.wait_idle(page, TIMEOUT)
    assert query(page)["tab"] == "Reverse view" and query(page)["test_pos"] == "0"
    page.close()
    linked = open_page(browser, f"{base}/browse?task=digits-mlp&kind=naive&test_pos=7&tab=Reverse+view")
    assert linked.get_by_role("tab", name="Reverse view").get_attribute("aria-selected") == "true"
    assert linked.get_by_text("Test examples it helps most").is_visible()
    chosen = linked.locator('[data-testid="stSelectbox"]').filter(has_text="Test example").locator("input")
    assert re.match(r"7 · #\d+ · label", chosen.input_value()), chosen.input_value()
    linked.close()


def test_every_page_renders_without_errors(served, tmp_path, capsys):
    base, store, browser = served
    out = tmp_path / "shots"
    args = screenshots.parse_args(["--task", "digits-mlp", "--kind", "naive", "--out", str(out),
                                   "--timeout", str(TIMEOUT)])
    failures = screenshots.capture(browser, base, args)
    printed = capsys.readouterr().out
    assert failures == []
    names = sorted(p.name for p in out.glob("*.png"))
    pages = ("browse", "browse-compare", "browse-reverse", "browse-differences", "browse-phone", "build", "home",
             "lds_cost", "learn")
    assert names == sorted(f"digits-mlp-{page}.png" for page in pages)
    assert all((out / n).stat().st_size > 20_000 for n in names)  # real renders, not blank pages
    assert "browse-phone: 390 px wide, horizontal overflow" in printed
