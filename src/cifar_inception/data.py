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
"""

from __future__ import annotations

import bz2
import contextlib
import difflib
import functools
import gzip
import hashlib
import io
import json
import logging
import lzma
import os
import pickle
import re
import shutil
import stat
import sys
import tarfile
import tempfile
import warnings
import zipfile
import zlib
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cifar_inception.errors import DataError
from cifar_inception.fileio import atomic_open, atomic_write_json
from cifar_inception.images import IMAGE_SUFFIXES, ImageError, open_image, to_rgb

CLASSES = ("airplane", "automobile", "bird", "cat", "deer",
           "dog", "frog", "horse", "ship", "truck")

CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_MD5 = "c58f30108f718f92721af3b95e74349a"
ARCHIVE_NAME = "cifar-10-python.tar.gz"
BATCHES_DIR = "cifar-10-batches-py"
TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_BATCH = "test_batch"
META_FILE = "batches.meta"
BATCH_FILES = (*TRAIN_BATCHES, TEST_BATCH, META_FILE)

ENV_DATA = "CIFAR_INCEPTION_DATA"
ENV_CACHE = "CIFAR_INCEPTION_CACHE"
ENV_URL = "CIFAR_INCEPTION_URL"  # a mirror of the official archive (its MD5 is still checked)

APP_NAME = "cifar-inception"
SPLITS = ("train", "test")
IMAGE_SIZE = 32

# Bounds on what a source may make us read into memory. An official batch is 31 MB; a 32x32
# image file is a few kilobytes even with generous metadata.
MAX_BATCH_BYTES = 256 << 20
MAX_IMAGE_BYTES = 4 << 20

_CACHE_VERSION = 1
_DECODE_CHUNK = 2000  # images per task for the decoding processes
_MAX_PROBLEMS = 6     # problems named in one error message

_ARCHIVE_SUFFIXES = {".zip": "zip", ".tar": "tar", ".tgz": "tar", ".tar.gz": "tar",
                     ".tar.bz2": "tar", ".tar.xz": "tar"}
# What a truncated or corrupt tar, gzip or zip stream raises while it is read.
_STREAM_ERRORS = (tarfile.TarError, zipfile.BadZipFile, EOFError, zlib.error, OSError,
                  RuntimeError, NotImplementedError, ValueError)


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


# ---------------------------------------------------------------------------------------------
# Public API


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


def cache_dir() -> Path:
    """Where decoded arrays and remembered checksums go: ``$CIFAR_INCEPTION_CACHE``, else the
    user cache folder."""
    if os.environ.get(ENV_CACHE):
        return Path(os.environ[ENV_CACHE]).expanduser()
    return _user_cache_dir()


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


def download_cifar10(folder: str | os.PathLike, *, url: str | None = None,
                     md5: str | None = None, progress: bool = True) -> Path:
    """Download the official archive into ``folder`` and return its path.

    The file arrives under a temporary name and is renamed only once its MD5 matches; a
    mismatching or broken download is removed. ``url`` defaults to ``$CIFAR_INCEPTION_URL``,
    else the data set's home page.
    """
    import pooch
    import requests

    folder = Path(folder)
    url = url or os.environ.get(ENV_URL) or CIFAR10_URL
    md5 = md5 or CIFAR10_MD5
    if not url.lower().startswith(("http://", "https://")):
        raise DataError(f"the download address must start with http:// or https://: {url}")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DataError(f"cannot create the data folder {folder}: {exc.strerror or exc}") from None
    advice = (f"without internet, fetch {ARCHIVE_NAME} (or an image-folder copy) elsewhere and "
              "pass --data-dir PATH")
    bar = _DownloadBar(desc=f"downloading {ARCHIVE_NAME}") if progress else None
    logger = pooch.get_logger()
    level = logger.level
    logger.setLevel(logging.WARNING)  # our own bar says what happens
    try:
        path = pooch.retrieve(url, known_hash=f"md5:{md5}", fname=ARCHIVE_NAME, path=folder,
                              progressbar=bar if bar is not None else False)
    except ValueError as exc:
        if "does not match" in str(exc):
            got = re.search(r"got ([0-9a-f]{32})", str(exc))
            raise DataError(
                f"the file downloaded from {url} failed the MD5 check (expected {md5}"
                f"{', got ' + got.group(1) if got else ''}) and was removed; try again, or "
                f"{advice}") from None
        raise DataError(f"cannot download {url}: {_one_line(exc)}") from None
    except requests.exceptions.HTTPError as exc:
        raise DataError(f"cannot download {url}: the server answered "
                        f"{exc.response.status_code if exc.response is not None else exc}; "
                        f"{advice}") from None
    except requests.exceptions.ChunkedEncodingError:
        raise DataError(f"the download from {url} was cut short (truncated) and was removed; "
                        f"try again, or {advice}") from None
    except (requests.exceptions.ConnectionError, requests.exceptions.Timeout) as exc:
        raise DataError(f"cannot download CIFAR-10 from {url}: network unreachable "
                        f"({_root_cause(exc)}); {advice}") from None
    except requests.exceptions.RequestException as exc:
        raise DataError(f"cannot download {url}: {_one_line(exc)}; {advice}") from None
    except OSError as exc:  # after requests' errors, which are OSErrors too: saving failed
        raise DataError(f"cannot save the download in {folder}: {exc.strerror or exc}") from None
    finally:
        logger.setLevel(level)
        if bar is not None:
            bar.close()
    return Path(path)


def extract_official_archive(archive: str | os.PathLike, folder: str | os.PathLike) -> Path:
    """Extract ``cifar-10-batches-py/`` from the official archive into ``folder``, safely.

    Every member is checked before it is written: absolute names, ``..``, links and devices
    are refused. Extraction goes to a temporary folder that is renamed into place at the end.
    """
    archive, folder = Path(archive), Path(folder)
    target = folder / BATCHES_DIR
    label = str(archive)
    try:
        scratch = Path(tempfile.mkdtemp(prefix=".cifar-10-extract-", dir=folder))
    except OSError as exc:
        raise DataError(f"cannot extract {label} into {folder}: {exc.strerror or exc}") from None
    try:
        try:
            with _open_tar(archive) as (stream, tar):
                for member in tar:
                    parts = _member_parts(member.name, label)
                    _refuse_special_member(member, label)
                    if not parts or parts[0] != BATCHES_DIR:
                        continue  # not part of the data set: left out
                    if member.isreg() and member.size > MAX_BATCH_BYTES:
                        raise DataError(f"{label}: {member.name} is {member.size:,} bytes, too "
                                        "large for a CIFAR-10 batch")
                    _extract_member(tar, member, scratch)
                _check_tar_end(stream, tar, label)
        except DataError:
            raise
        except _STREAM_ERRORS as exc:
            raise _archive_error(label, exc) from None
        _check_batches_folder(scratch / BATCHES_DIR, label)
        try:
            (scratch / BATCHES_DIR).rename(target)
        except OSError as exc:
            if not _has_all_batches(target):  # else another process got there first
                raise DataError(f"cannot create {target}: {exc.strerror or exc}") from None
    finally:
        shutil.rmtree(scratch, ignore_errors=True)  # our own scratch folder only
    return target


# ---------------------------------------------------------------------------------------------
# Finding the source


@dataclass(frozen=True)
class _Source:
    kind: str   # "batches" (a cifar-10-batches-py folder), "archive" (a file), "images" (a folder)
    path: Path


def _find_source(root: Path, explicit: bool) -> _Source | None:
    """What ``root`` holds, or None when it is a folder with nothing yet (download there)."""
    if root.is_file():
        if _archive_type(root) is None:
            raise DataError(f"{root} is neither a folder nor a .zip, .tar or .tar.gz archive")
        return _Source("archive", root)
    if not root.exists():
        if explicit:
            raise DataError(f"{root} does not exist (point --data-dir or ${ENV_DATA} at a "
                            "CIFAR-10 copy, or at an existing folder to download it into)")
        return None
    if not root.is_dir():
        raise DataError(f"{root} is neither a folder nor a file")
    for folder in (root / BATCHES_DIR, root):
        if any((folder / name).exists() for name in BATCH_FILES):
            _check_batches_folder(folder, str(folder))
            return _Source("batches", folder)
    if (root / ARCHIVE_NAME).is_file():
        return _Source("archive", root / ARCHIVE_NAME)
    tree = _find_tree_root(root)
    return _Source("images", tree) if tree is not None else None


def _find_tree_root(root: Path) -> Path | None:
    """``root`` or its one subfolder that holds train/ and test/; None when there is none."""
    present = [split for split in SPLITS if (root / split).is_dir()]
    if len(present) == 2:
        return root
    if present:
        missing = next(split for split in SPLITS if split not in present)
        raise DataError(f"{root} has {present[0]}/ but no {missing}/ folder beside it")
    nested = sorted(folder for folder in _subfolders(root)
                    if all((folder / split).is_dir() for split in SPLITS))
    if len(nested) > 1:
        names = ", ".join(folder.name for folder in nested)
        raise DataError(f"{root} holds several image-folder trees ({names}); point --data-dir "
                        "at one of them")
    return nested[0] if nested else None


def _subfolders(folder: Path) -> Iterator[Path]:
    try:
        entries = list(os.scandir(folder))
    except OSError as exc:
        raise DataError(f"cannot read the folder {folder}: {exc.strerror or exc}") from None
    for entry in entries:
        if not entry.name.startswith(".") and entry.is_dir():
            yield Path(entry.path)


def _archive_type(path: Path) -> str | None:
    name = path.name.lower()
    for suffix, kind in _ARCHIVE_SUFFIXES.items():
        if name.endswith(suffix):
            return kind
    return None


def _has_all_batches(folder: Path) -> bool:
    return all((folder / name).is_file() for name in BATCH_FILES)


def _check_batches_folder(folder: Path, label: str) -> None:
    missing = [name for name in BATCH_FILES if not (folder / name).is_file()]
    if missing:
        raise DataError(f"{label}: incomplete CIFAR-10 batches folder, missing "
                        f"{', '.join(missing)}")


# ---------------------------------------------------------------------------------------------
# Loading through the cache


def _load_source(source: _Source, *, progress: bool) -> CIFAR10:
    checksum = _source_checksum(source)
    cache_file = cache_dir() / "arrays" / f"v{_CACHE_VERSION}-{checksum.replace(':', '-')}.npz"
    cached = _read_cache(cache_file)
    if cached is not None:
        arrays, layout = cached
        from_cache = True
    else:
        arrays, layout = _decode_source(source, progress=progress)
        if not _write_cache(cache_file, arrays, layout):
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


def _decode_source(source: _Source, *, progress: bool) -> tuple[dict[str, np.ndarray], str]:
    label = str(source.path)
    if source.kind == "batches":
        blobs = {name: _read_file(source.path / name, f"{label}: {name}", MAX_BATCH_BYTES)
                 for name in BATCH_FILES}
        return _parse_batches(blobs, label), "batches"
    if source.kind == "images":
        files = ((tuple(rel.split("/")), size,
                  functools.partial(_read_file, path, f"{label}: {rel}"))
                 for rel, path, size, _ in _folder_tree_listing(source.path))
        return _read_entries(files, label, progress=progress)
    return _read_entries(_archive_files(source.path), label, progress=progress)


def _read_cache(path: Path) -> tuple[dict[str, np.ndarray], str] | None:
    """The cached arrays, or None when absent or unreadable (it is then rebuilt and replaced)."""
    try:
        if not path.is_file():  # raises when the cache folder may not be searched
            return None
    except OSError:
        return None
    try:
        with np.load(path, allow_pickle=False) as stored:
            arrays = {key: stored[key] for key in
                      ("train_images", "train_labels", "test_images", "test_labels")}
            layout = str(stored["layout"])
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
        return None
    for split in SPLITS:
        images, labels = arrays[f"{split}_images"], arrays[f"{split}_labels"]
        if (images.dtype != np.uint8 or images.shape[1:] != (IMAGE_SIZE, IMAGE_SIZE, 3)
                or labels.dtype != np.int64 or labels.shape != (len(images),)):
            return None
    return arrays, layout


def _write_cache(path: Path, arrays: dict[str, np.ndarray], layout: str) -> bool:
    try:
        with atomic_open(path, "wb") as handle:
            np.savez(handle, layout=np.array(layout), **arrays)
    except OSError as exc:
        warnings.warn(f"could not cache the decoded arrays in {path}: {exc.strerror or exc}",
                      stacklevel=3)
        return False
    return True


# ---------------------------------------------------------------------------------------------
# Checksums, remembered by path, size and modification time


def _source_checksum(source: _Source) -> str:
    if source.kind == "archive":
        stats = [("", source.path, _stat(source.path))]
    elif source.kind == "batches":
        stats = [(name, source.path / name, _stat(source.path / name)) for name in BATCH_FILES]
    else:
        stats = [(rel, path, st) for rel, path, _, st in _folder_tree_listing(source.path)]
    fingerprint = hashlib.sha256(json.dumps(
        [(rel, st.st_size, st.st_mtime_ns) for rel, _, st in stats]).encode()).hexdigest()
    memo_path = cache_dir() / "checksums.json"
    memo = _read_memo(memo_path)
    key = str(source.path.resolve())
    entry = memo.get(key)
    if isinstance(entry, dict) and entry.get("fingerprint") == fingerprint:
        return str(entry["checksum"])
    checksum = "sha256:" + _hash_files(stats, str(source.path))
    memo.pop(key, None)
    memo[key] = {"fingerprint": fingerprint, "checksum": checksum}
    while len(memo) > 200:  # forget the oldest
        memo.pop(next(iter(memo)))
    try:
        atomic_write_json(memo_path, memo)
    except OSError:
        pass  # only a speed-up
    return checksum


def _hash_files(stats: list[tuple[str, Path, os.stat_result]], label: str) -> str:
    """SHA-256 of one file, or of the names and contents of several, in the given order."""
    digest = hashlib.sha256()
    for rel, path, _ in stats:
        if len(stats) > 1:
            digest.update(rel.encode() + b"\0")
        try:
            with open(path, "rb") as handle:
                for block in iter(lambda: handle.read(1 << 20), b""):
                    digest.update(block)
        except OSError as exc:
            raise DataError(f"{label}: cannot read {path}: {exc.strerror or exc}") from None
    return digest.hexdigest()


def _read_memo(path: Path) -> dict:
    try:
        memo = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return memo if isinstance(memo, dict) else {}


def _stat(path: Path) -> os.stat_result:
    try:
        return path.stat()
    except OSError as exc:
        raise DataError(f"cannot read {path}: {exc.strerror or exc}") from None


# ---------------------------------------------------------------------------------------------
# Reading files out of folders and archives


# (path parts, size in bytes as listed, a function returning the content given a byte limit)
_FileEntry = tuple[tuple[str, ...], int, Callable[[int], bytes]]
_READ_CHUNK = 1 << 16


def _folder_tree_listing(root: Path) -> list[tuple[str, Path, int, os.stat_result]]:
    """Files in ``root/{train,test}/<folder>/``, sorted: (relative name, path, size, stat)."""
    listing = []
    for split in SPLITS:
        for folder in sorted(_subfolders(root / split)):
            try:
                entries = sorted(os.scandir(folder), key=lambda e: e.name)
            except OSError as exc:
                raise DataError(f"cannot read the folder {folder}: {exc.strerror or exc}") from None
            for entry in entries:
                if entry.is_file():
                    st = entry.stat()
                    rel = f"{split}/{folder.name}/{entry.name}"
                    listing.append((rel, Path(entry.path), st.st_size, st))
    return listing


def _read_file(path: Path, label: str, limit: int) -> bytes:
    try:
        with open(path, "rb") as handle:
            return read_capped(handle, limit, label)
    except OSError as exc:
        raise DataError(f"{label}: cannot read ({exc.strerror or exc})") from None


def read_capped(handle: io.BufferedIOBase, limit: int, label: str) -> bytes:
    """At most ``limit`` bytes of a file or archive member, read in small chunks.

    Sizes in zip and tar headers are the archive's word only: a member that claims 1,000
    bytes may inflate to gigabytes. Reading in chunks and stopping past ``limit`` bounds the
    memory whatever the headers say.
    """
    parts, total = [], 0
    while chunk := handle.read(min(_READ_CHUNK, limit + 1 - total)):
        parts.append(chunk)
        total += len(chunk)
        if total > limit:
            raise DataError(f"{label}: more than {limit:,} bytes, too large for CIFAR-10")
    return b"".join(parts)


def _archive_files(path: Path) -> Iterator[_FileEntry]:
    """Regular files of a zip or tar, in archive order; read each before asking for the next."""
    if _archive_type(path) == "zip":
        return _zip_files(path)
    return _tar_files(path)


def _tar_files(path: Path) -> Iterator[_FileEntry]:
    label = str(path)
    try:
        with _open_tar(path) as (stream, tar):
            for member in tar:
                parts = _member_parts(member.name, label)
                _refuse_special_member(member, label)
                if member.isreg():
                    yield parts, member.size, functools.partial(_read_tar_member, tar, member,
                                                                f"{label}: {member.name}")
            _check_tar_end(stream, tar, label)
    except DataError:
        raise
    except _STREAM_ERRORS as exc:
        raise _archive_error(label, exc) from None


class _TarStream:
    """A (decompressed) tar file read front to back, remembering the last block read.

    ``tarfile`` takes a missing end-of-archive marker, or garbage where a header should be, as
    the end of the archive, and in stream mode it does not notice a gzip stream that stops
    early. Reading through this wrapper lets :func:`_check_tar_end` tell a complete archive
    from a truncated one.
    """

    def __init__(self, raw: io.BufferedIOBase) -> None:
        self.raw = raw
        self.last = b""

    def read(self, size: int = -1) -> bytes:
        self.last = self.raw.read(size)
        return self.last

    def seek(self, offset: int, whence: int = 0) -> int:
        return self.raw.seek(offset, whence)

    def tell(self) -> int:
        return self.raw.tell()


# Compressed tars by their first bytes, whatever their names say.
_DECOMPRESSORS = ((b"\x1f\x8b", lambda raw: gzip.GzipFile(fileobj=raw)),
                  (b"BZh", bz2.BZ2File),
                  (b"\xfd7zXZ\x00", lzma.LZMAFile))


@contextlib.contextmanager
def _open_tar(path: Path) -> Iterator[tuple[_TarStream, tarfile.TarFile]]:
    """Open a tar, gzip-, bzip2- or xz-compressed, for one forward pass over its members."""
    with open(path, "rb") as raw:
        head = raw.read(6)
        raw.seek(0)
        decompress = next((opener for magic, opener in _DECOMPRESSORS if head.startswith(magic)),
                          contextlib.nullcontext)  # an uncompressed tar
        with decompress(raw) as plain:
            stream = _TarStream(plain)
            with tarfile.open(fileobj=stream, mode="r:") as tar:  # type: ignore[call-overload]
                yield stream, tar


def _check_tar_end(stream: _TarStream, tar: tarfile.TarFile, label: str) -> None:
    """Insist on the end-of-archive block, then read to the end (checking gzip's CRC)."""
    ended = (stream.tell() == tar.offset + tarfile.BLOCKSIZE
             and len(stream.last) == tarfile.BLOCKSIZE and not any(stream.last))
    if not ended:
        raise DataError(f"{label}: truncated or corrupt archive (it stops, or turns to "
                        f"garbage, after {len(tar.members):,} members)")
    while stream.raw.read(1 << 20):
        pass


def _archive_error(label: str, exc: BaseException) -> DataError:
    if isinstance(exc, (PermissionError, FileNotFoundError, IsADirectoryError)):
        return DataError(f"{label}: cannot read ({exc.strerror or exc})")
    return DataError(f"{label}: truncated or corrupt archive ({_one_line(exc)})")


def _read_tar_member(tar: tarfile.TarFile, member: tarfile.TarInfo, label: str,
                     limit: int) -> bytes:
    try:
        handle = tar.extractfile(member)
        data = read_capped(handle, limit, label) if handle is not None else b""
    except _STREAM_ERRORS as exc:
        raise DataError(f"{label}: truncated or corrupt archive ({_one_line(exc)})") from None
    if len(data) != member.size:
        raise DataError(f"{label}: truncated archive (the member is cut short)")
    return data


def _zip_files(path: Path) -> Iterator[_FileEntry]:
    label = str(path)
    try:
        archive = zipfile.ZipFile(path)
    except (PermissionError, FileNotFoundError, IsADirectoryError) as exc:
        raise _archive_error(label, exc) from None
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as exc:
        raise DataError(f"{label}: not a zip file, or a truncated one "
                        f"({_one_line(exc)})") from None
    with archive:
        for info in archive.infolist():
            name = info.filename.replace("\\", "/")
            if info.is_dir():
                continue
            parts = _member_parts(name, label)
            if stat.S_ISLNK(info.external_attr >> 16):
                raise DataError(f"{label}: refusing the link {name!r} (archives of CIFAR-10 "
                                "hold plain files)")
            yield parts, info.file_size, functools.partial(_read_zip_member, archive, info,
                                                           f"{label}: {name}")


def _read_zip_member(archive: zipfile.ZipFile, info: zipfile.ZipInfo, label: str,
                     limit: int) -> bytes:
    try:
        with archive.open(info) as handle:
            return read_capped(handle, limit, label)
    except _STREAM_ERRORS as exc:
        raise DataError(f"{label}: corrupt or truncated member ({_one_line(exc)})") from None


def _member_parts(name: str, label: str) -> tuple[str, ...]:
    """An archive member's path parts; refuses names that would leave the archive's folder."""
    parts = tuple(part for part in name.split("/") if part not in ("", "."))
    if name.startswith("/") or ".." in parts or re.match(r"^[A-Za-z]:", name):
        raise DataError(f"{label}: refusing the member {name!r}, which points outside the "
                        "archive's folder")
    return parts


def _refuse_special_member(member: tarfile.TarInfo, label: str) -> None:
    if member.isreg() or member.isdir():
        return
    kind = ("link" if member.issym() or member.islnk() else
            "device" if member.isdev() else "special file")
    raise DataError(f"{label}: refusing the {kind} {member.name!r} (archives of CIFAR-10 hold "
                    "plain files)")


def _extract_member(tar: tarfile.TarFile, member: tarfile.TarInfo, dest: Path) -> None:
    # The checks above already refuse what the "data" filter refuses; the filter is a second
    # line of defence where this Python has it.
    if hasattr(tarfile, "data_filter"):
        tar.extract(member, dest, filter="data")
    else:  # pragma: no cover - Python without extraction filters
        tar.extract(member, dest)


# ---------------------------------------------------------------------------------------------
# Official batches: restricted unpickling


def _reconstruct_ndarray(subtype: object, shape: tuple, dtype: object) -> np.ndarray:
    # NumPy pickles an array as an empty shell, then fills it from raw bytes; only that shell
    # may be made here, so a pickle cannot allocate or call anything else.
    if subtype is not _NDARRAY_TOKEN or tuple(shape) != (0,):
        raise pickle.UnpicklingError("unexpected array reconstruction")
    return _RECONSTRUCT(np.ndarray, (0,), dtype)


def _make_dtype(spec: object, align: object = False, copy: object = False) -> np.dtype:
    dtype = np.dtype(spec, bool(align), bool(copy))  # type: ignore[call-overload]
    if dtype.hasobject:
        raise pickle.UnpicklingError("object arrays are not allowed")
    return dtype


def _latin1_encode(text: str, encoding: str = "latin1") -> bytes:
    # Pickles of bytes from Python 3 at protocol 2 spell them as _codecs.encode(str, "latin1").
    if encoding not in ("latin1", "latin-1") or not isinstance(text, str):
        raise pickle.UnpicklingError("unexpected call of _codecs.encode")
    return text.encode("latin1")


_RECONSTRUCT = np.ndarray.__reduce__(np.zeros(0))[0]
_NDARRAY_TOKEN = object()  # stands for numpy.ndarray inside a pickle; not callable
_PICKLE_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"): _reconstruct_ndarray,   # NumPy 1: official files
    ("numpy._core.multiarray", "_reconstruct"): _reconstruct_ndarray,  # NumPy 2
    ("numpy", "ndarray"): _NDARRAY_TOKEN,
    ("numpy", "dtype"): _make_dtype,
    ("_codecs", "encode"): _latin1_encode,
}


