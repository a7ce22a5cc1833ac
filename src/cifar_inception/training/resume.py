"""Continuing a run: the configuration it continues with, the checkpoint it continues from,
and the :class:`Position` that a checkpoint records."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cifar_inception.checkpoint import check_run_matches, load_checkpoint
from cifar_inception.errors import CheckpointError, CifarInceptionError, TrainingError
from cifar_inception.recipes import RUNTIME_FIELDS, TrainConfig, validate
from cifar_inception.runs import (
    BEST,
    CONFIG_FILE,
    LAST,
    RunFolder,
    RunFolderError,
    read_record,
    recorded_settings,
    resume_target,
)


@dataclass
class Position:
    """Where training stands: completed epochs, steps into the next epoch, partial sums."""

    epoch: int = 0
    step: int = 0
    loss_sum: float = 0.0
    correct: float = 0.0
    seen: float = 0.0
    seconds: float = 0.0
    best_score: float | None = None  # best validation accuracy; the epoch without validation
    best_epoch: int | None = None


def resume_config(run: str | os.PathLike, **overrides: Any) -> TrainConfig:
    """The configuration a run was started with, with runtime options (device, threads,
    epochs, ...) replaced by ``overrides``; changing anything that alters the computation
    (model, learning rate, ...) is refused."""
    saved = TrainConfig.from_dict(_saved_config(run))
    values = saved.to_dict()
    values["stop_after_epochs"] = None  # a pause applies to the invocation that asked for it
    for key, value in overrides.items():
        if key not in values:
            raise TrainingError(f"unknown training option {key!r}")
        if key not in RUNTIME_FIELDS and value != values[key]:
            raise TrainingError(
                f"cannot change {key} when resuming (the run has {values[key]!r}, not "
                f"{value!r}); start a new run instead")
        values[key] = value
    config = TrainConfig.from_dict(values)
    validate(config)
    return config


def _saved_config(run: str | os.PathLike) -> dict:
    """The configuration of the run to resume: its last.pt's, or, if the run died before
    saving one, its config.json's (it is then started again)."""
    target = resume_target(run)
    if target.last is None:
        record = read_record(target.folder, warn=lambda line: print(line, file=sys.stderr))
        if record is None or not record.get("config"):
            raise RunFolderError(f"{target.folder}: nothing to resume: no {LAST} yet, and its "
                                 f"{CONFIG_FILE} is not a run record; start a new run")
        return record["config"]
    ckpt = load_checkpoint(target.last)
    if "training" not in ckpt or "config" not in ckpt["training"]:
        raise CheckpointError(f"{target.last}: holds no training state to resume from")
    return ckpt["training"]["config"]


def resume_state(config: TrainConfig, resume: str | os.PathLike | None
                  ) -> tuple[dict | None, Position]:
    """The checkpoint to continue from (checked against ``config`` and against the run's
    record) and its position."""
    path = resume_target(resume).last if resume is not None else None
    if path is None:  # a new run, or one that died before its first last.pt: from the start
        return None, Position()
    ckpt = load_checkpoint(path)
    if "training" not in ckpt or "optimizer" not in ckpt["training"]:
        raise CheckpointError(f"{path}: holds no training state to resume from")
    if ckpt["model"]["name"] != config.model:
        raise CheckpointError(f"{path} is for model {ckpt['model']['name']!r}, "
                              f"not {config.model!r}")
    _check_resume_matches(config, ckpt["training"]["config"], path)
    _check_checkpoints_are_the_runs(path.parent, ckpt, path)
    return ckpt, Position(**ckpt["training"]["position"])


def check_not_done(config: TrainConfig, epochs: int, position: Position,
                   resume: str | os.PathLike) -> None:
    """Refuse to continue a run whose ``epochs`` (as planned) are all done, unless its test
    is still to do."""
    folder = resume_target(resume).folder
    if position.epoch >= epochs and not final_test_pending(config, folder):
        tested = " and tested" if config.test else ""
        raise TrainingError(f"{folder}: all {epochs} epochs are done{tested}; "
                            f"pass a larger --epochs to train further")


def final_test_pending(config: TrainConfig, folder: Path) -> bool:
    """Whether the run's final test is still to do: asked for, and no eval.json of best.pt
    (a stop after the last epoch, or during the test, leaves none)."""
    return config.test and RunFolder(folder).eval_for(folder / BEST) is None


def _check_checkpoints_are_the_runs(folder: Path, last: dict, last_path: Path) -> None:
    """Refuse to resume from a last.pt (or beside a best.pt) of another model or other
    settings than the run's config.json records: training on would rewrite the record and
    mix another run's epochs into metrics.jsonl. A config.json that cannot be read is
    rebuilt when the run opens, so it checks nothing."""
    try:
        if recorded_settings(RunFolder(folder).read_config()) is None:
            return
    except CifarInceptionError:
        return
    check_run_matches(last, last_path)
    best = folder / BEST
    if best.exists():
        check_run_matches(load_checkpoint(best), best)


def _check_resume_matches(config: TrainConfig, saved: dict, path: Path) -> None:
    for key, value in config.to_dict().items():
        if key not in RUNTIME_FIELDS and key in saved and saved[key] != value:
            raise TrainingError(f"{path}: the run was trained with {key}={saved[key]!r}, "
                                f"not {value!r}; start a new run instead")
