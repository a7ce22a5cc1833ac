"""The one exception type the command line turns into a one-line message.

Every module raises :class:`CifarInceptionError` (or a subclass) for bad input that the user
can fix: a missing data folder, a corrupt archive, an unknown model name. The CLI prints
``error: <message>`` and exits with status 2. An ``OSError`` (a full disk, a path that is a
file, no permission) is printed the same way with status 1, and Ctrl-C exits with 130;
anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator


class CifarInceptionError(Exception):
    """A problem with the user's input or environment, reported as one line."""


class DataError(CifarInceptionError):
    """The data set could not be found, downloaded, verified or decoded."""


class ModelError(CifarInceptionError):
    """Unknown model name, bad option, or an input of the wrong shape."""


class TrainingError(CifarInceptionError):
    """A run that cannot start or go on: diverged loss, impossible resume, too little data."""


class CheckpointError(CifarInceptionError):
    """A checkpoint that is missing, unsafe, corrupt, or for another model."""


@contextlib.contextmanager
def needs_extra(extra: str, what: str) -> Iterator[None]:
    """Turn a missing optional dependency, imported inside the block, into one line that
    names the extra to install: ``pip install 'cifar-inception[serve]'``."""
    try:
        yield
    except ModuleNotFoundError as exc:
        if (exc.name or "").startswith("cifar_inception"):
            raise  # our own module missing is a bug, not an extra to install
        raise CifarInceptionError(
            f"{what} needs the optional package {exc.name!r}, part of the [{extra}] extra: "
            f"pip install 'cifar-inception[{extra}]'") from None


def describe_os_error(exc: OSError) -> str:
    """``No space left on device: runs/x/.last.pt.tmp``, rather than errno numbers."""
    if exc.strerror is None:
        return str(exc)
    names = [str(n) for n in (exc.filename, exc.filename2) if n is not None]
    return exc.strerror + (f": {' -> '.join(names)}" if names else "")
