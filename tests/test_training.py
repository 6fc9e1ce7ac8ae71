"""Training: accuracy thresholds, determinism, train_many == train, the store round trip."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tda_core.data import load_dataset
from tda_core.data.base import Dataset, sample_indices
from tda_core.models.resnet9 import ResNet9
from tda_core.models.stacked import batch_norm_channels_last
from tda_core.tasks import get_task
from tda_core.training import dataset_fingerprint, evaluate, load_or_train, train, train_many


def short(task_name: str, **recipe):
    task = get_task(task_name)
    return dataclasses.replace(task, recipe=dataclasses.replace(task.recipe, **recipe))


def test_digits_mlp_reaches_90_percent():
    task, ds = get_task("digits-mlp"), load_dataset("digits")
    acc = evaluate(train(task, ds, seed=0), ds.x_test, ds.y_test, False)["accuracy"]
    assert acc >= 0.90, acc


def test_mnist_mlp_reaches_93_percent_on_embedded_mnist():
    task, ds = get_task("mnist-mlp"), load_dataset("mnist")
    acc = evaluate(train(task, ds, seed=0), ds.x_test, ds.y_test, False)["accuracy"]
    assert acc >= 0.93, acc


@pytest.mark.slow
def test_mnist_resnet9_cpu_reaches_96_percent_on_embedded_mnist():
    """Measured for seed 0: 0.978 (one thread), 0.974 (trained with train_many), 0.964 (two threads on a busy
    machine); 0.958-0.978 over seeds 0-4. The issue's goal of 0.97 is met by some seeds, not by every run."""
    task, ds = get_task("mnist-resnet9-cpu"), load_dataset("mnist")
    acc = evaluate(train(task, ds, seed=0), ds.x_test, ds.y_test, False)["accuracy"]
    assert acc >= 0.955, acc


def test_training_is_deterministic_and_seed_dependent():
    task, ds = short("digits-mlp", epochs=2), load_dataset("digits")
    a, b, c = (train(task, ds, seed=s) for s in (5, 5, 6))
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert not torch.equal(a.fc1.weight, c.fc1.weight)


@pytest.mark.parametrize("optimizer, lr", [("sgd", 0.01), ("adam", 1e-3)])
def test_train_many_equals_separate_runs(optimizer, lr):
    task = short("digits-mlp", epochs=3, optimizer=optimizer, lr=lr, weight_decay=1e-4)
    ds = load_dataset("digits")
    seeds = [0, 1, 2]
    subsets = [sample_indices(ds.n_train, 750, 100 + s) for s in seeds]
    together = train_many(task, ds, seeds, subsets)
    for seed, subset, model in zip(seeds, subsets, together):
        alone = train(task, ds, seed, subset)
        for (name, p), q in zip(alone.named_parameters(), model.parameters()):
            assert torch.allclose(p, q, atol=1e-5, rtol=1e-4), name
    assert not torch.allclose(together[0].fc1.weight, together[1].fc1.weight)


@pytest.mark.parametrize("optimizer, lr", [("sgd", 0.05), ("adam", 1e-3)])
@pytest.mark.parametrize("path", ["forward_stacked", "vmap"])
def test_train_many_equals_train_with_batchnorm(optimizer, lr, path, monkeypatch):
    """Per-model BatchNorm running statistics in batched training, through ResNet-9's grouped forward and through
    the generic vmap path: parameters and buffers equal `train`'s."""
    if path == "vmap":
        monkeypatch.delattr(ResNet9, "forward_stacked")
    task = short("mnist-resnet9-cpu", epochs=2, batch_size=8, optimizer=optimizer, lr=lr)
    gen = torch.Generator().manual_seed(0)
    x, y = torch.rand(24, 1, 28, 28, generator=gen), torch.randint(0, 10, (24,), generator=gen)
    ds = Dataset("tiny", "image", x, y, x[:4], y[:4], torch.arange(24), torch.arange(4), ("digit",), "test")
    seeds, subsets = [0, 1, 2], [np.arange(0, 24, 2), np.arange(12), np.arange(12, 24)]
    together = train_many(task, ds, seeds, subsets, device="cpu")
    for seed, subset, model in zip(seeds, subsets, together):
        alone = train(task, ds, seed, subset, device="cpu")
        for (name, p), q in zip(alone.state_dict().items(), model.state_dict().values()):
            assert torch.allclose(p, q, atol=1e-5, rtol=1e-4), name
    assert int(together[0].prep[1].num_batches_tracked) == 2 * 2  # 12 examples in batches of 8, 2 epochs
    assert not torch.allclose(together[0].prep[1].running_mean, together[1].prep[1].running_mean)


@pytest.fixture
def float64():
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


