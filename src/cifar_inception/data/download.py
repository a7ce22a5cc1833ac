"""Fetching the official archive: download with progress and MD5 verification, safe extraction."""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from cifar_inception.data.archives import (
    STREAM_ERRORS,
    archive_error,
    extract_member,
    tar_members,
)
from cifar_inception.data.batches import check_batches_folder, has_all_batches
from cifar_inception.data.common import MAX_BATCH_BYTES, one_line, progress_bar
from cifar_inception.data.specs import CIFAR10, DatasetSpec
from cifar_inception.errors import DataError

__all__ = ["MAX_ARCHIVE_DOWNLOAD_BYTES", "download_cifar10", "download_dataset",
           "extract_official_archive", "fetch_file"]

# The most a dataset's archive download may bring (the official CIFAR archives are 161 to
# 163 MB): the hash is checked only at the end, and a server may stream without end.
MAX_ARCHIVE_DOWNLOAD_BYTES = 1 << 30

# A download slower than this for this long is stalled, and stopped (as curl's --speed-limit
# and --speed-time): each read's own timeout cannot see a server that trickles a byte at a
# time, and a download that never ends is a hang.
MIN_DOWNLOAD_BYTES_PER_S = 1024
SLOW_DOWNLOAD_S = 60.0

T = TypeVar("T")


def download_dataset(spec: DatasetSpec, folder: str | os.PathLike, *, url: str | None = None,
                     md5: str | None = None, progress: bool = True) -> Path:
    """Download ``spec``'s official archive into ``folder`` and return its path.

    The file arrives under a temporary name and is renamed only once its MD5 matches; a
    mismatching or broken download is removed. ``url`` defaults to the spec's mirror
    variable (``$CIFAR_INCEPTION_URL`` for CIFAR-10), else the data set's home page.
    """
    if spec.url is None:
        raise DataError(f"{spec.title} has nothing to download; pass --data-dir PATH")
    mirror = os.environ.get(spec.url_env) if spec.url_env else None
    return fetch_file(
        url or mirror or spec.url, folder, name=spec.archive_name,
        known_hash=f"md5:{md5 or spec.md5}", what=spec.title, progress=progress,
        max_bytes=MAX_ARCHIVE_DOWNLOAD_BYTES,
        advice=f"without internet, fetch {spec.archive_name} (or an image-folder copy) "
               "elsewhere and pass --data-dir PATH")


def download_cifar10(folder: str | os.PathLike, *, url: str | None = None,
                     md5: str | None = None, progress: bool = True) -> Path:
    """Download the official CIFAR-10 archive into ``folder`` (see :func:`download_dataset`)."""
    return download_dataset(CIFAR10, folder, url=url, md5=md5, progress=progress)


def fetch_file(url: str, folder: str | os.PathLike, *, name: str, known_hash: str, what: str,
               advice: str, max_bytes: int, progress: bool = True) -> Path:
    """Download ``url`` into ``folder``/``name`` unless a file with that hash is there.

    ``known_hash`` is ``md5:HEX`` or ``sha256:HEX``. The file arrives under a temporary name
    and is renamed only once its hash matches; a mismatching or broken download is removed,
    and so is one that passes ``max_bytes`` (stopped there: the hash is known only at the
    end, and a server may send without end) or that stalls (under
    :data:`MIN_DOWNLOAD_BYTES_PER_S` for :data:`SLOW_DOWNLOAD_S`). Every failure is a one-line
    :class:`DataError` that ends with ``advice``.
    """
    import pooch

    folder = Path(folder)
    if not url.lower().startswith(("http://", "https://")):
        raise DataError(f"the download address must start with http:// or https://: {url}")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DataError(f"cannot create the folder {folder}: {exc.strerror or exc}") from None
    bar = _DownloadBar(desc=f"downloading {name}") if progress else None
    logger = pooch.get_logger()
    level = logger.level
    logger.setLevel(logging.WARNING)  # our own bar says what happens
    watch = _PaceWatch(MIN_DOWNLOAD_BYTES_PER_S, SLOW_DOWNLOAD_S)
    failure = _Failure(url, folder, what=what, advice=advice, known_hash=known_hash,
                       max_bytes=max_bytes, watch=watch)
    try:
        with failure.as_data_error():
            path = watch.run(lambda: pooch.retrieve(
                url, known_hash=known_hash, fname=name, path=folder,
                downloader=_capped_download(max_bytes, bar, watch)))
    finally:
        logger.setLevel(level)
        if bar is not None:
            bar.close()
    return Path(path)


