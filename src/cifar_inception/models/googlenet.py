"""GoogLeNet (Inception v1) adapted to 32x32 CIFAR images, with batch norm.

Szegedy et al., "Going deeper with convolutions" (2014), with the paper's Inception widths
(table 1), rebuilt for 32x32 inputs the way the well-known CIFAR ports do:

- **Stem**: one 3x3 convolution to 192 channels at full resolution, instead of the paper's
  7x7/2 convolution, max-pools and 3x3 stage, which shrink 224 pixels to 28 but would leave
  a 32-pixel image at 4x4 before the first Inception module.
- **Two grid reductions** (3x3 max-pool, stride 2): 3a-3b run at 32x32, 4a-4e at 16x16,
  5a-5b at 8x8, then global average pooling.
- **The 5x5 branch is two stacked 3x3 convolutions** (reduce -> 3x3 -> 3x3). Same receptive
  field, nearly the same cost, one more batch norm and ReLU; the factorisation the
  Inception-v2/v3 papers recommend, and what the CIFAR ports use.
- **Every convolution is a ConvBNAct** (conv without bias, batch norm, ReLU), so the
  network trains without the paper's careful learning-rate schedule.
- **Auxiliary heads** (optional, on by default) on the outputs of 4a and 4d, as in the
  paper: 4x4 average pooling, 1x1 convolution (128), dense 1024 + ReLU, dropout 0.7, dense
  classifier. Their default loss weight is the paper's 0.3 each.

``width`` multiplies every channel count (the stem, every branch and the auxiliary heads);
widths are rounded to the nearest multiple of 8, at least 8 (see ``scale_width``).
Initialisation: ``blocks.init_cifar`` (Kaiming normal convolutions, small normal linear
layers).
"""

from __future__ import annotations

import torch.nn as nn

from cifar_inception.models.blocks import (
    Branches,
    ConvBNAct,
    ImageSizes,
    InceptionNet,
    check_flag,
    check_rate,
    check_width,
    classifier_head,
    init_cifar,
    scale_width,
)
from cifar_inception.models.registry import register_model
from cifar_inception.models.seed import GOOGLENET_WIDTHS

STEM_CHANNELS = 192
AUX_TAPS = ("inception4a", "inception4d")
AUX_POOLED_SIZE = 4
AUX_CONV_CHANNELS = 128
AUX_HIDDEN = 1024
AUX_DROPOUT = 0.7
# The GoogLeNet paper's weight for each auxiliary loss.
AUX_WEIGHT = 0.3
# Every convolution and max-pool is padded, the auxiliary heads pool adaptively to 4x4 and
# the main head globally, so any image side works, down to a single pixel.
SIZES = ImageSizes(1, None)


class InceptionModule(Branches):
    """Inception v1 with dimension reduction; the 5x5 branch as two 3x3 convolutions.

    Branches: 1x1 (``c1``); 1x1 (``r3``) -> 3x3 (``c3``); 1x1 (``r5``) -> 3x3 (``c5``) ->
    3x3 (``c5``); 3x3 max-pool (stride 1) -> 1x1 (``pool_proj``).
    """

    def __init__(self, in_channels: int, c1: int, r3: int, c3: int, r5: int, c5: int,
                 pool_proj: int):
        super().__init__(
            [
                ConvBNAct(in_channels, c1, 1),
                nn.Sequential(ConvBNAct(in_channels, r3, 1), ConvBNAct(r3, c3, 3)),
                nn.Sequential(ConvBNAct(in_channels, r5, 1), ConvBNAct(r5, c5, 3),
                              ConvBNAct(c5, c5, 3)),
                nn.Sequential(nn.MaxPool2d(3, stride=1, padding=1),
                              ConvBNAct(in_channels, pool_proj, 1)),
            ],
            out_channels=c1 + c3 + c5 + pool_proj,
        )


def aux_head(in_channels: int, num_classes: int, width: float) -> nn.Sequential:
    """The paper's auxiliary classifier; it pools the 16x16 map to 4x4 (the paper: 14x14 to 4x4)."""
    conv_channels = scale_width(AUX_CONV_CHANNELS, width)
    hidden = scale_width(AUX_HIDDEN, width)
    return nn.Sequential(
        nn.AdaptiveAvgPool2d(AUX_POOLED_SIZE),
        ConvBNAct(in_channels, conv_channels, 1),
        nn.Flatten(),
        nn.Linear(conv_channels * AUX_POOLED_SIZE ** 2, hidden),
        nn.ReLU(inplace=True),
        nn.Dropout(AUX_DROPOUT),
        nn.Linear(hidden, num_classes),
    )


@register_model("googlenet", sizes=SIZES)
def googlenet(num_classes: int = 10, *, width: float = 1.0, aux_logits: bool = True,
              dropout: float = 0.2) -> InceptionNet:
    """GoogLeNet with batch norm tuned for 32x32 images; width=0.25 gives a small, fast model.

    Options: ``width`` (channel multiplier, e.g. 0.25 for a small fast model),
    ``aux_logits`` (bool, default True: two auxiliary heads, weighted 0.3 each by default),
    ``dropout`` (before the main classifier, default 0.2).
    """
    width = check_width(width)
    aux_logits = check_flag("aux_logits", aux_logits)
    dropout = check_rate("dropout", dropout)

    stem_channels = scale_width(STEM_CHANNELS, width)
    stages: dict[str, nn.Module] = {"stem": ConvBNAct(3, stem_channels, 3)}
    channels = stem_channels
    for name, widths in GOOGLENET_WIDTHS.items():
        if name in ("inception4a", "inception5a"):
            stages[f"pool{name[-2]}"] = nn.MaxPool2d(3, stride=2, padding=1)
        scaled = [scale_width(w, width) for w in widths]
        stages[name] = InceptionModule(channels, *scaled)
        channels = stages[name].out_channels

    aux_heads = []
    if aux_logits:
        aux_heads = [(tap, aux_head(stages[tap].out_channels, num_classes, width))
                     for tap in AUX_TAPS]
    head = classifier_head(channels, num_classes, dropout)
    model = InceptionNet(stages, head, aux_heads, aux_weight=AUX_WEIGHT, sizes=SIZES)
    init_cifar(model)
    return model
