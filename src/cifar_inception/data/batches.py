"""The official python batches: the folder's files, a restricted unpickler and batch parsing.

Which files a dataset's folder holds, and under which keys its labels and label names are,
come from its :class:`~cifar_inception.data.specs.DatasetSpec`.
"""

from __future__ import annotations

import io
import pickle
from pathlib import Path

import numpy as np

from cifar_inception.data.common import one_line
from cifar_inception.data.specs import DatasetSpec
from cifar_inception.errors import DataError

__all__ = ["check_batches_folder", "has_all_batches", "parse_batches", "safe_unpickle"]


def has_all_batches(folder: Path, spec: DatasetSpec) -> bool:
    return all((folder / name).is_file() for name in spec.batch_files)


def check_batches_folder(folder: Path, label: str, spec: DatasetSpec) -> None:
    missing = [name for name in spec.batch_files if not (folder / name).is_file()]
    if missing:
        raise DataError(f"{label}: incomplete {spec.title} batches folder, missing "
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


def safe_unpickle(data: bytes, label: str, title: str = "dataset") -> object:
    """Unpickle an official batch without ever calling anything but NumPy's array rebuilding."""
    try:
        # Python 2 strings arrive as bytes, as in the official files.
        return _BatchUnpickler(io.BytesIO(data), encoding="bytes").load()
    except _RefusedGlobal as exc:
        raise DataError(f"{label}: refusing to unpickle {exc} (a {title} batch holds only "
                        "NumPy arrays and lists)") from None
    except Exception as exc:  # noqa: BLE001 - untrusted input may fail in any way
        raise DataError(f"{label}: not a readable {title} batch ({type(exc).__name__}: "
                        f"{one_line(exc)})") from None


# ---------------------------------------------------------------------------------------------
# Parsing


def parse_batches(blobs: dict[str, bytes], label: str,
                  spec: DatasetSpec) -> tuple[dict[str, np.ndarray], tuple[str, ...]]:
    """The arrays of the official batch files ``blobs`` (by file name), and the class names."""
    classes = _class_names(blobs[spec.meta_file], label, spec)
    parsed = {split: [_parse_batch(blobs[name], label, name, spec, len(classes))
                      for name in names]
              for split, names in (("train", spec.train_batches), ("test", spec.test_batches))}
    arrays = {}
    for split, batches in parsed.items():
        arrays[f"{split}_images"] = np.concatenate([images for images, _ in batches])
        arrays[f"{split}_labels"] = np.concatenate([labels for _, labels in batches])
    return arrays, classes


def _class_names(blob: bytes, label: str, spec: DatasetSpec) -> tuple[str, ...]:
    meta_file, key = spec.meta_file, spec.label_names_key
    meta = _str_keys(safe_unpickle(blob, f"{label}: {meta_file}", spec.title), label, meta_file)
    names = meta.get(key)
    if not isinstance(names, list) or not names:
        raise DataError(f"{label}: {meta_file} has no list of {key}")
    names = tuple(n.decode("latin1") if isinstance(n, bytes) else str(n) for n in names)
    if spec.classes and names != spec.classes:
        raise DataError(f"{label}: {meta_file} names the classes {', '.join(names)}; "
                        f"expected {spec.title}'s {', '.join(spec.classes)}")
    if len(set(names)) != len(names):
        raise DataError(f"{label}: {meta_file} names a class twice")
    return names


def _parse_batch(blob: bytes, label: str, name: str, spec: DatasetSpec,
                 num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    batch = _str_keys(safe_unpickle(blob, f"{label}: {name}", spec.title), label, name)
    data, labels = batch.get("data"), batch.get(spec.label_key)
    size = 32  # the official batches hold 32x32 images; other sizes are resized after
    pixels = 3 * size * size
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 \
            or data.shape[1] != pixels:
        raise DataError(f"{label}: {name}: 'data' is not a uint8 array of shape (N, {pixels})")
    try:
        labels = np.asarray(labels, dtype=np.int64)
    except (TypeError, ValueError):
        raise DataError(f"{label}: {name}: {spec.label_key!r} is not a list of class "
                        "indices") from None
    if labels.shape != (len(data),):
        raise DataError(f"{label}: {name}: {len(data)} images but {labels.size} labels")
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise DataError(f"{label}: {name}: labels outside 0-{num_classes - 1}")
    # Rows are planar (1024 red, 1024 green, 1024 blue values, row by row); make them HWC.
    images = data.reshape(-1, 3, size, size).transpose(0, 2, 3, 1)
    return np.ascontiguousarray(images), labels


def _str_keys(obj: object, label: str, name: str) -> dict:
    if not isinstance(obj, dict):
        raise DataError(f"{label}: {name} is not a dataset batch (not a dict)")
    return {(k.decode("latin1") if isinstance(k, bytes) else k): v for k, v in obj.items()}
