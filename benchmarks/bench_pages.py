"""Page revisit times of the explorer: every page opened twice in one app session (Streamlit's AppTest, the
server-side script run a browser waits for), on a store that holds what each page shows.

    python -m benchmarks.bench_pages                      # fills ~/.cache/tda-explorer/bench-app-store first
    python -m benchmarks.bench_pages --store PATH --repeats 5

The store is filled once through the core (digits-mlp: a Dropout I = 1, D = 5 attribution with its members'
scores, a naive I = 2 one for the comparison tab, the M = 50 ground truth, three results rows and the Learn
page's live examples); later runs only time. Prints, per page, the first visit and the median revisit.
Goal: every revisit under 1 s on 2 cores.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TASK = "digits-mlp"
STATE = {"task": TASK, "kind": "dropout", "I": 1, "D": 5, "cmp_kind": "naive", "cmp_I": 2, "test_pos": 5}
VIEWS = [("home", None, {}), ("build", "build", {}), ("browse: proponents & members", "browse", {}),
         ("browse: compare", "browse", {"tab": "Compare two settings"}),
         ("browse: reverse", "browse", {"tab": "Reverse view"}), ("lds_cost", "lds_cost", {}), ("learn", "learn", {})]


def fill(store_root: str) -> None:
    """Compute what the pages show (each step reads the store when it is already there)."""
    from tda_core import jobs
    from tda_core.attribution import attribute, member_attribution
    from tda_core.evaluation import ground_truth
    from tda_core.experiments import run
    from tda_core.results import append_results, is_recorded
    from tda_core.specs import EnsembleSpec, EvalSpec, MethodSpec
    from tda_core.store import Store

    store, trak = Store(store_root), MethodSpec("trak", proj="kron", proj_dim=2048)
    main, other = EnsembleSpec("dropout", I=1, D=5), EnsembleSpec("naive", I=2)
    attribute(TASK, trak, main, store=store)
    member_attribution(TASK, trak, main, store=store)
    attribute(TASK, trak, other, store=store)
    truth = ground_truth(TASK, EvalSpec(), store=store)
    for ensemble in (main, other, EnsembleSpec("naive", I=1)):
        result = run(TASK, trak, ensemble, EvalSpec(), store=store, truth=truth)
        if not is_recorded(result.setting_key, store):
            append_results(store, [result.row()])
    from streamlit.testing.v1 import AppTest

    learn = AppTest.from_file(str(ROOT / "app.py"), default_timeout=600)  # the Learn page starts its own examples
    learn.switch_page("pages/learn.py").run()
    if any(b.key == "learn_start" for b in learn.button):
        learn.button(key="learn_start").click().run()
        for status in jobs.active_jobs(store):
            jobs.wait(store, status.job_id, 3600)


def time_views(repeats: int) -> list[tuple[str, float, float]]:
    from streamlit.testing.v1 import AppTest

    rows = []
    for name, page, extra in VIEWS:
        at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=600)
        for key, value in {**STATE, **extra}.items():
            at.session_state[key] = value
        if page:
            at.switch_page(f"pages/{page}.py")
        t0 = time.perf_counter()
        at.run()
        first = time.perf_counter() - t0
        if at.exception:
            raise RuntimeError(f"{name}: {at.exception}")
        revisits = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            at.run()
            revisits.append(time.perf_counter() - t0)
        rows.append((name, first, statistics.median(revisits)))
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", default=str(Path.home() / ".cache" / "tda-explorer" / "bench-app-store"))
    parser.add_argument("--repeats", type=int, default=3, help="revisits timed per page (median printed)")
    args = parser.parse_args(argv)
    os.environ["TDA_STORE"] = args.store
    t0 = time.perf_counter()
    fill(args.store)
    print(f"store {args.store} ready in {time.perf_counter() - t0:.1f} s; load average {os.getloadavg()[0]:.1f}")
    rows = time_views(args.repeats)
    print(f"{'page':32s} {'first visit s':>14s} {'revisit s':>10s}")
    for name, first, revisit in rows:
        print(f"{name:32s} {first:14.2f} {revisit:10.2f}{'' if revisit < 1.0 else '  (over 1 s)'}")
    print(f"load average after: {os.getloadavg()[0]:.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
