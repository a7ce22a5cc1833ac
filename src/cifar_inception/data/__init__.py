"""CIFAR-10 from wherever it is: downloaded, a batches folder, an archive, or image folders.

:func:`load_cifar10` finds the data set, decodes it once into uint8 arrays and caches them::

    data = load_cifar10()                       # downloads on first use
    data = load_cifar10("cifar10-jpeg.tar.gz")  # an image-folder tree, read in place
    train_x, train_y, val_x, val_y = split_train_val(data.train_images, data.train_labels)
    mean, std = channel_stats(train_x)          # per channel, 0-1 scale

Sources (``data_dir``, else ``$CIFAR_INCEPTION_DATA``, else the user cache folder):

- a folder holding ``cifar-10-batches-py/`` (or that folder itself);
- ``cifar-10-python.tar.gz``, or a folder holding it (read in place);
- an image-folder tree ``train/<class>/*`` and ``test/<class>/*``, possibly under one top-level
  folder, as a folder, ``.zip``, ``.tar`` or ``.tar.gz`` (archives are read in place);
- an existing folder with none of these: the official archive is downloaded into it, its MD5
  checked, and it is extracted to ``cifar-10-batches-py/``.

The official batches are Python pickles. They are read with an unpickler that knows only the
few NumPy names an array needs, so a crafted archive cannot run code.

Decoded arrays are cached in ``$CIFAR_INCEPTION_CACHE`` (default: the user cache folder), keyed
by the source's checksum; checksums are remembered by path, size and modification time, so a
second load reads one file and hashes nothing.

The parts: :mod:`~cifar_inception.data.sources` finds, checksums and decodes a source, reading
archives through :mod:`~cifar_inception.data.archives`, batches through
:mod:`~cifar_inception.data.batches` and image trees through :mod:`~cifar_inception.data.trees`;
:mod:`~cifar_inception.data.cache` keeps the decoded arrays and
:mod:`~cifar_inception.data.download` fetches and extracts the official archive.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cifar_inception.data.archives import read_capped
from cifar_inception.data.cache import (
    _cache_file,
    _read_cache,
    _user_cache_dir,
    _write_cache,
    cache_dir,
)
from cifar_inception.data.common import (
    APP_NAME,
    ARCHIVE_NAME,
    BATCH_FILES,
    BATCHES_DIR,
    CIFAR10_MD5,
    CIFAR10_URL,
    CLASSES,
    ENV_CACHE,
    ENV_DATA,
    ENV_URL,
    IMAGE_SIZE,
    MAX_BATCH_BYTES,
    MAX_IMAGE_BYTES,
    META_FILE,
    SPLITS,
    TEST_BATCH,
    TRAIN_BATCHES,
)
from cifar_inception.data.download import download_cifar10, extract_official_archive
from cifar_inception.data.sources import _decode_source, _find_source, _Source, _source_checksum
from cifar_inception.errors import DataError

__all__ = [
    "APP_NAME", "ARCHIVE_NAME", "BATCHES_DIR", "BATCH_FILES", "CIFAR10", "CIFAR10_MD5",
    "CIFAR10_URL", "CLASSES", "ENV_CACHE", "ENV_DATA", "ENV_URL", "IMAGE_SIZE",
    "MAX_BATCH_BYTES", "MAX_IMAGE_BYTES", "META_FILE", "SPLITS", "TEST_BATCH", "TRAIN_BATCHES",
    "cache_dir", "channel_stats", "download_cifar10", "extract_official_archive", "load_cifar10",
    "one_hot", "read_capped", "resolve_data_dir", "split_train_val",
]


@dataclass(repr=False)
class CIFAR10:
    """The decoded data set: uint8 images (N, 32, 32, 3), int64 labels, class names."""

    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    classes: tuple[str, ...]
    source: str
    checksum: str
    cache_file: Path | None = None  # where the decoded arrays are cached, if they could be
    from_cache: bool = False        # True when this load read the cache instead of decoding

    def __repr__(self) -> str:
        return (f"CIFAR10(train={len(self.train_labels)}, test={len(self.test_labels)}, "
                f"source={self.source!r}, checksum={self.checksum!r})")


def load_cifar10(data_dir: str | os.PathLike | None = None, *, download: bool = True,
                 progress: bool = True) -> CIFAR10:
    """Find CIFAR-10 in ``data_dir`` (see the module docstring), decode it once, and cache it.

    Raises :class:`DataError` with a one-line message for anything wrong with the source.
    """
    root, explicit = resolve_data_dir(data_dir)
    try:
        source = _find_source(root, explicit)
    except PermissionError as exc:  # e.g. a folder without read or search permission
        raise DataError(f"cannot read {exc.filename or root}: permission denied") from None
    if source is None:
        if not download:
            raise DataError(
                f"no CIFAR-10 found in {root} (looked for {BATCHES_DIR}/, {ARCHIVE_NAME}, and "
                "train/ and test/ class folders) and downloading is off; pass --data-dir PATH")
        archive = download_cifar10(root, progress=progress)
        source = _Source("batches", extract_official_archive(archive, root))
    return _load_source(source, progress=progress)


def resolve_data_dir(data_dir: str | os.PathLike | None = None) -> tuple[Path, bool]:
    """The data folder or file to use, and whether the user named it (argument or environment)."""
    if data_dir is not None and str(data_dir) != "":
        return Path(data_dir).expanduser(), True
    if os.environ.get(ENV_DATA):
        return Path(os.environ[ENV_DATA]).expanduser(), True
    return _user_cache_dir(), False


def split_train_val(images: np.ndarray, labels: np.ndarray, val_size: int = 5000,
                    seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Hold out ``val_size`` images, stratified by class and seeded; the rest keep their order.

    Each class gives the share of ``val_size`` it has of the data (largest remainders round up),
    so 5,000 of CIFAR-10's 50,000 training images are 500 per class.
    """
    labels = np.asarray(labels)
    if len(images) != len(labels):
        raise DataError(f"{len(images)} images but {len(labels)} labels")
    if isinstance(val_size, bool) or not isinstance(val_size, (int, np.integer)) or val_size < 0:
        raise DataError(f"the validation size must be a whole number >= 0, not {val_size!r}")
    if val_size == 0:
        return images, labels, images[:0], labels[:0]
    if val_size >= len(labels):
        raise DataError(f"a validation split of {val_size:,} leaves no training images "
                        f"(there are {len(labels):,})")
    classes, counts = np.unique(labels, return_counts=True)
    rng = np.random.default_rng(seed)
    held_out = np.zeros(len(labels), dtype=bool)
    for cls, quota in zip(classes, _stratified_quotas(counts, int(val_size)), strict=True):
        members = np.flatnonzero(labels == cls)
        held_out[rng.choice(members, size=quota, replace=False)] = True
    return images[~held_out], labels[~held_out], images[held_out], labels[held_out]


