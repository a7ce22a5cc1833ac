"""The optimiser, its learning-rate schedule, lookahead, the loss, and one optimiser step."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.profiler import record_function

from cifar_inception.errors import TrainingError
from cifar_inception.models.hooks import default_aux_weights
from cifar_inception.recipes import TrainConfig


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
    # The fused kernel does the same update in one pass over each tensor; the default's
    # chain of per-tensor operations is what dominates a step of the report's 232M-parameter
    # naive network on the CPU (BENCHMARKS.md, "The report's recipe").
    fused = all(p.device.type in ("cpu", "cuda") for p in params)
    adam = torch.optim.AdamW if config.optimizer == "adamw" else torch.optim.Adam
    return adam(groups, lr=config.lr, betas=betas, fused=fused)


def lr_factor(step: int, total_steps: int, warmup_steps: int, schedule: str,
              final: float = 0.0) -> float:
    """Multiplier of the peak learning rate at ``step`` (0-based) of ``total_steps``.

    Warm-up rises linearly from 0.1 to 1; then ``onecycle`` falls linearly towards ``final``,
    ``cosine`` follows half a cosine towards ``final``, and ``constant`` stays at 1.
    """
    return lr_at_progress(step / total_steps, warmup_steps / total_steps, schedule, final)


def lr_at_progress(progress: float, warmup: float, schedule: str, final: float = 0.0
                   ) -> float:
    """:func:`lr_factor` at ``progress`` through the run (0 to 1), the warm-up ending at
    ``warmup``: a run whose plan changes keeps a schedule without jumps, since its progress
    only moves forward (:class:`~cifar_inception.budget.RunPlan`)."""
    if progress < warmup:
        return 0.1 + 0.9 * progress / warmup
    if schedule == "constant":
        return 1.0
    decayed = min(1.0, (progress - warmup) / (1.0 - warmup)) if warmup < 1 else 1.0
    if schedule == "onecycle":
        return 1.0 - (1.0 - final) * decayed
    return final + (1.0 - final) * 0.5 * (1.0 + math.cos(math.pi * decayed))


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
    def after_step(self, step: int, total_steps: int, progress: float | None = None) -> None:
        """Call after optimizer step ``step`` (1-based); the last step copies the EMA in.
        ``progress``: how far the run is after it (default ``step / total_steps``)."""
        if step == total_steps:
            self._update(1.0)
        elif step % self.every == 0:
            progress = step / total_steps if progress is None else progress
            self._update(self.decay ** self.every * progress ** 3)

    def _update(self, decay: float) -> None:
        for average, tensor in zip(self.average, self.tensors):
            average.lerp_(tensor, 1.0 - decay)
            tensor.copy_(average)

    def state_dict(self) -> list[torch.Tensor]:
        return [t.clone() for t in self.average]

    def load_state_dict(self, state: list[torch.Tensor]) -> None:
        for average, saved in zip(self.average, state):
            average.copy_(saved)


def resolve_aux_weights(config: TrainConfig, model: nn.Module) -> tuple[float, ...]:
    """The configured auxiliary weights: the model's defaults, one value for all, or a list."""
    defaults = default_aux_weights(model)
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


def split_outputs(output: Any) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
    """Main logits and auxiliary logits from a model's train-mode output."""
    if hasattr(output, "aux_logits"):
        return output.logits, tuple(output.aux_logits)
    return output, ()
