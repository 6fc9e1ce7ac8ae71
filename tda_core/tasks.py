"""The task registry: dataset + model + recipe, by name."""
from __future__ import annotations

import dataclasses
import os

from torch import nn

from .errors import UserError, unknown_choice
from .models import build_model
from .models.music_transformer import CPU_SIZE, PAPER_SIZE
from .specs import Recipe, TaskSpec

MNIST_RECIPE = Recipe(epochs=50, batch_size=64, lr=0.01, optimizer="sgd", momentum=0.9)

TASKS: dict[str, TaskSpec] = {}


def register_task(task: TaskSpec) -> TaskSpec:
    """Add a task to the registry."""
    TASKS[task.name] = task
    return task


register_task(TaskSpec("mnist-mlp", "mnist", "mlp", (("in_features", 784), ("n_classes", 10)), MNIST_RECIPE,
                       description="MNIST-10 + MLP 784-128-64-10 (SGD 0.01, momentum 0.9, 50 epochs)"))
register_task(TaskSpec("digits-mlp", "digits", "mlp", (("in_features", 64), ("n_classes", 10)),
                       Recipe(epochs=30, batch_size=64, lr=0.01, optimizer="sgd", momentum=0.9),
                       description="8x8 digits + MLP 64-128-64-10, seconds to train: tests and teaching"))
register_task(TaskSpec("cifar2-mlp", "cifar2", "mlp", (("in_features", 3072), ("n_classes", 2)),
                       Recipe(epochs=50, batch_size=64, lr=0.01, optimizer="sgd", momentum=0.9),
                       description="CIFAR-2 (cat vs dog) + MLP 3072-128-64-2"))
register_task(TaskSpec("cifar2-resnet9", "cifar2", "resnet9", (("n_classes", 2), ("width", 1.0)),
                       Recipe(epochs=20, batch_size=128, lr=0.05, optimizer="sgd", momentum=0.9, weight_decay=5e-4),
                       description="CIFAR-2 + ResNet-9 (6.6M parameters; meant for a GPU)"))
register_task(TaskSpec("cifar2-resnet9-cpu", "cifar2", "resnet9", (("n_classes", 2), ("width", 0.25)),
                       Recipe(epochs=20, batch_size=128, lr=0.05, optimizer="sgd", momentum=0.9, weight_decay=5e-4),
                       description="CIFAR-2 + ResNet-9 at width 0.25 (0.41M parameters; CPU-sized)"))
register_task(TaskSpec("chorales-mt", "chorales", "music-transformer", tuple(CPU_SIZE.items()),
                       Recipe(epochs=2, batch_size=8, lr=3e-3, optimizer="adam"), sequence=True,
                       description="Bach chorales + Music Transformer, CPU size (0.16M parameters, 2 layers, "
                                   "relative attention; about a minute to train on 2 cores)"))
register_task(TaskSpec("maestro-mt", "maestro", "music-transformer", tuple(PAPER_SIZE.items()),
                       Recipe(epochs=20, batch_size=32, lr=3e-4, optimizer="adam"), sequence=True,
                       description="MAESTRO + Music Transformer as in the benchmark "
                                   "(13.1M parameters; meant for a GPU)"))


EPOCHS_ENV = "TDA_EPOCHS"  # quick checks: train for this many epochs instead of the recipe's


def get_task(name: str) -> TaskSpec:
    """Task by name; unknown names list the valid ones. With $TDA_EPOCHS=N set (quick checks such as
    scripts/gpu_check.sh), the task trains for N epochs; the recipe is part of every store key, so such
    models are stored apart from the full recipe's."""
    if name not in TASKS:
        raise unknown_choice("task", name, sorted(TASKS))
    task, epochs = TASKS[name], os.environ.get(EPOCHS_ENV, "").strip()
    if not epochs:
        return task
    if not epochs.isdigit() or int(epochs) < 1:
        raise UserError(f"${EPOCHS_ENV} must be a positive whole number of epochs, got {epochs!r}")
    return dataclasses.replace(task, recipe=dataclasses.replace(task.recipe, epochs=int(epochs)))


def make_model(task: TaskSpec) -> nn.Module:
    """A fresh (untrained) model for the task, initialised from the current torch RNG."""
    return build_model(task.model, **task.kwargs)