def _stratified_quotas(counts: np.ndarray, total: int) -> list[int]:
    """Split ``total`` over classes in proportion to ``counts``; largest remainders round up."""
    ideal = counts * total / counts.sum()
    quotas = np.floor(ideal).astype(int)
    remainders = ideal - quotas
    for index in np.argsort(-remainders, kind="stable")[: total - quotas.sum()]:
        quotas[index] += 1
    return quotas.tolist()


def channel_stats(images: np.ndarray,
                  chunk: int = 4096) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and (population) std of uint8 (N, H, W, 3) images, on the 0-1 scale.

    Computed exactly from per-channel histograms, a chunk at a time, so no float copy of the
    data is ever made. On CIFAR-10's training set the std is about (0.247, 0.243, 0.261); the
    widely copied (0.2023, 0.1994, 0.2010) is not the per-pixel std.
    """
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise DataError(f"expected uint8 images of shape (N, H, W, 3), got {images.dtype} "
                        f"{images.shape}")
    if len(images) == 0:
        raise DataError("cannot compute mean and std of no images")
    histograms = np.zeros((3, 256), dtype=np.int64)
    for start in range(0, len(images), chunk):
        block = images[start:start + chunk]
        for channel in range(3):
            histograms[channel] += np.bincount(block[..., channel].ravel(), minlength=256)
    levels = np.arange(256, dtype=np.float64)
    count = histograms.sum(axis=1)
    mean = histograms @ levels / count
    var = (histograms * (levels[None, :] - mean[:, None]) ** 2).sum(axis=1) / count
    std = np.sqrt(var)
    return tuple(float(v) for v in mean / 255.0), tuple(float(v) for v in std / 255.0)


def one_hot(labels: np.ndarray, num_classes: int = 10) -> np.ndarray:
    """Class indices (N,) -> float32 one-hot rows (N, num_classes)."""
    labels = np.asarray(labels)
    if labels.ndim != 1 or (labels.size and labels.dtype.kind not in "iu"):
        raise DataError(f"labels must be a 1-D array of class indices, got {labels.dtype} "
                        f"{labels.shape}")
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise DataError(f"labels must lie in [0, {num_classes}), found {labels.min()} to "
                        f"{labels.max()}")
    encoded = np.zeros((len(labels), num_classes), dtype=np.float32)
    encoded[np.arange(len(labels)), labels] = 1.0
    return encoded


# ---------------------------------------------------------------------------------------------
# Loading through the cache


def _load_source(source: _Source, *, progress: bool) -> CIFAR10:
    checksum = _source_checksum(source)
    cache_file = _cache_file(checksum)
    cached = _read_cache(cache_file, checksum)
    if cached is not None:
        arrays, layout = cached
        from_cache = True
    else:
        arrays, layout = _decode_source(source, progress=progress)
        if not _write_cache(cache_file, arrays, layout, checksum):
            cache_file = None
        from_cache = False
    return CIFAR10(
        train_images=arrays["train_images"], train_labels=arrays["train_labels"],
        test_images=arrays["test_images"], test_labels=arrays["test_labels"],
        classes=CLASSES, source=_describe(source, layout), checksum=checksum,
        cache_file=cache_file, from_cache=from_cache)


def _describe(source: _Source, layout: str) -> str:
    what = "CIFAR-10 python batches" if layout == "batches" else "image folders"
    if source.kind == "archive":
        return f"{source.path} (archive of {what})"
    return f"{source.path} (folder of {what})"

