"""Real-browser check of the explorer: start the app, open every page in headless Chromium, fail on any
error element, save one PNG per page (and per browser tab, the teaching views, a phone-width browser page).

    python scripts/screenshots.py --task mnist-mlp --compute --learn --ground-truth  # docs/screenshots/mnist-mlp-*
    python scripts/screenshots.py --task chorales-mt --kind naive --compute

Uses Debian's `chromium` (apt-get install chromium) driven by Playwright (requirements-dev.txt).
With --compute, the Build and Attribution-browser pages press their Run / Compute buttons (and with
--learn the Learn page its Start / ground-truth buttons) and wait for the background jobs they start;
the time each took is printed. Exit status 1 when any page shows an error, or the phone-width browser
page scrolls sideways.
"""
from __future__ import annotations

import argparse
import os
import re
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PAGES = ("", "build", "browse", "lds_cost", "learn")  # "" = home
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage"]
PRESS = {"build": ("Run",), "browse": ("Compute", "Compute the")}
GROUND_TRUTH_PRESS = ("Compute the ground truth", "Add to the results table")
LEARN_PRESS = ("Start the live examples", "Train the")
TABS = {"browse": ("Compare two settings", "Reverse view")}  # extra screenshots, one per tab
TOGGLES = {"browse": "Show each one's pixel difference"}  # an extra screenshot with this toggle on
PHONE_WIDTH = 390
ERRORS = '[data-testid="stException"], [data-testid="stAlertContentError"]'


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_app(port: int, env: dict[str, str]) -> subprocess.Popen:
    """`streamlit run app.py` headless on `port`; returns once the health endpoint answers."""
    cmd = [sys.executable, "-m", "streamlit", "run", str(ROOT / "app.py"), "--server.headless", "true",
           "--server.port", str(port), "--server.address", "127.0.0.1", "--browser.gatherUsageStats", "false",
           "--client.toolbarMode", "minimal"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.time() + 120
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"streamlit exited: {proc.stdout.read().decode()[-2000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/_stcore/health", timeout=2) as r:
                if r.status == 200:
                    return proc
        except OSError:
            time.sleep(0.5)
    proc.kill()
    raise RuntimeError("streamlit did not come up within 120 s")


def script_state(page) -> str | None:
    """'running' / 'notRunning' as the app reports it on its root element."""
    return page.evaluate("() => document.querySelector('[data-testid=\"stApp\"]')?.dataset.testScriptState ?? null")


def wait_idle(page, timeout_s: float, start_wait_s: float = 5.0) -> float:
    """Wait for the script run to start (up to `start_wait_s`) and then to stay finished for 1.5 s."""
    t0 = time.time()
    page.wait_for_selector('[data-testid="stApp"]', timeout=timeout_s * 1000)
    while time.time() - t0 < start_wait_s and script_state(page) != "running":
        page.wait_for_timeout(100)
    quiet = 0.0
    while time.time() - t0 < timeout_s:
        quiet = quiet + 0.25 if script_state(page) == "notRunning" else 0.0
        if quiet >= 1.5:
            return time.time() - t0
        page.wait_for_timeout(250)
    raise TimeoutError(f"page still running after {timeout_s:.0f} s")


def running_jobs(page) -> int:
    """Progress panels of background jobs shown on the page (each has a Cancel button)."""
    return page.get_by_role("button", name=re.compile("Cancel")).filter(visible=True).count()


def wait_jobs(page, timeout_s: float) -> float:
    """Wait until no background job's panel is shown (the page reruns itself when a job ends), then idle."""
    t0 = time.time()
    page.wait_for_timeout(1500)
    while running_jobs(page) and time.time() - t0 < timeout_s:
        page.wait_for_timeout(500)
    if running_jobs(page):
        raise TimeoutError(f"background job still running after {timeout_s:.0f} s")
    wait_idle(page, timeout_s)
    return time.time() - t0


def click_if_present(page, label: str, timeout_s: float) -> float | None:
    """Click the first visible button whose label starts with `label`; returns the seconds until the page is idle
    and the background jobs it started are done."""
    button = page.get_by_role("button", name=re.compile(f"^{re.escape(label)}")).filter(visible=True)
    if button.count() == 0:
        return None
    t0 = time.time()
    button.first.click()
    page.wait_for_timeout(500)
    wait_idle(page, timeout_s)
    wait_jobs(page, timeout_s)
    return time.time() - t0


def horizontal_overflow(page) -> int:
    """Pixels the page (or its main block) is wider than the viewport: > 0 means it scrolls sideways."""
    return int(page.evaluate("() => Math.max(...[document.documentElement, document.querySelector("
                             "'[data-testid=\"stMain\"]')].filter(Boolean).map(e => e.scrollWidth - e.clientWidth))"))


def screenshot(page, path: Path, width: int, max_height: int = 7000) -> None:
    """The whole page: Streamlit scrolls inside its main block, so grow the viewport to its height first."""
    height = page.evaluate("() => Math.max(...[...document.querySelectorAll('[data-testid=\"stMain\"], "
                           "[data-testid=\"stSidebarContent\"]')].map(e => e.scrollHeight), 800)")
    page.set_viewport_size({"width": width, "height": min(int(height) + 40, max_height)})
    page.wait_for_timeout(800)
    page.screenshot(path=str(path))
    page.set_viewport_size({"width": width, "height": 1000})