class _RefusedGlobal(pickle.UnpicklingError):
    pass


class _BatchUnpickler(pickle.Unpickler):
    """Knows only the names a pickled NumPy array needs; anything else is refused."""

    def find_class(self, module: str, name: str) -> object:
        try:
            return _PICKLE_GLOBALS[(module, name)]
        except KeyError:
            raise _RefusedGlobal(f"{module}.{name}") from None

    def persistent_load(self, pid: object) -> object:
        raise pickle.UnpicklingError("persistent references are not allowed")


def _safe_unpickle(data: bytes, label: str) -> object:
    """Unpickle a CIFAR-10 batch without ever calling anything but NumPy's array rebuilding."""
    try:
        # Python 2 strings arrive as bytes, as in the official files.
        return _BatchUnpickler(io.BytesIO(data), encoding="bytes").load()
    except _RefusedGlobal as exc:
        raise DataError(f"{label}: refusing to unpickle {exc} (a CIFAR-10 batch holds only "
                        "NumPy arrays and lists)") from None
    except Exception as exc:  # noqa: BLE001 - untrusted input may fail in any way
        raise DataError(f"{label}: not a readable CIFAR-10 batch ({type(exc).__name__}: "
                        f"{_one_line(exc)})") from None


def _parse_batches(blobs: dict[str, bytes], label: str) -> dict[str, np.ndarray]:
    meta = _str_keys(_safe_unpickle(blobs[META_FILE], f"{label}: {META_FILE}"), label, META_FILE)
    names = meta.get("label_names")
    if not isinstance(names, list):
        raise DataError(f"{label}: {META_FILE} has no list of label_names")
    names = tuple(n.decode("latin1") if isinstance(n, bytes) else str(n) for n in names)
    if names != CLASSES:
        raise DataError(f"{label}: {META_FILE} names the classes {', '.join(names)}; "
                        f"expected CIFAR-10's {', '.join(CLASSES)}")
    train = [_parse_batch(blobs[name], label, name) for name in TRAIN_BATCHES]
    test_images, test_labels = _parse_batch(blobs[TEST_BATCH], label, TEST_BATCH)
    return {
        "train_images": np.concatenate([images for images, _ in train]),
        "train_labels": np.concatenate([labels for _, labels in train]),
        "test_images": test_images,
        "test_labels": test_labels,
    }


