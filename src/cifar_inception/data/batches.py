"""The official python batches: the folder's files, a restricted unpickler and batch parsing."""

from __future__ import annotations

import io
import pickle
from pathlib import Path

import numpy as np

from cifar_inception.data.common import (
    BATCH_FILES,
    CLASSES,
    IMAGE_SIZE,
    META_FILE,
    TEST_BATCH,
    TRAIN_BATCHES,
    _one_line,
)
from cifar_inception.errors import DataError


def _has_all_batches(folder: Path) -> bool:
    return all((folder / name).is_file() for name in BATCH_FILES)


def _check_batches_folder(folder: Path, label: str) -> None:
    missing = [name for name in BATCH_FILES if not (folder / name).is_file()]
    if missing:
        raise DataError(f"{label}: incomplete CIFAR-10 batches folder, missing "
                        f"{', '.join(missing)}")


# ---------------------------------------------------------------------------------------------
# Restricted unpickling


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


# ---------------------------------------------------------------------------------------------
# Parsing


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
