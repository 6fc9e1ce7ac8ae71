"""`tasks`, `add-image-folder`, `lds --scores` and `export-ground-truth`: your tasks and other tools' scores."""
from __future__ import annotations

import argparse
import sys

from ..data import load_dataset
from ..interop import ORIENTATIONS, export_ground_truth, scores_lds
from ..progress import tqdm_progress
from ..specs import OPTIMIZERS, Recipe
from ..store import Store
from ..tasks import get_task
from ..user_tasks import FOLDER_MODELS, register_image_folder, task_table
from .common import emit
from .evaluation import _eval_options, _eval_spec


def cmd_tasks(args: argparse.Namespace) -> None:
    emit(task_table().to_dict("records"), args.json)


def cmd_add_image_folder(args: argparse.Namespace) -> None:
    recipe = None
    if any(v is not None for v in (args.epochs, args.batch_size, args.lr)) or args.optimizer:
        base = FOLDER_MODELS[args.model]
        recipe = Recipe(epochs=args.epochs or base.epochs, batch_size=args.batch_size or base.batch_size,
                        lr=args.lr or base.lr, optimizer=args.optimizer or base.optimizer, momentum=base.momentum,
                        weight_decay=base.weight_decay)
    task = register_image_folder(args.name, args.path, model=args.model, width=args.width, recipe=recipe,
                                 size=args.size, channels=args.channels, test_fraction=args.test_fraction,
                                 seed=args.split_seed, record_in=Store(args.store))
    dataset = load_dataset(task.dataset)  # decodes now: unreadable files are counted here
    emit({"task": task.name, "classes": ", ".join(dataset.class_names), "train/test": f"{dataset.n_train}/"
          f"{dataset.n_test}", "image": "x".join(map(str, dataset.x_train.shape[1:])), "model": task.model,
          "source": dataset.source}, args.json)
    if not args.json:
        print(f"registered; e.g. python -m tda_core attribute --task {task.name} --ensemble dropout --I 1 --D 5",
              file=sys.stderr)


def cmd_lds(args: argparse.Namespace) -> None:
    task = get_task(args.task)
    result = scores_lds(task, args.scores, _eval_spec(args), store=Store(args.store), device=args.device,
                        orientation=args.orientation, progress=None if args.json else tqdm_progress())
    if args.json:
        emit(result.row(), True)
        return
    flipped = " (the file was test x train: transposed)" if result.transposed else ""
    print(f"{task.name}: LDS {result.lds.mean:.4f} +- {result.lds.sem:.4f} on {result.lds.n} test examples of the "
          f"evaluation split ({result.n_columns} scored){flipped}")


def cmd_export_ground_truth(args: argparse.Namespace) -> None:
    task = get_task(args.task)
    out = export_ground_truth(task, args.out, _eval_spec(args), store=Store(args.store), device=args.device,
                              progress=None if args.json else tqdm_progress())
    emit({"task": task.name, "M": args.M, "alpha": args.alpha, "runs": args.runs, "written": str(out)}, args.json)


def register(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("tasks", parents=[common], help="every task: built-in, from Python, tasks file, image folder")
    p.set_defaults(func=cmd_tasks)

    p = sub.add_parser("add-image-folder", parents=[common],
                       help="register a class-per-subfolder image folder as a task (recorded in the store)")
    p.add_argument("path", help="folder with one subfolder per class (or train/ and test/ laid out so)")
    p.add_argument("--name", required=True, help="task name")
    p.add_argument("--model", default="mlp", choices=sorted(FOLDER_MODELS))
    p.add_argument("--width", type=float, default=0.25, help="resnet9 channel width (1.0 = full size)")
    p.add_argument("--size", type=int, help="resize images to SIZE x SIZE (default: the most common longer side)")
    p.add_argument("--channels", type=int, choices=(1, 3), help="1 or 3 (default: 1 when all images are grey)")
    p.add_argument("--test-fraction", type=float, default=0.2, help="held-out share of every class without "
                                                                    "train/ and test/ folders")
    p.add_argument("--split-seed", type=int, default=0, help="seed of the held-out draw")
    p.add_argument("--epochs", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--optimizer", choices=OPTIMIZERS)
    p.set_defaults(func=cmd_add_image_folder)

    p = sub.add_parser("lds", parents=[common],
                       help="LDS of a score file (any tool's, .npz / .safetensors) on the task's ground truth")
    _eval_options(p)
    p.add_argument("--scores", required=True, metavar="FILE",
                   help="scores (train x test or test x train) with train_index and test_index source indices")
    p.add_argument("--orientation", default="auto", choices=ORIENTATIONS,
                   help="auto: detected from the index arrays (needed only when n_train == n_test)")
    p.set_defaults(func=cmd_lds)

    p = sub.add_parser("export-ground-truth", parents=[common],
                       help="write the ground truth (subsets, targets, split) to an .npz for other tools")
    _eval_options(p)
    p.add_argument("--out", required=True, metavar="FILE", help="an .npz file")
    p.set_defaults(func=cmd_export_ground_truth)
