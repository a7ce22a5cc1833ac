"""What a run sets up before its first step: threads, the data on the device, the model, and
the :class:`Loop` that holds them with the optimiser; also the seeds of the random draws."""

from __future__ import annotations

import hashlib
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from cifar_inception import distributed
from cifar_inception.augment import AugmentPolicy, normalize
from cifar_inception.budget import RunPlan
from cifar_inception.checkpoint import make_checkpoint
from cifar_inception.devices import cpu_precision, reuse_freed_memory, usable_cores
from cifar_inception.distributed import DistContext
from cifar_inception.errors import ModelError, TrainingError
from cifar_inception.models import create_model, hooks
from cifar_inception.recipes import TrainConfig
from cifar_inception.training.optim import (
    Lookahead,
    build_optimizer,
    lr_at_progress,
    resolve_aux_weights,
)
from cifar_inception.training.plan import TrainPlan
from cifar_inception.training.resume import Position

SPLIT_SEED = 0  # every run holds out the same validation images, so runs compare
INIT_IMAGES = 5000  # images a model's init_from_data hook sees


def derived_seed(*parts: object) -> int:
    """A 63-bit seed from (seed, purpose, epoch, step, ...), stable across runs and machines."""
    digest = hashlib.blake2b("/".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def more_order(order: torch.Tensor, n_train: int, device: torch.device, seed: int,
                epoch: int) -> torch.Tensor:
    """The epoch's order followed by another permutation, for the steps of a sliver folded
    into the epoch (each drawn from its own generator: the epoch's own order is unchanged)."""
    more = torch.randperm(n_train, device=device, generator=seeded_generator(
        device, seed, "order", epoch, "folded", order.numel() // n_train))
    return torch.cat([order, more])


def seeded_generator(device: torch.device, *parts: object) -> torch.Generator:
    generator = torch.Generator(device=device)
    generator.manual_seed(derived_seed(*parts))
    return generator


def _threads_for(config: TrainConfig, ctx: DistContext) -> int:
    """--threads, at most the cores this process may use (4,096 threads on 2 cores spend
    their time waiting on each other: a step of 0.1 s took minutes), else those cores,
    shared among the ranks on them."""
    if config.num_threads:
        return min(config.num_threads, usable_cores())
    return max(1, usable_cores() // ctx.world_size)


def fit_cpu(config: TrainConfig, ctx: DistContext) -> tuple[int, bool, str]:
    """Threads and precision for this CPU, set: the threads, whether bf16, and why."""
    threads = _threads_for(config, ctx)
    torch.set_num_threads(threads)
    reuse_freed_memory()  # a step's large blocks are reused, not page-faulted in again
    precision = cpu_precision(config.cpu_amp)
    if config.num_threads:
        how = "--threads" if threads == config.num_threads else \
            f"--threads {config.num_threads}, cut to the cores this process may use"
    elif ctx.enabled:
        how = f"the {usable_cores()} cores shared by {ctx.world_size} processes"
    else:
        how = "the cores this process may use"
    line = (f"{precision.describe()}; {threads} thread{'s' if threads != 1 else ''} per "
            f"process ({how})")
    return threads, precision.bf16, line


def check_model(config: TrainConfig) -> None:
    """Refuse an unknown model name or option, an option's value out of its range, a model
    larger than a checkpoint may hold, or an image size the model does not take, at once,
    before the data is loaded."""
    from cifar_inception.checkpoint import MAX_PARAMETERS
    from cifar_inception.models.registry import (
        check_image_size,
        check_model_options,
        create_model,
    )

    check_model_options(config.model, config.model_options)
    check_image_size(config.model, config.image_size)
    with torch.device("meta"):  # the builder checks the values; shapes only, no memory
        model = create_model(config.model, **config.model_options)
    size = sum(p.numel() for p in model.parameters())
    if size > MAX_PARAMETERS:  # options such as widths=4096/4096/4096 ask for 49 G
        raise ModelError(f"{config.model} with {config.model_options} has {size:,} "
                         f"parameters, over the {MAX_PARAMETERS:,} a checkpoint may hold")
    if config.weights is not None:
        start_weights(config)


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

    check_data_size(config, data)
    train_x, train_y, val_x, val_y = split_train_val(
        data.train_images, data.train_labels, val_size=config.val_size, seed=SPLIT_SEED)
    if config.train_limit is not None and config.train_limit < len(train_x):
        pick = torch.randperm(len(train_x), generator=torch.Generator().manual_seed(
            derived_seed(SPLIT_SEED, "train-limit")))[:config.train_limit].sort().values.numpy()
        train_x, train_y = train_x[pick], train_y[pick]
    mean, std = channel_stats(train_x)
    mean, std = tuple(float(v) for v in mean), tuple(float(v) for v in std)
    info = {"dataset": getattr(data, "name", "cifar10"),
            "source": getattr(data, "source", None), "checksum": getattr(data, "checksum", None),
            "image_size": config.image_size, "train_images": len(train_x),
            "val_images": len(val_x), "split_seed": SPLIT_SEED, "mean": list(mean),
            "std": list(std)}

    def on_device(array: Any, dtype: torch.dtype) -> torch.Tensor:
        return torch.as_tensor(array).to(device=device, dtype=dtype)

    return DeviceData(on_device(train_x, torch.uint8), on_device(train_y, torch.long),
                      on_device(val_x, torch.uint8), on_device(val_y, torch.long),
                      mean, std, tuple(data.classes), info)


def check_data_size(config: TrainConfig, data: Any) -> None:
    """Refuse data given already loaded (``train(config, data)``) whose images are not of the
    run's image size: the checkpoint would record a size the model never saw."""
    shape = tuple(data.train_images.shape[1:])
    wanted = (config.image_size, config.image_size, 3)
    if shape != wanted:
        raise TrainingError(f"the data's images are {shape}, not the {wanted} of "
                            f"--image-size {config.image_size}; load it with "
                            f"image_size={config.image_size}")


@dataclass
class Loop:
    """What every step needs: the config as asked and the plan as decided (a budget's
    re-plan replaces the plan; the config never changes)."""

    config: TrainConfig
    plan: TrainPlan
    ctx: DistContext
    device: torch.device
    prepared: DeviceData
    model: nn.Module                # the module itself: checkpoints, validation
    net: nn.Module                  # what the steps call: DDP and/or compiled around it
    optimizer: torch.optim.Optimizer
    aux_weights: tuple[float, ...]
    policy: AugmentPolicy
    lookahead: Lookahead | None = None
    run_dir: Path | None = None     # rank 0 only

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    @property
    def steps_per_epoch(self) -> int:
        return self.plan.steps_per_epoch

    @property
    def total_steps(self) -> int:
        """Optimiser steps of the whole run, as planned."""
        return self.plan.total_steps

    @property
    def bf16(self) -> bool:
        return self.plan.surroundings.bf16

    def steps_in_epoch(self, epoch: int) -> int:
        """All of them, but in the last epoch (shorter, or longer by a folded sliver)."""
        return self.run_plan().steps_in(epoch, self.steps_per_epoch)

    def run_plan(self) -> RunPlan:
        """The schedule in force."""
        return self.plan.schedule

    def set_plan(self, schedule: RunPlan) -> None:
        """Follow a budget's new ``schedule``: the plan changes, the config does not."""
        self.plan = self.plan.replanned(schedule)

    @property
    def warmup_steps(self) -> int:
        """The warm-up's length in steps, as the run began."""
        return round(self.run_plan().warmup * self.total_steps)

    @property
    def whiten_bias_steps(self) -> int | None:
        """The steps a fixed whitening stem's bias trains, as the run began (None: all)."""
        bias = self.run_plan().whiten_bias
        return None if bias is None else round(bias * self.total_steps)

    def lr_at(self, step: int) -> float:
        """The learning rate of global step ``step`` (0-based)."""
        c, plan = self.config, self.run_plan()
        return c.lr * lr_at_progress(plan.at(step), plan.warmup, c.schedule, c.final_lr)

    def bias_trains_at(self, step: int) -> bool:
        """Whether a fixed whitening stem's bias still trains at global step ``step``."""
        plan = self.run_plan()
        return plan.whiten_bias is None or plan.at(step) < plan.whiten_bias

    def checkpoint(self, position: Position, metrics: dict | None,
                   with_training: bool = True) -> dict:
        """best.pt holds weights and metrics; last.pt also the optimiser and RNG states."""
        training: dict[str, Any] = {"config": self.config.to_dict(),
                                    "plan": self.plan.to_dict(),  # a resume continues it
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
            model_name=self.config.model, model_options=self.plan.model_options,
            num_classes=len(p.classes), classes=list(p.classes), mean=list(p.mean),
            std=list(p.std), dataset=p.info.get("dataset"),
            image_size=p.info["image_size"],
            state_dict=self.model.state_dict(), training=training,
            metrics=metrics)


def steps_per_epoch(config: TrainConfig, prepared: DeviceData, ctx: DistContext) -> int:
    """Whole batches of the training split (the last partial one dropped)."""
    steps = prepared.train_x.shape[0] // config.batch_size
    distributed.per_rank_batch(config.batch_size, ctx)  # refuses an uneven split early
    if steps == 0:
        raise TrainingError(f"the training split has {prepared.train_x.shape[0]} images, "
                            f"fewer than one batch of {config.batch_size}; lower --batch-size")
    return steps


def build_loop(config: TrainConfig, plan: TrainPlan, prepared: DeviceData, ctx: DistContext,
               device: torch.device, ckpt: dict | None) -> Loop:
    """Model (with the plan's options), optimiser and the rest, fresh or restored from
    ``ckpt``."""
    model = build_model(config, plan.model_options, len(prepared.classes), device, ctx)
    aux_weights = resolve_aux_weights(config, model)
    optimizer = build_optimizer(config, model)
    if ckpt is None:
        if config.weights is not None:
            load_start_weights(model, config, prepared)
        elif config.whiten_init:
            init_from_data(model, prepared)
    else:
        check_resumed_data(ckpt, prepared)
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
    return Loop(config, plan, ctx, device, prepared, model, net, optimizer, aux_weights,
                policy, lookahead)


def build_model(config: TrainConfig, model_options: dict[str, Any], num_classes: int,
                device: torch.device, ctx: DistContext) -> nn.Module:
    torch.manual_seed(config.seed)  # the same initial weights on every rank, every time
    model = create_model(config.model, num_classes=num_classes, **model_options)
    if config.sync_bn:
        model = distributed.convert_sync_batchnorm(model, ctx, device)
    model = model.to(device)
    if uses_channels_last(config, device):
        model = model.to(memory_format=torch.channels_last)
    if _stem_is_fixed(config, model):
        hooks.stem_conv(model).weight.requires_grad_(False)  # the whitening stays as set
    return model


def uses_channels_last(config: TrainConfig, device: torch.device) -> bool:
    return config.channels_last if device.type == "cuda" else config.cpu_channels_last


def autocast_for(bf16: bool, device: torch.device) -> Any:
    """bf16 autocast on ``device`` where the plan has it, else nothing."""
    return torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else nullcontext()


def _stem_is_fixed(config: TrainConfig, model: nn.Module) -> bool:
    """A whitening stem set from the data whose weights stay (a bias training time given)."""
    timed = config.whiten_bias_epochs is not None or config.whiten_bias_fraction is not None
    return config.whiten_init and timed and hooks.stem_conv(model) is not None


def fixed_stem_bias(loop: Loop) -> torch.Tensor | None:
    """The bias of a fixed whitening stem (trained for the plan's ``whiten_bias``), else None."""
    return hooks.stem_conv(loop.model).bias if _stem_is_fixed(loop.config, loop.model) \
        else None


def start_weights(config: TrainConfig) -> tuple[dict, str]:
    """The checkpoint ``--weights`` names, checked against the model and its options (the
    classes are checked once the data is loaded), and how to name it."""
    from cifar_inception.models.registry import model_options
    from cifar_inception.pretrained import load_checkpoint_for

    start, where = load_checkpoint_for(config.weights, model=config.model,
                                       options=config.model_options)
    defaults = model_options(config.model)
    theirs = {**defaults, **start["model"]["options"]}
    ours = {**defaults, **config.model_options}
    if theirs != ours:
        differ = {k: v for k, v in theirs.items() if ours.get(k) != v}
        raise TrainingError(f"{where} are for {config.model} with {differ}; train it with the "
                            "same options (e.g. --width W or --option KEY=VALUE)")
    return start, where


def load_start_weights(model: nn.Module, config: TrainConfig, prepared: DeviceData) -> None:
    """Fine-tuning: trained weights (``--weights``) replace the fresh ones before the first
    step. They must be for this model, its options and the data's classes."""
    start, where = start_weights(config)
    if list(start["data"]["classes"]) != list(prepared.classes):
        raise TrainingError(f"{where} were trained on the classes {start['data']['classes']}, "
                            f"not this data's {list(prepared.classes)}")
    model.load_state_dict(start["state_dict"])


def check_resumed_data(ckpt: dict, prepared: DeviceData) -> None:
    """Refuse to resume a run on other data than it trained on (``--data-dir`` may change
    from one resume to the next): other classes, whose head would not fit, or other
    training images, whose statistics differ from those the run normalised with."""
    classes = list(ckpt["data"]["classes"])
    if classes != list(prepared.classes):
        raise TrainingError(f"this run was trained on {len(classes)} classes "
                            f"({', '.join(classes[:5])}{', ...' if len(classes) > 5 else ''}), "
                            f"not on this data's; resume it with its own data (--data-dir)")
    # 1e-4 of the 0-1 scale: far below what other images give, above what another JPEG
    # decoder's rounding of the same files could.
    saved = [*ckpt["data"]["mean"], *ckpt["data"]["std"]]
    if any(abs(a - b) > 1e-4 for a, b in zip(saved, [*prepared.mean, *prepared.std])):
        raise TrainingError("this run was trained on other training images (their mean and "
                            "std differ from this data's); resume it with its own data "
                            "(--data-dir)")


def init_from_data(model: nn.Module, prepared: DeviceData) -> None:
    """Models that set layers from the data (e.g. a whitening stem) see the first training
    images once, before the first step (a resumed run has its weights already)."""
    if isinstance(model, hooks.DataInitialised):
        images = prepared.train_x[:INIT_IMAGES]
        hooks.init_from_data(model, normalize(images, prepared.mean, prepared.std))
