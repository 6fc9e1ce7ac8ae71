"""Choose a task's training recipe on a validation split of its training set, then report its test accuracy.

Usage: python -m benchmarks.select_recipe --task mnist-resnet9-cpu [--lrs 0.02,0.05,0.1] [--epochs 6,10]
                                          [--batch-sizes 64] [--val 500] [--device auto]
Splits the training set into validation (`--val` examples, seed 0) and the rest, trains one model (seed 0) per
candidate recipe (every combination of the lists; the other recipe fields are the task's) on the rest, and prints
a Markdown table of validation accuracy and seconds. Then trains the task's registered recipe on the whole
training set and prints its test accuracy. The output is committed under docs/ with this command.
"""
from __future__ import annotations

import argparse
import dataclasses
import itertools
import time

import numpy as np

from tda_core.data import load_dataset
from tda_core.device import describe_device, resolve_device
from tda_core.models import n_parameters
from tda_core.tasks import get_task, make_model
from tda_core.training import evaluate, train

VALIDATION_SEED = 0


def _floats(text: str) -> list[float]:
    return [float(v) for v in text.split(",")]


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default="mnist-resnet9-cpu")
    parser.add_argument("--lrs", type=_floats, default=[0.02, 0.05, 0.1])
    parser.add_argument("--epochs", type=_ints, default=[6, 10])
    parser.add_argument("--batch-sizes", type=_ints, default=[64])
    parser.add_argument("--val", type=int, default=500)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()
    task, device = get_task(args.task), resolve_device(args.device)
    ds = load_dataset(task.dataset)
    perm = np.random.default_rng(VALIDATION_SEED).permutation(ds.n_train)
    val, rest = np.sort(perm[:args.val]), np.sort(perm[args.val:])
    x_val, y_val = ds.x_train[val], ds.y_train[val]
    print(f"`{task.name}`: {task.description}; {n_parameters(make_model(task))} parameters; "
          f"trained on {len(rest)} training examples, validated on the other {len(val)} "
          f"(split seed {VALIDATION_SEED}); {describe_device(device)}\n")
    print("| epochs | batch | lr | momentum | weight decay | validation accuracy | train s |")
    print("|---|---|---|---|---|---|---|")
    for epochs, batch, lr in itertools.product(args.epochs, args.batch_sizes, args.lrs):
        recipe = dataclasses.replace(task.recipe, epochs=epochs, batch_size=batch, lr=lr)
        t0 = time.perf_counter()
        model = train(dataclasses.replace(task, recipe=recipe), ds, 0, rest, device)
        seconds = time.perf_counter() - t0
        acc = evaluate(model, x_val, y_val, task.sequence)["accuracy"]
        print(f"| {epochs} | {batch} | {lr:g} | {recipe.momentum:g} | {recipe.weight_decay:g} | {acc:.3f} | "
              f"{seconds:.1f} |", flush=True)
    r = task.recipe
    t0 = time.perf_counter()
    model = train(task, ds, 0, None, device)
    seconds = time.perf_counter() - t0
    acc = evaluate(model, ds.x_test, ds.y_test, task.sequence)["accuracy"]
    print(f"\nRegistered recipe (epochs {r.epochs}, batch {r.batch_size}, lr {r.lr:g}, momentum {r.momentum:g}, "
          f"weight decay {r.weight_decay:g}) trained on all {ds.n_train} training examples (seed 0): "
          f"test accuracy {acc:.3f} on {ds.n_test} test examples, {seconds:.1f} s.")


if __name__ == "__main__":
    main()
