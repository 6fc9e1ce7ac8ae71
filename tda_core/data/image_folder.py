"""Image folders in the usual class-per-subfolder layout: ``root/<class>/<image>``, or already split as
``root/train/<class>/<image>`` and ``root/test/<class>/<image>``.

Class names are the subfolder names (sorted). The size (the most common longer side) and the channels
(1 when every image is greyscale, else 3) are read from the image headers unless given; every image is
resized to a size x size square. Each header is checked against a pixel limit before the image is decoded, and
files that cannot be read (corrupt, not an image, over the limit) are skipped and counted in one warning.
Without train/ and test/ subfolders a `test_fraction` of every class is held out, drawn from `seed`.
An example's source index is its file's position in `ImageFolderListing.files` (sorted relative paths).
"""
from __future__ import annotations

import collections
import dataclasses
import io
import logging
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..errors import UserError
from .base import Dataset

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
MAX_PIXELS = 1 << 24  # 16.8 megapixels per image: larger headers are skipped before decoding
SPLIT_FOLDERS = ("train", "test")
GREY_MODES = ("1", "L", "LA", "I", "I;16", "F")
log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class ImageFolderListing:
    """The image files under a folder: relative paths (sorted; source index = position), labels, splits."""

    root: Path
    classes: tuple[str, ...]
    files: tuple[str, ...]
    labels: np.ndarray  # int64 class per file
    splits: tuple[str, ...] | None  # 'train' / 'test' per file when the folder is split into train/ and test/


def _class_dirs(folder: Path) -> list[str]:
    return sorted(d.name for d in folder.iterdir() if d.is_dir() and not d.name.startswith("."))


def _images_under(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
                  and not p.name.startswith("."))


def list_image_folder(path: str | Path) -> ImageFolderListing:
    """Classes and image files of a class-per-subfolder folder; a folder in another layout raises UserError."""
    root = Path(path).expanduser().resolve()
    if not root.is_dir():
        raise UserError(f"image folder {root} does not exist or is not a folder")
    top = _class_dirs(root)
    split = set(SPLIT_FOLDERS) <= set(top)
    parts = [(s, root / s) for s in SPLIT_FOLDERS] if split else [(None, root)]
    classes = sorted({c for _, folder in parts for c in _class_dirs(folder)})
    if len(classes) < 2:
        raise UserError(f"{root} needs one subfolder per class (at least two), e.g. {root}/cat/1.png and "
                        f"{root}/dog/2.png (or train/ and test/ folders laid out so); found subfolders: "
                        f"{', '.join(top) or 'none'}")
    files, labels, splits = [], [], []
    for split_name, folder in parts:
        for label, name in enumerate(classes):
            for p in _images_under(folder / name) if (folder / name).is_dir() else []:
                files.append(str(p.relative_to(root)))
                labels.append(label)
                splits.append(split_name)
    if not files:
        raise UserError(f"no image files ({', '.join(IMAGE_SUFFIXES)}) in the class folders of {root}")
    order = np.argsort(files, kind="stable")
    return ImageFolderListing(root, tuple(classes), tuple(files[i] for i in order),
                              np.asarray(labels, dtype=np.int64)[order],
                              tuple(splits[i] for i in order) if split else None)


def _open(path: Path) -> Image.Image:
    """The image file opened from its bytes in memory: reading from a file, PIL allocates the length a chunk
    claims (a damaged PNG length byte made it 117 MB for a 70-byte file); from memory, at most the file's size."""
    return Image.open(io.BytesIO(path.read_bytes()))


def _header(path: Path, max_pixels: int) -> tuple[tuple[int, int], str] | str:
    """((width, height), mode) read from the header without decoding, or why the file cannot be used."""
    try:
        with _open(path) as im:
            w, h = im.size
            mode = im.mode
    except Exception as exc:  # noqa: BLE001 - untrusted files: any failure means "skip it"
        return f"{type(exc).__name__}: {exc}"
    if w * h > max_pixels:
        return f"{w}x{h} pixels is over the limit of {max_pixels}"
    return (w, h), mode


