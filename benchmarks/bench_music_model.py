"""Model selection for `chorales-mt` on the CPU: size and epochs by validation loss on held-out training pieces,
within a budget on the ground truth's training time.

Usage: python -m benchmarks.bench_music_model [--budget-core-s 1800] [--max-epochs 12] [--threads 2] [--out FILE.md]

The training pieces are split (seeded) into fit pieces and validation pieces (`--validation-fraction`); the test
pieces are never read until the chosen recipe's test loss is printed at the end. For each candidate size:
  1. one epoch on the fit pieces is timed in CPU seconds (all threads of this process; unlike wall time, hardly
     changed by other processes sharing the cores), and from it the CPU seconds of one epoch of a ground-truth
     subset model (alpha = 0.5 of the full training set), scaled by window count;
  2. the epochs allowed are those that keep the ground truth used by docs/results_chorales_cpu.md (M = 50 subsets,
     R = 2 runs: 100 models) within `--budget-core-s` CPU seconds (default 1800: 15 minutes of 2 cores; at most
     `--max-epochs`);
  3. a model trained on the fit pieces for that many epochs has its validation loss measured after every epoch.
The (size, epochs) with the lowest validation loss wins (Adam, the task's learning rate and batch size). The
winner is then trained on all training pieces (seed 0) and its test loss printed next to the unigram baseline's.
Wall times depend on how busy the machine is (the load average is printed before and after).
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from tda_core.data import load_dataset
from tda_core.data.music import SPLIT_SEED, Corpus, convert_chorales, music_dataset, unigram_loss
from tda_core.models.music_transformer import CPU_SIZE
from tda_core.report import markdown
from tda_core.specs import EvalSpec
from tda_core.tasks import get_task, make_model
from tda_core.training import evaluate, train

CANDIDATES = (  # (d_model, n_layers, n_heads, d_ff); attention-probability dropout off on the CPU
    (32, 2, 2, 128),
    (64, 2, 2, 256),
    (64, 4, 2, 256),
    (128, 2, 4, 512),
)
GROUND_TRUTH = EvalSpec(M=50, alpha=0.5, runs=2)


def fit_validation_corpus(corpus: Corpus, validation_fraction: float) -> Corpus:
    """The corpus with its training pieces split (seeded) into fit ('train') and validation ('test') pieces; its
    test pieces are marked 'held-out' and so appear in neither."""
    train_pieces = np.flatnonzero(np.array(corpus.splits) == "train")
    order = np.random.default_rng([SPLIT_SEED, 7]).permutation(train_pieces)
    validation = set(order[:max(1, round(validation_fraction * len(order)))].tolist())
    splits = tuple("held-out" if s == "test" else "test" if i in validation else "train"
                   for i, s in enumerate(corpus.splits))
    return dataclasses.replace(corpus, splits=splits)


def size_kwargs(size: tuple[int, int, int, int]) -> dict:
    d_model, n_layers, n_heads, d_ff = size
    return {**CPU_SIZE, "d_model": d_model, "n_layers": n_layers, "n_heads": n_heads, "d_ff": d_ff}


def formatted(frame: pd.DataFrame, digits: dict[str, int]) -> pd.DataFrame:
    """`frame` with the columns in `digits` as text rounded to that many decimals (NaN blank)."""
    return frame.assign(**{c: frame[c].map(lambda v, d=d: "" if pd.isna(v) else f"{v:.{d}f}")
                           for c, d in digits.items()})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget-core-s", type=float, default=1800.0,
                        help="CPU seconds allowed for the 100 ground-truth subset models (default 1800 = 15 minutes "
                             "of 2 cores)")
    parser.add_argument("--max-epochs", type=int, default=12)
    parser.add_argument("--validation-fraction", type=float, default=0.2)
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--out", help="also write the tables as Markdown to this file")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    base = get_task("chorales-mt")
    corpus = fit_validation_corpus(convert_chorales(), args.validation_fraction)
    fit, _ = music_dataset("chorales-fit", corpus, "chorales: fit vs validation pieces")
    full = load_dataset("chorales")
    subset_windows = GROUND_TRUTH.alpha * full.n_train
    n_models = GROUND_TRUTH.M * GROUND_TRUTH.runs
    load_before = os.getloadavg()[0]
    print(f"chorales: {fit.n_train} fit / {fit.n_test} validation windows (training pieces only), "
          f"{full.n_train} training windows in all; budget {args.budget_core_s:.0f} CPU s for {n_models} subset "
          f"models of {subset_windows:.0f} windows; torch threads {torch.get_num_threads()}, load average {load_before:.2f}",
          flush=True)
    rows, curves = [], []
    for size in CANDIDATES:
        kwargs = size_kwargs(size)
        probe = dataclasses.replace(base, model_kwargs=tuple(kwargs.items()),
                                    recipe=dataclasses.replace(base.recipe, epochs=1))
        t0, c0 = time.perf_counter(), time.process_time()
        train(probe, fit, seed=0, device="cpu")
        epoch_s, epoch_cpu_s = time.perf_counter() - t0, time.process_time() - c0
        subset_epoch_cpu_s = epoch_cpu_s * subset_windows / fit.n_train
        epochs = int(min(args.max_epochs, args.budget_core_s // (n_models * subset_epoch_cpu_s)))
        label = f"d={size[0]}, {size[1]} layers, {size[2]} heads, ff {size[3]}"
        n_params = sum(p.numel() for p in make_model(probe).parameters())
        if epochs < 1:
            rows.append({"size": label, "parameters": n_params, "epoch wall s": epoch_s, "epoch CPU s": epoch_cpu_s,
                         "epochs allowed": 0, "best epochs": np.nan, "validation loss": np.nan,
                         "ground truth CPU s": np.nan})
            print(f"{label}: one epoch {epoch_cpu_s:.1f} CPU s; not even one epoch fits the budget", flush=True)
            continue
        losses: list[float] = []

        def on_epoch(done: int, model: torch.nn.Module) -> None:
            losses.append(evaluate(model, fit.x_test, fit.y_test, True)["loss"])
            print(f"  {label}: epoch {done}: validation loss {losses[-1]:.4f}", flush=True)

        run = dataclasses.replace(probe, recipe=dataclasses.replace(base.recipe, epochs=epochs))
        train(run, fit, seed=0, device="cpu", on_epoch=on_epoch)
        best = int(np.argmin(losses)) + 1
        rows.append({"size": label, "parameters": n_params, "epoch wall s": epoch_s, "epoch CPU s": epoch_cpu_s,
                     "epochs allowed": epochs, "best epochs": best, "validation loss": losses[best - 1],
                     "ground truth CPU s": n_models * subset_epoch_cpu_s * best})
        curves += [{"size": label, "epochs": e + 1, "validation loss": v} for e, v in enumerate(losses)]
    table = pd.DataFrame(rows)
    chosen = table.loc[table["validation loss"].idxmin()]
    size = CANDIDATES[int(table["validation loss"].idxmin())]
    final = dataclasses.replace(base, model_kwargs=tuple(size_kwargs(size).items()),
                                recipe=dataclasses.replace(base.recipe, epochs=int(chosen["best epochs"])))
    t0, c0 = time.perf_counter(), time.process_time()
    model = train(final, full, seed=0, device="cpu")
    final_s, final_cpu_s = time.perf_counter() - t0, time.process_time() - c0
    test = evaluate(model, full.x_test, full.y_test, True)
    validation_unigram = unigram_loss(fit)
    configured = (dict(base.model_kwargs) == size_kwargs(size) and base.recipe.epochs == int(chosen["best epochs"]))
    summary = [f"Chosen: {chosen['size']}, {int(chosen['best epochs'])} epochs (validation loss "
               f"{chosen['validation loss']:.4f}; the unigram baseline on the validation pieces: "
               f"{validation_unigram:.4f}).",
               f"Trained on all {full.n_train} training windows (seed 0, {final_s:.1f} s wall, {final_cpu_s:.1f} CPU s): "
               f"test loss {test['loss']:.4f} nats per token, accuracy {test['accuracy']:.3f}; unigram baseline {unigram_loss(full):.4f} on the "
               f"{full.n_test} test windows.",
               f"`chorales-mt` in tda_core/tasks.py {'uses' if configured else 'does NOT use'} this size and "
               f"epoch count ({dict(base.model_kwargs)}, {base.recipe.epochs} epochs).",
               f"Load average before {load_before:.2f}, after {os.getloadavg()[0]:.2f}."]
    shown = formatted(table, {"epoch wall s": 1, "epoch CPU s": 1, "validation loss": 4, "ground truth CPU s": 0,
                              "best epochs": 0})
    text = "\n".join([markdown(shown), *summary])
    print(text)
    if args.out:
        command = "python -m benchmarks.bench_music_model " + " ".join(shlex.quote(a) for a in sys.argv[1:])
        Path(args.out).write_text("\n".join([
            "# chorales-mt: model size and epochs chosen by validation loss", "", f"Made by `{command}`.", "",
            __doc__.split("\n\n", 1)[1].strip(), "", markdown(shown), "Validation loss after every epoch:", "",
            markdown(formatted(pd.DataFrame(curves), {"validation loss": 4})), *[f"{s}\n" for s in summary]]))


if __name__ == "__main__":
    main()