def _parse_batch(blob: bytes, label: str, name: str) -> tuple[np.ndarray, np.ndarray]:
    batch = _str_keys(_safe_unpickle(blob, f"{label}: {name}"), label, name)
    data, labels = batch.get("data"), batch.get("labels")
    pixels = 3 * IMAGE_SIZE * IMAGE_SIZE
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 \
            or data.shape[1] != pixels:
        raise DataError(f"{label}: {name}: 'data' is not a uint8 array of shape (N, {pixels})")
    try:
        labels = np.asarray(labels, dtype=np.int64)
    except (TypeError, ValueError):
        raise DataError(f"{label}: {name}: 'labels' is not a list of class indices") from None
    if labels.shape != (len(data),):
        raise DataError(f"{label}: {name}: {len(data)} images but {labels.size} labels")
    if labels.size and (labels.min() < 0 or labels.max() >= len(CLASSES)):
        raise DataError(f"{label}: {name}: labels outside 0-{len(CLASSES) - 1}")
    # Rows are planar (1024 red, 1024 green, 1024 blue values, row by row); make them HWC.
    images = data.reshape(-1, 3, IMAGE_SIZE, IMAGE_SIZE).transpose(0, 2, 3, 1)
    return np.ascontiguousarray(images), labels


def _str_keys(obj: object, label: str, name: str) -> dict:
    if not isinstance(obj, dict):
        raise DataError(f"{label}: {name} is not a CIFAR-10 batch (not a dict)")
    return {(k.decode("latin1") if isinstance(k, bytes) else k): v for k, v in obj.items()}