def test_channels_last_batch_norm_equals_batch_norm(float64):
    """The batched path's BatchNorm (channels-last, own column sums) is F.batch_norm in training mode: output,
    gradients of input, scale and shift, and the running statistics."""
    gen = torch.Generator().manual_seed(0)
    x = (3 + torch.randn(6, 5, 4, 4, generator=gen)).contiguous(memory_format=torch.channels_last)
    w, b, g = torch.rand(5, generator=gen) + 0.5, torch.randn(5, generator=gen), torch.randn(6, 5, 4, 4, generator=gen)
    outs = []
    for norm in (batch_norm_channels_last, F.batch_norm):
        inputs = [t.clone().requires_grad_() for t in (x, w, b)]
        running = [torch.zeros(5), torch.ones(5)]
        if norm is F.batch_norm:
            out = norm(inputs[0], *running, *inputs[1:], training=True, momentum=0.1, eps=1e-5)
        else:
            out = norm(inputs[0], *running, *inputs[1:], 0.1, 1e-5)
        out.backward(g)
        outs.append([out, *(t.grad for t in inputs), *running])
    for mine, reference in zip(*outs):
        assert torch.allclose(mine, reference, atol=1e-12, rtol=0)


def _mnist_slice(n: int, dtype: torch.dtype) -> Dataset:
    """The first n embedded MNIST training images as a training set (real digits: constant background, exact
    max-pool ties, small BatchNorm variances in some channels)."""
    full = load_dataset("mnist")
    x, y = full.x_train[:n].to(dtype), full.y_train[:n]
    return Dataset("mnist-slice", "image", x, y, x[:4], y[:4], torch.arange(n), torch.arange(4), ("digit",), "test")


def _max_difference(task, ds: Dataset, seeds: list[int], subsets: list[np.ndarray]) -> float:
    together = train_many(task, ds, seeds, subsets, device="cpu")
    return max(float((p - q).abs().max()) for seed, subset, model in zip(seeds, subsets, together)
               for p, q in zip(train(task, ds, seed, subset, device="cpu").state_dict().values(),
                               model.state_dict().values()) if p.is_floating_point())


def test_train_many_is_train_on_mnist_images_in_float64(float64):
    """On real MNIST images the batched ResNet-9 computes what `train` computes: in float64, 2 models x 4 SGD steps
    of 32 images agree to 1e-10 (parameters, running statistics)."""
    task = short("mnist-resnet9-cpu", epochs=2, batch_size=32)
    assert _max_difference(task, _mnist_slice(128, torch.float64), [0, 1], [np.arange(64), np.arange(64, 128)]) < 1e-10


def test_train_many_on_mnist_images_in_float32_is_within_rounding():
    """In float32, one SGD step of 64 real MNIST images: batched and looped models differ by under 1e-4 (measured
    4e-5). The bound is rounding, not a different computation: `train`'s own weight gradients of the first
    convolutions are only accurate to about 4e-5 against float64 on these images (the float64 test above agrees to
    1e-10). torch's channels-last BatchNorm kernel, which the batched path used before, gave 2e-3 here."""
    task = short("mnist-resnet9-cpu", epochs=1, batch_size=64)
    assert _max_difference(task, _mnist_slice(128, torch.float32), [0, 1], [np.arange(64), np.arange(64, 128)]) < 1e-4


def test_load_or_train_stores_then_loads(store):
    task, ds = short("digits-mlp", epochs=2), load_dataset("digits")
    first = load_or_train(task, [0, 1], store=store, dataset=ds)
    assert [m.loaded for m in first] == [False, False]
    second = load_or_train(task, [1, 0, 2], store=store, dataset=ds)
    assert [m.loaded for m in second] == [True, True, False]
    assert torch.equal(second[1].model.fc1.weight, first[0].model.fc1.weight)
    assert second[0].metrics == first[1].metrics and second[0].train_s == first[1].train_s
    half = load_or_train(task, [0], [np.arange(0, 1500, 2)], store=store, dataset=ds)
    assert not half[0].loaded and half[0].key != first[0].key


def test_fingerprint_belongs_to_the_dataset_object_not_its_id():
    """Python reuses the ids of collected objects: a fingerprint memoised by id would hand a new dataset an old key."""
    fingerprints = set()
    for value in range(6):
        x = torch.full((4, 1, 2, 2), float(value))
        ds = Dataset("tiny", "image", x, torch.zeros(4, dtype=torch.long), x, torch.zeros(4, dtype=torch.long),
                     torch.arange(4), torch.arange(4), ("a",), "test")
        fingerprints.add(dataset_fingerprint(ds))
        del ds
    assert len(fingerprints) == 6
