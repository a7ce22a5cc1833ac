"""Image-folder trees: the ``[top/]split/class/file`` layout check and the multiprocess decoder.

A tree is read against a :class:`~cifar_inception.data.specs.DatasetSpec`: one that names
its classes (CIFAR-10) wants exactly those folders; one that does not (an image-folder
dataset) takes the folder names, sorted, as its classes.
"""

from __future__ import annotations

import difflib
import os
import re
import sys
from collections import Counter
from pathlib import Path

import numpy as np

from cifar_inception.data.common import SPLITS, progress_bar
from cifar_inception.data.specs import CIFAR10, MAX_CLASSES, DatasetSpec
from cifar_inception.errors import DataError
from cifar_inception.images import IMAGE_SUFFIXES, ImageError, image_header, load_cifar_array

__all__ = ["MIN_CLASSES", "ImageDecoder", "TreeLayout"]

_DECODE_CHUNK = 2000  # images per task for the decoding processes
_MAX_PROBLEMS = 6     # problems named in one error message
MIN_CLASSES = 2
# Pixels an image of a tree may have: any photo size, but not a decompression bomb per worker.
_MAX_TREE_PIXELS = 4096 * 4096


class TreeLayout:
    """Checks ``[top/]split/class/file`` paths as they stream past and remembers each image."""

    def __init__(self, label: str, spec: DatasetSpec) -> None:
        self.label = label
        self.spec = spec
        self.tops: set[str] = set()                 # the folder train/ and test/ sit in ("" = none)
        self.folders = {split: Counter() for split in SPLITS}  # class folder -> images in it
        self.problems: list[str] = []
        self.keys: list[tuple[int, str, list]] = []  # (split, folder, natural name) per image
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
        if self.spec.classes and folder not in self.spec.classes:
            self.healthy = False
            return False
        self.keys.append((SPLITS.index(split), folder, _natural_key(filename)))
        return True

    def check(self) -> tuple[str, ...]:
        """The tree's classes, in label order; DataError naming what is wrong with it."""
        problems = list(self.problems)
        if len(self.tops) > 1:
            tops = ", ".join(f"{t}/" if t else "the top level" for t in sorted(self.tops))
            problems.append(f"train/ and test/ appear in several places ({tops})")
        if not any(self.folders.values()):
            raise DataError(
                f"{self.label}: no {self._looked_for()} found (expected train/<class>/ and "
                f"test/<class>/ image folders{self._or_batches()})")
        classes = self.spec.classes or _folder_classes(self.folders["train"])
        for split in SPLITS:
            found = self.folders[split]
            if not found:
                problems.append(f"no {split}/ class folders")
                continue
            missing = [c for c in classes if c not in found]
            extra = sorted(f for f in found if f not in classes)
            if missing:
                problems.append(f"{split}/ lacks the class folder(s) {', '.join(missing)}")
            if extra:
                problems.append(f"{split}/ has unexpected folder(s) "
                                f"{', '.join(_with_suggestion(f, classes) for f in extra)}")
        if not problems and len(classes) < MIN_CLASSES:
            problems.append(f"train/ has {len(classes)} class folder; a dataset needs "
                            f"{MIN_CLASSES} or more")
        unprintable = [c for c in classes if not c.isprintable()]
        if unprintable:  # a newline would split one class name into two wherever it is kept
            problems.append(f"class folder names with control characters "
                            f"({', '.join(repr(c) for c in unprintable[:3])})")
        if len(classes) > MAX_CLASSES:
            problems.append(f"train/ has {len(classes):,} class folders; a dataset may have "
                            f"at most {MAX_CLASSES:,}")
        if problems:
            shown = problems[:_MAX_PROBLEMS]
            more = len(problems) - len(shown)
            raise DataError(f"{self.label}: " + "; ".join(shown)
                            + (f"; and {more} more" if more else "")
                            + f" (the classes are {_named(classes)})")
        return tuple(classes)

    def assemble(self, images: np.ndarray,
                 classes: tuple[str, ...]) -> dict[str, np.ndarray]:
        """Split and order the decoded images: by class in label order, then by name."""
        index = {name: i for i, name in enumerate(classes)}
        keys = [(split, index[folder], name) for split, folder, name in self.keys]
        arrays = {}
        for split_index, split in enumerate(SPLITS):
            rows = [i for i, key in enumerate(keys) if key[0] == split_index]
            rows.sort(key=lambda i: keys[i][1:])
            arrays[f"{split}_images"] = images[rows]
            arrays[f"{split}_labels"] = np.array([keys[i][1] for i in rows], dtype=np.int64)
        return arrays

    def _looked_for(self) -> str:
        return self.spec.title if self.spec.classes else "dataset"

    def _or_batches(self) -> str:
        return f", or the {self.spec.batches_dir} files" if self.spec.has_batches else ""


