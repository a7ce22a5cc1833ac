"""Datasets of small images from wherever they are: downloaded, a batches folder, an archive,
or image folders.

:func:`load_dataset` finds a data set, decodes it once into uint8 arrays and caches them::

    data = load_dataset("cifar100")             # downloads on first use
    data = load_dataset(None, "my_images/")     # any train/<class>/ and test/<class>/ tree
    data = load_cifar10("cifar10-jpeg.tar.gz")  # CIFAR-10 as image folders, read in place
    train_x, train_y, val_x, val_y = split_train_val(data.train_images, data.train_labels)
    mean, std = channel_stats(train_x)          # per channel, 0-1 scale

What makes each data set what it is (its URL, archive layout, label key, class names, image
size) is its :class:`~cifar_inception.data.specs.DatasetSpec`, in :mod:`.specs`.

Sources (``data_dir``, else ``$CIFAR_INCEPTION_DATA``, else the user cache folder):

- a folder holding the spec's batches folder (``cifar-10-batches-py/``, ``cifar-100-python/``),
  or that folder itself;
- the spec's official archive (``cifar-10-python.tar.gz``), or a folder holding it (read in
  place);
- an image-folder tree ``train/<class>/*`` and ``test/<class>/*``, possibly under one top-level
  folder, as a folder, ``.zip``, ``.tar`` or ``.tar.gz`` (archives are read in place). With no
  dataset named, its classes are its folder names, sorted (CIFAR-10's ten keep CIFAR-10's
  order), and its images of any size are resized to the image size;
- an existing folder with none of these: the official archive is downloaded into it, its MD5
  checked, and it is extracted.

The official batches are Python pickles. They are read with an unpickler that knows only the
few NumPy names an array needs, so a crafted archive cannot run code.

Decoded arrays are cached in ``$CIFAR_INCEPTION_CACHE`` (default: the user cache folder), keyed
by the dataset spec and the source's checksum; checksums are remembered by path, size and
modification time, so a second load reads one file and hashes nothing.

The parts: :mod:`~cifar_inception.data.specs` describes the datasets;
:mod:`~cifar_inception.data.sources` finds, checksums and decodes a source, reading
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
    cache_dir,
    cache_file,
    read_cache,
    user_cache_dir,
    write_cache,
)
from cifar_inception.data.common import (
    APP_NAME,
    ENV_CACHE,
    ENV_DATA,
    MAX_BATCH_BYTES,
    MAX_IMAGE_BYTES,
    SPLITS,
)
from cifar_inception.data.download import (
    download_cifar10,
    download_dataset,
    extract_official_archive,
)
from cifar_inception.data.sources import (
    Decoded,
    Source,
    Wanted,
    decode_source,
    find_source,
    source_checksum,
)
from cifar_inception.data.specs import (
    IMAGE_FOLDER,
    SPECS,
    DatasetSpec,
    dataset_names,
    get_spec,
)
from cifar_inception.data.specs import CIFAR10 as CIFAR10_SPEC
from cifar_inception.errors import DataError

# CIFAR-10's names, as this package offered them before datasets had specs.
CLASSES = CIFAR10_SPEC.classes
CIFAR10_URL = CIFAR10_SPEC.url
CIFAR10_MD5 = CIFAR10_SPEC.md5
ARCHIVE_NAME = CIFAR10_SPEC.archive_name
BATCHES_DIR = CIFAR10_SPEC.batches_dir
TRAIN_BATCHES = CIFAR10_SPEC.train_batches
TEST_BATCH = CIFAR10_SPEC.test_batches[0]
META_FILE = CIFAR10_SPEC.meta_file
BATCH_FILES = CIFAR10_SPEC.batch_files
ENV_URL = CIFAR10_SPEC.url_env
IMAGE_SIZE = CIFAR10_SPEC.image_size

__all__ = [
    "APP_NAME", "ARCHIVE_NAME", "BATCHES_DIR", "BATCH_FILES", "CIFAR10", "CIFAR10_MD5",
    "CIFAR10_SPEC", "CIFAR10_URL", "CLASSES", "ENV_CACHE", "ENV_DATA", "ENV_URL", "IMAGE_SIZE",
    "MAX_BATCH_BYTES", "MAX_IMAGE_BYTES", "META_FILE", "SPECS", "SPLITS", "TEST_BATCH",
    "TRAIN_BATCHES", "Dataset", "DatasetSpec", "cache_dir", "channel_stats", "dataset_names",
    "download_cifar10", "download_dataset", "extract_official_archive", "get_spec",
    "load_cifar10", "load_dataset", "one_hot", "trained_dataset", "read_capped", "resolve_data_dir",
    "split_train_val",
]


@dataclass(repr=False)
class Dataset:
    """A decoded data set: uint8 images (N, S, S, 3), int64 labels, class names, and the
    name of its spec (what a run records, so evaluation loads the same data set)."""

    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    classes: tuple[str, ...]
    source: str
    checksum: str
    cache_file: Path | None = None  # where the decoded arrays are cached, if they could be
    from_cache: bool = False        # True when this load read the cache instead of decoding
    name: str = CIFAR10_SPEC.name

    @property
    def image_size(self) -> int:
        return int(self.train_images.shape[1])

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(name={self.name!r}, classes={len(self.classes)}, "
                f"train={len(self.train_labels)}, test={len(self.test_labels)}, "
                f"source={self.source!r}, checksum={self.checksum!r})")


CIFAR10 = Dataset  # the name of the decoded data set before there were others


def load_dataset(spec_or_name: DatasetSpec | str | None = None,
                 data_dir: str | os.PathLike | None = None, *, image_size: int | None = None,
                 download: bool = True, progress: bool = True) -> Dataset:
    """Find a data set in ``data_dir`` (see the module docstring), decode it once, cache it.

    ``spec_or_name``: a spec or a name of :data:`SPECS` (``cifar10``, ``cifar100``,
    ``cifar100-coarse``, ``image-folder``). None: CIFAR-10, unless ``data_dir`` holds an
    image-folder tree, whose folders are then the classes. ``image_size``: resize every image
    to it (default: the spec's, 32).

    Raises :class:`DataError` with a one-line message for anything wrong with the source.
    """
    wanted = _wanted(spec_or_name, image_size)
    root, explicit = resolve_data_dir(data_dir)
    try:
        source = find_source(root, explicit, wanted)
    except PermissionError as exc:  # e.g. a folder without read or search permission
        raise DataError(f"cannot read {exc.filename or root}: permission denied") from None
    if source is None:
        spec = wanted.batches
        if spec is None or not download:
            looked_for = (f"{spec.batches_dir}/, {spec.archive_name}, and " if spec else "")
            raise DataError(
                f"no {wanted.title} found in {root} (looked for {looked_for}train/ and test/ "
                "class folders) and downloading is off; pass --data-dir PATH")
        archive = download_dataset(spec, root, progress=progress)
        source = Source("batches", extract_official_archive(archive, root, spec))
    return _load_source(source, wanted, progress=progress)


def trained_dataset(ckpt: dict) -> str:
    """The name of the dataset a checkpoint was trained on (one without a name: CIFAR-10)."""
    name = ckpt.get("data", {}).get("dataset") or CIFAR10_SPEC.name
    if not isinstance(name, str):
        raise DataError(f"the checkpoint names its dataset {name!r:.80}, not a dataset name")
    get_spec(name)  # an unknown name fails here, naming the choices
    return name


def load_cifar10(data_dir: str | os.PathLike | None = None, *, download: bool = True,
                 progress: bool = True) -> Dataset:
    """Find CIFAR-10 in ``data_dir`` (see the module docstring), decode it once, and cache it.

    Raises :class:`DataError` with a one-line message for anything wrong with the source.
    """
    return load_dataset(CIFAR10_SPEC, data_dir, download=download, progress=progress)


def _wanted(spec_or_name: DatasetSpec | str | None, image_size: int | None) -> Wanted:
    """What a source may hold for this request: with no dataset named, CIFAR-10's batches or
    any image-folder tree; else the named spec's batches (if it has any) or its tree."""
    if spec_or_name is None:
        return Wanted(CIFAR10_SPEC.at_size(image_size), IMAGE_FOLDER.at_size(image_size))
    spec = get_spec(spec_or_name).at_size(image_size)
    return Wanted(spec if spec.has_batches else None, spec)


def resolve_data_dir(data_dir: str | os.PathLike | None = None) -> tuple[Path, bool]:
    """The data folder or file to use, and whether the user named it (argument or environment)."""
    if data_dir is not None and str(data_dir) != "":
        return Path(data_dir).expanduser(), True
    if os.environ.get(ENV_DATA):
        return Path(os.environ[ENV_DATA]).expanduser(), True
    return user_cache_dir(), False


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


def _load_source(source: Source, wanted: Wanted, *, progress: bool) -> Dataset:
    checksum = source_checksum(source, wanted)
    image_size = wanted.tree.image_size
    path = cache_file(checksum, wanted.cache_key())
    cached = read_cache(path, checksum, image_size)
    if cached is not None:
        decoded = Decoded(*cached)
    else:
        decoded = decode_source(source, wanted, progress=progress)
        if not write_cache(path, decoded.arrays, decoded.layout, checksum, decoded.classes):
            path = None
    arrays = decoded.arrays
    return Dataset(
        train_images=arrays["train_images"], train_labels=arrays["train_labels"],
        test_images=arrays["test_images"], test_labels=arrays["test_labels"],
        classes=decoded.classes, source=_describe(source, decoded.layout, wanted),
        checksum=checksum, cache_file=path, from_cache=cached is not None,
        name=_dataset_name(wanted, decoded))


def _dataset_name(wanted: Wanted, decoded: Decoded) -> str:
    """The spec the data turned out to be: a tree of CIFAR-10's ten folders is CIFAR-10."""
    if decoded.layout == "batches":
        return wanted.batches.name
    if not wanted.tree.classes and decoded.classes == CIFAR10_SPEC.classes:
        return CIFAR10_SPEC.name
    return wanted.tree.name


def _describe(source: Source, layout: str, wanted: Wanted) -> str:
    what = f"{wanted.batches.title} python batches" if layout == "batches" else "image folders"
    if source.kind == "archive":
        return f"{source.path} (archive of {what})"
    return f"{source.path} (folder of {what})"