def extract_official_archive(archive: str | os.PathLike, folder: str | os.PathLike,
                             spec: DatasetSpec = CIFAR10) -> Path:
    """Extract ``spec``'s batches folder from its official archive into ``folder``, safely.

    Every member is checked before it is written: absolute names, ``..``, links and devices
    are refused. Extraction goes to a temporary folder that is renamed into place at the end.
    """
    archive, folder = Path(archive), Path(folder)
    target = folder / spec.batches_dir
    label = str(archive)
    try:
        scratch = Path(tempfile.mkdtemp(prefix=f".{spec.name}-extract-", dir=folder))
    except OSError as exc:
        raise DataError(f"cannot extract {label} into {folder}: {exc.strerror or exc}") from None
    try:
        try:
            with contextlib.closing(tar_members(archive, label)) as members:
                for tar, member, parts in members:
                    if not parts or parts[0] != spec.batches_dir:
                        continue  # not part of the data set: left out
                    if member.isreg() and member.size > MAX_BATCH_BYTES:
                        raise DataError(f"{label}: {member.name} is {member.size:,} bytes, too "
                                        f"large for a {spec.title} batch")
                    extract_member(tar, member, scratch)
        except DataError:
            raise
        except STREAM_ERRORS as exc:  # while a member was written out
            raise archive_error(label, exc) from None
        check_batches_folder(scratch / spec.batches_dir, label, spec)
        try:
            (scratch / spec.batches_dir).rename(target)
        except OSError as exc:
            if not has_all_batches(target, spec):  # else another process got there first
                raise DataError(f"cannot create {target}: {exc.strerror or exc}") from None
    finally:
        shutil.rmtree(scratch, ignore_errors=True)  # our own scratch folder only
    return target


@dataclass(frozen=True)
class _Failure:
    """What a download was, for saying in one line why it failed."""

    url: str
    folder: Path
    what: str
    advice: str
    known_hash: str
    max_bytes: int
    watch: _PaceWatch

    @contextlib.contextmanager
    def as_data_error(self) -> Iterator[None]:
        """Whatever the download raises leaves as one :class:`DataError`."""
        import requests

        url, advice = self.url, self.advice
        try:
            yield
        except _Stalled:
            raise DataError(f"the download from {url} stalled (under "
                            f"{self.watch.min_rate:,} bytes a second for "
                            f"{self.watch.window:g} s) and was removed; try again, or "
                            f"{advice}") from None
        except _TooLarge:
            raise DataError(f"the download from {url} passed {self.max_bytes:,} bytes, more "
                            f"than {self.what} can be; it was stopped and removed; "
                            f"{advice}") from None
        except ValueError as exc:
            if "does not match" in str(exc):
                kind, _, expected = self.known_hash.partition(":")
                got = re.search(r"got ([0-9a-f]{32,64})", str(exc))
                raise DataError(
                    f"the file downloaded from {url} failed the {kind.upper()} check "
                    f"(expected {expected}{', got ' + got.group(1) if got else ''}) and was "
                    f"removed; try again, or {advice}") from None
            raise DataError(f"cannot download {url}: {one_line(exc)}") from None
        except requests.exceptions.HTTPError as exc:
            answer = exc.response.status_code if exc.response is not None else exc
            raise DataError(f"cannot download {url}: the server answered {answer}; "
                            f"{advice}") from None
        except requests.exceptions.ChunkedEncodingError:
            raise DataError(f"the download from {url} was cut short (truncated) and was "
                            f"removed; try again, or {advice}") from None
        except (requests.exceptions.ConnectionError, requests.exceptions.Timeout) as exc:
            raise DataError(f"cannot download {self.what} from {url}: network unreachable "
                            f"({_root_cause(exc)}); {advice}") from None
        except requests.exceptions.RequestException as exc:
            raise DataError(f"cannot download {url}: {one_line(exc)}; {advice}") from None
        except OSError as exc:  # after requests' errors, which are OSErrors too: saving failed
            raise DataError(f"cannot save the download in {self.folder}: "
                            f"{exc.strerror or exc}") from None


