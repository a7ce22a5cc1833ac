"""One run as several processes of this machine: what the parent hands the ranks, and back.

The command line calls it from outside :func:`~cifar_inception.training.train` (as torchrun
launches from outside): :func:`splits_into_processes` says when, and
:func:`train_in_processes` writes the job (the configuration, where to resume, the data
set when the caller passed one) to a scratch folder, runs the ranks
(:func:`cifar_inception.launch.run_ranks`, each ``python -m
cifar_inception.training.rank_main JOB``), and returns rank 0's :class:`TrainResult`, with
the lines it logged replayed to the caller's ``log``.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from cifar_inception.devices import usable_cores
from cifar_inception.distributed import DistContext, per_rank_batch
from cifar_inception.errors import TrainingError
from cifar_inception.launch import RankFailed, run_ranks, under_launcher
from cifar_inception.recipes import TrainConfig, validate
from cifar_inception.training.result import TrainResult

DATA_ARRAYS = ("train_images", "train_labels", "test_images", "test_labels")


def splits_into_processes(config: TrainConfig) -> bool:
    """Whether ``config`` asks for several processes (``--processes``), outside a launcher
    (in a rank, torchrun's or ours, nothing is launched again)."""
    return config.processes is not None and config.processes > 1 and not under_launcher()


def check_processes(processes: int, batch_size: int) -> None:
    """Refuse, before any process starts, more processes than cores (each trains on cores
    of its own) or a global batch that they cannot share evenly."""
    cores = usable_cores()
    if processes > cores:
        raise TrainingError(f"--processes {processes}: more than the {cores} cores this "
                            "process may use; each process needs a core of its own")
    per_rank_batch(batch_size, DistContext(world_size=processes))


def train_in_processes(config: TrainConfig, data: Any = None, *,
                       resume: str | os.PathLike | None = None,
                       log: Callable[[str], None] | None = None,
                       started_at: float | None = None) -> TrainResult:
    """``train(config, data, resume=resume)`` as ``config.processes`` ranks; rank 0's result.

    What can fail at once (an unknown model or option, missing data) fails here, as one
    line, before any process starts."""
    from cifar_inception.training.setup import check_model

    started_at = time.time() if started_at is None else started_at
    validate(config)
    check_model(config)
    check_processes(config.processes, config.batch_size)
    if data is None:
        from cifar_inception.data import load_dataset

        data = load_dataset(config.dataset, config.data_dir, image_size=config.image_size,
                            download=config.download)
    processes = config.processes
    with tempfile.TemporaryDirectory(prefix="cifar-inception-ranks-") as scratch:
        folder = Path(scratch)
        job = {"config": config.to_dict(), "resume": None if resume is None else str(resume),
               "data": None if data is None else _write_data(data, folder / "data.npz"),
               "result": str(folder / "result.json"), "errors": str(folder),
               "quiet": log is not None, "started_at": started_at}
        (folder / "job.json").write_text(json.dumps(job))
        try:
            statuses = run_ranks("cifar_inception.training.rank_main",
                                 [str(folder / "job.json")], processes)
        except RankFailed as failed:  # its own one-line message, when it left one
            message = folder / f"error-{failed.rank}.txt"
            raise TrainingError(message.read_text() if message.is_file() else str(failed)
                                ) from None
        result_file = folder / "result.json"
        if not result_file.is_file():
            if 130 in statuses:  # stopped at once by a second Ctrl-C
                raise KeyboardInterrupt
            raise TrainingError("the training processes ended without a result")
        values = json.loads(result_file.read_text())
    for line in values.pop("log"):  # what rank 0 logged, when the caller collects it
        log(line)
    return TrainResult.from_json(values)


def _write_data(data: Any, path: Path) -> dict:
    np.savez(path, **{name: getattr(data, name) for name in DATA_ARRAYS})
    return {"arrays": str(path), "classes": list(data.classes), "source": data.source,
            "checksum": data.checksum, "name": getattr(data, "name", "cifar10")}


def read_data(job: dict) -> Any:
    """The data set the parent passed on, or None (the ranks then load ``data_dir``)."""
    if job["data"] is None:
        return None
    from cifar_inception.data import Dataset

    with np.load(job["data"]["arrays"]) as arrays:
        loaded = {name: arrays[name] for name in DATA_ARRAYS}
    return Dataset(**loaded, classes=tuple(job["data"]["classes"]),
                   source=job["data"]["source"], checksum=job["data"]["checksum"],
                   name=job["data"].get("name", "cifar10"))
