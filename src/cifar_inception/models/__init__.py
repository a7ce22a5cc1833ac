"""Registered models. Importing this package registers every model module below."""

from __future__ import annotations

import torch.nn as nn

# Each model module registers its builders when imported.
from cifar_inception.models import fast, googlenet, inception_v3, seed  # noqa: F401
from cifar_inception.models.blocks import InceptionOutputs
from cifar_inception.models.registry import create_model as build_registered
from cifar_inception.models.registry import list_models, register_model

__all__ = ["InceptionOutputs", "create_model", "list_models", "register_model"]


def create_model(name: str, num_classes: int | None = None, *, weights: str | None = None,
                 **options) -> nn.Module:
    """Build a registered model, fresh or with trained weights.

    ``weights`` loads trained weights (see :mod:`cifar_inception.pretrained`): ``"cifar10"``
    or ``"default"`` for the package's own, or a checkpoint path or ``URL#sha256=HEX``. The
    model then takes the options and class count of its weights (those given must agree with
    them) and comes back in eval mode. Without weights ``num_classes`` defaults to 10.
    Unknown names and options fail with a one-line error.
    """
    if weights is None:
        return build_registered(name, 10 if num_classes is None else num_classes, **options)
    from cifar_inception.pretrained import pretrained_model  # reads checkpoints: lazily

    return pretrained_model(name, weights, num_classes=num_classes, **options)
