"""`datasets` and `train`."""
from __future__ import annotations

import argparse

import numpy as np

from ..data import dataset_table, load_dataset
from ..data.base import sample_indices
from ..paths import data_dir
from ..progress import tqdm_progress
from ..store import Store
from ..tasks import get_task
from ..training import load_or_train
from .common import emit, parse_seeds


def cmd_datasets(args: argparse.Namespace) -> None:
    root = data_dir(args.data_dir)
    if args.download:
        load_dataset(args.download, root, download=True)
    table = dataset_table(root, sizes=True).rename(columns={"dataset": "name", "status": "source"})
    emit(table.to_dict("records"), args.json)


def subsets_for(seeds: list[int], n_train: int, frac: float | None) -> list[np.ndarray | None]:
    """Per seed, a random `frac` of the training positions drawn with that seed (None = full set)."""
    if frac is None:
        return [None] * len(seeds)
    if not 0 < frac <= 1:
        from ..errors import UserError
        raise UserError(f"--subset-frac must be in (0, 1], got {frac}")
    return [sample_indices(n_train, int(round(frac * n_train)), seed) for seed in seeds]


def cmd_train(args: argparse.Namespace) -> None:
    task = get_task(args.task)
    dataset = load_dataset(task.dataset, args.data_dir)
    seeds = parse_seeds(args.seeds)
    models = load_or_train(task, seeds, subsets_for(seeds, dataset.n_train, args.subset_frac), Store(args.store),
                           args.device, dataset, None if args.json else tqdm_progress())
    rows = [{"task": task.name, "seed": m.seed, "test_accuracy": round(m.metrics["accuracy"], 4),
             "test_loss": round(m.metrics["loss"], 4), "train_s": round(m.train_s, 2),
             "from_store": m.loaded, "load_s": round(m.load_s, 3), "key": m.key} for m in models]
    emit(rows, args.json)


def register(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("datasets", parents=[common], help="list every dataset, its sizes and where it comes from")
    p.add_argument("--download", metavar="NAME", help="download a dataset that allows it (mnist, cifar2)")
    p.set_defaults(func=cmd_datasets)

    p = sub.add_parser("train", parents=[common], help="train models (or load them from the store)")
    p.add_argument("--task", required=True, help="task name, e.g. mnist-mlp (see `datasets` / README)")
    p.add_argument("--seeds", default="0", help="seeds: 0-4 or 0,3,7 (default 0)")
    p.add_argument("--subset-frac", type=float, help="train each seed on this fraction of the training set, "
                                                     "drawn with that seed")
    p.set_defaults(func=cmd_train)