def folder_format(listing: ImageFolderListing, max_pixels: int = MAX_PIXELS) -> tuple[int, int]:
    """(size, channels) read from the image headers: the most common longer side, and 1 channel when every
    image is greyscale, else 3."""
    headers = [h for h in (_header(listing.root / rel, max_pixels) for rel in listing.files) if not isinstance(h, str)]
    if not headers:
        raise UserError(f"none of the {len(listing.files)} image files under {listing.root} can be read")
    sizes = collections.Counter(max(wh) for wh, _ in headers)
    channels = 1 if all(mode in GREY_MODES for _, mode in headers) else 3
    return sizes.most_common(1)[0][0], channels


def _decode(path: Path, size: int, channels: int, max_pixels: int) -> np.ndarray | str:
    """The image as uint8 (channels, size, size), or why it could not be read."""
    header = _header(path, max_pixels)
    if isinstance(header, str):
        return header
    try:
        with _open(path) as im:
            im = im.convert("L" if channels == 1 else "RGB")
            if im.size != (size, size):
                im = im.resize((size, size), Image.Resampling.BILINEAR)
            array = np.asarray(im, dtype=np.uint8)
    except Exception as exc:  # noqa: BLE001 - untrusted files: any failure means "skip it"
        return f"{type(exc).__name__}: {exc}"
    return array[None] if channels == 1 else array.transpose(2, 0, 1)


def _held_out(labels: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Boolean test mask: `fraction` of every class (at least one where a class has two or more), from `seed`."""
    test = np.zeros(len(labels), dtype=bool)
    rng = np.random.default_rng(seed)
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        n = int(round(fraction * len(members)))
        n = min(max(n, 1 if len(members) > 1 else 0), len(members) - 1)
        test[rng.permutation(members)[:n]] = True
    return test


def load_image_folder(name: str, path: str | Path, size: int, channels: int, *, test_fraction: float = 0.2,
                      seed: int = 0, max_pixels: int = MAX_PIXELS) -> Dataset:
    """Decode a folder into a `Dataset` (float images in [0, 1], labels, source indices = file positions)."""
    if channels not in (1, 3):
        raise UserError(f"channels must be 1 or 3, got {channels}")
    if not 0.0 < test_fraction < 1.0:
        raise UserError(f"test fraction must be in (0, 1), got {test_fraction}")
    listing = list_image_folder(path)
    images, keep, skipped = [], [], []
    for i, rel in enumerate(listing.files):
        decoded = _decode(listing.root / rel, size, channels, max_pixels)
        if isinstance(decoded, str):
            skipped.append(f"{rel} ({decoded})")
        else:
            images.append(decoded)
            keep.append(i)
    if skipped:
        log.warning("%s: skipped %d of %d image files that could not be read (first: %s)",
                    name, len(skipped), len(listing.files), skipped[0])
    if not images:
        raise UserError(f"none of the {len(listing.files)} image files under {listing.root} can be read")
    keep_idx = np.asarray(keep, dtype=np.int64)
    labels = listing.labels[keep_idx]
    if listing.splits is not None:
        test = np.asarray([listing.splits[i] == "test" for i in keep], dtype=bool)
    else:
        test = _held_out(labels, test_fraction, seed)
    if test.all() or not test.any():
        raise UserError(f"{listing.root}: the readable images leave an empty train or test split; add images")
    x = torch.from_numpy(np.stack(images)).float() / 255.0
    y = torch.from_numpy(labels)
    index = torch.from_numpy(keep_idx)
    tr, te = torch.from_numpy(~test), torch.from_numpy(test)
    source = (f"image folder {listing.root}: {len(images)} images of {size}x{size}x{channels}, classes "
              f"{', '.join(listing.classes)}" + (f"; {len(skipped)} unreadable file(s) skipped" if skipped else ""))
    return Dataset(name, "image", x[tr], y[tr], x[te], y[te], index[tr], index[te], listing.classes, source)
