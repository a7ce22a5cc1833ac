"""The decoded-array cache: where it lives, and reading and writing one source's arrays."""

from __future__ import annotations

import os
import warnings
import zipfile
from pathlib import Path

import numpy as np

from cifar_inception.data.common import APP_NAME, ENV_CACHE, IMAGE_SIZE, SPLITS
from cifar_inception.fileio import atomic_open

_CACHE_VERSION = 1


def cache_dir() -> Path:
    """Where decoded arrays and remembered checksums go: ``$CIFAR_INCEPTION_CACHE``, else the
    user cache folder."""
    if os.environ.get(ENV_CACHE):
        return Path(os.environ[ENV_CACHE]).expanduser()
    return _user_cache_dir()


def _user_cache_dir() -> Path:
    import platformdirs

    return Path(platformdirs.user_cache_dir(APP_NAME, appauthor=False))


def _cache_file(checksum: str) -> Path:
    """Where the arrays decoded from the source with ``checksum`` are cached."""
    return cache_dir() / "arrays" / f"v{_CACHE_VERSION}-{checksum.replace(':', '-')}.npz"


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
