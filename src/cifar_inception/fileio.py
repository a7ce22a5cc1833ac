"""Atomic file writes: a temporary file in the same folder, fsync, then rename; and the one
reader and writer of JSON.

A reader (or a crash) never sees half a file: either the old content or the new one. Only a
regular file (or nothing) is ever replaced: renaming over ``/dev/null`` as root would turn
the device into a file.

JSON is written by :func:`to_json` (NaN and infinities as ``null``, tensors as numbers or
lists, so that what is written is valid JSON) and read by :func:`parse_json`, with bounds on
size, depth and numbers, so that a damaged record is one error, not a RecursionError.
"""

from __future__ import annotations

import json
import math
import os
import stat
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from cifar_inception.errors import CifarInceptionError

# Bounds on a JSON record we read back (config.json, eval.json, metrics.jsonl): far above
# what a run writes, far below what would exhaust memory or the interpreter's stack.
MAX_RECORD_BYTES = 16 << 20
MAX_JSON_DEPTH = 32
MAX_INT_DIGITS = 30
# Tensors and arrays larger than this are described, not written out, in a JSON document.
MAX_JSON_ELEMENTS = 10_000


def check_replaceable(path: str | os.PathLike) -> None:
    """Refuse to replace anything but a regular file: a device, a FIFO or a folder."""
    try:
        mode = os.stat(path).st_mode  # follows a link: what it points to is what we would hit
    except FileNotFoundError:
        return
    if not stat.S_ISREG(mode):
        raise CifarInceptionError(f"{path}: exists and is not a regular file; refusing to "
                                  "replace it (choose another output path)")


@contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "wb") -> Iterator[Any]:
    """Open a temporary sibling of ``path`` for writing; rename it over ``path`` on success."""
    path = Path(path)
    check_replaceable(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, _mode_for(path))
        check_replaceable(path)  # what the caller wrote may have taken a while
        os.replace(tmp, path)
    except BaseException:
        # The destination is untouched; only our own temporary file goes.
        Path(tmp).unlink(missing_ok=True)
        raise


def _mode_for(path: Path) -> int:
    """The permissions of the file a write replaces (a user's private eval.json stays
    private), else those a plain open() would give (mkstemp's are 0600)."""
    try:
        return stat.S_IMODE(os.stat(path).st_mode)
    except FileNotFoundError:
        return 0o666 & ~_current_umask()


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_open(path, "wb") as handle:
        handle.write(data)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_open(path, "w") as handle:
        handle.write(text)


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, to_json(obj, indent=2) + "\n")


def append_jsonl(path: str | os.PathLike, obj: Any) -> None:
    """Append one JSON line; a line is small enough that a crash leaves at worst a torn last line."""
    with open(path, "a") as handle:
        handle.write(to_json(obj) + "\n")
        handle.flush()
        os.fsync(handle.fileno())


# --- JSON out: always valid


def json_safe(value: Any, depth: int = 0) -> Any:
    """``value`` with what JSON cannot hold replaced: NaN and infinities by None, tensors and
    arrays by numbers or lists (a large one by a description), tuples by lists, other
    objects by their text; nesting beyond :data:`MAX_JSON_DEPTH` is cut."""
    if value is None or isinstance(value, (bool, str, int)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if depth >= MAX_JSON_DEPTH:
        return None
    if isinstance(value, dict):
        return {str(k): json_safe(v, depth + 1) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v, depth + 1) for v in value]
    if hasattr(value, "tolist") and hasattr(value, "shape"):  # a tensor or a numpy array
        return _array_to_json(value, depth)
    if hasattr(value, "item"):  # a numpy scalar
        return json_safe(value.item(), depth)
    return str(value)


def _array_to_json(array: Any, depth: int) -> Any:
    shape = tuple(int(n) for n in array.shape)
    if math.prod(shape) > MAX_JSON_ELEMENTS:
        return f"array of shape {shape}"
    return json_safe(array.tolist(), depth)


def to_json(obj: Any, **options: Any) -> str:
    """The JSON text of ``obj`` after :func:`json_safe`: valid JSON, whatever ``obj`` holds."""
    return json.dumps(json_safe(obj), allow_nan=False, **options)


# --- JSON in: bounded


def parse_json(text: str | bytes) -> Any:
    """The value of a JSON document; ValueError (with the reason) when it is not JSON, not
    UTF-8, nested deeper than :data:`MAX_JSON_DEPTH`, or holds a number of more than
    :data:`MAX_INT_DIGITS` digits. NaN and infinities are read as None, as written."""
    if isinstance(text, bytes):
        text = text.decode("utf-8")  # UnicodeDecodeError is a ValueError
    try:
        value = json.loads(text, parse_int=_bounded_int, parse_float=_finite_float,
                           parse_constant=lambda _: None)
    except RecursionError:
        raise ValueError(f"nested deeper than {MAX_JSON_DEPTH} levels") from None
    if _depth_over(value, MAX_JSON_DEPTH):
        raise ValueError(f"nested deeper than {MAX_JSON_DEPTH} levels")
    return value


def _bounded_int(text: str) -> int:
    if len(text.lstrip("-")) > MAX_INT_DIGITS:
        raise ValueError(f"a number of {len(text.lstrip('-')):,} digits")
    return int(text)


def _finite_float(text: str) -> float | None:
    value = float(text)
    return value if math.isfinite(value) else None


def _depth_over(value: Any, limit: int) -> bool:
    """Whether containers in ``value`` nest deeper than ``limit`` (no recursion)."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        children = item.values() if isinstance(item, dict) else item \
            if isinstance(item, list) else ()
        for child in children:
            if isinstance(child, (dict, list)):
                if depth + 1 > limit:
                    return True
                stack.append((child, depth + 1))
    return False


def read_record_bytes(path: str | os.PathLike) -> bytes:
    """A record file's bytes; CifarInceptionError when it is over :data:`MAX_RECORD_BYTES`
    or not a regular file (reading a FIFO would wait forever)."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    with os.fdopen(fd, "rb") as handle:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise CifarInceptionError(f"{path}: not a regular file")
        data = handle.read(MAX_RECORD_BYTES + 1)
    if len(data) > MAX_RECORD_BYTES:
        raise CifarInceptionError(f"{path}: over {MAX_RECORD_BYTES >> 20} MB, not a record "
                                  "this program wrote")
    return data


def read_jsonl(path: str | os.PathLike) -> list[Any]:
    """The value of each line of a JSON-lines file, skipping lines that do not parse (a torn
    last line left by a crash, a damaged one); what the values must be is the caller's to
    check."""
    rows = []
    for line in read_record_bytes(path).splitlines():
        try:
            rows.append(parse_json(line))
        except ValueError:
            continue
    return rows