class _TooLarge(Exception):
    """A download passed its size limit (caught in :func:`fetch_file`)."""


class _Stalled(Exception):
    """A download went on too slowly for too long (caught in :func:`fetch_file`)."""


class _PaceWatch:
    """Runs a download in a thread of its own and abandons it when it brings under
    ``min_rate`` bytes a second for ``window`` seconds (a read blocked on a trickling socket
    cannot be interrupted; a thread waiting on it can be left behind). The abandoned
    download's file is removed at once, and its thread ends at its next write.
    """

    def __init__(self, min_rate: int, window: float) -> None:
        self.min_rate, self.window = min_rate, window
        self.written = 0  # bytes so far, set by the download's writes
        self.output_file: str | None = None  # its temporary file, set by the downloader
        self.abandoned = False

    def run(self, download: Callable[[], T]) -> T:
        """``download()``'s result or error; :class:`_Stalled` when it fell behind."""
        outcome: dict[str, Any] = {}
        # Waited for with an Event, not Thread.join: a join that Ctrl-C interrupts can leave
        # the thread marked as ended while it still runs (Python 3.11).
        finished = threading.Event()

        def work() -> None:
            try:
                outcome["result"] = download()
            except BaseException as exc:  # handed to the waiting thread, raised there
                outcome["error"] = exc
            finally:
                finished.set()

        threading.Thread(target=work, name="download", daemon=True).start()
        try:
            self._wait(finished)
        finally:
            if not finished.is_set():  # stalled, or Ctrl-C: nothing of it may stay on disk
                self.abandoned = True
                if self.output_file is not None:
                    with contextlib.suppress(OSError):
                        os.remove(self.output_file)
        if "error" in outcome:
            raise outcome["error"]
        return outcome["result"]

    def _wait(self, finished: threading.Event) -> None:
        since, written_then = time.monotonic(), self.written
        while not finished.wait(min(1.0, self.window)):
            now = time.monotonic()
            if self.written - written_then >= self.min_rate * self.window:
                since, written_then = now, self.written  # it kept the pace: a new window
            elif now - since >= self.window:
                raise _Stalled


class _CappedFile:
    """The file a download is written to, refusing to grow past ``limit`` bytes; it tells
    ``watch`` how much has arrived."""

    def __init__(self, raw, limit: int, watch: _PaceWatch) -> None:  # noqa: ANN001
        self.raw, self.limit, self.watch = raw, limit, watch

    def write(self, chunk: bytes) -> int:
        if self.watch.abandoned:
            raise _Stalled  # ends the download's thread; nobody waits for it any more
        self.watch.written += len(chunk)  # the one count: the watch reads it for the pace
        if self.watch.written > self.limit:
            raise _TooLarge
        return self.raw.write(chunk)

    def flush(self) -> None:
        self.raw.flush()


def _capped_download(limit: int, bar: _DownloadBar | None, watch: _PaceWatch):  # noqa: ANN202
    """A pooch downloader that writes through :class:`_CappedFile` and lets ``watch`` stop
    a stalled connection (pooch removes the temporary file when it raises)."""
    import pooch

    http = pooch.HTTPDownloader(progressbar=bar if bar is not None else False)

    def download(url: str, output_file: str, known: object) -> None:
        watch.output_file = output_file
        with open(output_file, "w+b") as raw:
            http(url, _CappedFile(raw, limit, watch), known)

    return download


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
        self.bar = progress_bar(True, total=value or None, unit="B", unit_scale=True,
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