# ---------------------------------------------------------------------------------------------
# Image-folder trees and the official batches, from one stream of files


def _read_entries(files: Iterable[_FileEntry], label: str, *,
                  progress: bool) -> tuple[dict[str, np.ndarray], str]:
    """Sort a stream of files into official batches or an image tree, decoding as they come."""
    batches: dict[str, bytes] = {}
    layout = _TreeLayout(label)
    with _ImageDecoder(label, progress=progress) as decoder:
        for parts, size, read in files:
            if not parts:
                continue
            if len(parts) <= 2 and parts[-1] in BATCH_FILES:
                if size > MAX_BATCH_BYTES:
                    raise DataError(f"{label}: {'/'.join(parts)} is {size:,} bytes, too large "
                                    "for a CIFAR-10 batch")
                batches[parts[-1]] = read(MAX_BATCH_BYTES)
                continue
            if layout.add(parts) and layout.healthy:
                if size > MAX_IMAGE_BYTES:
                    raise DataError(f"{label}: {'/'.join(parts)} is {size:,} bytes, too large "
                                    "for a 32x32 image")
                decoder.add("/".join(parts), read(MAX_IMAGE_BYTES))
        if batches:
            if layout.count:
                raise DataError(f"{label}: holds both CIFAR-10 batch files and image folders; "
                                "use one or the other")
            missing = [name for name in BATCH_FILES if name not in batches]
            if missing:
                raise DataError(f"{label}: incomplete CIFAR-10 batches, missing "
                                f"{', '.join(missing)}")
            return _parse_batches(batches, label), "batches"
        layout.check()
        return layout.assemble(decoder.finish()), "images"


