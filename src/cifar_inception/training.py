"""The training loop, top to bottom.

``train(config)`` loads CIFAR-10 once, splits off the validation images, computes the
normalisation statistics on the training split, and moves every image to the device as uint8.
Each epoch then:

1. draws a permutation of the training images from a generator seeded by (seed, epoch);
2. per step, gathers the global batch, augments it on the device (crop, flip, cutout) with a
   generator seeded by (seed, epoch, step), keeps this rank's share, and normalises it;
3. runs forward (bf16 autocast and channels_last on CUDA) and backward on
   ``main loss + sum(aux weight x aux loss)``, steps the optimiser, and sets the learning rate
   of the next step from the schedule (a pure function of the step number);
4. validates, prints one Keras-like line, appends to ``metrics.jsonl`` and saves ``last.pt``
   (and ``best.pt`` when the validation accuracy improved), atomically.

Because the data order and the augmentation are functions of (seed, epoch, step), and the
checkpoint carries the optimiser state and the global RNG state (dropout), a resumed run
continues exactly where it stopped, even mid-epoch. Ctrl-C (or SIGTERM) finishes the current
step, saves ``last.pt`` and stops; a second Ctrl-C stops at once. A NaN or infinite loss
stops the run before anything of the bad epoch is written.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import platform
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager, nullcontext
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.profiler import record_function

from cifar_inception import __version__, distributed
from cifar_inception.augment import AugmentPolicy, alternating_flips, normalize
from cifar_inception.budget import (
    EPOCH_FIXED_S,
    TTA_SHARE,
    BudgetError,
    Plan,
    Rates,
    plan,
    time_per_call,
    worth_tta,
)
from cifar_inception.checkpoint import load_checkpoint, make_checkpoint, save_checkpoint
from cifar_inception.devices import cpu_precision, pick_device, usable_cores
from cifar_inception.distributed import DistContext
from cifar_inception.errors import CheckpointError, CifarInceptionError, ModelError, TrainingError
from cifar_inception.evaluation import (
    EVAL_FILE,
    TTA_VIEWS,
    evaluate,
    log_probabilities,
    test_in_channels_last,
)
from cifar_inception.fileio import append_jsonl, atomic_write_json
from cifar_inception.models import create_model
from cifar_inception.recipes import RUNTIME_FIELDS, TrainConfig, get_recipe, validate
from cifar_inception.runs import (
    BEST,
    CONFIG_FILE,
    LAST,
    METRICS_FILE,
    RunFolderError,
    clear_for_restart,
    locked,
    new_run_folder,
    read_history,
    read_record,
    remove_temporaries,
    resume_target,
    truncate_history,
)

SPLIT_SEED = 0  # every run holds out the same validation images, so runs compare
INIT_IMAGES = 5000  # images a model's init_from_data hook sees


@dataclass
class TrainResult:
    run_dir: Path | None       # None on ranks other than 0
    status: str                # "completed", "paused" (stop_after_epochs) or "interrupted"
    epoch: int                 # epochs completed
    history: list[dict]        # every epoch's metrics so far (metrics.jsonl)
    best: dict | None          # the metrics of the epoch saved as best.pt
    test: dict | None          # eval.json of best.pt, when the test set was evaluated
    message: str = ""


# --- small pure helpers


def derived_seed(*parts: object) -> int:
    """A 63-bit seed from (seed, purpose, epoch, step, ...), stable across runs and machines."""
    digest = hashlib.blake2b("/".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def seeded_generator(device: torch.device, *parts: object) -> torch.Generator:
    generator = torch.Generator(device=device)
    generator.manual_seed(derived_seed(*parts))
    return generator


def lr_factor(step: int, total_steps: int, warmup_steps: int, schedule: str,
              final: float = 0.0) -> float:
    """Multiplier of the peak learning rate at ``step`` (0-based) of ``total_steps``.

    Warm-up rises linearly from 0.1 to 1; then ``onecycle`` falls linearly towards ``final``,
    ``cosine`` follows half a cosine towards ``final``, and ``constant`` stays at 1.
    """
    if step < warmup_steps:
        return 0.1 + 0.9 * step / warmup_steps
    if schedule == "constant":
        return 1.0
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    if schedule == "onecycle":
        return 1.0 - (1.0 - final) * progress
    return final + (1.0 - final) * 0.5 * (1.0 + math.cos(math.pi * progress))


def split_outputs(output: Any) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
    """Main logits and auxiliary logits from a model's train-mode output."""
    if hasattr(output, "aux_logits"):
        return output.logits, tuple(output.aux_logits)
    return output, ()


def resolve_aux_weights(config: TrainConfig, model: nn.Module) -> tuple[float, ...]:
    """The configured auxiliary weights: the model's defaults, one value for all, or a list."""
    defaults = tuple(float(w) for w in getattr(model, "default_aux_weights", ()))
    weights = config.aux_weights
    if weights is None:
        return defaults
    if isinstance(weights, (int, float)):
        return (float(weights),) * len(defaults)
    if len(weights) != len(defaults):
        raise TrainingError(
            f"model {config.model!r} has {len(defaults)} auxiliary head(s), but "
            f"{len(weights)} auxiliary weight(s) were given")
    return tuple(float(w) for w in weights)


