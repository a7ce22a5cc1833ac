"""Small generated stand-ins for CIFAR-10, in every layout the data module reads.

- the official format: pickled ``data_batch_1..5``, ``test_batch`` and ``batches.meta`` in
  ``cifar-10-batches-py/``, pickled as Python 2 did (byte strings, ``numpy.core``) or as
  Python 3 does at protocol 2 (``_codecs.encode``, ``numpy._core``);
- image-folder trees ``[top/]train/<class>/N.png`` and ``test/<class>/N.png``, packed as a
  folder, .zip, .tar or .tar.gz.

Images are random but seeded, so a test can compare decoded pixels with what was written.
"""

from __future__ import annotations

import io
import pickle
import struct
import tarfile
import zipfile
from pathlib import Path

import numpy as np
from PIL import Image

from cifar_inception.data import CLASSES

BATCH_NAMES = [f"data_batch_{i}" for i in range(1, 6)]


def random_images(count: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(count, 32, 32, 3), dtype=np.uint8)


class _Python2Pickler(pickle._Pickler):
    """Writes every str and bytes as a Python 2 byte string, as the official batches have them."""

    dispatch = pickle._Pickler.dispatch.copy()

    def _save_py2_string(self, obj: str | bytes) -> None:
        data = obj.encode("latin1") if isinstance(obj, str) else obj
        if len(data) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(data)]) + data)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(data)) + data)
        self.memoize(obj)

    dispatch[str] = _save_py2_string
    dispatch[bytes] = _save_py2_string


def pickle_batch(obj: object, style: str = "py2") -> bytes:
    if style == "py3":
        return pickle.dumps(obj, protocol=2)
    buffer = io.BytesIO()
    _Python2Pickler(buffer, protocol=2).dump(obj)
    # NumPy 1, which wrote the official files, kept _reconstruct in numpy.core.
    return buffer.getvalue().replace(b"cnumpy._core.multiarray\n", b"cnumpy.core.multiarray\n")


def official_files(per_batch: int = 10, test_count: int = 10, seed: int = 0,
                   style: str = "py2") -> tuple[dict[str, bytes], dict[str, np.ndarray]]:
    """The seven files of cifar-10-batches-py (name -> bytes) and the arrays they hold."""
    train_images = random_images(5 * per_batch, seed)
    test_images = random_images(test_count, seed + 1)
    rng = np.random.default_rng(seed + 2)
    train_labels = rng.integers(0, 10, size=len(train_images)).astype(np.int64)
    test_labels = rng.integers(0, 10, size=len(test_images)).astype(np.int64)

    def batch(images: np.ndarray, labels: np.ndarray, title: str) -> bytes:
        planar = images.transpose(0, 3, 1, 2).reshape(len(images), -1)  # R plane, G, B
        return pickle_batch({"batch_label": title, "labels": [int(v) for v in labels],
                             "data": np.ascontiguousarray(planar),
                             "filenames": [f"img_{i}.png" for i in range(len(images))]}, style)

    files = {}
    for i, name in enumerate(BATCH_NAMES):
        part = slice(i * per_batch, (i + 1) * per_batch)
        files[name] = batch(train_images[part], train_labels[part],
                            f"training batch {i + 1} of 5")
    files["test_batch"] = batch(test_images, test_labels, "testing batch 1 of 1")
    files["batches.meta"] = pickle_batch({"num_cases_per_batch": per_batch,
                                          "label_names": list(CLASSES), "num_vis": 3072}, style)
    expected = {"train_images": train_images, "train_labels": train_labels,
                "test_images": test_images, "test_labels": test_labels}
    return files, expected


def write_official_folder(folder: Path, **options) -> dict[str, np.ndarray]:
    files, expected = official_files(**options)
    batches = folder / "cifar-10-batches-py"
    batches.mkdir(parents=True)
    for name, data in files.items():
        (batches / name).write_bytes(data)
    return expected


def write_official_archive(path: Path, extra_members: list[tarfile.TarInfo] | None = None,
                           files: dict[str, bytes] | None = None,
                           **options) -> dict[str, np.ndarray]:
    """A cifar-10-python.tar.gz like the official one; ``extra_members`` are added first."""
    expected = None
    if files is None:
        files, expected = official_files(**options)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w:gz") as tar:
        for member in extra_members or []:
            tar.addfile(member, io.BytesIO(b"x" * member.size) if member.isreg() else None)
        folder = tarfile.TarInfo("cifar-10-batches-py")
        folder.type, folder.mode = tarfile.DIRTYPE, 0o755
        tar.addfile(folder)
        for name, data in files.items():
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return expected


def encode_image(array: np.ndarray, fmt: str = "PNG", mode: str | None = None) -> bytes:
    image = Image.fromarray(array)
    if mode is not None:
        image = image.convert(mode)
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def image_tree_files(train_per_class: int = 2, test_per_class: int = 1, seed: int = 0,
                     top: str | None = None) -> tuple[dict[str, bytes], dict[str, np.ndarray]]:
    """Files of an image-folder tree (relative name -> PNG bytes) and the arrays, in load order.

    Names run 0..k-1 but are written largest first, and 10 sorts after 9, so a loader that
    kept archive order or sorted names as text would fail the comparison.
    """
    prefix = f"{top}/" if top else ""
    files: dict[str, bytes] = {}
    expected: dict[str, np.ndarray] = {}
    for split_index, (split, per_class) in enumerate((("train", train_per_class),
                                                      ("test", test_per_class))):
        images = random_images(10 * per_class, seed + split_index)
        labels = np.repeat(np.arange(10), per_class).astype(np.int64)
        for cls in range(10):
            for i in reversed(range(per_class)):
                files[f"{prefix}{split}/{CLASSES[cls]}/{i}.png"] = encode_image(
                    images[cls * per_class + i])
        expected[f"{split}_images"] = images
        expected[f"{split}_labels"] = labels
    return files, expected


def write_tree(folder: Path, files: dict[str, bytes]) -> Path:
    for name, data in files.items():
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return folder


def pack(files: dict[str, bytes], path: Path) -> Path:
    """Pack name -> bytes into a .zip, .tar or .tar.gz (by suffix), in the given order."""
    if path.suffix == ".zip":
        with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
            for name, data in files.items():
                archive.writestr(name, data)
        return path
    compression = {".gz": "gz", ".tgz": "gz", ".bz2": "bz2", ".xz": "xz"}.get(path.suffix, "")
    mode = f"w:{compression}" if compression else "w"
    with tarfile.open(path, mode) as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def assert_arrays_equal(data, expected: dict[str, np.ndarray]) -> None:
    for key, value in expected.items():
        actual = getattr(data, key)
        assert actual.dtype == value.dtype, key
        assert actual.shape == value.shape, key
        np.testing.assert_array_equal(actual, value, err_msg=key)
