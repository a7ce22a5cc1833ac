"""Building blocks shared by every model: the conv block, parallel branches, the network shell.

- :class:`ConvBNAct`: convolution, optional batch norm, ReLU. The report's networks use it
  without batch norm (the convolution then has a bias, as Keras's ``Conv2D`` does); the
  CIFAR-tuned networks use it with batch norm (and no convolution bias).
- :class:`Branches`: run several branches on one input and concatenate them along the
  channels. An Inception module is a ``Branches``; so is the split at the end of an
  Inception-v2/v3 "C" branch (1x3 and 3x1 side by side).
- :class:`InceptionNet`: a stack of named stages, auxiliary heads tapped after some of them,
  and a main head. Its ``forward`` checks the input shape (the one place that does) and
  returns :class:`InceptionOutputs` in train mode when the network has auxiliary heads.
- :class:`ImageSizes`: the image sides a network accepts, which its ``forward`` checks and
  the registry declares (:func:`~cifar_inception.models.registry.register_model`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn as nn

from cifar_inception.errors import ModelError

INPUT_CHANNELS = 3
IMAGE_SIZE = 32


class ImageSizes(NamedTuple):
    """The image sides a model accepts: from ``smallest`` to ``largest`` pixels (None: no
    limit of the model's own, as for a network that pools globally before its classifier)."""

    smallest: int = IMAGE_SIZE
    largest: int | None = IMAGE_SIZE

    def accepts(self, size: int) -> bool:
        return self.smallest <= size and (self.largest is None or size <= self.largest)

    def describe(self) -> str:
        """``32x32 only``, ``from 9x9 up`` or ``from 16x16 to 64x64``."""
        low = f"{self.smallest}x{self.smallest}"
        if self.largest == self.smallest:
            return f"{low} only"
        if self.largest is None:
            return f"from {low} up"
        return f"from {low} to {self.largest}x{self.largest}"


# What a network built for CIFAR's images alone accepts (a dense head sized for them).
CIFAR_ONLY = ImageSizes(IMAGE_SIZE, IMAGE_SIZE)


class InceptionOutputs(NamedTuple):
    """Train-mode output of a network with auxiliary heads (as torchvision's namedtuple)."""

    logits: torch.Tensor
    aux_logits: tuple[torch.Tensor, ...]


def expected_shape(sizes: ImageSizes) -> str:
    """``(N, 3, 32, 32)`` for a model of one size, ``(N, 3, H, W), H and W from 9 up`` else."""
    if sizes.largest == sizes.smallest:
        return f"(N, {INPUT_CHANNELS}, {sizes.smallest}, {sizes.smallest})"
    upper = "up" if sizes.largest is None else f"to {sizes.largest}"
    return f"(N, {INPUT_CHANNELS}, H, W), H and W from {sizes.smallest} {upper}"


def check_input(x: torch.Tensor, sizes: ImageSizes = CIFAR_ONLY) -> None:
    """Refuse anything but a float batch of shape (N, 3, H, W) with sides the model accepts
    (``sizes``), naming the expected shape.

    Skipped while ``torch.jit.trace`` records the network: there the sizes are traced
    values, and a recorded graph has no use for a Python-side check.
    """
    if torch.jit.is_tracing():
        return
    expected = expected_shape(sizes)
    if not isinstance(x, torch.Tensor):
        raise ModelError(f"expected a tensor of shape {expected}, got {type(x).__name__}")
    sides_fit = x.dim() == 4 and all(sizes.accepts(int(side)) for side in x.shape[2:])
    if not sides_fit or x.shape[1] != INPUT_CHANNELS:
        hint = ""
        if x.dim() == 4 and x.shape[-1] == INPUT_CHANNELS and x.shape[1] != INPUT_CHANNELS:
            hint = " (channels last: permute to channels first)"
        raise ModelError(f"expected input of shape {expected}, got {tuple(x.shape)}{hint}")
    if not x.is_floating_point():
        raise ModelError(f"expected a float tensor (normalised images), got {x.dtype}")


def scale_width(channels: int, width: float) -> int:
    """``channels * width`` rounded to the nearest multiple of 8, at least 8.

    Multiples of 8 keep the channel counts friendly to vectorised kernels and tensor cores.
    Width 1.0 returns the paper's numbers unchanged (they are all multiples of 8).
    """
    if width == 1.0:
        return channels
    return max(8, int(channels * width / 8 + 0.5) * 8)


def check_width(width: object) -> float:
    """Validate a width multiplier option: a number in (0, 4]."""
    if isinstance(width, bool) or not isinstance(width, (int, float)) or not 0 < width <= 4:
        raise ModelError(f"width must be a number in (0, 4], not {width!r}")
    return float(width)


def check_flag(name: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise ModelError(f"{name} must be true or false, not {value!r}")
    return value


def check_count(name: str, value: object, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ModelError(f"{name} must be an integer from {low} to {high}, not {value!r}")
    return value


def check_rate(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
        raise ModelError(f"{name} must be a number in [0, 1), not {value!r}")
    return float(value)


class ConvBNAct(nn.Sequential):
    """Conv2d, then BatchNorm2d (if ``norm``), then ReLU: the one convolution block.

    ``padding=None`` means "same" for stride 1 with odd kernels (half the kernel on each
    side, per axis, so asymmetric 1xn / nx1 kernels work too); pass ``padding=0`` for
    Keras's "valid". With ``norm`` the convolution has no bias (batch norm's shift replaces
    it); without, it has one.

    The summary table shows a ``ConvBNAct`` as a single layer (``summary_leaf``).
    """

    summary_leaf = True

    def __init__(self, in_channels: int, out_channels: int,
                 kernel_size: int | tuple[int, int], stride: int = 1,
                 padding: int | tuple[int, int] | None = None, *, norm: bool = True):
        kernel = (kernel_size, kernel_size) if isinstance(kernel_size, int) else kernel_size
        if padding is None:
            padding = (kernel[0] // 2, kernel[1] // 2)
        layers: list[nn.Module] = [
            nn.Conv2d(in_channels, out_channels, kernel, stride=stride, padding=padding,
                      bias=not norm)
        ]
        if norm:
            layers.append(nn.BatchNorm2d(out_channels))
        layers.append(nn.ReLU(inplace=True))
        super().__init__(*layers)
        self.in_channels = in_channels
        self.out_channels = out_channels


class Concat(nn.Module):
    """Concatenate a list of tensors along the channels (a module so the summary shows it)."""

    def forward(self, tensors: list[torch.Tensor]) -> torch.Tensor:
        return torch.cat(tensors, dim=1)


class Branches(nn.Module):
    """Run every branch on the same input; concatenate the results along the channels.

    ``out_channels`` is the width of the concatenation; the builder states it because a
    pooling branch passes its input's width through.
    """

    def __init__(self, branches: Sequence[nn.Module], out_channels: int):
        super().__init__()
        self.branches = nn.ModuleList(branches)
        self.concat = Concat()
        self.out_channels = out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.concat([branch(x) for branch in self.branches])


def classifier_head(channels: int, num_classes: int, dropout: float) -> nn.Sequential:
    """Global average pool, dropout, one linear layer: the CIFAR-tuned networks' main head."""
    return nn.Sequential(
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Dropout(dropout),
        nn.Linear(channels, num_classes),
    )


class InceptionNet(nn.Module):
    """Named stages run in order, auxiliary heads tapped after some stages, and a main head.

    Args:
        stages: name -> module, run in this order on the (N, 3, H, W) input.
        head: the main classifier, from the last stage's output to logits.
        aux_heads: (name of the stage it reads, head) pairs, in depth order; registered as
            ``aux1``, ``aux2``, ... Empty for a network without auxiliary heads.
        aux_weight: the default loss weight of each auxiliary head
            (``default_aux_weights`` repeats it once per head).
        sizes: the image sides the network accepts (the registry declares the same, so
            that training refuses another size before it loads the data); ``forward``
            refuses any other, naming the expected shape.

    In eval mode, and in train mode without auxiliary heads, ``forward`` returns the logits
    (N, num_classes). In train mode with auxiliary heads it returns
    ``InceptionOutputs(logits, aux_logits)``; the heads run only then, so inference never
    pays for them. Softmax is left to the loss and to prediction.
    """

    def __init__(self, stages: dict[str, nn.Module], head: nn.Module,
                 aux_heads: Sequence[tuple[str, nn.Module]] = (), aux_weight: float = 1.0,
                 sizes: ImageSizes = CIFAR_ONLY):
        super().__init__()
        for name, stage in stages.items():
            self.add_module(name, stage)
        self.stage_names = tuple(stages)
        self.aux_taps: dict[str, str] = {}
        for index, (tap, aux_head) in enumerate(aux_heads, start=1):
            if tap not in stages:
                raise ValueError(f"auxiliary head reads unknown stage {tap!r}")
            self.add_module(f"aux{index}", aux_head)
            self.aux_taps[tap] = f"aux{index}"
        self.head = head
        self.default_aux_weights = tuple(float(aux_weight) for _ in aux_heads)
        self.image_sizes = ImageSizes(*sizes)

    def forward(self, x: torch.Tensor) -> torch.Tensor | InceptionOutputs:
        check_input(x, self.image_sizes)
        with_aux = self.training and bool(self.aux_taps)
        aux_logits = []
        for name in self.stage_names:
            x = getattr(self, name)(x)
            if with_aux and name in self.aux_taps:
                aux_logits.append(getattr(self, self.aux_taps[name])(x))
        logits = self.head(x)
        if with_aux:
            return InceptionOutputs(logits, tuple(aux_logits))
        return logits

    def all_heads(self, x: torch.Tensor) -> InceptionOutputs:
        """Every head's logits, in either mode (in eval mode without dropout): what a
        per-head validation measures, as Keras logs each output of a multi-output model."""
        check_input(x, self.image_sizes)
        aux_logits = []
        for name in self.stage_names:
            x = getattr(self, name)(x)
            if name in self.aux_taps:
                aux_logits.append(getattr(self, self.aux_taps[name])(x))
        return InceptionOutputs(self.head(x), tuple(aux_logits))


def init_keras_defaults(model: nn.Module) -> None:
    """Keras's defaults, for the report's networks: Glorot-uniform weights, zero biases."""
    for module in model.modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            nn.init.xavier_uniform_(module.weight)
            if module.bias is not None:
                nn.init.zeros_(module.bias)


def init_cifar(model: nn.Module) -> None:
    """Initialisation of the CIFAR-tuned networks.

    Convolutions: Kaiming normal, fan-out, for ReLU (as torchvision's ResNets), so the
    activations neither vanish nor explode through the deep stacks. Batch norm: scale 1,
    shift 0. Linear layers: normal with std 0.01 and zero bias, so the first logits are
    near zero and the first loss near log(num_classes).
    """
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.BatchNorm2d):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=0.01)
            nn.init.zeros_(module.bias)
