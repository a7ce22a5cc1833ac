"""The run folder: what a training run writes there, and the rules that keep it whole.

A run folder holds ``config.json`` (how the run was made), ``metrics.jsonl`` (one line per
epoch), ``last.pt`` (the state to resume from), ``best.pt`` and ``eval.json``. The rules:

- one process at a time trains in a folder: an advisory lock (``.lock``) that the kernel
  drops when its process ends, so even a kill -9 leaves no stale lock behind;
- a folder whose run died before its first ``last.pt`` is no dead end: the same command, or
  ``--resume``, starts that run again from its ``config.json``;
- temporary files left by a kill during an atomic write are removed when a run opens the
  folder, and malformed lines or records (a torn line, a hand edit) are dropped with a
  warning instead of stopping the run.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cifar_inception.errors import TrainingError
from cifar_inception.fileio import atomic_write_text, read_jsonl

CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.jsonl"
LAST, BEST = "last.pt", "best.pt"
EVAL_FILE = "eval.json"
LOCK_FILE = ".lock"
# What a run writes; a folder holding only these (and no last.pt) may be started again.
RUN_FILES = (CONFIG_FILE, METRICS_FILE, LAST, BEST, EVAL_FILE, LOCK_FILE)

Warn = Callable[[str], None]


class RunFolderError(TrainingError):
    """A run folder that is in use, or that cannot be continued or started again."""


@dataclass(frozen=True)
class ResumeTarget:
    """The folder of a run to continue, and its ``last.pt`` (None: nothing saved yet)."""

    folder: Path
    last: Path | None


def resume_target(run: str | os.PathLike) -> ResumeTarget:
    """What ``--resume RUN`` points at: a run folder, or a ``last.pt`` inside one."""
    path = Path(run)
    if path.is_file():
        return ResumeTarget(path.parent, path)
    if path.is_dir():
        if (path / LAST).is_file():
            return ResumeTarget(path, path / LAST)
        if (path / CONFIG_FILE).is_file():  # died in its first epoch: start it again
            return ResumeTarget(path, None)
    raise RunFolderError(f"{run}: nothing to resume (no {LAST})")


def new_run_folder(out_dir: str | os.PathLike, name: str | None, model: str) -> Path:
    """The folder of a new run: ``out_dir/name``, or ``out_dir/MODEL-DATE-TIME`` unnamed.

    A named folder that already holds a run with a ``last.pt`` is refused (continue it with
    --resume); one whose run never saved a ``last.pt`` is taken over and started again.
    """
    root = Path(out_dir)
    if name:
        path = root / name
        if path.is_dir() and any(path.iterdir()):
            if (path / LAST).exists():
                raise RunFolderError(f"run folder {path} already exists; continue it with "
                                     f"--resume {path}, or choose another --name")
            foreign = sorted(p.name for p in path.iterdir()
                             if p.name not in RUN_FILES and not is_temporary(p.name))
            if foreign:
                raise RunFolderError(f"{path} exists and holds files that are not a run's "
                                     f"({', '.join(foreign[:3])}); choose another --name")
    else:
        base = f"{model}-{time.strftime('%Y%m%d-%H%M%S')}"
        path, count = root / base, 2
        while path.exists():
            path, count = root / f"{base}-{count}", count + 1
    path.mkdir(parents=True, exist_ok=True)
    return path


def clear_for_restart(folder: Path) -> None:
    """Remove what a run that is started again would otherwise mix with its new results."""
    for name in (METRICS_FILE, BEST, EVAL_FILE):
        (folder / name).unlink(missing_ok=True)


# --- one process per folder


@contextmanager
def locked(folder: Path) -> Iterator[None]:
    """Hold the folder's lock for the block, or refuse at once if another process holds it."""
    try:
        import fcntl
    except ImportError:  # no advisory locks on this platform: nothing to hold
        yield
        return
    with open(folder / LOCK_FILE, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip()
            who = f" (process {holder})" if holder.isdigit() else ""
            raise RunFolderError(f"{folder} is in use by another training run{who}; wait for "
                                 f"it to end, or stop it") from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


# --- leftovers of a kill


def is_temporary(name: str) -> bool:
    """A temporary file of :func:`cifar_inception.fileio.atomic_open` for one of our files."""
    return name.endswith(".tmp") and any(name.startswith(f".{f}.") for f in RUN_FILES)


def remove_temporaries(folder: Path) -> int:
    """Delete the temporaries a kill during a write left behind; how many there were.

    Called with the folder's lock held, so no live writer owns them."""
    stale = [p for p in folder.iterdir() if is_temporary(p.name) and p.is_file()]
    for path in stale:
        path.unlink(missing_ok=True)
    return len(stale)


# --- records that a crash or a hand edit may have broken


def read_record(folder: Path, warn: Warn) -> dict | None:
    """config.json as a dict with a list of resumes, or None (with a warning) if it is not."""
    path = folder / CONFIG_FILE
    try:
        record = json.loads(path.read_text())
    except FileNotFoundError:
        warn(f"warning: {path} is missing; rebuilding it")
        return None
    except (OSError, ValueError) as exc:
        warn(f"warning: {path} is unreadable ({exc}); rebuilding it")
        return None
    if isinstance(record, dict) and isinstance(record.get("resumed", []), list) \
            and isinstance(record.get("config", {}), dict):
        return record
    warn(f"warning: {path} is not a run record; rebuilding it (the versions and hardware of "
         f"the run's start are lost)")
    return None


def read_history(folder: Path, warn: Warn | None = None) -> list[dict]:
    """The epochs in metrics.jsonl, in order; lines that are not an epoch's row are dropped."""
    path = folder / METRICS_FILE
    if not path.exists():
        return []
    lines = read_jsonl(path)
    rows = [r for r in lines if isinstance(r, dict) and _is_epoch(r.get("epoch"))]
    if warn is not None and len(rows) < len(lines):
        warn(f"warning: {path}: ignored {len(lines) - len(rows)} line(s) that are not an "
             f"epoch's metrics")
    return rows


def _is_epoch(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def truncate_history(folder: Path, epochs_done: int, warn: Warn) -> list[dict]:
    """Keep the rows of the first ``epochs_done`` epochs (a crash may have logged one more
    than its checkpoint holds), once each, and rewrite the file; the rows kept."""
    kept: dict[int, dict] = {}
    for row in read_history(folder, warn):
        if row["epoch"] <= epochs_done:
            kept[row["epoch"]] = row  # a repeated epoch: the later line is the one saved
    rows = [kept[e] for e in sorted(kept)]
    if (folder / METRICS_FILE).exists():
        atomic_write_text(folder / METRICS_FILE, "".join(json.dumps(r) + "\n" for r in rows))
    return rows


# --- the evaluation of a run


def read_eval(folder: str | os.PathLike) -> dict | None:
    """The run folder's eval.json; None when it is missing, unreadable or not a JSON object."""
    try:
        result = json.loads((Path(folder) / EVAL_FILE).read_text())
    except (OSError, ValueError):
        return None
    return result if isinstance(result, dict) else None
