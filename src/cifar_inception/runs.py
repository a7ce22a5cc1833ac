"""The run folder: what a training run writes there, and the rules that keep it whole.

A run folder holds ``config.json`` (how the run was made), ``metrics.jsonl`` (one line per
epoch), ``last.pt`` (the state to resume from), ``best.pt`` and ``eval.json``.
:class:`RunFolder` names these files and reads them for everything that uses a finished run
(evaluation, report, export, serving), on top of the functions below. The rules:

- one process at a time trains in a folder: an advisory lock (``.lock``) that the kernel
  drops when its process ends, so even a kill -9 leaves no stale lock behind;
- a folder whose run died before its first ``last.pt`` is no dead end: the same command, or
  ``--resume``, starts that run again from its ``config.json``;
- temporary files left by a kill during an atomic write are removed when a run opens the
  folder, and malformed lines or records (a torn line, a hand edit) are dropped with a
  warning instead of stopping the run;
- what a record says is read in one place: the settings and data folder a run was trained
  on, its best epoch, and whether an eval.json is for a given checkpoint.
"""

from __future__ import annotations

import os
import stat
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cifar_inception.errors import CifarInceptionError, TrainingError
from cifar_inception.fileio import (
    atomic_write_text,
    parse_json,
    read_jsonl,
    read_record_bytes,
    to_json,
)
from cifar_inception.options import is_number

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
            check_restartable(path)
            return ResumeTarget(path, None)
    raise RunFolderError(f"{run}: nothing to resume (no {LAST})")


def new_run_folder(out_dir: str | os.PathLike, name: str | None, model: str) -> Path:
    """The folder of a new run: ``out_dir/name``, or ``out_dir/MODEL-DATE-TIME`` unnamed.

    A named folder that already holds a run with a ``last.pt`` is refused (continue it with
    --resume); one whose run never saved a ``last.pt`` is taken over and started again.
    """
    root = Path(out_dir)
    if name:
        check_run_name(name)
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
            check_restartable(path)
        path.mkdir(parents=True, exist_ok=True)
        return path
    base, count = f"{model}-{time.strftime('%Y%m%d-%H%M%S')}", 1
    while True:
        path = root / (base if count == 1 else f"{base}-{count}")
        try:  # created, not only looked for: two runs started in one second get two folders
            path.mkdir(parents=True)
            return path
        except FileExistsError:
            count += 1


def check_run_name(name: str) -> None:
    """Refuse a --name that would put the run outside --output (a path, '..', or absolute)
    or that no message could show on one line (a newline, a tab)."""
    separators = {"/", "\\", os.sep, os.altsep or "/", "\0"}
    if name in (".", "..") or any(sep in name for sep in separators):
        raise RunFolderError(f"--name {name!r}: a run name is one folder name inside "
                             "--output, without '/', '\\' or '..'")
    if not name.isprintable():  # a newline would break every message that names the folder
        raise RunFolderError(f"--name {name!r}: a run name holds no control characters")


def check_restartable(folder: Path) -> None:
    """Refuse to start again a folder without last.pt that holds more than a run that died
    in its first epoch leaves (an epoch's end writes its metrics row, then best.pt, then
    last.pt): an eval.json, or rows of two epochs or more, mean the run got further and its
    last.pt was removed since, and starting again would delete those results."""
    epochs, tested = len(read_history(folder)), (folder / EVAL_FILE).exists()
    if epochs > 1 or tested:
        done = f"{epochs} epochs" + (f" and a test ({EVAL_FILE})" if tested else "")
        raise RunFolderError(f"{folder} holds a run's results ({done}) but no {LAST} to "
                             f"continue from; starting it again would delete them: choose "
                             f"another --name or --output")


