"""Inception-v3 adapted to 32x32 CIFAR images.

Szegedy et al., "Rethinking the Inception Architecture for Computer Vision" (2015), with the
widths of the reference implementation (as torchvision's ``inception_v3``), rebuilt for
32x32 inputs the way the well-known CIFAR ports do:

- **Stem without downsampling**: 3x3 (32), 3x3 (32), 3x3 (64), 1x1 (80), 3x3 (192), all
  stride 1 at 32x32. The ImageNet stem's two stride-2 convolutions and two max-pools take
  299 pixels to 35; here the image already is about that size.
- **Module A** (x3, 32x32): 1x1; 1x1 -> 3x3; the 5x5 factorised into 1x1 -> 3x3 -> 3x3;
  3x3 average-pool -> 1x1 (the paper's figure 5; the reference code keeps a true 5x5 in
  the second branch, this one does not).
- **Grid reduction** 32 -> 16: stride-2 convolution branches side by side with a stride-2
  max-pool, so the grid shrinks while the width grows (the paper's figure 10).
- **Module B** (x4, 16x16): 7x7 convolutions factorised into 1x7 and 7x1 (the paper's
  figure 6, n = 7).
- **Auxiliary head** (optional, on by default) on the last module B: 5x5 average-pool,
  stride 3 (16x16 -> 4x4), 1x1 convolution (128), 4x4 convolution (768) to 1x1, linear
  classifier, with batch norm as in the paper. Default loss weight 0.3. On images larger
  than 32x32 the convolution's output is larger than 1x1 and is averaged to 1x1; it needs
  a 4x4 map, so the network takes images of 27 pixels and more (``SIZES``).
- **Grid reduction** 16 -> 8, then **module C** (x2, 8x8): the 3x3 outputs split into 1x3
  and 3x1 side by side (the paper's figure 7), widening the representation to 2,048.
- Global average pooling, dropout, linear classifier.

Every convolution is a ConvBNAct. Stride-2 convolutions and pools use padding 1, so the
grid halves exactly (32 -> 16 -> 8). ``width`` multiplies every channel count, rounded to
the nearest multiple of 8, at least 8. Initialisation: ``blocks.init_cifar``.
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

AUX_WEIGHT = 0.3
# The auxiliary head (on by default, and run in training) needs a map of at least 14x14 at
# mixed_6e for its 5x5/3 pooling and 4x4 convolution, so 27 pixels or more; everything else
# is padded and the main head pools globally, so there is no largest.
SIZES = ImageSizes(27, None)


def avg_pool_branch(in_channels: int, out_channels: int) -> nn.Sequential:
    return nn.Sequential(nn.AvgPool2d(3, stride=1, padding=1),
                         ConvBNAct(in_channels, out_channels, 1))


def split_1x3_3x1(channels: int, out_channels: int) -> Branches:
    """1x3 and 3x1 convolutions side by side on the same input, both kept."""
    return Branches([ConvBNAct(channels, out_channels, (1, 3)),
                     ConvBNAct(channels, out_channels, (3, 1))],
                    out_channels=2 * out_channels)


def module_a(in_channels: int, pool_features: int, s) -> Branches:
    """Figure 5: 1x1; 1x1 -> 3x3; 1x1 -> 3x3 -> 3x3 (a factorised 5x5); avg-pool -> 1x1."""
    c64, c48, c96, cp = s(64), s(48), s(96), s(pool_features)
    return Branches(
        [
            ConvBNAct(in_channels, c64, 1),
            nn.Sequential(ConvBNAct(in_channels, c48, 1), ConvBNAct(c48, c64, 3)),
            nn.Sequential(ConvBNAct(in_channels, c64, 1), ConvBNAct(c64, c96, 3),
                          ConvBNAct(c96, c96, 3)),
            avg_pool_branch(in_channels, cp),
        ],
        out_channels=c64 + c64 + c96 + cp,
    )


def reduction_a(in_channels: int, s) -> Branches:
    """Figure 10: 3x3/2 (384); 1x1 -> 3x3 -> 3x3/2 (96); 3x3/2 max-pool."""
    c384, c64, c96 = s(384), s(64), s(96)
    return Branches(
        [
            ConvBNAct(in_channels, c384, 3, stride=2),
            nn.Sequential(ConvBNAct(in_channels, c64, 1), ConvBNAct(c64, c96, 3),
                          ConvBNAct(c96, c96, 3, stride=2)),
            nn.MaxPool2d(3, stride=2, padding=1),
        ],
        out_channels=c384 + c96 + in_channels,
    )


def module_b(in_channels: int, channels_7x7: int, s) -> Branches:
    """Figure 6 with n = 7: 1x1; 1x1 -> 1x7 -> 7x1; 1x1 -> (7x1 -> 1x7) twice; pool -> 1x1."""
    c7, c192 = s(channels_7x7), s(192)
    return Branches(
        [
            ConvBNAct(in_channels, c192, 1),
            nn.Sequential(ConvBNAct(in_channels, c7, 1), ConvBNAct(c7, c7, (1, 7)),
                          ConvBNAct(c7, c192, (7, 1))),
            nn.Sequential(ConvBNAct(in_channels, c7, 1),
                          ConvBNAct(c7, c7, (7, 1)), ConvBNAct(c7, c7, (1, 7)),
                          ConvBNAct(c7, c7, (7, 1)), ConvBNAct(c7, c192, (1, 7))),
            avg_pool_branch(in_channels, c192),
        ],
        out_channels=4 * c192,
    )


def reduction_b(in_channels: int, s) -> Branches:
    """1x1 -> 3x3/2 (320); 1x1 -> 1x7 -> 7x1 -> 3x3/2 (192); 3x3/2 max-pool."""
    c192, c320 = s(192), s(320)
    return Branches(
        [
            nn.Sequential(ConvBNAct(in_channels, c192, 1),
                          ConvBNAct(c192, c320, 3, stride=2)),
            nn.Sequential(ConvBNAct(in_channels, c192, 1), ConvBNAct(c192, c192, (1, 7)),
                          ConvBNAct(c192, c192, (7, 1)), ConvBNAct(c192, c192, 3, stride=2)),
            nn.MaxPool2d(3, stride=2, padding=1),
        ],
        out_channels=c320 + c192 + in_channels,
    )


def module_c(in_channels: int, s) -> Branches:
    """Figure 7: 1x1; 1x1 -> split; 1x1 -> 3x3 -> split; avg-pool -> 1x1 (split = 1x3 | 3x1)."""
    c320, c384, c448, c192 = s(320), s(384), s(448), s(192)
    return Branches(
        [
            ConvBNAct(in_channels, c320, 1),
            nn.Sequential(ConvBNAct(in_channels, c384, 1), split_1x3_3x1(c384, c384)),
            nn.Sequential(ConvBNAct(in_channels, c448, 1), ConvBNAct(c448, c384, 3),
                          split_1x3_3x1(c384, c384)),
            avg_pool_branch(in_channels, c192),
        ],
        out_channels=c320 + 4 * c384 + c192,
    )


def pool_and_flatten() -> nn.Sequential:
    """Average whatever map is left to one value per channel, then flatten: on 32x32 images
    the map is already 1x1 (nothing changes); on larger ones it is larger. No weights, so it
    keeps the place (and the weights' names) of the plain Flatten it replaced."""
    return nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())


