"""Checkpoints: written atomically, read with ``torch.load(weights_only=True)``.

A checkpoint is a plain dict of tensors, numbers, strings, lists and dicts, so that loading
it can never run code. It carries everything evaluation and prediction need::

    {
      "format": "cifar-inception-checkpoint/1",
      "model": {"name": "googlenet", "options": {"width": 0.25}, "num_classes": 10},
      "data": {"classes": [...10 names...], "mean": [r, g, b], "std": [r, g, b]},  # 0-1 scale
      "state_dict": {...},           # model weights (float32, on the CPU)
      "training": {...} or absent,   # optimiser, schedule position, RNG states, config
      "metrics": {...} or absent,    # e.g. {"epoch": 12, "val_acc": 0.91}
    }
"""

from __future__ import annotations

import io
import os
import pickle
import re
import zipfile
from pathlib import Path
from typing import Any

import torch

from cifar_inception.errors import CheckpointError
from cifar_inception.fileio import atomic_write_bytes

FORMAT = "cifar-inception-checkpoint/1"
CHECKPOINT_NAMES = ("best.pt", "last.pt")


def make_checkpoint(*, model_name: str, model_options: dict, num_classes: int,
                    classes: list[str], mean: list[float], std: list[float],
                    state_dict: dict, training: dict | None = None,
                    metrics: dict | None = None) -> dict:
    ckpt = {
        "format": FORMAT,
        "model": {"name": model_name, "options": dict(model_options), "num_classes": num_classes},
        "data": {"classes": list(classes), "mean": [float(v) for v in mean],
                 "std": [float(v) for v in std]},
        "state_dict": {k: v.detach().to("cpu") for k, v in state_dict.items()},
    }
    if training is not None:
        ckpt["training"] = training
    if metrics is not None:
        ckpt["metrics"] = metrics
    return ckpt


def save_checkpoint(path: str | os.PathLike, checkpoint: dict) -> None:
    """Serialise in memory, then write to a temporary file and rename over ``path``."""
    buffer = io.BytesIO()
    torch.save(checkpoint, buffer)
    atomic_write_bytes(path, buffer.getvalue())


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """A checkpoint file, or a run folder (its best.pt, else its last.pt)."""
    path = Path(path)
    if path.is_dir():
        for name in CHECKPOINT_NAMES:
            if (path / name).is_file():
                return path / name
        raise CheckpointError(f"{path}: run folder holds no best.pt or last.pt")
    if not path.exists():
        raise CheckpointError(f"{path}: no such checkpoint or run folder")
    return path


def load_checkpoint(path: str | os.PathLike) -> dict:
    """Load a checkpoint safely (weights only) and check that it is one of ours."""
    path = resolve_checkpoint(path)
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        # torch's message opens with generic advice; the useful part names the offending global.
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(exc))
        if found is None and not zipfile.is_zipfile(path):
            raise CheckpointError(f"{path}: not a readable checkpoint (not a torch file)") from None
        what = f"a pickled object ({found.group(1)})" if found else "content"
        raise CheckpointError(
            f"{path}: refused: it holds {what} that a weights-only load does not allow, as it "
            "could run code; only tensors, numbers, strings, lists and dicts are loaded"
        ) from None
    except (RuntimeError, zipfile.BadZipFile, EOFError, OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: not a readable checkpoint ({str(exc)[:160]})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a cifar-inception checkpoint (no '{FORMAT}' marker)")
    return ckpt


def check_compatible(ckpt: dict, *, model_name: str | None = None,
                     num_classes: int | None = None, where: str = "checkpoint") -> None:
    """Refuse a checkpoint made for another model or class count, naming both."""
    found = ckpt["model"]
    if model_name is not None and found["name"] != model_name:
        raise CheckpointError(
            f"{where} is for model '{found['name']}', not '{model_name}'")
    if num_classes is not None and found["num_classes"] != num_classes:
        raise CheckpointError(
            f"{where} has {found['num_classes']} classes, not {num_classes}")


def model_from_checkpoint(ckpt: dict, *, where: str = "checkpoint") -> torch.nn.Module:
    """Build the registered model the checkpoint names and load its weights (eval mode)."""
    from cifar_inception.models import create_model  # sideways: models know nothing of us

    info = ckpt["model"]
    model = create_model(info["name"], num_classes=info["num_classes"], **info["options"])
    try:
        model.load_state_dict(ckpt["state_dict"])
    except RuntimeError as exc:
        raise CheckpointError(
            f"{where}: weights do not fit model '{info['name']}' with options "
            f"{info['options']} ({str(exc).splitlines()[0][:160]})"
        ) from None
    return model.eval()


def load_trained_model(path: str | os.PathLike) -> tuple[torch.nn.Module, dict]:
    """The one-call loader for evaluation, prediction, export and serving."""
    ckpt = load_checkpoint(path)
    return model_from_checkpoint(ckpt, where=str(path)), ckpt


def describe(ckpt: dict) -> dict[str, Any]:
    """The small, JSON-safe part of a checkpoint (no tensors)."""
    return {"model": ckpt["model"], "data": ckpt["data"], "metrics": ckpt.get("metrics", {})}
