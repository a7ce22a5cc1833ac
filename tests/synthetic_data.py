"""Generated stand-ins for training tests: an easy CIFAR-10 look-alike and a tiny model.

Shared by the training, evaluation and distributed tests, and importable by the scripts they
run in subprocesses (``sys.path`` gets this folder). Nothing here is real CIFAR-10.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn
from PIL import Image

from cifar_inception.data import CIFAR10
from cifar_inception.models.blocks import InceptionOutputs
from cifar_inception.models.registry import list_models, register_model

CLASSES = ("airplane", "automobile", "bird", "cat", "deer",
           "dog", "frog", "horse", "ship", "truck")
# One well-separated colour per class: the task is easy, so a few steps beat chance.
PALETTE = np.array([(230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200),
                    (245, 130, 48), (145, 30, 180), (70, 240, 240), (240, 50, 230),
                    (128, 128, 0), (0, 0, 128)], dtype=np.float64)
TINY = "test-tiny"


def easy_images(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """n images, classes balanced and shuffled: the class colour plus Gaussian noise."""
    labels = np.arange(n) % len(CLASSES)
    rng.shuffle(labels)
    noise = rng.normal(0.0, 30.0, (n, 32, 32, 3))
    images = np.clip(PALETTE[labels][:, None, None, :] + noise, 0, 255).astype(np.uint8)
    return images, labels.astype(np.int64)


def easy_data(n_train: int = 300, n_test: int = 100, seed: int = 0) -> CIFAR10:
    rng = np.random.default_rng(seed)
    train_x, train_y = easy_images(n_train, rng)
    test_x, test_y = easy_images(n_test, rng)
    return CIFAR10(train_x, train_y, test_x, test_y, CLASSES,
                   source=f"generated (seed {seed})", checksum=f"generated-{seed}")


def write_image_tree(data: CIFAR10, root) -> None:
    """The data set as train/<class>/NNNN.png and test/<class>/NNNN.png (lossless)."""
    for split, images, labels in (("train", data.train_images, data.train_labels),
                                  ("test", data.test_images, data.test_labels)):
        for index, (image, label) in enumerate(zip(images, labels)):
            folder = root / split / CLASSES[label]
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(image).save(folder / f"{index:04d}.png")


class TinyNet(nn.Module):
    """Conv, ReLU, pooling, (dropout,) linear; one auxiliary head. No batch norm and, by
    default, no dropout, so that data-parallel training matches one process up to float
    rounding; ``dropout`` > 0 makes training draw from the global RNG (for resume tests)."""

    def __init__(self, num_classes: int = 10, channels: int = 8, dropout: float = 0.0):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, channels, 3, padding=1), nn.ReLU(),
                                      nn.AdaptiveAvgPool2d(2), nn.Flatten(),
                                      nn.Dropout(dropout))
        self.head = nn.Linear(4 * channels, num_classes)
        self.aux1 = nn.Linear(4 * channels, num_classes)
        self.default_aux_weights = (0.5,)

    def forward(self, x: torch.Tensor):
        features = self.features(x)
        logits = self.head(features)
        if self.training:
            return InceptionOutputs(logits, (self.aux1(features),))
        return logits


if TINY not in list_models():
    # A padded convolution and an adaptive pooling: any image side works.
    @register_model(TINY, sizes=(1, None))
    def tiny(num_classes: int = 10, *, channels: int = 8, dropout: float = 0.0,
             width: float = 1.0) -> TinyNet:
        return TinyNet(num_classes, round(channels * width), dropout)