def keep_broken_record(folder: Path) -> Path | None:
    """Move a config.json that is to be rebuilt (unreadable, or no run record) aside, as
    config.json.broken (replacing an older one), rather than writing over it: it may be a
    file of the user's. The path it was kept at, or None when there was none."""
    path = folder / CONFIG_FILE
    kept = path.with_name(CONFIG_FILE + ".broken")
    try:
        os.replace(path, kept)
    except FileNotFoundError:
        return None
    return kept


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
    with os.fdopen(_open_lock_file(folder / LOCK_FILE), "r+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = handle.read(32).strip()
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


def _open_lock_file(path: Path) -> int:
    """The lock file's descriptor, never through a link: a ``.lock`` planted as a symlink to
    another file would otherwise have that file truncated and overwritten with our PID."""
    flags = os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
    try:
        fd = os.open(path, flags, 0o644)
    except OSError:
        if os.path.islink(path):  # ELOOP from O_NOFOLLOW
            raise RunFolderError(f"{path} is a symbolic link, not a lock file; remove it "
                                 "and try again") from None
        raise
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise RunFolderError(f"{path} is not a regular file, not a lock file; remove it and "
                             "try again")
    os.set_blocking(fd, True)
    return fd


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


def read_json_object(path: str | os.PathLike,
                     error: type[CifarInceptionError] = CifarInceptionError) -> dict:
    """A record file (config.json, eval.json) as a dict; ``error`` naming the file when it
    cannot be read, is not JSON within the reader's bounds (size, depth, numbers: see
    :func:`cifar_inception.fileio.parse_json`) or holds something else than one object."""
    try:
        content = parse_json(read_record_bytes(path))
    except (OSError, ValueError, CifarInceptionError) as exc:
        raise error(f"{path}: not readable JSON ({_first_line(exc)})") from None
    if not isinstance(content, dict):
        raise error(f"{path}: expected a JSON object")
    return content


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:160] if text else type(exc).__name__


def read_record(folder: Path, warn: Warn) -> dict | None:
    """config.json as a dict with a list of resumes, or None (with a warning) if it is not."""
    path = folder / CONFIG_FILE
    if not path.exists():
        warn(f"warning: {path} is missing; rebuilding it")
        return None
    try:
        record = read_json_object(path)
    except CifarInceptionError as exc:
        warn(f"warning: {exc}; rebuilding it")
        return None
    if isinstance(record.get("resumed", []), list) \
            and isinstance(record.get("config", {}), dict):
        return record
    warn(f"warning: {path} is not a run record; rebuilding it (the versions and hardware of "
         f"the run's start are lost)")
    return None


def read_history(folder: Path, warn: Warn | None = None) -> list[dict]:
    """The epochs in metrics.jsonl, in order; lines that are not an epoch's row (a torn or
    damaged line, a metric that is not a number) are dropped."""
    path = folder / METRICS_FILE
    if not path.exists():
        return []
    try:
        lines = read_jsonl(path)
    except CifarInceptionError as exc:
        raise TrainingError(str(exc)) from None
    rows = [r for r in lines if is_epoch_row(r)]
    if warn is not None and len(rows) < len(lines):
        warn(f"warning: {path}: ignored {len(lines) - len(rows)} line(s) that are not an "
             f"epoch's metrics")
    return rows


# What an epoch's row holds besides its number: numbers, or null where there is none.
METRIC_KEYS = ("seconds", "train_loss", "train_acc", "val_loss", "val_acc", "lr")


def is_epoch_row(row: Any) -> bool:
    """A row of metrics.jsonl as training writes it: an epoch number, numbers (or null)."""
    return isinstance(row, dict) and _is_epoch(row.get("epoch")) and all(
        row.get(key) is None or is_number(row[key]) for key in METRIC_KEYS)


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
        atomic_write_text(folder / METRICS_FILE, "".join(to_json(r) + "\n" for r in rows))
    return rows


# --- what the records say


def recorded_settings(record: dict) -> dict | None:
    """The training settings a config.json records: its "config" entry (a flat file, as a
    hand-written one may be, is its own settings); None when they are not a dict."""
    settings = record.get("config", record)
    return settings if isinstance(settings, dict) else None


def recorded_plan(record: dict) -> dict | None:
    """What the run decided, as a config.json (or a checkpoint's training state) records it:
    its "plan" entry; None without one."""
    plan = record.get("plan")
    return plan if isinstance(plan, dict) else None


def recorded_data_dir(record: dict | None, ckpt: dict | None = None) -> str | None:
    """The data folder the run was trained on: config.json's (``record``), else the
    checkpoint's; each its plan's (absolute), else its config's. config.json comes first: a
    resume may move the data (``data_dir`` is a runtime setting), and config.json follows
    it while an older best.pt does not."""
    training = (ckpt or {}).get("training", {})
    for settings in (recorded_plan(record or {}), recorded_settings(record or {}),
                     recorded_plan(training), training.get("config")):
        if isinstance(settings, dict) and settings.get("data_dir"):
            data_dir = settings["data_dir"]
            if not isinstance(data_dir, str):
                raise CifarInceptionError(f"the run's recorded data_dir is {data_dir!r:.80}, "
                                          "not a folder; give --data-dir")
            return data_dir
    return None


