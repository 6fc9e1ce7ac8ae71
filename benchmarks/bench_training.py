"""Models per second: `train` in a loop vs `train_many` (torch.func, batched), in the same run.

Usage: python -m benchmarks.bench_training [--task mnist-mlp] [--models 16] [--frac 0.5]
Each model trains on its own random subset (as LDS ground truth does). Prints both rates and the speed-up,
and checks that the batched parameters equal the looped ones.
"""
from __future__ import annotations

import argparse
import time

import torch

from tda_core.data import load_dataset
from tda_core.data.base import sample_indices
from tda_core.device import describe_device, resolve_device
from tda_core.tasks import get_task
from tda_core.training import train, train_many


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default="mnist-mlp")
    parser.add_argument("--models", type=int, default=16)
    parser.add_argument("--frac", type=float, default=0.5)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()
    task, device = get_task(args.task), resolve_device(args.device)
    ds = load_dataset(task.dataset)
    seeds = list(range(args.models))
    subsets = [sample_indices(ds.n_train, int(args.frac * ds.n_train), 1000 + s) for s in seeds]
    print(f"{task.name}: {args.models} models x {len(subsets[0])} examples x {task.recipe.epochs} epochs "
          f"on {describe_device(device)}")

    t0 = time.perf_counter()
    looped = [train(task, ds, s, sub, device) for s, sub in zip(seeds, subsets)]
    loop_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    batched = train_many(task, ds, seeds, subsets, device)
    if device.type == "cuda":
        torch.cuda.synchronize()
    many_s = time.perf_counter() - t0

    max_diff = max(float((p - q).detach().abs().max()) for a, b in zip(looped, batched)
                   for p, q in zip(a.parameters(), b.parameters()))
    print(f"loop     : {loop_s:7.2f} s  {args.models / loop_s:6.2f} models/s")
    print(f"batched  : {many_s:7.2f} s  {args.models / many_s:6.2f} models/s")
    print(f"speed-up : {loop_s / many_s:.2f}x   max |param difference| {max_diff:.2e}")


if __name__ == "__main__":
    main()