def aux_head(in_channels: int, num_classes: int, s) -> nn.Sequential:
    c128, c768 = s(128), s(768)
    return nn.Sequential(
        nn.AvgPool2d(5, stride=3),                    # 16x16 -> 4x4
        ConvBNAct(in_channels, c128, 1),
        ConvBNAct(c128, c768, 4, padding=0),          # 4x4 -> 1x1
        pool_and_flatten(),
        nn.Linear(c768, num_classes),
    )


@register_model("inception-v3", sizes=SIZES)
def inception_v3(num_classes: int = 10, *, width: float = 1.0, aux_logits: bool = True,
                 dropout: float = 0.2) -> InceptionNet:
    """Inception-v3 tuned for 32x32 images: the largest tuned model; width scales it down.

    Options: ``width`` (channel multiplier, e.g. 0.25 for a small fast model),
    ``aux_logits`` (bool, default True: one auxiliary head, weighted 0.3 by default),
    ``dropout`` (before the main classifier, default 0.2).
    """
    width = check_width(width)
    aux_logits = check_flag("aux_logits", aux_logits)
    dropout = check_rate("dropout", dropout)

    def s(channels: int) -> int:
        return scale_width(channels, width)

    stem = nn.Sequential(
        ConvBNAct(3, s(32), 3),
        ConvBNAct(s(32), s(32), 3),
        ConvBNAct(s(32), s(64), 3),
        ConvBNAct(s(64), s(80), 1),
        ConvBNAct(s(80), s(192), 3),
    )
    stages: dict[str, nn.Module] = {"stem": stem}
    stages["mixed_5b"] = module_a(s(192), 32, s)
    stages["mixed_5c"] = module_a(stages["mixed_5b"].out_channels, 64, s)
    stages["mixed_5d"] = module_a(stages["mixed_5c"].out_channels, 64, s)
    stages["mixed_6a"] = reduction_a(stages["mixed_5d"].out_channels, s)
    channels = stages["mixed_6a"].out_channels
    for name, channels_7x7 in (("mixed_6b", 128), ("mixed_6c", 160), ("mixed_6d", 160),
                               ("mixed_6e", 192)):
        stages[name] = module_b(channels, channels_7x7, s)
        channels = stages[name].out_channels
    stages["mixed_7a"] = reduction_b(channels, s)
    stages["mixed_7b"] = module_c(stages["mixed_7a"].out_channels, s)
    stages["mixed_7c"] = module_c(stages["mixed_7b"].out_channels, s)
    channels = stages["mixed_7c"].out_channels

    aux_heads = []
    if aux_logits:
        aux_heads = [("mixed_6e", aux_head(stages["mixed_6e"].out_channels, num_classes, s))]
    head = classifier_head(channels, num_classes, dropout)
    model = InceptionNet(stages, head, aux_heads, aux_weight=AUX_WEIGHT, sizes=SIZES)
    init_cifar(model)
    return model
