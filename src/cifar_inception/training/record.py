"""The run folder and its record, config.json: what was run, on what, and each resume."""

from __future__ import annotations

import os
import platform
import sys
import time
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path

import torch
import torch.nn as nn

from cifar_inception import __version__
from cifar_inception.devices import cpu_capability, cpu_name
from cifar_inception.distributed import DistContext
from cifar_inception.fileio import atomic_write_json
from cifar_inception.recipes import TrainConfig, get_recipe
from cifar_inception.runs import (
    CONFIG_FILE,
    EVAL_FILE,
    clear_for_restart,
    keep_broken_record,
    locked,
    new_run_folder,
    read_record,
    remove_temporaries,
    resume_target,
    truncate_history,
)
from cifar_inception.training.resume import Position
from cifar_inception.training.setup import DeviceData, Loop


def open_run_dir(loop: Loop, resume: str | os.PathLike | None, ckpt: dict | None,
                  position: Position, held: ExitStack, emit: Callable[[str], None]) -> Path:
    """The run folder, locked and cleaned of a kill's leftovers, with its config.json: a new
    record for a new run (or one started again), the resume added to it otherwise."""
    if resume is None:
        run_dir = new_run_folder(loop.config.out_dir, loop.config.name, loop.config.model)
        held.enter_context(locked(run_dir))
    else:
        run_dir = resume_target(resume).folder  # locked since the start
    remove_temporaries(run_dir)
    record = None if ckpt is None else read_record(run_dir, emit)
    if record is None:  # new, started again, or a record that must be rebuilt
        if ckpt is None:
            clear_for_restart(run_dir)
        else:
            kept = keep_broken_record(run_dir)
            if kept is not None:
                emit(f"warning: the old {CONFIG_FILE} is kept as {kept}")
        record = run_record(loop.config, loop.prepared, loop.model, loop.aux_weights,
                            loop.device, loop.ctx)
    if ckpt is not None:
        record.setdefault("resumed", []).append(
            {"at_epoch": position.epoch, "at_step": position.step, "command": list(sys.argv),
             "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
             "hardware": hardware_info(loop.device, loop.ctx)})
        truncate_history(run_dir, position.epoch, emit)
        if position.epoch < loop.plan.epochs:  # best.pt may change: its test is to redo
            (run_dir / EVAL_FILE).unlink(missing_ok=True)
    write_record(run_dir, record, loop)
    return run_dir


def write_record(run_dir: Path, record: dict, loop: Loop) -> None:
    """config.json, the one place it is written: the record with what was asked for
    (``config``) and what the run decided (``plan``, which a budget's re-plan changes)."""
    record.update(config=loop.config.to_dict(), plan=loop.plan.to_dict())
    # A budget run that starts over at another width has another model than it began with.
    record.setdefault("model", {})["parameters"] = sum(p.numel() for p in loop.model.parameters())
    atomic_write_json(run_dir / CONFIG_FILE, record)


def record_plan(loop: Loop, emit: Callable[[str], None]) -> None:
    """Bring config.json's plan up to date after a re-plan (rank 0)."""
    if loop.run_dir is None:
        return
    record = read_record(loop.run_dir, emit)
    if record is not None and record.get("plan") != loop.plan.to_dict():
        write_record(loop.run_dir, record, loop)


def run_record(config: TrainConfig, prepared: DeviceData, model: nn.Module,
               aux_weights: tuple[float, ...], device: torch.device, ctx: DistContext) -> dict:
    """config.json: everything needed to repeat the run."""
    recipe = get_recipe(config.recipe) if config.recipe else None
    return {
        "recipe": {"name": recipe.name, "description": recipe.description} if recipe else None,
        "versions": {"cifar_inception": __version__, "torch": torch.__version__,
                     "python": platform.python_version()},
        "hardware": hardware_info(device, ctx),
        "command": list(sys.argv),
        "data": prepared.info,
        "model": {"parameters": sum(p.numel() for p in model.parameters()),
                  "aux_weights": list(aux_weights)},
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "resumed": [],
    }


def hardware_info(device: torch.device, ctx: DistContext) -> dict:
    """The machine a run's figures belong to: the CPU's model and vector capability always
    (bf16 and speed depend on them), the GPU's name where there is one."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()
    return {"device": str(device), "device_name": name, "cpu": cpu_name(),
            "cpu_capability": cpu_capability(), "cpu_count": os.cpu_count(),
            "threads": torch.get_num_threads(), "world_size": ctx.world_size,
            "platform": platform.platform()}
