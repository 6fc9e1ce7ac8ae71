"""Seconds for an LDS ground truth (M subset models, each on alpha of the training set), from scratch.

Usage: python -m benchmarks.bench_ground_truth [--task mnist-mlp] [--M 50] [--chunks 25,50] [--threads 2]
                                                 [--device cpu]
Runs `tda_core.evaluation.ground_truth` on a fresh temporary store (nothing cached) once per chunk size
and prints the wall time, seconds per model, the achieved GFLOP/s beside the machine's matmul limit measured
in the same run, the CPU threads and the load average before and after (other processes on the machine slow it
down; the goal is at most 45 s for embedded MNIST on a quiet 2-core machine), then where the training time goes.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import tempfile
import time

import torch

from benchmarks.bench_training import flops_per_example
from benchmarks.machine_limit import limit_line, matmul_limits, rate, time_breakdown
from tda_core.data import load_dataset
from tda_core.device import describe_device, resolve_device
from tda_core.evaluation import draw_subsets, ground_truth, run_seed, subset_size
from tda_core.specs import EvalSpec
from tda_core.store import Store
from tda_core.tasks import get_task
from tda_core.training import train_many


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default="mnist-mlp")
    parser.add_argument("--M", type=int, default=50)
    parser.add_argument("--alpha", type=float, default=0.5)
    parser.add_argument("--chunks", default="50", help="comma-separated chunk sizes (models trained at once)")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    task, spec, device = get_task(args.task), EvalSpec(M=args.M, alpha=args.alpha), resolve_device(args.device)
    ds = load_dataset(task.dataset)
    limits = matmul_limits(device)
    flops = flops_per_example(task, ds, device) * subset_size(ds.n_train, spec) * task.recipe.epochs * spec.M
    print(f"{task.name}: {spec.M} subsets of alpha={spec.alpha} on {describe_device(device)}; "
          f"cores visible {len(os.sched_getaffinity(0))}; load average {os.getloadavg()[0]:.2f}; "
          f"{flops / 1e12:.2f} TFLOP of training (counted)")
    print(limit_line(limits))
    for chunk in (int(c) for c in args.chunks.split(",")):
        with tempfile.TemporaryDirectory() as root:
            t0 = time.perf_counter()
            truth = ground_truth(task, spec, store=Store(root), device=device, dataset=ds, chunk=chunk)
            wall = time.perf_counter() - t0
        print(f"chunk {chunk:3d}: {wall:7.1f} s wall, {wall / spec.M:.2f} s per model, {rate(flops, wall, limits)}, "
              f"targets {tuple(truth.targets.shape)}, load average after {os.getloadavg()[0]:.2f}", flush=True)
    epochs = min(2, task.recipe.epochs)
    short = dataclasses.replace(task, recipe=dataclasses.replace(task.recipe, epochs=epochs))
    subsets = list(draw_subsets(ds.n_train, spec))
    seeds = [run_seed(spec, j, 0) for j in range(spec.M)]
    print(f"training of all {spec.M} models at once over {epochs} of {task.recipe.epochs} epochs, profiled:")
    print("\n".join(time_breakdown(lambda: train_many(short, ds, seeds, subsets, device),
                                   flops * epochs / task.recipe.epochs, limits)))


if __name__ == "__main__":
    main()
