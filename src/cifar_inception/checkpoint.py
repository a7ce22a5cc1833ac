"""Checkpoints: written atomically, read with ``torch.load(weights_only=True)``.

A checkpoint is a plain dict of tensors, numbers, strings, lists and dicts, so that loading
it can never run code. It carries everything evaluation and prediction need::

    {
      "format": "cifar-inception-checkpoint/1",
      "model": {"name": "googlenet", "options": {"width": 0.25}, "num_classes": 10},
      "data": {"classes": [...10 names...], "mean": [r, g, b], "std": [r, g, b],  # 0-1 scale
               "dataset": "cifar10", "image_size": 32},  # both absent in older ones
      "state_dict": {...},           # model weights (float32, on the CPU)
      "training": {...} or absent,   # optimiser, schedule position, RNG states, config
      "metrics": {...} or absent,    # e.g. {"epoch": 12, "val_acc": 0.91}
    }

:func:`load_checkpoint` checks all of this in one place (types, class names against
num_classes, finite normalisation and weights, bounded sizes), and
:func:`model_from_checkpoint` compares the weights' shapes with the model built on the meta
device before allocating it, so no loader meets a KeyError or a half-terabyte allocation.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import pickle
import re
import stat
import zipfile
from pathlib import Path
from typing import Any

import torch

from cifar_inception.data.specs import (
    DEFAULT_IMAGE_SIZE,
    MAX_CLASSES,
    MAX_IMAGE_SIZE,
    MIN_IMAGE_SIZE,
)
from cifar_inception.errors import CheckpointError, ModelError
from cifar_inception.fileio import atomic_write_bytes
from cifar_inception.options import is_number
from cifar_inception.runs import (
    BEST,
    CONFIG_FILE,
    LAST,
    RunFolder,
    read_json_object,
    recorded_plan,
    recorded_settings,
)

FORMAT = "cifar-inception-checkpoint/1"
CHECKPOINT_NAMES = (BEST, LAST)  # what a run folder stands for when used (resume uses LAST)
RUN_CONFIG = CONFIG_FILE  # written by train beside the checkpoints

# Bounds on what a checkpoint may ask a loader to build, checked before any weight is
# allocated: a header saying num_classes = 10**9 must not make us allocate half a terabyte.
MAX_PARAMETERS = 1_000_000_000  # the largest registered model has about 232 million
MAX_WEIGHT_BYTES = 8 * MAX_PARAMETERS  # as float64, the widest a weight is stored
# Bounds on what a checkpoint may hold besides its weights, checked before any of it is
# read: a 3 MB file must not inflate to gigabytes. torch.save stores every record
# uncompressed, so a record's size in the zip is its size in the file. The pickled structure
# (names, numbers, lists) of a real checkpoint is under 100 KB (67 KB for the shipped
# Inception-v3 weights), and unpickling inflates it about 150-fold in memory, so 2 MB bounds
# that to some 300 MB; the optimiser keeps at most two tensors per weight (Adam's moments);
# RNG states and metrics are small.
MAX_PICKLE_BYTES = 2 << 20
OPTIMIZER_COPIES = 2
MAX_SMALL_TENSOR_BYTES = 16 << 20
# What a model option may be: the JSON scalars the command line's KEY=VALUE gives.
_OPTION_TYPES = (bool, int, float, str, type(None))


def make_checkpoint(*, model_name: str, model_options: dict, num_classes: int,
                    classes: list[str], mean: list[float], std: list[float],
                    state_dict: dict, training: dict | None = None,
                    metrics: dict | None = None, dataset: str | None = None,
                    image_size: int | None = None) -> dict:
    ckpt = {
        "format": FORMAT,
        "model": {"name": model_name, "options": dict(model_options), "num_classes": num_classes},
        "data": {"classes": list(classes), "mean": [float(v) for v in mean],
                 "std": [float(v) for v in std]},
        "state_dict": {k: v.detach().to("cpu") for k, v in state_dict.items()},
    }
    if dataset is not None:  # what evaluation loads again (older checkpoints: CIFAR-10)
        ckpt["data"]["dataset"] = dataset
    if image_size is not None:  # what every user resizes images to (older checkpoints: 32)
        ckpt["data"]["image_size"] = int(image_size)
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
    if not stat.S_ISREG(path.stat().st_mode):
        # Reading a FIFO or a device would wait forever or never end.
        raise CheckpointError(f"{path}: not a regular file")
    return path


def check_archive(path: Path) -> None:
    """Refuse, before torch reads it, a file that is not a torch zip (torch's loader fails
    on a text file with an IndexError), a compressed record (torch.save never writes one; it
    could inflate to any size) and an oversized pickle."""
    try:
        with zipfile.ZipFile(path) as archive:
            records = archive.infolist()
    except (zipfile.BadZipFile, OSError, ValueError, EOFError):
        raise CheckpointError(f"{path}: not a readable checkpoint (not a torch checkpoint "
                              "file)") from None
    for record in records:
        if record.compress_type != zipfile.ZIP_STORED:
            raise CheckpointError(
                f"{path}: refused: its record {record.filename!r} is compressed "
                f"({record.file_size:,} bytes inflated), which torch.save never writes")
        if record.filename.endswith("data.pkl") and record.file_size > MAX_PICKLE_BYTES:
            raise CheckpointError(f"{path}: refused: its pickled structure is "
                                  f"{record.file_size:,} bytes, over the limit of "
                                  f"{MAX_PICKLE_BYTES:,}")


def load_checkpoint(path: str | os.PathLike) -> dict:
    """Load a checkpoint safely (weights only) and check that it is one of ours.

    The tensors are memory-mapped, not read, until :func:`check_tensor_bytes` has bounded
    what the checkpoint holds besides its weights; then they are read into memory.
    """
    path = resolve_checkpoint(path)
    check_archive(path)
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
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
    check_tensor_bytes(ckpt, where=str(path))
    check_stored_in_file(ckpt, path.stat().st_size, where=str(path))
    read_into_memory(ckpt)
    check_structure(ckpt, where=str(path))
    return ckpt


def read_into_memory(obj: Any) -> None:
    """Replace every memory-mapped tensor inside nested dicts and lists by an in-memory copy,
    once its size is known to be bounded: a mapping kept open would crash the process (SIGBUS)
    when the file is later rewritten in place, as ``torch.save(ckpt, same_path)`` does. Walked
    without recursion, as :func:`tensor_bytes` is."""
    pending, seen = [obj], set()
    while pending:
        item = pending.pop()
        if id(item) in seen:
            continue
        seen.add(id(item))
        keys = item.keys() if isinstance(item, dict) else \
            range(len(item)) if isinstance(item, list) else ()
        for key in keys:
            value = item[key]
            if isinstance(value, torch.Tensor):
                item[key] = value.clone()
            elif isinstance(value, (dict, list)):
                pending.append(value)


def tensor_bytes(obj: Any) -> int:
    """Bytes that copies of the tensors inside nested dicts, lists and tuples take, each
    object counted once (walked without recursion: a deeply nested or self-referencing pickle
    must neither overflow the stack nor loop). A tensor's copy, not its storage, is counted:
    a view with a zero stride claims 10**12 elements of one stored float, and copying it
    into memory would allocate all of them."""
    total, pending, seen = 0, [obj], set()
    while pending:
        item = pending.pop()
        if id(item) in seen:
            continue
        seen.add(id(item))
        if isinstance(item, torch.Tensor):
            total += max(item.untyped_storage().nbytes(), item.numel() * item.element_size())
        elif isinstance(item, dict):
            pending.extend(item.values())
        elif isinstance(item, (list, tuple)):
            pending.extend(item)
    return total


def check_tensor_bytes(ckpt: dict, *, where: str = "checkpoint") -> None:
    """Refuse a checkpoint whose weights outweigh the largest model's, or whose tensors
    besides them outweigh what training keeps: the optimiser's copies of the weights and
    small RNG states and metrics. Checked before anything is copied into memory."""
    weights = tensor_bytes(ckpt.get("state_dict"))
    if weights > MAX_WEIGHT_BYTES:
        raise CheckpointError(f"{where}: refused: its weights take {weights:,} bytes, over the "
                              f"limit of {MAX_WEIGHT_BYTES:,}")
    allowed = OPTIMIZER_COPIES * weights + MAX_SMALL_TENSOR_BYTES
    for key, value in ckpt.items():
        if key == "state_dict":
            continue
        found = tensor_bytes(value)
        limit = allowed if key == "training" else MAX_SMALL_TENSOR_BYTES
        if found > limit:
            raise CheckpointError(f"{where}: refused: its '{key}' entry holds {found:,} bytes "
                                  f"of tensors, over the limit of {limit:,} for a model "
                                  f"with {weights:,} bytes of weights")


def check_stored_in_file(ckpt: dict, file_bytes: int, *, where: str = "checkpoint") -> None:
    """Refuse tensors whose copies outweigh the file: its records are stored uncompressed
    (:func:`check_archive`), so a checkpoint that torch.save wrote holds every byte it
    loads. Only views that repeat stored values (a zero stride) can claim more, and a small
    file must not make a loader allocate gigabytes under the weights' limit."""
    held = tensor_bytes(ckpt)
    if held > file_bytes:
        raise CheckpointError(f"{where}: refused: its tensors would take {held:,} bytes in "
                              f"memory, more than the {file_bytes:,} bytes of the file store "
                              "(views that repeat stored values)")