def training_loss(output: Any, targets: torch.Tensor, aux_weights: tuple[float, ...],
                  label_smoothing: float) -> tuple[torch.Tensor, torch.Tensor]:
    """main cross-entropy + sum(weight x auxiliary cross-entropy); also the main logits."""
    logits, aux_logits = split_outputs(output)
    loss = F.cross_entropy(logits.float(), targets, label_smoothing=label_smoothing)
    for weight, aux in zip(aux_weights, aux_logits):
        # A zero weight still joins the graph, so every parameter gets a gradient (DDP).
        loss = loss + weight * F.cross_entropy(aux.float(), targets,
                                               label_smoothing=label_smoothing)
    return loss, logits


def build_optimizer(config: TrainConfig, model: nn.Module) -> torch.optim.Optimizer:
    """SGD (Nesterov), AdamW or Adam; weight decay only on weights, not on norms and biases.

    Each group carries ``lr_scale``, its multiple of the scheduled learning rate: 1 for the
    weights, ``config.norm_bias_lr`` for norms and biases.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.ndim > 1], "weight_decay": config.weight_decay,
         "lr_scale": 1.0},
        {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0,
         "lr_scale": config.norm_bias_lr},
    ]
    groups = [g for g in groups if g["params"]]
    if config.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=config.lr, momentum=config.momentum,
                               nesterov=config.nesterov and config.momentum > 0)
    betas = (config.momentum, 0.999)
    if config.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=config.lr, betas=betas)
    return torch.optim.Adam(groups, lr=config.lr, betas=betas)


def format_epoch_line(row: dict, epochs: int) -> str:
    """``Epoch 3/10 - 42.1s - loss: 1.2345 - acc: 0.5678 - val_loss: ... - lr: ...``"""
    parts = [f"Epoch {row['epoch']}/{epochs}", f"{row['seconds']:.1f}s",
             f"loss: {row['train_loss']:.4f}", f"acc: {row['train_acc']:.4f}"]
    if row["val_loss"] is not None:
        parts += [f"val_loss: {row['val_loss']:.4f}", f"val_acc: {row['val_acc']:.4f}"]
    parts.append(f"lr: {row['lr']:.3g}")
    return " - ".join(parts)


class StopRequest:
    """Ctrl-C or SIGTERM asks the loop to stop after the current step; a second one stops now."""

    def __init__(self) -> None:
        self.requested = False

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    @contextmanager
    def installed(self) -> Iterator[StopRequest]:
        if threading.current_thread() is not threading.main_thread():
            yield self  # signals reach only the main thread; nothing to install
            return
        previous = {s: signal.signal(s, self._handle) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield self
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)


# --- data, model, run folder


@dataclass
class DeviceData:
    """The split data set, as uint8/int64 tensors on the training device."""

    train_x: torch.Tensor
    train_y: torch.Tensor
    val_x: torch.Tensor
    val_y: torch.Tensor
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    classes: tuple[str, ...]
    info: dict


def prepare_data(config: TrainConfig, data: Any, device: torch.device) -> DeviceData:
    """Split off the validation images, compute the statistics, move everything to ``device``."""
    from cifar_inception.data import channel_stats, split_train_val

    train_x, train_y, val_x, val_y = split_train_val(
        data.train_images, data.train_labels, val_size=config.val_size, seed=SPLIT_SEED)
    if config.train_limit is not None and config.train_limit < len(train_x):
        pick = torch.randperm(len(train_x), generator=torch.Generator().manual_seed(
            derived_seed(SPLIT_SEED, "train-limit")))[:config.train_limit].sort().values.numpy()
        train_x, train_y = train_x[pick], train_y[pick]
    mean, std = channel_stats(train_x)
    mean, std = tuple(float(v) for v in mean), tuple(float(v) for v in std)
    info = {"source": getattr(data, "source", None), "checksum": getattr(data, "checksum", None),
            "train_images": len(train_x), "val_images": len(val_x), "split_seed": SPLIT_SEED,
            "mean": list(mean), "std": list(std)}

    def on_device(array: Any, dtype: torch.dtype) -> torch.Tensor:
        return torch.as_tensor(array).to(device=device, dtype=dtype)

    return DeviceData(on_device(train_x, torch.uint8), on_device(train_y, torch.long),
                      on_device(val_x, torch.uint8), on_device(val_y, torch.long),
                      mean, std, tuple(data.classes), info)


def build_model(config: TrainConfig, num_classes: int, device: torch.device,
                ctx: DistContext) -> nn.Module:
    torch.manual_seed(config.seed)  # the same initial weights on every rank, every time
    model = create_model(config.model, num_classes=num_classes, **config.model_options)
    if config.sync_bn:
        model = distributed.convert_sync_batchnorm(model, ctx, device)
    model = model.to(device)
    if uses_channels_last(config, device):
        model = model.to(memory_format=torch.channels_last)
    if _stem_is_fixed(config, model):
        model.stem_conv().weight.requires_grad_(False)  # the whitening stays as set
    return model


def uses_channels_last(config: TrainConfig, device: torch.device) -> bool:
    return config.channels_last if device.type == "cuda" else config.cpu_channels_last


def autocast_for(config: TrainConfig, device: torch.device) -> Any:
    """bf16 autocast on CUDA (``amp``) or on the CPU (``cpu_amp``), else nothing."""
    enabled = config.amp if device.type == "cuda" else config.cpu_amp
    return torch.autocast(device.type, dtype=torch.bfloat16) if enabled else nullcontext()


def init_from_data(model: nn.Module, prepared: DeviceData) -> None:
    """Models that set layers from the data (e.g. a whitening stem) see the first training
    images once, before the first step (a resumed run has its weights already)."""
    if hasattr(model, "init_from_data"):
        images = prepared.train_x[:INIT_IMAGES]
        model.init_from_data(normalize(images, prepared.mean, prepared.std))


class Lookahead:
    """airbench's lookahead: an EMA of the weights (and norm statistics) that the weights are
    reset to every ``every`` steps, and that replaces them at the end of training.

    The EMA's decay ramps up as ``decay ** every * progress ** 3``: early on the weights move
    freely, late in the run they are averaged over the last few hundred steps.
    """

    def __init__(self, model: nn.Module, every: int, decay: float):
        self.every, self.decay = every, decay
        self.tensors = [t for t in model.state_dict().values() if t.is_floating_point()]
        self.average = [t.detach().clone() for t in self.tensors]

    @torch.no_grad()
    def after_step(self, step: int, total_steps: int) -> None:
        """Call after optimizer step ``step`` (1-based); the last step copies the EMA in."""
        if step == total_steps:
            self._update(1.0)
        elif step % self.every == 0:
            self._update(self.decay ** self.every * (step / total_steps) ** 3)

    def _update(self, decay: float) -> None:
        for average, tensor in zip(self.average, self.tensors):
            average.lerp_(tensor, 1.0 - decay)
            tensor.copy_(average)

    def state_dict(self) -> list[torch.Tensor]:
        return [t.clone() for t in self.average]

    def load_state_dict(self, state: list[torch.Tensor]) -> None:
        for average, saved in zip(self.average, state):
            average.copy_(saved)


def check_model(config: TrainConfig) -> None:
    """Refuse an unknown model name or option at once, before the data is loaded."""
    import inspect

    from cifar_inception.models.registry import get_builder, model_options

    known = model_options(config.model)  # ModelError for an unknown name
    unknown = sorted(set(config.model_options) - set(known))
    takes_any = any(p.kind is p.VAR_KEYWORD
                    for p in inspect.signature(get_builder(config.model)).parameters.values())
    if unknown and not takes_any:
        raise ModelError(f"model {config.model!r} has no option(s) {', '.join(unknown)}; "
                         f"its options: {', '.join(known) or 'none'}")


def hardware_info(device: torch.device, ctx: DistContext) -> dict:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else \
        (platform.processor() or platform.machine())
    return {"device": str(device), "device_name": name, "cpu_count": os.cpu_count(),
            "threads": torch.get_num_threads(), "world_size": ctx.world_size,
            "platform": platform.platform()}


def run_record(config: TrainConfig, prepared: DeviceData, model: nn.Module,
               aux_weights: tuple[float, ...], device: torch.device, ctx: DistContext) -> dict:
    """config.json: everything needed to repeat the run."""
    recipe = get_recipe(config.recipe) if config.recipe else None
    return {
        "config": config.to_dict(),
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


# --- resume


def resume_config(run: str | os.PathLike, **overrides: Any) -> TrainConfig:
    """The configuration a run was started with, with runtime options (device, threads,
    epochs, ...) replaced by ``overrides``; changing anything that alters the computation
    (model, learning rate, ...) is refused."""
    saved = TrainConfig.from_dict(_saved_config(run))
    values = saved.to_dict()
    values["stop_after_epochs"] = None  # a pause applies to the invocation that asked for it
    if "epochs" in overrides and "train_steps" not in overrides:
        values["train_steps"] = None  # more epochs replace a budget's plan: whole epochs
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


def _check_resume_matches(config: TrainConfig, saved: dict, path: Path) -> None:
    for key, value in config.to_dict().items():
        if key not in RUNTIME_FIELDS and key in saved and saved[key] != value:
            raise TrainingError(f"{path}: the run was trained with {key}={saved[key]!r}, "
                                f"not {value!r}; start a new run instead")


# --- the loop


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


def _threads_for(config: TrainConfig, ctx: DistContext) -> int:
    """--threads, else the cores this process may use, shared among the ranks on them."""
    return config.num_threads or max(1, usable_cores() // ctx.world_size)


def _fit_cpu(config: TrainConfig, ctx: DistContext) -> tuple[TrainConfig, str]:
    """Threads and precision for this CPU; the config with ``cpu_amp`` decided, and why."""
    threads = _threads_for(config, ctx)
    torch.set_num_threads(threads)
    precision = cpu_precision(config.cpu_amp)
    how = "--threads" if config.num_threads else "the cores this process may use"
    line = (f"{precision.describe()}; {threads} thread{'s' if threads != 1 else ''} per "
            f"process ({how})")
    return replace(config, cpu_amp=precision.bf16), line


def train(config: TrainConfig | None = None, data: Any = None, *,
          resume: str | os.PathLike | None = None,
          log: Callable[[str], None] | None = None,
          epoch_end: Callable[..., None] | None = None) -> TrainResult:
    """Train ``config.model`` on CIFAR-10 and return where the run is and how it went.

    ``data``: a loaded ``CIFAR10`` (default: ``load_cifar10(config.data_dir)``).
    ``resume``: a run folder (or its last.pt) to continue; ``config`` may then be None (the
    run's own) or come from :func:`resume_config`. ``log``: where progress lines go (default
    print; only rank 0 logs under torchrun). ``epoch_end(row, model, mean, std)``: called on
    rank 0 after each epoch is logged and saved, outside the epoch's timing (benchmarks use
    it to follow test accuracy against training time).
    """
    started = time.perf_counter()  # a --budget counts from here
    if config is None:
        if resume is None:
            raise TrainingError("give a configuration or a run to resume")
        config = resume_config(resume)
    validate(config)
    if config.data_dir is not None:  # recorded absolute, so evaluation finds it from anywhere
        config = replace(config, data_dir=str(Path(config.data_dir).expanduser().resolve()))
    ctx = distributed.context_from_environment()
    device = distributed.device_for(ctx, pick_device(config.device))
    emit = (log or (lambda line: print(line, flush=True))) if ctx.is_main else (lambda _: None)
    threads_before = torch.get_num_threads()
    held = ExitStack()  # the run folder's lock, from before it is read to the end of the run
    try:
        if device.type == "cpu":
            config, line = _fit_cpu(config, ctx)
            emit(line)
        distributed.init(ctx, device, config.dist_timeout)
        return _train(config, data, resume, ctx, device, emit, epoch_end, started, held)
    except CifarInceptionError as exc:
        if ctx.enabled:  # say which rank failed; torchrun then stops the others
            raise type(exc)(f"rank {ctx.rank}: {exc}") from None
        raise
    except RuntimeError as exc:
        if ctx.enabled and distributed.is_communication_failure(exc):
            raise distributed.communication_error(ctx, exc) from None
        raise
    finally:
        held.close()
        distributed.shutdown()
        torch.set_num_threads(threads_before)


@dataclass
class Loop:
    """What every step needs, fixed for the whole run."""

    config: TrainConfig
    ctx: DistContext
    device: torch.device
    prepared: DeviceData
    model: nn.Module                # the module itself: checkpoints, validation
    net: nn.Module                  # what the steps call: DDP and/or compiled around it
    optimizer: torch.optim.Optimizer
    aux_weights: tuple[float, ...]
    policy: AugmentPolicy
    steps_per_epoch: int
    lookahead: Lookahead | None = None
    run_dir: Path | None = None     # rank 0 only

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    @property
    def total_steps(self) -> int:
        """Optimiser steps of the whole run: ``train_steps`` (a budget's), else every epoch's."""
        return self.config.train_steps or self.config.epochs * self.steps_per_epoch

    def steps_in_epoch(self, epoch: int) -> int:
        """All of them, but in the last epoch of a run of ``train_steps``."""
        return min(self.steps_per_epoch, self.total_steps - epoch * self.steps_per_epoch)

    def schedule_steps(self, fraction: float | None, epochs: float | None) -> int | None:
        """A schedule's length in steps: a fraction of the run, or epochs (None: none)."""
        if fraction is not None:
            return round(fraction * self.total_steps)
        return None if epochs is None else round(epochs * self.steps_per_epoch)

    @property
    def warmup_steps(self) -> int:
        return self.schedule_steps(self.config.warmup_fraction, self.config.warmup_epochs)

    @property
    def whiten_bias_steps(self) -> int | None:
        return self.schedule_steps(self.config.whiten_bias_fraction,
                                   self.config.whiten_bias_epochs)

    def lr_at(self, step: int) -> float:
        """The learning rate of global step ``step`` (0-based)."""
        c = self.config
        return c.lr * lr_factor(step, self.total_steps, self.warmup_steps, c.schedule,
                                c.final_lr)

    def checkpoint(self, position: Position, metrics: dict | None,
                   with_training: bool = True) -> dict:
        """best.pt holds weights and metrics; last.pt also the optimiser and RNG states."""
        training: dict[str, Any] = {"config": self.config.to_dict(),
                                    "position": vars(position).copy()}
        if with_training:
            if self.lookahead is not None:
                training["lookahead"] = self.lookahead.state_dict()
            training.update(
                optimizer=self.optimizer.state_dict(),
                rng={"cpu": torch.get_rng_state(),
                     "cuda": [torch.cuda.get_rng_state(self.device)] if self.cuda else []},
                world_size=self.ctx.world_size)
        p = self.prepared
        return make_checkpoint(
            model_name=self.config.model, model_options=self.config.model_options,
            num_classes=len(p.classes), classes=list(p.classes), mean=list(p.mean),
            std=list(p.std), state_dict=self.model.state_dict(), training=training,
            metrics=metrics)


def _train(config: TrainConfig, data: Any, resume: str | os.PathLike | None,
           ctx: DistContext, device: torch.device, emit: Callable[[str], None],
           epoch_end: Callable[..., None] | None = None,
           started: float | None = None, held: ExitStack | None = None) -> TrainResult:
    check_model(config)  # before the data is loaded: a typo should fail at once
    held = held if held is not None else ExitStack()
    if resume is not None and ctx.is_main:  # one process per run folder, before reading it
        held.enter_context(locked(resume_target(resume).folder))
    ckpt, position = _resume_state(config, resume)
    if data is None:
        from cifar_inception.data import load_cifar10

        with distributed.main_first(ctx):  # rank 0 fills the decoded-array cache first
            data = load_cifar10(config.data_dir, download=config.download,
                                progress=ctx.is_main)
    loop = _build_loop(config, prepare_data(config, data, device), ctx, device, ckpt)
    run_started = time.perf_counter() if started is None else started
    test_images = len(data.test_labels) if config.test else 0
    budget_plan = None
    if config.budget is not None and ckpt is None:
        budget_plan = plan_budget(loop, test_images, run_started)
        if config.tta and not budget_plan.tta:
            emit(f"test-time augmentation off: its {len(TTA_VIEWS)} views of the test set "
                 f"would take over {TTA_SHARE:.0%} of the budget on this machine")
        loop.config = config = replace(config, train_steps=budget_plan.train_steps,
                                       epochs=budget_plan.epochs, tta=budget_plan.tta)
        emit(budget_plan.describe(config.budget, loop.steps_per_epoch, config.batch_size))
    elif config.train_steps is not None:  # the epochs that hold them, the last cut short
        loop.config = config = replace(
            config, epochs=math.ceil(config.train_steps / loop.steps_per_epoch))
    if ctx.is_main:
        loop.run_dir = _open_run_dir(loop, resume, ckpt, position, held, emit)
        emit(_start_line(loop, resumed=ckpt is not None))

    status, message = "completed", ""
    stop = StopRequest()
    with stop.installed():
        epoch = position.epoch - 1
        while (epoch := epoch + 1) < config.epochs:  # a budget's re-plan may change the end
            if config.stop_after_epochs is not None and epoch >= config.stop_after_epochs:
                status = "paused"
                message = (f"paused after epoch {epoch} of {config.epochs}; continue with: "
                           f"cifar-inception train --resume {loop.run_dir}")
                emit(message)
                break
            started = time.perf_counter() - position.seconds
            totals, lr, stopped_at = train_epoch(loop, epoch, position, stop)
            if stopped_at is not None:  # Ctrl-C inside the epoch: save where we are
                position = replace(position, epoch=epoch, step=stopped_at,
                                   loss_sum=float(totals[0]), correct=float(totals[1]),
                                   seen=float(totals[2]),
                                   seconds=time.perf_counter() - started)
                if ctx.is_main:
                    save_checkpoint(loop.run_dir / LAST, loop.checkpoint(position, None))
                status = "interrupted"
                message = (f"interrupted at epoch {epoch + 1}, step {stopped_at} of "
                           f"{loop.steps_in_epoch(epoch)}; saved {loop.run_dir / LAST}; continue "
                           f"with: cifar-inception train --resume {loop.run_dir}")
                break
            trained_s = time.perf_counter() - started
            with record_function("validation"):
                val_loss, val_acc = validation_metrics(loop.model, loop.prepared, config,
                                                       device, ctx)
            if budget_plan is not None and epoch == 0 and config.epochs > 1:
                loop.config = config = replan_budget(
                    loop, budget_plan, run_started, trained_s,
                    time.perf_counter() - started - trained_s, test_images, emit)
            row = {"epoch": epoch + 1, "seconds": round(time.perf_counter() - started, 3),
                   "train_loss": float(totals[0] / totals[2]),
                   "train_acc": float(totals[1] / totals[2]),
                   "val_loss": val_loss, "val_acc": val_acc, "lr": lr}
            position = _end_of_epoch(loop, position, row, emit)
            if epoch_end is not None and ctx.is_main:
                epoch_end(row, loop.model, loop.prepared.mean, loop.prepared.std)
            if stop.requested:  # Ctrl-C during validation or saving: the epoch is complete
                status = "interrupted"
                message = (f"interrupted after epoch {epoch + 1}; saved {loop.run_dir / LAST}; "
                           f"continue with: cifar-inception train --resume {loop.run_dir}")
                break

    history = read_history(loop.run_dir) if ctx.is_main else []
    best = next((r for r in history if r["epoch"] == position.best_epoch), None)
    test = None
    if status == "completed" and ctx.is_main and config.test:
        test = evaluate(loop.run_dir / BEST, data, device=str(device),
                        batch_size=config.eval_batch_size, tta=config.tta)
        emit(f"test ({BEST}, epoch {position.best_epoch}"
             f"{', with test-time augmentation' if config.tta else ''}): "
             f"loss {test['test_loss']:.4f} - "
             f"top-1 {100 * test['test_top1']:.2f}% - top-5 {100 * test['test_top5']:.2f}% "
             f"({loop.run_dir / EVAL_FILE})")
    return TrainResult(loop.run_dir, status, position.epoch, history, best, test, message)


def plan_budget(loop: Loop, test_images: int, started: float) -> Plan:
    """Measure this machine's speed on a scratch copy of the model, then plan the run."""
    rates = measure_rates(loop)
    # Every rank steps together: the slowest one sets the pace.
    slowest = distributed.all_reduce(torch.tensor(
        [rates.step_s, rates.val_image_s, rates.test_image_s], dtype=torch.float64,
        device=loop.device), loop.ctx, op="max").tolist()
    budget, rates = loop.config.budget, Rates(*slowest, epoch_s=rates.epoch_s)
    tta = loop.config.tta and worth_tta(budget, test_images, len(TTA_VIEWS), rates.test_image_s)
    val_per_rank = math.ceil(loop.prepared.val_x.shape[0] / loop.ctx.world_size)
    return plan(budget, time.perf_counter() - started, rates,
                steps_per_epoch=loop.steps_per_epoch, val_images=val_per_rank,
                test_images=test_images * (len(TTA_VIEWS) if tta else 1), tta=tta)


def replan_budget(loop: Loop, budget_plan: Plan, run_started: float, train_s: float,
                  val_s: float, test_images: int, emit: Callable[[str], None]) -> TrainConfig:
    """Plan the rest of the run again from its first epoch, a far longer measurement than
    the probe's few steps (which a busy machine, or kernels still warming up, can mislead);
    the schedules, fractions of the run, follow. The run's config and config.json get it."""
    config, ctx, steps_per_epoch = loop.config, loop.ctx, loop.steps_per_epoch
    done = loop.steps_in_epoch(0)
    val_per_rank = math.ceil(loop.prepared.val_x.shape[0] / ctx.world_size)
    measured = distributed.all_reduce(torch.tensor(
        [train_s / done, val_s / max(1, val_per_rank)], dtype=torch.float64,
        device=loop.device), ctx, op="max").tolist()
    rates = replace(budget_plan.rates, step_s=measured[0], val_image_s=measured[1])
    views = len(TTA_VIEWS) if config.tta else 1
    try:
        rest = plan(config.budget, time.perf_counter() - run_started, rates,
                    steps_per_epoch=steps_per_epoch, val_images=val_per_rank,
                    test_images=test_images * views).train_steps
    except BudgetError:  # the budget is spent already: end with this epoch
        rest = 0
    total = done + rest
    if abs(total - config.train_steps) <= 0.01 * config.train_steps:
        return config
    emit(f"budget re-planned after epoch 1 (measured {config.batch_size / rates.step_s:,.0f} "
         f"training images/s): {total / steps_per_epoch:.2f} epochs, {total} steps in all")
    config = replace(config, train_steps=total, epochs=math.ceil(total / steps_per_epoch))
    if loop.run_dir is not None:
        record = read_record(loop.run_dir, emit)
        if record is not None:
            record["config"] = config.to_dict()
            atomic_write_json(loop.run_dir / CONFIG_FILE, record)
    return config


def measure_rates(loop: Loop) -> Rates:
    """Seconds per training step and per validation and test image, measured on a copy of
    the model (its optimiser and lookahead too), so that the run itself is untouched."""
    config, device, data = loop.config, loop.device, loop.prepared
    rng = torch.get_rng_state(), (torch.cuda.get_rng_state(device) if loop.cuda else None)
    model = copy.deepcopy(loop.model)
    net = distributed.wrap(model, loop.ctx, device)
    optimizer = build_optimizer(config, model)
    lookahead = (Lookahead(model, config.lookahead_steps, config.lookahead_decay)
                 if config.lookahead else None)
    autocast, channels_last = autocast_for(config, device), uses_channels_last(config, device)
    batch = distributed.per_rank_batch(config.batch_size, loop.ctx)
    images, targets = data.train_x[:batch], data.train_y[:batch]
    calls = 0

    def step() -> None:
        nonlocal calls
        x = normalize(loop.policy(images, generator=seeded_generator(device, "probe")), data.mean, data.std,
                      channels_last=channels_last)
        optimise(net, optimizer, x, targets, loop.aux_weights, config.label_smoothing,
                 autocast)
        calls += 1
        if lookahead is not None:
            lookahead.after_step(calls, 1 << 30)
        _sync(device)

    step_s = time_per_call(step)
    model.eval()
    sample = data.val_x[:config.eval_batch_size]
    if sample.shape[0] == 0:
        sample = data.train_x[:config.eval_batch_size]

    def evaluate_sample(bf16: bool, in_channels_last: bool) -> Callable[[], None]:
        net = model.to(memory_format=torch.channels_last if in_channels_last
                       else torch.contiguous_format)

        def run() -> None:
            with autocast_for(config, device) if bf16 else nullcontext():
                log_probabilities(net, sample, data.mean, data.std,
                                  batch_size=config.eval_batch_size, device=device,
                                  channels_last=in_channels_last)
        return run

    per_image = 1.0 / sample.shape[0]
    val_s = time_per_call(evaluate_sample(True, channels_last), min_seconds=0.5,
                          min_calls=1) * per_image
    # The final test evaluates best.pt as evaluate() does: fp32, in its layout.
    test_s = time_per_call(evaluate_sample(False, test_in_channels_last(device)),
                           min_seconds=0.5, min_calls=1) * per_image

    out_dir = Path(config.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".budget-probe-", dir=out_dir) as scratch:
        def write_checkpoints() -> None:  # best.pt and last.pt, as an epoch's end writes them
            save_checkpoint(Path(scratch) / BEST, {"model": model.state_dict()})
            save_checkpoint(Path(scratch) / LAST, {"model": model.state_dict(),
                                                   "optimizer": optimizer.state_dict()})

        epoch_s = time_per_call(write_checkpoints, min_seconds=0.2, min_calls=1)
    torch.set_rng_state(rng[0])
    if rng[1] is not None:
        torch.cuda.set_rng_state(rng[1], device)
    return Rates(step_s, val_s, test_s, epoch_s + EPOCH_FIXED_S)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_epoch(loop: Loop, epoch: int, position: Position, stop: StopRequest
                ) -> tuple[torch.Tensor, float, int | None]:
    """The steps of one epoch, from ``position.step`` on.

    Returns the global (loss sum, correct, seen) of the epoch, the last learning rate, and
    the number of steps done when a stop request ended the epoch early (else None).
    """
    config, ctx, device, data = loop.config, loop.ctx, loop.device, loop.prepared
    n_train = data.train_x.shape[0]
    per_rank = distributed.per_rank_batch(config.batch_size, ctx)
    order = torch.randperm(n_train, device=device,
                           generator=seeded_generator(device, config.seed, "order", epoch))
    # Partial sums of an interrupted epoch are global; rank 0 carries them on.
    carried = [position.loss_sum, position.correct, position.seen] if ctx.is_main \
        else [0.0, 0.0, 0.0]
    sums = torch.tensor(carried, dtype=torch.float64, device=device)
    cutout_fill = [round(m * 255) for m in data.mean]  # normalises to about zero
    check_every = 10 if loop.cuda else 1  # a check syncs CUDA; the CPU pays nothing
    autocast = autocast_for(config, device)
    channels_last = uses_channels_last(config, device)
    flips = None
    if config.flip and config.flip_mode == "alternate":  # the same draw every epoch
        flips = alternating_flips(n_train, epoch,
                                  generator=seeded_generator(device, config.seed, "flips"))
    stem_bias, bias_steps = _fixed_stem_bias(loop), loop.whiten_bias_steps
    first = epoch * loop.steps_per_epoch  # global index of the epoch's first step
    steps = loop.steps_in_epoch(epoch)
    loop.model.train()
    bar = _progress(steps, position.step, epoch, config.epochs, ctx)
    lr, stopped_at = loop.lr_at(first + position.step), None
    for step in range(position.step, steps):
        lr = loop.lr_at(first + step)
        for group in loop.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)
        # The whole global batch is augmented alike on every rank; each keeps its share.
        with record_function("data"):
            index = order[step * config.batch_size:(step + 1) * config.batch_size]
            images = loop.policy(data.train_x[index], fill=cutout_fill,
                                 flip_mask=None if flips is None else flips[index],
                                 generator=seeded_generator(device, config.seed, "augment",
                                                            epoch, step))
            images = distributed.shard(images, ctx)
            targets = distributed.shard(data.train_y[index], ctx)
            x = normalize(images, data.mean, data.std, channels_last=channels_last)
        frozen = stem_bias if stem_bias is not None and first + step >= bias_steps else None
        loss, logits = optimise(loop.net, loop.optimizer, x, targets, loop.aux_weights,
                                config.label_smoothing, autocast, frozen=frozen)
        if loop.lookahead is not None:
            loop.lookahead.after_step(first + step + 1, loop.total_steps)
        sums += torch.stack([loss.detach().double() * per_rank,
                             (logits.argmax(1) == targets).sum().double(),
                             torch.tensor(float(per_rank), dtype=torch.float64, device=device)])

        last = step + 1 == steps
        if (step + 1) % check_every and not last:
            continue
        # One collective for both flags, so every rank stops at the same step.
        stop_now, diverged = distributed.all_reduce(torch.tensor(
            [float(stop.requested), float(not torch.isfinite(sums[0]))], device=device),
            ctx, op="max").tolist()
        if diverged:
            bar.close()
            raise TrainingError(_diverged_message(loop.run_dir, epoch, step, lr))
        bar.update(step + 1 - bar.n)
        if bar.n % 10 == 0 or last:
            bar.set_postfix(loss=f"{sums[0].item() / max(1.0, sums[2].item()):.4f}")
        if stop_now and not last:
            stopped_at = step + 1
            break
    bar.close()
    return distributed.all_reduce(sums, ctx), lr, stopped_at


