"""Hardened reading of zip and tar archives: one checked pass over the members, capped reads."""

from __future__ import annotations

import bz2
import contextlib
import functools
import gzip
import io
import lzma
import re
import stat
import tarfile
import zipfile
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path

from cifar_inception.data.common import MAX_ARCHIVE_MEMBERS, MAX_UNPACKED_BYTES, one_line
from cifar_inception.errors import DataError

__all__ = ["STREAM_ERRORS", "FileEntry", "archive_error", "archive_files", "archive_type",
           "extract_member", "read_capped", "tar_members"]

_ARCHIVE_SUFFIXES = {".zip": "zip", ".tar": "tar", ".tgz": "tar", ".tar.gz": "tar",
                     ".tar.bz2": "tar", ".tar.xz": "tar"}
# What a truncated or corrupt tar, gzip or zip stream raises while it is read.
STREAM_ERRORS = (tarfile.TarError, zipfile.BadZipFile, EOFError, zlib.error, OSError,
                  RuntimeError, NotImplementedError, ValueError)

# (path parts, size in bytes as listed, a function returning the content given a byte limit)
FileEntry = tuple[tuple[str, ...], int, Callable[[int], bytes]]
_READ_CHUNK = 1 << 16


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
            raise DataError(f"{label}: more than {limit:,} bytes, too large for a small-image "
                            "dataset")
    return b"".join(parts)


def archive_type(path: Path) -> str | None:
    name = path.name.lower()
    for suffix, kind in _ARCHIVE_SUFFIXES.items():
        if name.endswith(suffix):
            return kind
    return None


def archive_files(path: Path) -> Iterator[FileEntry]:
    """Regular files of a zip or tar, in archive order; read each before asking for the next."""
    if archive_type(path) == "zip":
        return _zip_files(path)
    return _tar_files(path)


def _tar_files(path: Path) -> Iterator[FileEntry]:
    label = str(path)
    for tar, member, parts in tar_members(path, label):
        if member.isreg():
            yield parts, member.size, functools.partial(_read_tar_member, tar, member,
                                                        f"{label}: {member.name}")


def tar_members(path: Path,
                 label: str) -> Iterator[tuple[tarfile.TarFile, tarfile.TarInfo, tuple[str, ...]]]:
    """One forward pass over a tar's members, each checked before anyone may read or write it.

    Yields ``(tar, member, path parts)`` for regular files and folders, in archive order; a
    name that points outside the archive's folder, a link, a device or another special file
    raises :class:`DataError` instead. After the last member the end of the archive is checked,
    so a truncated or corrupt stream is an error too. Reading files out of an archive and
    extracting the official one both walk the members through here; handle each member before
    asking for the next.
    """
    try:
        with _open_tar(path) as (stream, tar):
            for count, member in enumerate(tar, start=1):
                _check_bounds(count, member.offset_data + member.size, label)
                parts = _member_parts(member.name, label)
                _refuse_special_member(member, label)
                yield tar, member, parts
            _check_tar_end(stream, tar, label)
    except DataError:
        raise
    except STREAM_ERRORS as exc:
        raise archive_error(label, exc) from None


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


def extract_member(tar: tarfile.TarFile, member: tarfile.TarInfo, dest: Path) -> None:
    # The member walk already refuses what the "data" filter refuses; the filter is a second
    # line of defence where this Python has it.
    if hasattr(tarfile, "data_filter"):
        tar.extract(member, dest, filter="data")
    else:  # pragma: no cover - Python without extraction filters
        tar.extract(member, dest)


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
        _check_bounds(0, stream.raw.tell(), label)


def _check_bounds(members: int, unpacked_bytes: int, label: str) -> None:
    """Refuse an archive past :data:`MAX_ARCHIVE_MEMBERS` members or, unpacked up to the end
    of a member, past :data:`MAX_UNPACKED_BYTES`: known from the headers, before the bytes
    are read (a zip's members are read only when wanted, so for a zip only the count)."""
    if members > MAX_ARCHIVE_MEMBERS:
        raise DataError(f"{label}: holds more than {MAX_ARCHIVE_MEMBERS:,} members, far more "
                        "than a dataset of small images")
    if unpacked_bytes > MAX_UNPACKED_BYTES:
        raise DataError(f"{label}: unpacks to more than {MAX_UNPACKED_BYTES / 2**30:.0f} GiB, "
                        "far more than a dataset of small images")


def archive_error(label: str, exc: BaseException) -> DataError:
    if isinstance(exc, (PermissionError, FileNotFoundError, IsADirectoryError)):
        return DataError(f"{label}: cannot read ({exc.strerror or exc})")
    return DataError(f"{label}: truncated or corrupt archive ({one_line(exc)})")


def _read_tar_member(tar: tarfile.TarFile, member: tarfile.TarInfo, label: str,
                     limit: int) -> bytes:
    try:
        handle = tar.extractfile(member)
        data = read_capped(handle, limit, label) if handle is not None else b""
    except STREAM_ERRORS as exc:
        raise DataError(f"{label}: truncated or corrupt archive ({one_line(exc)})") from None
    if len(data) != member.size:
        raise DataError(f"{label}: truncated archive (the member is cut short)")
    return data


def _zip_files(path: Path) -> Iterator[FileEntry]:
    label = str(path)
    try:
        archive = zipfile.ZipFile(path)
    except (PermissionError, FileNotFoundError, IsADirectoryError) as exc:
        raise archive_error(label, exc) from None
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as exc:
        raise DataError(f"{label}: not a zip file, or a truncated one "
                        f"({one_line(exc)})") from None
    with archive:
        _check_bounds(len(archive.infolist()), 0, label)
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
    except STREAM_ERRORS as exc:
        raise DataError(f"{label}: corrupt or truncated member ({one_line(exc)})") from None