def check_structure(ckpt: dict, *, where: str = "checkpoint") -> None:
    """Refuse a checkpoint whose entries are missing, mistyped or inconsistent, naming the
    entry, so that every loader (evaluate, predict, report, export, serve) can trust it."""
    model = _entry(ckpt, "model", dict, where)
    data = _entry(ckpt, "data", dict, where)
    state = _entry(ckpt, "state_dict", dict, where)
    for key in ("training", "metrics"):
        if key in ckpt and not isinstance(ckpt[key], dict):
            raise CheckpointError(f"{where}: its '{key}' entry is not a dict")
    _check_model_entry(model, where)
    _check_data_entry(data, model["num_classes"], where)
    _check_weights(state, where)


def _entry(mapping: dict, key: str, kind: type, where: str) -> Any:
    if key not in mapping:
        raise CheckpointError(f"{where}: damaged checkpoint, it has no '{key}' entry")
    if not isinstance(mapping[key], kind):
        raise CheckpointError(f"{where}: damaged checkpoint, its '{key}' entry is a "
                              f"{type(mapping[key]).__name__}, not a {kind.__name__}")
    return mapping[key]


def _check_model_entry(model: dict, where: str) -> None:
    name = _entry(model, "name", str, f"{where}: model")
    options = _entry(model, "options", dict, f"{where}: model")
    count = model.get("num_classes")
    if isinstance(count, bool) or not isinstance(count, int) or not 1 <= count <= MAX_CLASSES:
        raise CheckpointError(f"{where}: num_classes must be a whole number from 1 to "
                              f"{MAX_CLASSES:,}, not {count!r}")
    for key, value in options.items():
        if not isinstance(key, str) or not isinstance(value, _OPTION_TYPES) or (
                isinstance(value, float) and not math.isfinite(value)):
            raise CheckpointError(f"{where}: model option {key!r} of '{name}' has the "
                                  f"value {value!r}, which no model accepts")


