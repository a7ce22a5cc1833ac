"""The decoded-array cache: where it lives, and reading and writing one source's arrays."""

from __future__ import annotations

import os
import warnings
import zipfile
from pathlib import Path

import numpy as np

from cifar_inception.data.common import APP_NAME, ENV_CACHE, SPLITS, one_line
from cifar_inception.fileio import atomic_open

__all__ = ["MAX_CACHED_IMAGES", "cache_dir", "cache_file", "read_cache", "user_cache_dir",
           "write_cache"]

# 2: the cache records the checksum of the source it was decoded from; 3: it is keyed on the
# dataset spec too, and records the class names (read from a meta file or folder names).
_CACHE_VERSION = 3
# Images a cache may hold, far above CIFAR-10's 60,000: an array header asking for more is
# damage, refused before anything is allocated (at most 600 MB of pixels).
MAX_CACHED_IMAGES = 200_000
_ARRAY_KEYS = tuple(f"{split}_{part}" for split in SPLITS for part in ("images", "labels"))
_TEXT_KEYS = ("layout", "source", "classes")
# The "layout" and "source" strings are short; "classes" holds up to a thousand names.
_MAX_TEXT_BYTES = {"layout": 4096, "source": 4096, "classes": 1 << 20}


def _array_layout(key: str, image_size: int) -> tuple[np.dtype, tuple[int, ...]]:
    """What a cached array must be: dtype and the shape after the image count."""
    if key.endswith("_images"):
        return np.dtype(np.uint8), (image_size, image_size, 3)
    return np.dtype(np.int64), ()


def cache_dir() -> Path:
    """Where decoded arrays and remembered checksums go: ``$CIFAR_INCEPTION_CACHE``, else the
    user cache folder."""
    if os.environ.get(ENV_CACHE):
        return Path(os.environ[ENV_CACHE]).expanduser()
    return user_cache_dir()


def user_cache_dir() -> Path:
    import platformdirs

    return Path(platformdirs.user_cache_dir(APP_NAME, appauthor=False))


def cache_file(checksum: str, spec_key: str) -> Path:
    """Where the arrays decoded from the source with ``checksum``, read as the dataset spec
    with ``spec_key``, are cached."""
    name = f"v{_CACHE_VERSION}-{spec_key}-{checksum.replace(':', '-')}.npz"
    return cache_dir() / "arrays" / name


def read_cache(path: Path, checksum: str, image_size: int
               ) -> tuple[dict[str, np.ndarray], str, tuple[str, ...]] | None:
    """The arrays, layout and class names cached for the source with ``checksum``, or None.

    A cache that is unreadable, or does not hold what its source would give (array headers,
    dtypes and shapes, labels in range, the source's checksum), is stale: it is rebuilt and
    replaced, with a one-line warning. Its array headers are checked before any array is
    read, so a damaged header cannot ask for petabytes.
    """
    try:
        if not path.is_file():  # raises when the cache folder may not be searched
            return None
    except OSError:
        return None
    try:
        problem = _header_problem(path, image_size)
        if problem is None:
            with np.load(path, allow_pickle=False) as stored:
                arrays = {key: stored[key] for key in _ARRAY_KEYS}
                layout, source = str(stored["layout"]), str(stored["source"])
                classes = tuple(str(stored["classes"]).split("\n"))
            problem = _content_problem(arrays, source, checksum, len(classes))
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile,
            RuntimeError, NotImplementedError) as exc:  # zipfile: "encrypted", "compression"
        problem = f"is unreadable ({one_line(exc)})"
    if problem is not None:
        warnings.warn(f"the cached arrays {path} {problem}; decoding the source again",
                      stacklevel=3)
        return None
    return arrays, layout, classes


def _header_problem(path: Path, image_size: int) -> str | None:
    """What is wrong with the arrays an .npz declares, read from the headers alone."""
    with zipfile.ZipFile(path) as archive:
        for key in (*_ARRAY_KEYS, *_TEXT_KEYS):
            try:
                info = archive.getinfo(f"{key}.npy")
            except KeyError:
                return f"lacks the array {key!r}"
            if info.compress_type != zipfile.ZIP_STORED:
                return f"holds {key!r} compressed, which this cache never writes"
            with archive.open(info) as member:
                shape, dtype = _array_header(member)
            problem = _declared_problem(key, shape, dtype, image_size)
            if problem is None and _nbytes(shape, dtype) > info.file_size:
                problem = f"declares {key!r} larger than the file holds"
            if problem is not None:
                return problem
    return None


def _array_header(member) -> tuple[tuple[int, ...], np.dtype]:  # noqa: ANN001
    version = np.lib.format.read_magic(member)
    read = (np.lib.format.read_array_header_1_0 if version == (1, 0)
            else np.lib.format.read_array_header_2_0)
    shape, _, dtype = read(member)
    return tuple(shape), dtype


def _declared_problem(key: str, shape: tuple[int, ...], dtype: np.dtype,
                      image_size: int) -> str | None:
    if key in _TEXT_KEYS:
        ok = dtype.kind == "U" and shape == () and dtype.itemsize <= _MAX_TEXT_BYTES[key]
        return None if ok else f"holds a {key!r} that is not a short string"
    expected_dtype, expected_shape = _array_layout(key, image_size)
    if dtype != expected_dtype or len(shape) != 1 + len(expected_shape) \
            or shape[1:] != expected_shape:
        return f"holds {key!r} as {dtype} {shape}, not {expected_dtype} (N, *{expected_shape})"
    if shape[0] > MAX_CACHED_IMAGES:
        return f"declares {shape[0]:,} entries in {key!r}, over {MAX_CACHED_IMAGES:,}"
    return None


def _nbytes(shape: tuple[int, ...], dtype: np.dtype) -> int:
    return int(np.prod(shape, dtype=object)) * dtype.itemsize


def _content_problem(arrays: dict[str, np.ndarray], source: str, checksum: str,
                     num_classes: int) -> str | None:
    """What makes the arrays other than what the source with ``checksum`` decodes to."""
    if source != checksum:
        return f"were decoded from another source ({source[:80]})"
    for split in SPLITS:
        images, labels = arrays[f"{split}_images"], arrays[f"{split}_labels"]
        if len(images) != len(labels):
            return f"hold {len(images):,} {split} images but {len(labels):,} labels"
        if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
            return (f"hold {split} labels from {labels.min()} to {labels.max()}, outside "
                    f"0-{num_classes - 1}")
    return None


def write_cache(path: Path, arrays: dict[str, np.ndarray], layout: str, checksum: str,
                classes: tuple[str, ...]) -> bool:
    try:
        with atomic_open(path, "wb") as handle:
            np.savez(handle, layout=np.array(layout), source=np.array(checksum),
                     classes=np.array("\n".join(classes)), **arrays)
    except OSError as exc:
        warnings.warn(f"could not cache the decoded arrays in {path}: {exc.strerror or exc}",
                      stacklevel=3)
        return False
    return True