def optimise(net: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor,
             targets: torch.Tensor, aux_weights: tuple[float, ...], label_smoothing: float,
             autocast: Any, frozen: torch.Tensor | None = None
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimiser step on a batch; the loss and the main head's logits.

    ``frozen``: a parameter the step leaves as it is (the whitening stem's bias, once its
    training time is over).
    """
    with record_function("forward"):
        with autocast:
            output = net(x)
        loss, logits = training_loss(output, targets, aux_weights, label_smoothing)
    with record_function("backward"):
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
    with record_function("optimizer"):
        if frozen is not None:
            frozen.grad = None  # SGD skips a parameter without a gradient
        optimizer.step()
    return loss, logits


def _fixed_stem_bias(loop: Loop) -> torch.Tensor | None:
    """The bias of a fixed whitening stem (trained for ``whiten_bias_steps`` only), else None."""
    return loop.model.stem_conv().bias if _stem_is_fixed(loop.config, loop.model) else None


def _stem_is_fixed(config: TrainConfig, model: nn.Module) -> bool:
    """A whitening stem set from the data whose weights stay (a bias training time given)."""
    timed = config.whiten_bias_epochs is not None or config.whiten_bias_fraction is not None
    return config.whiten_init and timed and hasattr(model, "stem_conv")


def _end_of_epoch(loop: Loop, position: Position, row: dict,
                  emit: Callable[[str], None]) -> Position:
    """Log the epoch, then save best.pt (if it improved) and last.pt; the new position."""
    score = row["val_acc"] if row["val_acc"] is not None else float(row["epoch"])  # the last
    improved = position.best_score is None or score > position.best_score
    position = Position(row["epoch"], 0,
                        best_score=score if improved else position.best_score,
                        best_epoch=row["epoch"] if improved else position.best_epoch)
    if loop.ctx.is_main:
        emit(format_epoch_line(row, loop.config.epochs))
        append_jsonl(loop.run_dir / METRICS_FILE, row)
        if improved:
            save_checkpoint(loop.run_dir / BEST,
                            loop.checkpoint(position, row, with_training=False))
        save_checkpoint(loop.run_dir / LAST, loop.checkpoint(position, row))
    return position


def _resume_state(config: TrainConfig, resume: str | os.PathLike | None
                  ) -> tuple[dict | None, Position]:
    """The checkpoint to continue from (checked against ``config``) and its position."""
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
    position = Position(**ckpt["training"]["position"])
    if position.epoch >= config.epochs:
        raise TrainingError(f"{path.parent}: all {config.epochs} epochs are done; "
                            f"pass a larger --epochs to train further")
    return ckpt, position


def _build_loop(config: TrainConfig, prepared: DeviceData, ctx: DistContext,
                device: torch.device, ckpt: dict | None) -> Loop:
    """Model, optimiser and the rest, fresh or restored from ``ckpt``."""
    steps_per_epoch = prepared.train_x.shape[0] // config.batch_size  # drop the last partial
    distributed.per_rank_batch(config.batch_size, ctx)  # refuses an uneven split early
    if steps_per_epoch == 0:
        raise TrainingError(f"the training split has {prepared.train_x.shape[0]} images, "
                            f"fewer than one batch of {config.batch_size}; lower --batch-size")
    model = build_model(config, len(prepared.classes), device, ctx)
    aux_weights = resolve_aux_weights(config, model)
    optimizer = build_optimizer(config, model)
    if ckpt is None:
        if config.whiten_init:
            init_from_data(model, prepared)
    else:
        model.load_state_dict(ckpt["state_dict"])
        optimizer.load_state_dict(ckpt["training"]["optimizer"])
        torch.set_rng_state(ckpt["training"]["rng"]["cpu"])
        if device.type == "cuda" and ckpt["training"]["rng"]["cuda"]:
            torch.cuda.set_rng_state(ckpt["training"]["rng"]["cuda"][0], device)
    net = distributed.wrap(model, ctx, device)
    if config.compile:
        net = torch.compile(net)
    policy = AugmentPolicy(config.crop_padding, config.padding_mode, config.flip, config.cutout)
    lookahead = None
    if config.lookahead:
        lookahead = Lookahead(model, config.lookahead_steps, config.lookahead_decay)
        if ckpt is not None and "lookahead" in ckpt["training"]:
            lookahead.load_state_dict(ckpt["training"]["lookahead"])
    return Loop(config, ctx, device, prepared, model, net, optimizer, aux_weights, policy,
                steps_per_epoch, lookahead)


def _open_run_dir(loop: Loop, resume: str | os.PathLike | None, ckpt: dict | None,
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
        record = run_record(loop.config, loop.prepared, loop.model, loop.aux_weights,
                            loop.device, loop.ctx)
    if ckpt is not None:
        record["config"] = loop.config.to_dict()
        record.setdefault("resumed", []).append(
            {"at_epoch": position.epoch, "at_step": position.step, "command": list(sys.argv),
             "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
             "hardware": hardware_info(loop.device, loop.ctx)})
        truncate_history(run_dir, position.epoch, emit)
    atomic_write_json(run_dir / CONFIG_FILE, record)
    return run_dir


def _start_line(loop: Loop, *, resumed: bool) -> str:
    c, p = loop.config, loop.prepared
    processes = f" x{loop.ctx.world_size}" if loop.ctx.enabled else ""
    return (f"{'resuming' if resumed else 'training'} {c.model} (recipe {c.recipe or 'none'}) "
            f"on {loop.device}{processes}: {p.train_x.shape[0]} training / "
            f"{p.val_x.shape[0]} validation images, {_count(c.epochs, 'epoch')} of "
            f"{loop.steps_per_epoch} steps ({loop.total_steps} in all), batch {c.batch_size}; "
            f"run folder {loop.run_dir}")


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


@torch.no_grad()
def validation_metrics(model: nn.Module, prepared: DeviceData, config: TrainConfig,
                       device: torch.device, ctx: DistContext) -> tuple[float | None, float | None]:
    """Validation loss (plain cross-entropy of the main head) and accuracy, over all ranks."""
    if prepared.val_x.shape[0] == 0:
        return None, None
    distributed.broadcast_buffers(model, ctx)  # every rank evaluates rank 0's model
    model.eval()
    images = prepared.val_x[ctx.rank::ctx.world_size]
    labels = prepared.val_y[ctx.rank::ctx.world_size]
    with autocast_for(config, device):  # as in training: bf16 when the run uses it
        log_probs = log_probabilities(model, images, prepared.mean, prepared.std,
                                      batch_size=config.eval_batch_size, device=device,
                                      channels_last=uses_channels_last(config, device))
    labels_cpu = labels.cpu()
    sums = torch.tensor([float(F.nll_loss(log_probs, labels_cpu, reduction="sum")),
                         float((log_probs.argmax(1) == labels_cpu).sum()), float(len(labels))],
                        dtype=torch.float64, device=device)
    distributed.all_reduce(sums, ctx)
    model.train()
    return float(sums[0] / sums[2]), float(sums[1] / sums[2])


def _progress(total: int, initial: int, epoch: int, epochs: int, ctx: DistContext) -> Any:
    """A tqdm bar on a terminal; a silent stand-in elsewhere."""
    from tqdm import tqdm

    enabled = ctx.is_main and sys.stdout.isatty()
    return tqdm(total=total, initial=initial, desc=f"Epoch {epoch + 1}/{epochs}",
                unit="step", leave=False, disable=not enabled, dynamic_ncols=True)


def _diverged_message(run_dir: Path | None, epoch: int, step: int, lr: float) -> str:
    last = run_dir / LAST if run_dir is not None else None
    kept = (f"the last good checkpoint is {last}" if last is not None and last.exists()
            else "no checkpoint was written")
    return (f"the loss became NaN or infinite in epoch {epoch + 1} (by step {step + 1}), "
            f"learning rate {lr:.3g}; stopped, {kept}. Try a lower --lr")