def _check_data_entry(data: dict, num_classes: int, where: str) -> None:
    classes = _entry(data, "classes", list, f"{where}: data")
    if len(classes) != num_classes or not all(isinstance(c, str) for c in classes):
        raise CheckpointError(f"{where}: names {len(classes)} classes for a model with "
                              f"{num_classes} outputs (expected {num_classes} class names)")
    for key in ("mean", "std"):
        values = _entry(data, key, list, f"{where}: data")
        if len(values) != 3 or not all(is_number(v) and math.isfinite(v) for v in values):
            raise CheckpointError(f"{where}: its normalisation '{key}' must be 3 finite "
                                  f"numbers (red, green, blue), not {str(values)[:80]}")
    if not all(v > 0 for v in data["std"]):
        raise CheckpointError(f"{where}: its normalisation 'std' must be positive, "
                              f"not {data['std']}")
    size = data.get("image_size", DEFAULT_IMAGE_SIZE)
    if isinstance(size, bool) or not isinstance(size, int) \
            or not MIN_IMAGE_SIZE <= size <= MAX_IMAGE_SIZE:
        raise CheckpointError(f"{where}: its image size must be a whole number from "
                              f"{MIN_IMAGE_SIZE} to {MAX_IMAGE_SIZE}, not {str(size)[:40]}")


def image_size_of(ckpt: dict) -> int:
    """The side of the square images the checkpoint's model was trained on, which every
    user of it resizes images to (a checkpoint from before image sizes: CIFAR's 32)."""
    return ckpt["data"].get("image_size", DEFAULT_IMAGE_SIZE)


def _check_weights(state: dict, where: str) -> None:
    for key, value in state.items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            raise CheckpointError(f"{where}: damaged checkpoint, its weights hold "
                                  f"{key!r}, which is not a tensor")
        # A diverged run's NaN weights would give NaN predictions that look like answers.
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            raise CheckpointError(f"{where}: the weights {key!r} hold NaN or infinite "
                                  "values (a diverged run?); refusing to use them")


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


def _build(info: dict, where: str, device: str | None = None) -> torch.nn.Module:
    # the registry module, not the package: the package's create_model reads checkpoints
    from cifar_inception.models.registry import create_model

    try:
        with torch.device(device) if device else contextlib.nullcontext():
            return create_model(info["name"], num_classes=info["num_classes"],
                                **info["options"])
    except (TypeError, ValueError, ZeroDivisionError, OverflowError) as exc:
        raise CheckpointError(f"{where}: cannot build model '{info['name']}' with options "
                              f"{info['options']} ({str(exc)[:160]})") from None


