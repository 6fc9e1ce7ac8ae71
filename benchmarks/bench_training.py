"""Training speed in one run: a plain PyTorch loop, `train`, `train` in a loop over K models, and `train_many`.

Usage: python -m benchmarks.bench_training [--task mnist-mlp] [--models 16] [--frac 0.5] [--device auto]
Each model trains on its own random subset (as LDS ground truth does). Prints the machine's matmul limit
(measured now), every variant's seconds and achieved GFLOP/s (FLOPs of the matrix products and convolutions,
counted), the ratios that count (train vs the plain loop, median model against median model: goal <= 1.2x;
train_many vs the loop: goal >= 4x for the MNIST MLP), the largest parameter difference between the batched
and the looped models, and where train_many's time goes.
"""
from __future__ import annotations

import argparse
import dataclasses
import time

import numpy as np
import torch

from benchmarks.machine_limit import count_flops, limit_line, matmul_limits, rate, time_breakdown
from tda_core.data import Dataset, load_dataset
from tda_core.data.base import sample_indices
from tda_core.device import describe_device, resolve_device
from tda_core.objectives import per_example_loss
from tda_core.specs import TaskSpec
from tda_core.tasks import get_task, make_model
from tda_core.training import train, train_many


PLAIN_RUNS = 3  # models trained by the plain loop; its median is compared with the median `train`


def plain_loop(task: TaskSpec, dataset: Dataset, seed: int, subset: np.ndarray, device: torch.device) -> None:
    """The textbook loop with the task's recipe: the model's own dropout, torch.optim's default implementation."""
    torch.manual_seed(seed)
    r = task.recipe
    model = make_model(task).to(device).train()
    opt = (torch.optim.SGD(model.parameters(), lr=r.lr, momentum=r.momentum, weight_decay=r.weight_decay)
           if r.optimizer == "sgd" else torch.optim.Adam(model.parameters(), lr=r.lr, weight_decay=r.weight_decay))
    pos = torch.as_tensor(subset)
    x, y = dataset.x_train[pos].to(device), dataset.y_train[pos].to(device)
    for _ in range(r.epochs):
        for batch in torch.randperm(len(pos)).split(r.batch_size):
            loss = per_example_loss(model(x[batch]), y[batch], task.sequence).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()


def flops_per_example(task: TaskSpec, dataset: Dataset, device: torch.device) -> float:
    """Counted FLOPs of one training step (forward and backward) per example."""
    model = make_model(task).to(device).train()
    b = task.recipe.batch_size
    x, y = dataset.x_train[:b].to(device), dataset.y_train[:b].to(device)
    return count_flops(lambda: per_example_loss(model(x), y, task.sequence).mean().backward()) / b


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


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
    limits = matmul_limits(device)
    flops = flops_per_example(task, ds, device) * len(subsets[0]) * task.recipe.epochs  # one model
    print(f"{task.name}: {args.models} models x {len(subsets[0])} examples x {task.recipe.epochs} epochs on "
          f"{describe_device(device)}; {flops / 1e9:.1f} GFLOP per model (counted)")
    print(limit_line(limits))

    plain_times = [timed(lambda: plain_loop(task, ds, seed, subset, device))
                   for seed, subset in zip(seeds[:PLAIN_RUNS], subsets[:PLAIN_RUNS])]
    looped, loop_times = [], []
    for seed, subset in zip(seeds, subsets):
        loop_times.append(timed(lambda: looped.append(train(task, ds, seed, subset, device))))
    loop_s = sum(loop_times)
    batched: list[torch.nn.Module] = []
    many_s = timed(lambda: batched.extend(train_many(task, ds, seeds, subsets, device)))

    max_diff = max(float((p - q).abs().max()) for a, b in zip(looped, batched)
                   for p, q in zip(a.state_dict().values(), b.state_dict().values()) if p.is_floating_point())
    k, plain_s, train_s = args.models, float(np.median(plain_times)), float(np.median(loop_times))
    print(f"plain PyTorch loop, 1 model : {plain_s:7.2f} s  {rate(flops, plain_s, limits)}  (median of "
          f"{len(plain_times)} models: {', '.join(f'{t:.2f}' for t in plain_times)} s)")
    print(f"train, 1 model              : {train_s:7.2f} s  {rate(flops, train_s, limits)}  "
          f"{train_s / plain_s:.2f}x the plain loop (goal <= 1.2x; median of the {k} models of the loop below, "
          f"{min(loop_times):.2f}-{max(loop_times):.2f} s)")
    print(f"train in a loop, {k:2d} models  : {loop_s:7.2f} s  {rate(k * flops, loop_s, limits)}  "
          f"{k / loop_s:.2f} models/s")
    print(f"train_many, {k:2d} models      : {many_s:7.2f} s  {rate(k * flops, many_s, limits)}  "
          f"{k / many_s:.2f} models/s")
    print(f"speed-up of train_many over the loop: {loop_s / many_s:.2f}x   "
          f"max |parameter/buffer difference| {max_diff:.2e}")
    short = dataclasses.replace(task, recipe=dataclasses.replace(task.recipe, epochs=min(2, task.recipe.epochs)))
    short_flops = k * flops * short.recipe.epochs / task.recipe.epochs
    print("\n".join(time_breakdown(lambda: train_many(short, ds, seeds, subsets, device), short_flops, limits)))


if __name__ == "__main__":
    main()