class _TreeLayout:
    """Checks ``[top/]split/class/file`` paths as they stream past and remembers each image."""

    def __init__(self, label: str) -> None:
        self.label = label
        self.tops: set[str] = set()                 # the folder train/ and test/ sit in ("" = none)
        self.folders = {split: Counter() for split in SPLITS}  # class folder -> images in it
        self.problems: list[str] = []
        self.keys: list[tuple[int, int, list]] = []  # (split, class, natural name) per image
        self.healthy = True  # False once the tree is known to be wrong: stop decoding

    @property
    def count(self) -> int:
        return len(self.keys)

    def add(self, parts: tuple[str, ...]) -> bool:
        """Record one file; True when it is an image of the tree to decode."""
        if not parts or any(p.startswith(".") or p == "__MACOSX" for p in parts):
            return False  # hidden files and macOS resource forks
        if parts[0] in SPLITS:
            top, rel = "", parts
        elif len(parts) > 1 and parts[1] in SPLITS:
            top, rel = parts[0], parts[1:]
        else:
            return False  # not part of the tree
        if len(rel) != 3:
            return False  # beside the class folders, or nested deeper
        split, folder, filename = rel
        self.tops.add(top)
        if len(self.tops) > 1:
            self.healthy = False
        if os.path.splitext(filename)[1].lower() not in IMAGE_SUFFIXES:
            self.problems.append(f"{'/'.join(parts)} is not an image file")
            self.healthy = False
            return False
        self.folders[split][folder] += 1
        if folder not in CLASSES:
            self.healthy = False
            return False
        self.keys.append((SPLITS.index(split), CLASSES.index(folder), _natural_key(filename)))
        return True

    def check(self) -> None:
        problems = list(self.problems)
        if len(self.tops) > 1:
            tops = ", ".join(f"{t}/" if t else "the top level" for t in sorted(self.tops))
            problems.append(f"train/ and test/ appear in several places ({tops})")
        if not any(self.folders.values()):
            raise DataError(
                f"{self.label}: no CIFAR-10 found (expected train/<class>/ and test/<class>/ "
                f"image folders, or the {BATCHES_DIR} files)")
        for split in SPLITS:
            found = self.folders[split]
            if not found:
                problems.append(f"no {split}/ class folders")
                continue
            missing = [c for c in CLASSES if c not in found]
            extra = sorted(f for f in found if f not in CLASSES)
            if missing:
                problems.append(f"{split}/ lacks the class folder(s) {', '.join(missing)}")
            if extra:
                problems.append(f"{split}/ has unexpected folder(s) "
                                f"{', '.join(_with_suggestion(f) for f in extra)}")
        if problems:
            shown = problems[:_MAX_PROBLEMS]
            more = len(problems) - len(shown)
            raise DataError(f"{self.label}: " + "; ".join(shown)
                            + (f"; and {more} more" if more else "")
                            + f" (the classes are {', '.join(CLASSES)})")

    def assemble(self, images: np.ndarray) -> dict[str, np.ndarray]:
        """Split and order the decoded images: by class in the official order, then by name."""
        arrays = {}
        for index, split in enumerate(SPLITS):
            rows = [i for i, key in enumerate(self.keys) if key[0] == index]
            rows.sort(key=lambda i: self.keys[i][1:])
            arrays[f"{split}_images"] = images[rows]
            arrays[f"{split}_labels"] = np.array([self.keys[i][1] for i in rows], dtype=np.int64)
        return arrays