def _named(classes: tuple[str, ...], shown: int = 20) -> str:
    """The class names for a one-line message: the first ``shown`` of a long list, and how
    many; a name with control characters as its repr."""
    names = [c if c.isprintable() else repr(c) for c in classes[:shown]]
    more = f", ... ({len(classes):,} in all)" if len(classes) > shown else ""
    return ", ".join(names) + more


def _folder_classes(found: Counter) -> tuple[str, ...]:
    """An open tree's classes: its folder names, sorted; CIFAR-10's ten keep their order, so
    a CIFAR-10 copy as image folders keeps the labels of the official batches."""
    if set(found) == set(CIFAR10.classes):
        return CIFAR10.classes
    return tuple(sorted(found))


def _with_suggestion(folder: str, classes: tuple[str, ...]) -> str:
    close = difflib.get_close_matches(folder.lower(), classes, n=1, cutoff=0.6)
    return f"{folder!r} (did you mean {close[0]!r}?)" if close else repr(folder)


def _natural_key(name: str) -> list:
    """'img10.png' after 'img9.png': digits compare as numbers."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


class ImageDecoder:
    """Decodes images in chunks, in worker processes once there is enough work to share.

    Chunks are handed out while the source is still being read, so reading a compressed archive
    and decoding overlap. Results keep the order in which images were added.
    """

    def __init__(self, label: str, spec: DatasetSpec, *, progress: bool,
                 chunk: int | None = None) -> None:
        self.label = label
        self.spec = spec
        self.image_size = spec.image_size
        self.chunk = chunk or _DECODE_CHUNK
        self.names: list[str] = []
        self.blobs: list[bytes] = []
        self.results: list = []  # per chunk: a decoded array, or (future, names, blobs)
        self.executor = None
        self.pool_failed = _worker_count() < 2
        self.progress = progress
        self.started = False
        self.bar = None

    def __enter__(self) -> ImageDecoder:
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
            return np.empty((0, self.image_size, self.image_size, 3), dtype=np.uint8)
        return np.concatenate(decoded)

    def _dispatch(self) -> None:
        if not self.blobs:
            return
        names, blobs = self.names, self.blobs
        self.names, self.blobs = [], []
        if not self.started:  # the first chunk tells whether a pool is worth starting
            self.started = True
            self._start_pool_if_useful(len(blobs))
            self.bar = progress_bar(self.progress, desc=f"decoding {Path(self.label).name}",
                                     unit=" images")
        if self.executor is None:
            self.results.append(self._decode_here(names, blobs))
            return
        future = self.executor.submit(_decode_chunk, self.label, names, blobs, self.spec)
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
        images = _decode_chunk(self.label, names, blobs, self.spec)
        if self.bar is not None:
            self.bar.update(len(blobs))
        return images


def _decode_chunk(label: str, names: list[str], blobs: list[bytes],
                  spec: DatasetSpec) -> np.ndarray:
    """Decode and resize images (run in a worker process): uint8 (N, size, size, 3)."""
    size = spec.image_size
    out = np.empty((len(blobs), size, size, 3), dtype=np.uint8)
    for i, (name, blob) in enumerate(zip(names, blobs, strict=True)):
        out[i] = _decode_image(blob, f"{label}: {name}", spec)
    return out


def _decode_image(blob: bytes, name: str, spec: DatasetSpec) -> np.ndarray:
    """One image file -> RGB uint8 (size, size, 3); DataError naming the file.

    Where the dataset's images have one native size, the size is read from the header first,
    so no image of another size is decoded: a few kilobytes of PNG could otherwise decode to
    megapixels in each worker. Other images are bounded by :data:`_MAX_TREE_PIXELS`.
    """
    try:
        if spec.native_size is not None:
            width, height, _ = image_header(blob, name=name)
            if (width, height) != (spec.native_size, spec.native_size):
                raise DataError(f"{name} is {width}x{height} pixels; {spec.title} images are "
                                f"{spec.native_size}x{spec.native_size}")
        # The same path as predict and serve, so a model sees its images alike everywhere.
        return load_cifar_array(blob, name=name, max_pixels=_MAX_TREE_PIXELS,
                                size=spec.image_size)
    except ImageError as exc:
        raise DataError(str(exc)) from None


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