def check_shapes(ckpt: dict, *, where: str = "checkpoint") -> None:
    """Build the model on the meta device (no memory) and compare it with the weights.

    Only when the model is within :data:`MAX_PARAMETERS` and every weight has its shape is
    the real model built, so its size is that of the weights already read.
    """
    info = ckpt["model"]
    expected = _build(info, where, device="meta").state_dict()
    size = sum(t.numel() for t in expected.values())
    if size > MAX_PARAMETERS:
        raise CheckpointError(f"{where}: model '{info['name']}' with options {info['options']} "
                              f"and {info['num_classes']:,} classes would have {size:,} "
                              f"weights, over the limit of {MAX_PARAMETERS:,}")
    found = ckpt["state_dict"]
    missing = sorted(expected.keys() - found.keys())
    extra = sorted(found.keys() - expected.keys())
    wrong = [key for key in expected.keys() & found.keys()
             if tuple(expected[key].shape) != tuple(found[key].shape)]
    if missing or extra or wrong:
        problem = (f"missing {missing[0]!r}" if missing else f"unexpected {extra[0]!r}"
                   if extra else f"{wrong[0]!r} is {tuple(found[wrong[0]].shape)}, not "
                   f"{tuple(expected[wrong[0]].shape)}")
        raise CheckpointError(f"{where}: weights do not fit model '{info['name']}' with "
                              f"options {info['options']} ({problem})")


def check_size_fits(ckpt: dict, *, where: str = "checkpoint") -> None:
    """Refuse a checkpoint whose image size its model does not take (a hand-edited one)."""
    from cifar_inception.models.registry import check_image_size

    try:
        check_image_size(ckpt["model"]["name"], image_size_of(ckpt))
    except ModelError as exc:
        raise CheckpointError(f"{where}: {exc}") from None


def model_from_checkpoint(ckpt: dict, *, where: str = "checkpoint") -> torch.nn.Module:
    """Build the registered model the checkpoint names and load its weights (eval mode)."""
    check_shapes(ckpt, where=where)
    check_size_fits(ckpt, where=where)
    model = _build(ckpt["model"], where)
    try:
        model.load_state_dict(ckpt["state_dict"])
    except RuntimeError as exc:
        info = ckpt["model"]
        raise CheckpointError(
            f"{where}: weights do not fit model '{info['name']}' with options "
            f"{info['options']} ({str(exc).splitlines()[0][:160]})"
        ) from None
    return model.eval()


def check_run_matches(ckpt: dict, checkpoint: str | os.PathLike) -> None:
    """Refuse a checkpoint that is not the run's own: its model, options and training
    settings must be those of the config.json beside it (when there is one).

    A best.pt copied from another run would otherwise be reported with this run's curves.
    """
    from cifar_inception.recipes import RUNTIME_FIELDS  # settings a resume may change

    config_path = RunFolder.holding(checkpoint).config
    record = _run_record(config_path)
    if record is None:
        return
    settings = recorded_settings(record)
    recorded, found = {}, {"model": ckpt["model"]["name"],
                           "model_options": ckpt["model"]["options"]}
    if isinstance(settings.get("model"), str):
        recorded["model"] = settings["model"]
    options = (recorded_plan(record) or settings).get("model_options")  # a widened model's
    if isinstance(options, dict):
        recorded["model_options"] = options
    trained = ckpt.get("training", {}).get("config")
    if isinstance(trained, dict):
        for key in (settings.keys() & trained.keys()) - set(RUNTIME_FIELDS):
            recorded[key], found[key] = settings[key], trained[key]
    found = json.loads(json.dumps(found, default=str))  # tuples as config.json has them: lists
    for key, value in recorded.items():
        if value != found[key]:
            raise CheckpointError(
                f"{checkpoint} is not this run's checkpoint: its {key} is {found[key]!r}, "
                f"but {config_path} says {value!r}")


def _run_record(config_path: Path) -> dict | None:
    """The config.json beside a checkpoint (its training settings a dict), or None without
    one."""
    if not config_path.is_file():
        return None
    record = read_json_object(config_path, CheckpointError)
    if recorded_settings(record) is None:
        raise CheckpointError(f"{config_path}: not a run configuration")
    return record


def load_trained_model(path: str | os.PathLike) -> tuple[torch.nn.Module, dict]:
    """The one-call loader for evaluation, prediction, export and serving."""
    ckpt = load_checkpoint(path)
    return model_from_checkpoint(ckpt, where=str(path)), ckpt


def describe(ckpt: dict) -> dict[str, Any]:
    """The small, JSON-safe part of a checkpoint (no tensors)."""
    return {"model": ckpt["model"], "data": ckpt["data"], "metrics": ckpt.get("metrics", {})}