def best_epoch(history: list[dict]) -> dict | None:
    """The row of the epoch best.pt holds: the best validation accuracy (the first of equals,
    as training keeps a best.pt until another epoch beats it), or the last epoch when the run
    has no validation split."""
    with_val = [row for row in history if row.get("val_acc") is not None]
    if with_val:
        return max(with_val, key=lambda row: row["val_acc"])
    return history[-1] if history else None


# --- the evaluation of a run


def read_eval(folder: str | os.PathLike) -> dict | None:
    """The run folder's eval.json; None when it is missing, unreadable or not an evaluation."""
    try:
        evaluation = read_json_object(Path(folder) / EVAL_FILE)
    except CifarInceptionError:
        return None
    return evaluation if is_evaluation(evaluation) else None


def is_evaluation(record: dict) -> bool:
    """An eval.json as evaluate writes it (as far as it has its parts): a number for top-1,
    numbers for the other metrics and counts, a table of accuracies per class and a confusion
    matrix of counts."""
    per_class = record.get("per_class", {})
    confusion = record.get("confusion", [])
    # top-5 is absent where there are 5 classes or fewer; a hand-made record may hold top-1 only
    optional = [record.get(key) for key in ("test_top5", "test_loss")]
    return (is_number(record.get("test_top1"))
            and all(value is None or is_number(value) for value in optional)
            and _is_count(record.get("num_images", 0))
            and isinstance(per_class, dict)
            and all(v is None or is_number(v) for v in per_class.values())
            and isinstance(confusion, list)
            and all(isinstance(row, list) and all(map(_is_count, row)) for row in confusion))


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def eval_is_for(evaluation: dict, checkpoint: str | os.PathLike) -> bool:
    """Whether an eval.json describes this checkpoint: it names the checkpoint's file (by its
    name alone, so that a run folder that was moved keeps its evaluation); one that names no
    checkpoint is taken as the run's."""
    evaluated = evaluation.get("checkpoint")
    return not evaluated or Path(str(evaluated)).name == Path(checkpoint).name


# --- the folder as one object


@dataclass(frozen=True)
class RunFolder:
    """A run folder: the paths of its files, and their readers (the functions above).

    ``RunFolder(path)`` for a folder, ``RunFolder.holding(checkpoint)`` for the folder a
    checkpoint lies in (a checkpoint copied elsewhere has no record beside it: its folder's
    readers then find nothing).
    """

    path: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "path", Path(self.path))  # accept a str or any path-like

    @classmethod
    def holding(cls, checkpoint: str | os.PathLike) -> RunFolder:
        return cls(Path(checkpoint).parent)

    @property
    def config(self) -> Path:
        return self.path / CONFIG_FILE

    @property
    def metrics(self) -> Path:
        return self.path / METRICS_FILE

    @property
    def last(self) -> Path:
        return self.path / LAST

    @property
    def best(self) -> Path:
        return self.path / BEST

    @property
    def eval(self) -> Path:
        return self.path / EVAL_FILE

    def eval_file_for(self, checkpoint: str | os.PathLike) -> Path:
        """Where ``evaluate`` writes a checkpoint's results: eval.json, unless it holds
        another checkpoint's (a run's final test of best.pt, which evaluating last.pt must
        not replace): then ``eval-NAME.json`` beside it."""
        evaluation = self.read_eval()
        if evaluation is None or eval_is_for(evaluation, checkpoint):
            return self.eval
        return self.path / f"eval-{Path(checkpoint).stem}.json"

    def read_config(self) -> dict:
        """config.json as a dict, {} when there is none; CifarInceptionError if unreadable."""
        return read_json_object(self.config) if self.config.is_file() else {}

    def read_record(self, warn: Warn) -> dict | None:
        return read_record(self.path, warn)

    def read_history(self, warn: Warn | None = None) -> list[dict]:
        return read_history(self.path, warn)

    def read_eval(self) -> dict | None:
        return read_eval(self.path)

    def eval_for(self, checkpoint: str | os.PathLike) -> dict | None:
        """eval.json when it describes ``checkpoint``; None when it does not, or is unusable."""
        evaluation = self.read_eval()
        if evaluation is None or not eval_is_for(evaluation, checkpoint):
            return None
        return evaluation

    def recorded_data_dir(self, ckpt: dict | None = None) -> str | None:
        return recorded_data_dir(self.read_config(), ckpt)
