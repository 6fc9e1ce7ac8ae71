"""Wall seconds of one LDS ground truth with the local executor and with Ray at 1, 2, ... workers, side by side.

Usage: python -m benchmarks.bench_scaleout [--task mnist-mlp] [--M 50] [--workers 1,2] [--device cpu]
                                           [--address ADDRESS]
Every arm trains the same ground truth from scratch in a fresh temporary store (nothing cached); the Ray arms
share one Ray, started first (its start-up is printed apart: a session pays it once) or joined at --address, and
warmed up by a tiny digits ground truth per arm (each worker process imports torch and the project once).
With W workers the M models are trained in W chunks, each task getting 1/W of the cluster's CPUs (torch threads
to match) and, with --device cuda, 1/W of a GPU. The arms run interleaved for --rounds rounds (local, ray 1,
ray 2, local, ...), so a change in the machine's load hits every arm alike. Printed: wall seconds per arm and
round, the summed per-task training seconds (`train_s`), each round's ratio to that round's local arm, the ratio
of the arms' best rounds, and the load average before and after (other processes slow it).
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
    parser.add_argument("--rounds", type=int, default=2, help="interleaved rounds of every arm")
    parser.add_argument("--address", help="a running Ray cluster (default: start a local Ray with every core)")
    args = parser.parse_args()
    task, spec, device = get_task(args.task), EvalSpec(M=args.M), resolve_device(args.device)
    print(f"{task.name}: ground truth of {spec.M} subset models from scratch on {describe_device(device)}; "
          f"cores {os.cpu_count()}; load average {os.getloadavg()[0]:.2f}", flush=True)

    t0 = time.perf_counter()
    if args.address is None:
        start_local_ray()
    ray = ray_module()
    print(f"ray start-up   : {time.perf_counter() - t0:7.1f} s (once per session; not in the arms below)", flush=True)
    arms = [(f"ray {w:2d} worker{'s' if w > 1 else ' '}", RayExecutor(address=args.address, workers=w))
            for w in (int(w) for w in args.workers.split(","))]
    best: dict[str, float] = {}

    def timed_arm(round_: int, name: str, ex: Executor, local_s: float | None = None) -> float:
        wall, meta = timed(task, spec, device, ex)
        best[name] = min(wall, best.get(name, wall))
        ratio = "" if local_s is None else f", ratio to this round's local {wall / local_s:5.2f}"
        print(f"round {round_} {name}: {wall:7.1f} s wall, train_s {meta['train_s']:7.1f}{ratio}, "
              f"load average {os.getloadavg()[0]:.2f}", flush=True)
        return wall

    try:
        for name, ex in arms:
            warm_s, _ = timed(get_task("digits-mlp"), EvalSpec(M=2), device, ex)
            share = ex.task_options(device)  # what each task asks for
            gpu = f", {share['num_gpus']:.2f} GPU" if "num_gpus" in share else ""
            print(f"{name}: warm-up {warm_s:.1f} s; {share['num_cpus']} CPU{gpu} per task", flush=True)
        for round_ in range(1, args.rounds + 1):
            local_s = timed_arm(round_, "local", LOCAL)
            for name, ex in arms:
                timed_arm(round_, name, ex, local_s)
    finally:
        ray.shutdown()
    for name, ex in arms:
        goal = " (goal <= 1.10)" if ex.workers == 1 else ""
        print(f"best of {args.rounds}: {name} {best[name]:7.1f} s vs local {best['local']:7.1f} s, ratio "
              f"{best[name] / best['local']:5.2f}{goal}")
    print(f"load average after {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
