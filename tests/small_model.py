"""A registered model small enough to build and run in milliseconds, and checkpoints of it.

Shared by the tests of checkpoints, prediction and the report, which need a real checkpoint
of a registered model but nothing trained. Its name starts with ``test-``, so tests that
check every model of the project leave it out (see ``model_names``).
"""

from __future__ import annotations

import torch

from cifar_inception.checkpoint import make_checkpoint, save_checkpoint
from cifar_inception.models import list_models, register_model

SMALL = "test-small"
CLASSES = ["airplane", "automobile", "bird", "cat", "deer",
           "dog", "frog", "horse", "ship", "truck"]


class SmallNet(torch.nn.Module):
    """Convolution, ReLU, the mean over the image, linear: the class follows the colours."""

    def __init__(self, num_classes: int = 10, hidden: int = 4):
        super().__init__()
        self.features = torch.nn.Sequential(torch.nn.Conv2d(3, hidden, 3, padding=1),
                                            torch.nn.ReLU())
        self.head = torch.nn.Linear(hidden, num_classes)

    def forward(self, x):
        return self.head(self.features(x).mean(dim=(2, 3)))


if SMALL not in list_models():
    register_model(SMALL)(lambda num_classes=10, **options: SmallNet(num_classes, **options))


def small_model(num_classes: int = 10, hidden: int = 4) -> SmallNet:
    """The same weights every time (seed 0)."""
    torch.manual_seed(0)
    return SmallNet(num_classes, hidden=hidden)


def small_checkpoint(num_classes: int = 10, hidden: int = 4, **fields) -> dict:
    """A checkpoint of :func:`small_model`; ``fields`` replace or add ``make_checkpoint``'s
    arguments (mean, std, metrics, training, ...)."""
    model = small_model(num_classes, hidden)
    arguments = dict(model_name=SMALL, model_options={"hidden": hidden},
                     num_classes=num_classes, classes=CLASSES[:num_classes],
                     mean=[0.5, 0.5, 0.5], std=[0.25, 0.25, 0.25],
                     state_dict=model.state_dict())
    arguments.update(fields)
    return make_checkpoint(**arguments)


def save_small_checkpoint(path, num_classes: int = 10, hidden: int = 4, **fields) -> dict:
    """:func:`small_checkpoint`, written to ``path``; the checkpoint."""
    ckpt = small_checkpoint(num_classes, hidden, **fields)
    save_checkpoint(path, ckpt)
    return ckpt