def errors_on(page) -> list[str]:
    return [e.inner_text()[:300] for e in page.locator(ERRORS).all()]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default="mnist-mlp")
    parser.add_argument("--kind", default=None, help="ensemble kind for the URL (default: the app's)")
    parser.add_argument("--query", default="", help="extra URL query, e.g. 'I=2&D=5'")
    parser.add_argument("--out", default=str(ROOT / "docs" / "screenshots"))
    parser.add_argument("--store", help="artifact store for the app (default: $TDA_STORE or the user's)")
    parser.add_argument("--compute", action="store_true",
                        help="press Run / Compute / Start where a page offers it (trains and attributes)")
    parser.add_argument("--learn", action="store_true", help="with --compute: also start the Learn page's live "
                        "examples and its ground truth (digits; a minute or two)")
    parser.add_argument("--ground-truth", action="store_true", help="with --compute: also compute the Build "
                        "page's ground truth (50 subset models of the task), so it shows LDS, and add the row to the "
                        "results table")
    parser.add_argument("--first-visit", action="store_true", help="first save the LDS-vs-cost page as a first "
                        "visitor sees it (use a fresh --store): <task>-lds_cost-first-visit.png")
    parser.add_argument("--chromium", default="/usr/bin/chromium")
    parser.add_argument("--timeout", type=float, default=600, help="seconds allowed per page")
    parser.add_argument("--width", type=int, default=1400)
    return parser.parse_args(argv)


def capture(browser, base: str, args: argparse.Namespace) -> list[str]:  # noqa: ANN001 - a Playwright Browser
    """Open every page of the app served at `base`, press what --compute asks for, save the screenshots; returns
    the errors found (one line each)."""
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    query = f"task={args.task}" + (f"&kind={args.kind}" if args.kind else "") + (f"&{args.query}" if args.query else "")
    failures: list[str] = []
    t_start = time.time()
    page = browser.new_page(viewport={"width": args.width, "height": 1000})
    if args.first_visit:
        page.goto(f"{base}/lds_cost?{query}", wait_until="domcontentloaded")
        wait_idle(page, args.timeout)
        page.wait_for_timeout(1500)  # plotly draws after the script run
        failures += [f"lds_cost-first-visit: {text}" for text in errors_on(page)]
        screenshot(page, out / f"{args.task}-lds_cost-first-visit.png", args.width)
        print("lds_cost-first-visit: saved")
    for slug in PAGES:
        name = slug or "home"
        page.goto(f"{base}/{slug}?{query}", wait_until="domcontentloaded")
        waited = wait_idle(page, args.timeout)
        if args.compute:
            extra = (LEARN_PRESS if args.learn and slug == "learn" else ()) + (
                GROUND_TRUTH_PRESS if args.ground_truth and slug == "build" else ())
            for label in PRESS.get(slug, ()) + extra:
                took = click_if_present(page, label, args.timeout)
                if took is not None:
                    print(f"{name}: pressed {label!r}, done after {took:.1f} s "
                          f"({time.time() - t_start:.1f} s since the home page opened)")
        if slug == "browse":
            images = page.locator('[data-testid="stImage"] img').count()
            print(f"browse: {images} images drawn")
        tabs = [tab for tab in TABS.get(slug, ()) if page.get_by_role("tab", name=re.compile(tab)).count()]
        shots = [(name, None)] + [(f"{name}-{tab.split()[0].lower()}", tab) for tab in tabs]
        for shot, tab in shots:
            if tab:
                page.get_by_role("tab", name=re.compile(tab)).first.click()
                wait_idle(page, args.timeout)
                if args.compute and click_if_present(page, "Compute", args.timeout) is not None:
                    print(f"{shot}: computed the second setting")
            found = errors_on(page)
            failures += [f"{shot}: {text}" for text in found]
            path = out / f"{args.task}-{shot}.png"
            screenshot(page, path, args.width)
            print(f"{shot}: rendered in {waited:.1f} s, {len(found)} error(s) -> {path}")
        if tabs:  # back to the first tab
            page.get_by_role("tab").first.click()
            wait_idle(page, args.timeout)
        toggle = page.get_by_text(TOGGLES[slug]) if slug in TOGGLES else None
        if toggle is not None and toggle.count():
            toggle.first.click()
            wait_idle(page, args.timeout)
            screenshot(page, out / f"{args.task}-{name}-differences.png", args.width)
            print(f"{name}-differences: pixel differences shown")
        if slug == "browse":
            phone = browser.new_page(viewport={"width": PHONE_WIDTH, "height": 900})
            phone.goto(f"{base}/{slug}?{query}", wait_until="domcontentloaded")
            wait_idle(phone, args.timeout)
            overflow = horizontal_overflow(phone)
            failures += [f"{name}-phone: scrolls sideways by {overflow} px"] if overflow > 0 else []
            screenshot(phone, out / f"{args.task}-{name}-phone.png", PHONE_WIDTH)
            print(f"{name}-phone: {PHONE_WIDTH} px wide, horizontal overflow {overflow} px")
            phone.close()
    page.close()
    return failures


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from playwright.sync_api import sync_playwright

    env = dict(os.environ)
    if args.store:
        env["TDA_STORE"] = args.store
    port = free_port()
    app = start_app(port, env)
    try:
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=args.chromium, args=CHROMIUM_ARGS)
            failures = capture(browser, f"http://127.0.0.1:{port}", args)
            browser.close()
    finally:
        app.terminate()
        try:
            app.wait(timeout=10)
        except subprocess.TimeoutExpired:
            app.kill()
            app.wait()
    for failure in failures:
        print(f"ERROR {failure}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
