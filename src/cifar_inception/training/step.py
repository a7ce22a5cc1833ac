"""One training step, the only one: the loop's steps and the budget's speed probe both take
it, so any per-step work (a new optimiser, an average of the weights) is added here once and
the probe measures what the run will do."""

from __future__ import annotations

import torch
from torch.profiler import record_function

from cifar_inception import distributed
from cifar_inception.augment import normalize
from cifar_inception.training.optim import optimise
from cifar_inception.training.setup import Loop, autocast_for, uses_channels_last


def train_step(loop: Loop, images: torch.Tensor, labels: torch.Tensor, *, lr: float,
               generator: torch.Generator, flip_mask: torch.Tensor | None = None,
               frozen: torch.Tensor | None = None
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Set the learning rate, augment the global batch (``images``, uint8 on the device),
    keep this rank's share, normalise it, and take one optimiser step on it (forward, the
    loss with the auxiliary heads, backward, the optimiser).

    Returns the loss, the main head's logits and this rank's targets. ``frozen``: a parameter
    the step leaves as it is (a fixed whitening stem's bias, once its training time is over).
    Lookahead is not part of it: it follows the plan, which a budget settles after the step.
    """
    config, data, ctx = loop.config, loop.prepared, loop.ctx
    for group in loop.optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
    # The whole global batch is augmented alike on every rank; each keeps its share.
    with record_function("data"):
        augmented = loop.policy(images, fill=cutout_fill(data.mean), flip_mask=flip_mask,
                                generator=generator)
        x = normalize(distributed.shard(augmented, ctx), data.mean, data.std,
                      channels_last=uses_channels_last(config, loop.device))
        targets = distributed.shard(labels, ctx)
    loss, logits = optimise(loop.net, loop.optimizer, x, targets, loop.aux_weights,
                            config.label_smoothing, autocast_for(loop.bf16, loop.device),
                            frozen=frozen)
    return loss, logits, targets


def cutout_fill(mean: tuple[float, ...]) -> list[int]:
    """Cutout's fill, as uint8 pixel values: the data's mean, which normalises to about zero."""
    return [round(m * 255) for m in mean]
