"""Finding a dataset in a folder or file, checksumming it (remembered), and decoding it to arrays.

What a source may hold is a :class:`Wanted`: the official batches of one dataset spec, or an
image-folder tree read as another.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cifar_inception.data.archives import FileEntry, archive_files, archive_type, read_capped
from cifar_inception.data.batches import check_batches_folder, parse_batches
from cifar_inception.data.cache import cache_dir
from cifar_inception.data.common import (
    ENV_DATA,
    MAX_BATCH_BYTES,
    MAX_IMAGE_BYTES,
    MAX_SOURCE_BYTES,
    SPLITS,
    check_decoded_size,
)
from cifar_inception.data.specs import DatasetSpec
from cifar_inception.data.trees import ImageDecoder, TreeLayout
from cifar_inception.errors import DataError
from cifar_inception.fileio import atomic_write_json

__all__ = ["Decoded", "Source", "Wanted", "decode_source", "find_source", "source_checksum"]

# ---------------------------------------------------------------------------------------------
# Finding the source


@dataclass(frozen=True)
class Source:
    kind: str   # "batches" (an official batches folder), "archive" (a file), "images" (a folder)
    path: Path


@dataclass(frozen=True)
class Wanted:
    """What a source may be: ``batches``' official files (None: never), or a tree read as
    ``tree`` (whose classes, when it names none, are the folder names)."""

    batches: DatasetSpec | None
    tree: DatasetSpec

    @property
    def title(self) -> str:
        return (self.batches or self.tree).title

    def cache_key(self) -> str:
        keys = [spec.cache_key() if spec else "" for spec in (self.batches, self.tree)]
        return hashlib.sha256("/".join(keys).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Decoded:
    arrays: dict[str, np.ndarray]
    layout: str                 # "batches" or "images"
    classes: tuple[str, ...]


def find_source(root: Path, explicit: bool, wanted: Wanted) -> Source | None:
    """What ``root`` holds, or None when it is a folder with nothing yet (download there)."""
    if root.is_file():
        if archive_type(root) is None:
            raise DataError(f"{root} is neither a folder nor a .zip, .tar or .tar.gz archive")
        return Source("archive", root)
    if not root.exists():
        if explicit:
            raise DataError(f"{root} does not exist (point --data-dir or ${ENV_DATA} at a "
                            f"{wanted.title} copy, or at an existing folder to download it "
                            "into)")
        return None
    if not root.is_dir():
        raise DataError(f"{root} is neither a folder nor a file")
    spec = wanted.batches
    if spec is not None:
        for folder in (root / spec.batches_dir, root):
            if any((folder / name).exists() for name in spec.batch_files):
                check_batches_folder(folder, str(folder), spec)
                return Source("batches", folder)
        if (root / spec.archive_name).is_file():
            return Source("archive", root / spec.archive_name)
    tree = _find_tree_root(root)
    return Source("images", tree) if tree is not None else None


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


# ---------------------------------------------------------------------------------------------
# Decoding: the official batches and image-folder trees, from one stream of files


def decode_source(source: Source, wanted: Wanted, *, progress: bool) -> Decoded:
    label = str(source.path)
    if source.kind == "batches":
        spec = wanted.batches
        budget = _ReadBudget(label)
        blobs = {name: budget.charge(_read_file(source.path / name, f"{label}: {name}",
                                                MAX_BATCH_BYTES))
                 for name in spec.batch_files}
        return _batches_decoded(blobs, label, spec)
    if source.kind == "images":
        files = ((tuple(rel.split("/")), size,
                  functools.partial(_read_file, path, f"{label}: {rel}"))
                 for rel, path, size, _ in _folder_tree_listing(source.path))
        return _read_entries(files, label, wanted, progress=progress)
    return _read_entries(archive_files(source.path), label, wanted, progress=progress)


def _batches_decoded(blobs: dict[str, bytes], label: str, spec: DatasetSpec) -> Decoded:
    arrays, classes = parse_batches(blobs, label, spec)
    check_decoded_size(sum(len(arrays[f"{split}_images"]) for split in SPLITS), spec.image_size,
                       label)
    return Decoded(_resized(arrays, spec.image_size), "batches", classes)


def _resized(arrays: dict[str, np.ndarray], size: int) -> dict[str, np.ndarray]:
    """The official 32x32 images at another ``size``, resized as any other image is."""
    from PIL import Image

    from cifar_inception.images import to_cifar_array

    for split in SPLITS:
        images = arrays[f"{split}_images"]
        if images.shape[1:3] != (size, size):
            arrays[f"{split}_images"] = np.stack(
                [to_cifar_array(Image.fromarray(image), size) for image in images]) \
                if len(images) else np.empty((0, size, size, 3), dtype=np.uint8)
    return arrays


def _read_entries(files: Iterable[FileEntry], label: str, wanted: Wanted, *,
                  progress: bool) -> Decoded:
    """Sort a stream of files into official batches or an image tree, decoding as they come."""
    batch_files = wanted.batches.batch_files if wanted.batches is not None else ()
    batches: dict[str, bytes] = {}
    layout = TreeLayout(label, wanted.tree)
    budget = _ReadBudget(label)
    seen: set[tuple[str, ...]] = set()
    with ImageDecoder(label, wanted.tree, progress=progress) as decoder:
        for parts, size, read in files:
            if not parts:
                continue
            if parts in seen:  # a tar may hold a name twice; which copy is meant is unknown
                raise DataError(f"{label}: holds {'/'.join(parts)!r} twice; refusing an "
                                "archive with duplicate members")
            seen.add(parts)
            if len(parts) <= 2 and parts[-1] in batch_files:
                if size > MAX_BATCH_BYTES:
                    raise DataError(f"{label}: {'/'.join(parts)} is {size:,} bytes, too large "
                                    f"for a {wanted.batches.title} batch")
                budget.check(size)
                batches[parts[-1]] = budget.charge(read(MAX_BATCH_BYTES))
                continue
            if layout.add(parts) and layout.healthy:
                if size > MAX_IMAGE_BYTES:
                    raise DataError(f"{label}: {'/'.join(parts)} is {size:,} bytes, too large "
                                    "for a small image")
                budget.check(size)
                check_decoded_size(layout.count, wanted.tree.image_size, label)
                decoder.add("/".join(parts), budget.charge(read(MAX_IMAGE_BYTES)))
        if batches:
            spec = wanted.batches
            if layout.count:
                raise DataError(f"{label}: holds both {spec.title} batch files and image "
                                "folders; use one or the other")
            missing = [name for name in spec.batch_files if name not in batches]
            if missing:
                raise DataError(f"{label}: incomplete {spec.title} batches, missing "
                                f"{', '.join(missing)}")
            return _batches_decoded(batches, label, spec)
        classes = layout.check()
        return Decoded(layout.assemble(decoder.finish(), classes), "images", classes)


class _ReadBudget:
    """Bytes read from one source, all its files together, within :data:`MAX_SOURCE_BYTES`.

    Sizes are checked as declared before a file is read, and as read after (an archive's
    sizes are its own word), so at most one capped file more is ever held.
    """

    def __init__(self, label: str) -> None:
        self.label, self.limit, self.total = label, MAX_SOURCE_BYTES, 0

    def check(self, size: int) -> None:
        if self.total + size > self.limit:
            raise DataError(f"{self.label}: its files total more than {self.limit:,} bytes, "
                            "far more than a dataset of small images takes")

    def charge(self, data: bytes) -> bytes:
        self.check(len(data))
        self.total += len(data)
        return data


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


# ---------------------------------------------------------------------------------------------
# Checksums, remembered by path, size and modification time

_CHECKSUM = re.compile(r"sha256:[0-9a-f]{64}")
_MAX_MEMO_BYTES = 1 << 20  # 200 remembered sources take about 60 KB


def source_checksum(source: Source, wanted: Wanted) -> str:
    if source.kind == "archive":
        stats = [("", source.path, _stat(source.path))]
    elif source.kind == "batches":
        stats = [(name, source.path / name, _stat(source.path / name))
                 for name in wanted.batches.batch_files]
    else:
        stats = [(rel, path, st) for rel, path, _, st in _folder_tree_listing(source.path)]
    # The inode's change time too: `cp -p`, `rsync -t` or `tar x` give other bytes the old
    # size and modification time, but no program can set the change time.
    fingerprint = hashlib.sha256(json.dumps(
        [(rel, st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino)
         for rel, _, st in stats]).encode()).hexdigest()
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
            # The name's bytes as on disk: a name that is not valid UTF-8 arrives with
            # surrogate escapes, which str.encode() refuses.
            digest.update(os.fsencode(rel) + b"\0")
        try:
            with open(path, "rb") as handle:
                for block in iter(lambda: handle.read(1 << 20), b""):
                    digest.update(block)
        except OSError as exc:
            raise DataError(f"{label}: cannot read {path}: {exc.strerror or exc}") from None
    return digest.hexdigest()


def _read_memo(path: Path) -> dict:
    """The remembered checksums; anything damaged is forgotten (they are only a speed-up).

    The file is read with a size bound, a nesting too deep for the parser is damage, and
    only entries of the form this module writes are kept: a checksum becomes part of a
    cache file's name.
    """
    try:
        with open(path, "rb") as handle:
            text = handle.read(_MAX_MEMO_BYTES + 1)
        memo = json.loads(text) if len(text) <= _MAX_MEMO_BYTES else None
    except (OSError, ValueError, RecursionError):
        return {}
    if not isinstance(memo, dict):
        return {}
    return {key: entry for key, entry in memo.items() if _is_memo_entry(entry)}


def _is_memo_entry(entry: object) -> bool:
    return (isinstance(entry, dict) and isinstance(entry.get("fingerprint"), str)
            and isinstance(entry.get("checksum"), str)
            and _CHECKSUM.fullmatch(entry["checksum"]) is not None)


def _stat(path: Path) -> os.stat_result:
    try:
        return path.stat()
    except OSError as exc:
        raise DataError(f"cannot read {path}: {exc.strerror or exc}") from None
