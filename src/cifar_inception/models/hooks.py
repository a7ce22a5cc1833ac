"""What training may use of a model, declared once: :class:`TrainingHooks`.

A model is any ``nn.Module`` whose builder is registered (:func:`register_model`), with
these rules, which ``tests/test_models.py`` checks for every registered model:

- its builder takes ``num_classes`` and keyword options, each with a default, and the first
  line of its docstring says what the model is for (``cifar-inception models`` shows it);
- in eval mode it returns the logits; in train mode, the logits, or
  :class:`~cifar_inception.models.blocks.InceptionOutputs` with one auxiliary logits tensor
  per entry of ``default_aux_weights``;
- a ``width`` option, where there is one, defaults to 1.0 and multiplies its channels (a
  budget may then widen it, :func:`~cifar_inception.models.registry.can_widen`);
- the hooks below are optional; training calls them through the functions of this module
  only, never by probing the model itself.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch
import torch.nn as nn


@runtime_checkable
class AuxiliaryHeads(Protocol):
    """A model with auxiliary classifiers, and the weight of each one's loss by default."""

    default_aux_weights: tuple[float, ...]


@runtime_checkable
class DataInitialised(Protocol):
    """A model that sets layers from the training images before the first step (a
    whitening stem), and whose first convolution (``stem_conv``) may then stay fixed."""

    def init_from_data(self, images: torch.Tensor) -> None: ...

    def stem_conv(self) -> nn.Conv2d: ...


TrainingHooks = (AuxiliaryHeads, DataInitialised)


def default_aux_weights(model: nn.Module) -> tuple[float, ...]:
    """The weights of the auxiliary heads' losses by default; () without auxiliary heads."""
    if isinstance(model, AuxiliaryHeads):
        return tuple(float(w) for w in model.default_aux_weights)
    return ()


def init_from_data(model: nn.Module, images: torch.Tensor) -> bool:
    """Let the model set layers from normalised training ``images``; whether it did."""
    if isinstance(model, DataInitialised):
        model.init_from_data(images)
        return True
    return False


def stem_conv(model: nn.Module) -> nn.Conv2d | None:
    """The first convolution of a model initialised from the data, else None."""
    return model.stem_conv() if isinstance(model, DataInitialised) else None