def _with_suggestion(folder: str) -> str:
    close = difflib.get_close_matches(folder.lower(), CLASSES, n=1, cutoff=0.6)
    return f"{folder!r} (did you mean {close[0]!r}?)" if close else repr(folder)


def _natural_key(name: str) -> list:
    """'img10.png' after 'img9.png': digits compare as numbers."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


class _ImageDecoder:
    """Decodes images in chunks, in worker processes once there is enough work to share.

    Chunks are handed out while the source is still being read, so reading a compressed archive
    and decoding overlap. Results keep the order in which images were added.
    """

    def __init__(self, label: str, *, progress: bool, chunk: int | None = None) -> None:
        self.label = label
        self.chunk = chunk or _DECODE_CHUNK
        self.names: list[str] = []
        self.blobs: list[bytes] = []
        self.results: list = []  # per chunk: a decoded array, or (future, names, blobs)
        self.executor = None
        self.pool_failed = _worker_count() < 2
        self.progress = progress
        self.started = False
        self.bar = None

    def __enter__(self) -> _ImageDecoder:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.executor is not None:
            self.executor.shutdown(wait=True, cancel_futures=True)
        if self.bar is not None:
            self.bar.close()

    def add(self, name: str, blob: bytes) -> None:
        self.names.append(name)
        self.blobs.append(blob)
        if len(self.blobs) >= self.chunk:
            self._raise_early_failure()
            self._dispatch()

    def _raise_early_failure(self) -> None:
        """Re-raise a worker's error (a corrupt image, say) without reading on to the end."""
        for result in self.results:
            if isinstance(result, tuple) and result[0].done():
                exc = result[0].exception()
                if exc is not None and not isinstance(exc, _broken_pool_errors()):
                    raise exc

    def finish(self) -> np.ndarray:
        self._dispatch()
        decoded = []
        for result in self.results:
            if isinstance(result, tuple):
                future, names, blobs = result
                try:
                    result = future.result()
                except _broken_pool_errors():  # a worker died: decode that chunk here instead
                    result = self._decode_here(names, blobs)
            decoded.append(result)
        if not decoded:
            return np.empty((0, IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
        return np.concatenate(decoded)

    def _dispatch(self) -> None:
        if not self.blobs:
            return
        names, blobs = self.names, self.blobs
        self.names, self.blobs = [], []
        if not self.started:  # the first chunk tells whether a pool is worth starting
            self.started = True
            self._start_pool_if_useful(len(blobs))
            self.bar = _progress_bar(self.progress, desc=f"decoding {Path(self.label).name}",
                                     unit=" images")
        if self.executor is None:
            self.results.append(self._decode_here(names, blobs))
            return
        future = self.executor.submit(_decode_chunk, self.label, names, blobs)
        if self.bar is not None:
            count = len(blobs)
            future.add_done_callback(lambda _: self.bar.update(count))
        self.results.append((future, names, blobs))

    def _start_pool_if_useful(self, first_chunk: int) -> None:
        # A pool costs a fraction of a second to start; a small tree decodes faster here.
        if self.pool_failed or first_chunk < self.chunk:
            return
        from concurrent.futures import ProcessPoolExecutor
        try:
            self.executor = ProcessPoolExecutor(max_workers=_worker_count(),
                                                mp_context=_pool_context())
        except (OSError, ValueError, NotImplementedError):
            self.pool_failed = True  # no process support here: decode in this process

    def _decode_here(self, names: list[str], blobs: list[bytes]) -> np.ndarray:
        images = _decode_chunk(self.label, names, blobs)
        if self.bar is not None:
            self.bar.update(len(blobs))
        return images


def _decode_chunk(label: str, names: list[str], blobs: list[bytes]) -> np.ndarray:
    """Decode 32x32 images (run in a worker process): uint8 (len(blobs), 32, 32, 3)."""
    out = np.empty((len(blobs), IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
    for i, (name, blob) in enumerate(zip(names, blobs, strict=True)):
        out[i] = _decode_cifar_image(blob, f"{label}: {name}")
    return out


def _decode_cifar_image(blob: bytes, name: str) -> np.ndarray:
    """One image file that must be 32x32 -> RGB uint8 (32, 32, 3); DataError naming the file."""
    try:
        image = open_image(blob, name=name)
    except ImageError as exc:
        raise DataError(str(exc)) from None
    if image.size != (IMAGE_SIZE, IMAGE_SIZE):
        width, height = image.size
        raise DataError(f"{name} is {width}x{height} pixels; CIFAR-10 images are "
                        f"{IMAGE_SIZE}x{IMAGE_SIZE}")
    return np.asarray(to_rgb(image), dtype=np.uint8)


def _worker_count() -> int:
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cpus = os.cpu_count() or 1
    return max(1, min(cpus, 8))


def _pool_context():  # noqa: ANN202
    import multiprocessing

    # Fork starts workers at once and never re-imports the caller's script (with spawn, a
    # script without an ``if __name__ == "__main__"`` guard would run itself again).
    if sys.platform.startswith("linux"):
        return multiprocessing.get_context("fork")
    return None


def _broken_pool_errors() -> tuple[type[BaseException], ...]:
    from concurrent.futures.process import BrokenProcessPool

    return (BrokenProcessPool,)


# ---------------------------------------------------------------------------------------------
# Small helpers


def _stratified_quotas(counts: np.ndarray, total: int) -> list[int]:
    """Split ``total`` over classes in proportion to ``counts``; largest remainders round up."""
    ideal = counts * total / counts.sum()
    quotas = np.floor(ideal).astype(int)
    remainders = ideal - quotas
    for index in np.argsort(-remainders, kind="stable")[: total - quotas.sum()]:
        quotas[index] += 1
    return quotas.tolist()


def _user_cache_dir() -> Path:
    import platformdirs

    return Path(platformdirs.user_cache_dir(APP_NAME, appauthor=False))


class _DownloadBar:
    """The progress bar handed to pooch, drawn only once the server has answered.

    pooch sets ``total`` from the response's Content-Length; a bar made before that would
    flash "0.00/1.00" ahead of a network error.
    """

    def __init__(self, **options) -> None:
        self.options = options
        self.bar = None

    def __bool__(self) -> bool:  # pooch tests the bar's truth to decide whether to use it
        return True

    @property
    def total(self) -> int | None:
        return self.bar.total if self.bar is not None else None

    @total.setter
    def total(self, value: int) -> None:
        self.bar = _progress_bar(True, total=value or None, unit="B", unit_scale=True,
                                 unit_divisor=1024, **self.options)

    def update(self, count: int) -> None:
        if self.bar is not None:
            self.bar.update(count)

    def reset(self) -> None:
        if self.bar is not None:
            self.bar.reset()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _progress_bar(enabled: bool, **options):  # noqa: ANN202
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(leave=False, **options)


def _one_line(exc: object) -> str:
    return " ".join(str(exc).split())[:300]


def _root_cause(exc: BaseException) -> str:
    """The innermost reason of a requests error, briefly (e.g. 'Connection refused')."""
    chain: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and current not in chain and len(chain) < 20:
        chain.append(current)
        reason = getattr(current, "reason", None)
        current = (reason if isinstance(reason, BaseException)
                   else current.__cause__ or current.__context__)
    for item in reversed(chain):
        if isinstance(item, OSError) and item.strerror:
            return item.strerror
        match = re.search(r"\[Errno -?\d+\] ([^'\")\]]+)", str(item))
        if match:
            return match.group(1).strip()
    return type(chain[-1]).__name__
