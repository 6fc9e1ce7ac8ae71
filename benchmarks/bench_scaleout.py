"""Wall seconds of one LDS ground truth with the local executor and with Ray at 1, 2, ... workers, side by side.

Usage: python -m benchmarks.bench_scaleout [--task mnist-mlp] [--M 50] [--workers 1,2] [--device cpu]
                                           [--address ADDRESS]
Every arm trains the same ground truth from scratch in a fresh temporary store (nothing cached); the Ray arms
share one Ray, started first (its start-up is printed apart: a session pays it once) or joined at --address.
With W workers the M models are trained in W chunks, each task getting 1/W of the cluster's CPUs (torch threads
to match) and, with --device cuda, 1/W of a GPU. Printed: wall seconds per arm, the ratio to the local arm, the
summed per-task training seconds (`train_s`), and the load average before and after (other processes slow it).
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time

from tda_core.device import describe_device, resolve_device
from tda_core.evaluation import ground_truth
from tda_core.executors import LOCAL, Executor
from tda_core.ray_executor import RayExecutor, ray_module, start_local_ray
from tda_core.specs import EvalSpec
from tda_core.store import Store
from tda_core.tasks import get_task


def timed(task, spec: EvalSpec, device, executor: Executor) -> tuple[float, dict]:  # noqa: ANN001
    """(wall seconds, ground-truth metadata) of one ground truth from scratch."""
    with tempfile.TemporaryDirectory() as root:
        t0 = time.perf_counter()
        truth = ground_truth(task, spec, store=Store(root), device=device, executor=executor)
        return time.perf_counter() - t0, truth.meta


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default="mnist-mlp")
    parser.add_argument("--M", type=int, default=50)
    parser.add_argument("--workers", default="1,2", help="comma-separated Ray worker counts")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--address", help="a running Ray cluster (default: start a local Ray with every core)")
    args = parser.parse_args()
    task, spec, device = get_task(args.task), EvalSpec(M=args.M), resolve_device(args.device)
    print(f"{task.name}: ground truth of {spec.M} subset models from scratch on {describe_device(device)}; "
          f"cores {os.cpu_count()}; load average {os.getloadavg()[0]:.2f}", flush=True)

    local_s, meta = timed(task, spec, device, LOCAL)
    print(f"local          : {local_s:7.1f} s wall, train_s {meta['train_s']:7.1f}", flush=True)
    t0 = time.perf_counter()
    if args.address is None:
        start_local_ray()
    ray = ray_module()
    print(f"ray start-up   : {time.perf_counter() - t0:7.1f} s (once per session; not in the arms below)", flush=True)
    try:
        for workers in (int(w) for w in args.workers.split(",")):
            ex = RayExecutor(address=args.address, workers=workers)
            wall, meta = timed(task, spec, device, ex)
            share = ex.task_options(device)  # what each task asked for
            gpu = f", {share['num_gpus']:.2f} GPU" if "num_gpus" in share else ""
            print(f"ray {workers:2d} worker{'s' if workers > 1 else ' '}: {wall:7.1f} s wall, train_s "
                  f"{meta['train_s']:7.1f}, ratio to local {wall / local_s:5.2f} "
                  f"({share['num_cpus']} CPU{gpu} per task)", flush=True)
    finally:
        ray.shutdown()
    print(f"load average after {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
