"""The three networks of the Keras report this project starts from, exactly as it built them.

The report ("CIFAR-10 image classification", three Keras models) prints each model's layer
table; the parameter column there is the ground truth these builders reproduce, quirks
included. Common to all three, as in the report: no batch norm, ReLU after every
convolution and every hidden dense layer, "same" padding unless stated, convolutions and
dense layers with biases, Keras's default initialisation (Glorot-uniform weights, zero
biases). The softmax of the report's output layers is left to the loss.

Keras flattens channels-last (height, width, channel) tensors and PyTorch flattens
channels-first ones, so the dense weights see the features in another order: the same
network up to a permutation of the weights, with the same parameter count.
"""

from __future__ import annotations

import torch.nn as nn

from cifar_inception.models.blocks import (
    CIFAR_ONLY,
    Branches,
    ConvBNAct,
    InceptionNet,
    check_flag,
    init_keras_defaults,
)
from cifar_inception.models.registry import register_model

# Dropout before the dense layers of each head. The report uses dropout there but does not
# give the rates; these are the GoogLeNet paper's.
AUX_DROPOUT = 0.7
MAIN_DROPOUT = 0.4
# The report's Keras setting: every head's loss weighs 1.0.
REPORT_AUX_WEIGHT = 1.0
# The heads' dense layers are sized for the feature maps of a 32x32 image, as the report
# built them (seed-naive's reads every pixel), so these networks take 32x32 images only: most
# other sizes do not fit those layers, and the few that happen to are not the report's nets.
REPORT_SIZES = CIFAR_ONLY


def conv(in_channels: int, out_channels: int, kernel_size, stride: int = 1,
         padding=None) -> ConvBNAct:
    """A Keras ``Conv2D(..., activation="relu")``: convolution with bias, then ReLU."""
    return ConvBNAct(in_channels, out_channels, kernel_size, stride, padding, norm=False)


def dense_head(features: int, hidden: tuple[int, ...], num_classes: int, pool: nn.Module,
               dropout: float) -> nn.Sequential:
    """Pool, flatten, dropout, hidden Dense+ReLU layers, then the output Dense layer."""
    layers: list[nn.Module] = [pool, nn.Flatten(), nn.Dropout(dropout)]
    for width in hidden:
        layers += [nn.Linear(features, width), nn.ReLU(inplace=True)]
        features = width
    layers.append(nn.Linear(features, num_classes))
    return nn.Sequential(*layers)


# --------------------------------------------------------------------------- seed-naive

class NaiveInception(Branches):
    """1x1, 3x3 and 5x5 convolutions and a 3x3 max-pool (stride 1) side by side."""

    def __init__(self, in_channels: int, c1: int, c3: int, c5: int):
        super().__init__(
            [
                conv(in_channels, c1, 1),
                conv(in_channels, c3, 3),
                conv(in_channels, c5, 5),
                nn.MaxPool2d(3, stride=1, padding=1),
            ],
            out_channels=c1 + c3 + c5 + in_channels,
        )


@register_model("seed-naive", recipe="seed", sizes=REPORT_SIZES)
def seed_naive(num_classes: int = 10) -> InceptionNet:
    """The report's naive Inception module, as built: a baseline whose weights are one dense layer.

    232,465,282 parameters.

    One naive module (1x1 conv 64, 3x3 conv 128, 5x5 conv 32 and a 3x3 stride-1 max-pool,
    in parallel) on the 32x32x3 input, concatenated to 32x32x227, flattened to 232,448
    features, Dense 1000 + ReLU, Dense ``num_classes``.

    Quirk: there is no pooling before the classifier, so the first dense layer holds
    232,449,000 of the parameters (over 99.99 %); the pooling branch passes the 3 input
    channels straight into the concatenation. No auxiliary heads.
    """
    module = NaiveInception(3, 64, 128, 32)
    features = module.out_channels * 32 * 32
    head = nn.Sequential(
        nn.Flatten(),
        nn.Linear(features, 1000),
        nn.ReLU(inplace=True),
        nn.Linear(1000, num_classes),
    )
    model = InceptionNet({"inception": module}, head, sizes=REPORT_SIZES)
    init_keras_defaults(model)
    return model


# ------------------------------------------------------------------------ seed-googlenet

class ReportInceptionV1(Branches):
    """An Inception module with dimension reduction, as the report builds it.

    Branches: 1x1; 1x1 reduce then "3x3"; 1x1 reduce then 5x5; 3x3 max-pool (stride 1)
    then a 1x1 projection. ``kernel3`` is the kernel of the "3x3" convolution: the report
    used 1 (its quirk), ``fix_3x3`` restores 3.
    """

    def __init__(self, in_channels: int, c1: int, r3: int, c3: int, r5: int, c5: int,
                 pool_proj: int, kernel3: int):
        super().__init__(
            [
                conv(in_channels, c1, 1),
                nn.Sequential(conv(in_channels, r3, 1), conv(r3, c3, kernel3)),
                nn.Sequential(conv(in_channels, r5, 1), conv(r5, c5, 5)),
                nn.Sequential(nn.MaxPool2d(3, stride=1, padding=1),
                              conv(in_channels, pool_proj, 1)),
            ],
            out_channels=c1 + c3 + c5 + pool_proj,
        )


# (#1x1, #3x3 reduce, #3x3, #5x5 reduce, #5x5, pool proj), from the GoogLeNet paper's table 1.
GOOGLENET_WIDTHS = {
    "inception3a": (64, 96, 128, 16, 32, 32),
    "inception3b": (128, 128, 192, 32, 96, 64),
    "inception4a": (192, 96, 208, 16, 48, 64),
    "inception4b": (160, 112, 224, 24, 64, 64),
    "inception4c": (128, 128, 256, 24, 64, 64),
    "inception4d": (112, 144, 288, 32, 64, 64),
    "inception4e": (256, 160, 320, 32, 128, 128),
    "inception5a": (256, 160, 320, 32, 128, 128),
    "inception5b": (384, 192, 384, 48, 128, 128),
}


@register_model("seed-googlenet", recipe="seed", sizes=REPORT_SIZES)
def seed_googlenet(num_classes: int = 10, *, fix_3x3: bool = False,
                   aux_logits: bool = True) -> InceptionNet:
    """The report's GoogLeNet, as built, its 1x1 "3x3" quirk included (fix_3x3=True repairs it).

    8,390,710 parameters; 11,049,014 with ``fix_3x3=True``.

    Stem: one 7x7 convolution, 64 filters, stride 2, valid padding: 32x32 -> 13x13.
    Inception 3a, 3b at 13x13; 3x3 max-pool stride 2 (valid) -> 6x6; 4a-4e; 3x3 max-pool
    stride 2 (valid) -> 2x2; 5a, 5b. Widths from the GoogLeNet paper.
    Heads (each: average-pool, flatten, dropout, Dense 1000 + ReLU, Dense ``num_classes``):
    auxiliary 1 on 4a (pooled to 2x2x512, 2,048 features), auxiliary 2 on 4d (2x2x528,
    2,112), main on 5b (global average, 1,024).

    Quirks of the report, reproduced:

    - The "3x3" convolution after the 3x3-reduce has a 1x1 kernel in every module (its
      parameter column: 12,416 = 96 x 128 + 128 in 3a). ``fix_3x3=True`` uses 3x3.
    - The stem is the single 7x7/2 convolution: no max-pool, no local response
      normalisation, no 1x1/3x3 second stage as in the paper.
    - The auxiliary heads have no 1x1 convolution (the paper's 128 filters) and a hidden
      Dense 1000 (the paper's 1024); the main head adds a hidden Dense 1000 the paper does
      not have.
    - Not given by the report: the dropout rates (here the paper's, 0.7 auxiliary and
      0.4 main) and the auxiliary pooling window (here 3x3, stride 3: 6x6 -> 2x2).

    Options: ``fix_3x3`` (bool), ``aux_logits`` (bool, default True: the two auxiliary
    heads, weighted 1.0 each by default as in the report).
    """
    kernel3 = 3 if check_flag("fix_3x3", fix_3x3) else 1
    aux_logits = check_flag("aux_logits", aux_logits)

    stages: dict[str, nn.Module] = {"stem": conv(3, 64, 7, stride=2, padding=0)}
    channels = 64
    for name, widths in GOOGLENET_WIDTHS.items():
        if name in ("inception4a", "inception5a"):
            stages[f"pool{name[-2]}"] = nn.MaxPool2d(3, stride=2)
        stages[name] = ReportInceptionV1(channels, *widths, kernel3=kernel3)
        channels = stages[name].out_channels

    aux_heads = []
    if aux_logits:
        for tap in ("inception4a", "inception4d"):
            features = stages[tap].out_channels * 2 * 2
            aux_heads.append((tap, dense_head(features, (1000,), num_classes,
                                              nn.AvgPool2d(3, stride=3), AUX_DROPOUT)))
    head = dense_head(channels, (1000,), num_classes, nn.AdaptiveAvgPool2d(1), MAIN_DROPOUT)
    model = InceptionNet(stages, head, aux_heads, aux_weight=REPORT_AUX_WEIGHT,
                         sizes=REPORT_SIZES)
    init_keras_defaults(model)
    return model


# --------------------------------------------------------------------- seed-inception-v2

def report_module_a(in_channels: int, width: int) -> Branches:
    """1x1; 1x1 -> 3x3; 1x1 -> 3x3 -> 3x3; 3x3 max-pool -> 1x1. Every branch ``width`` wide."""
    return Branches(
        [
            conv(in_channels, width, 1),
            nn.Sequential(conv(in_channels, width, 1), conv(width, width, 3)),
            nn.Sequential(conv(in_channels, width, 1), conv(width, width, 3),
                          conv(width, width, 3)),
            nn.Sequential(nn.MaxPool2d(3, stride=1, padding=1), conv(in_channels, width, 1)),
        ],
        out_channels=4 * width,
    )


def report_module_b(in_channels: int, width: int) -> Branches:
    """1x1; 1x1 -> 1x3 -> 3x1; 1x1 -> (1x3 -> 3x1) twice; 3x3 max-pool -> 1x1."""
    return Branches(
        [
            conv(in_channels, width, 1),
            nn.Sequential(conv(in_channels, width, 1), conv(width, width, (1, 3)),
                          conv(width, width, (3, 1))),
            nn.Sequential(conv(in_channels, width, 1),
                          conv(width, width, (1, 3)), conv(width, width, (3, 1)),
                          conv(width, width, (1, 3)), conv(width, width, (3, 1))),
            nn.Sequential(nn.MaxPool2d(3, stride=1, padding=1), conv(in_channels, width, 1)),
        ],
        out_channels=4 * width,
    )


def report_split(width: int) -> Branches:
    """The 1x3 and 3x1 convolutions side by side, both kept (Inception-v3's module C)."""
    return Branches([conv(width, width, (1, 3)), conv(width, width, (3, 1))],
                    out_channels=2 * width)


def report_module_c(in_channels: int, width: int) -> Branches:
    """1x1; 1x1 -> 3x3 -> split(1x3, 3x1); 1x1 -> split(1x3, 3x1); 3x3 max-pool -> 1x1."""
    return Branches(
        [
            conv(in_channels, width, 1),
            nn.Sequential(conv(in_channels, width, 1), conv(width, width, 3),
                          report_split(width)),
            nn.Sequential(conv(in_channels, width, 1), report_split(width)),
            nn.Sequential(nn.MaxPool2d(3, stride=1, padding=1), conv(in_channels, width, 1)),
        ],
        out_channels=6 * width,
    )


@register_model("seed-inception-v2", recipe="seed", sizes=REPORT_SIZES)
def seed_inception_v2(num_classes: int = 10, *, aux_logits: bool = True) -> InceptionNet:
    """The report's "Inception v2", as built: v3-style modules, all at 15x15, so slow and large.

    141,746,134 parameters.

    Stem: 3x3 convolution, 32 filters, stride 2, valid padding: 32x32 -> 15x15; everything
    after stays at 15x15. Two modules A (128 per branch, 512 out), two modules B (256 per
    branch, factorised into 1x3 and 3x1, 1,024 out), two modules C (512 per branch, with
    the 1x3 / 3x1 split kept side by side, 3,072 out).
    Heads: auxiliary 1 on the second A (3x3 average-pool, stride 3, to 5x5x512, flatten
    12,800, dropout, Dense 1000, Dense 1000, Dense ``num_classes``), auxiliary 2 on the
    second B (5x5x1024, 25,600, same layers), main on the second C (5x5x3072, 76,800,
    dropout, Dense 1000, Dense ``num_classes``).

    Quirks of the report, reproduced:

    - No grid reduction after the stem: modules A, B and C all run at 15x15 (the paper
      reduces 35 -> 17 -> 8 between them), which makes this network slow.
    - The heads flatten 5x5 maps instead of pooling globally, so the dense layers hold
      over 117 million of the parameters (the main head's first layer alone 76.8 million).
    - The report's code calls the model ``inception_v3`` under the heading "Inception V2";
      the modules are Inception-v3's A, B (with n=3) and C.
    - Not given by the report: the dropout rates (here the GoogLeNet paper's, 0.7
      auxiliary and 0.4 main) and the order inside a factorised pair (here 1x3 then 3x1).

    Options: ``aux_logits`` (bool, default True: two auxiliary heads, weighted 1.0 each by
    default as in the report).
    """
    aux_logits = check_flag("aux_logits", aux_logits)
    stages = {
        "stem": conv(3, 32, 3, stride=2, padding=0),
        "mixed_a1": report_module_a(32, 128),
        "mixed_a2": report_module_a(512, 128),
        "mixed_b1": report_module_b(512, 256),
        "mixed_b2": report_module_b(1024, 256),
        "mixed_c1": report_module_c(1024, 512),
        "mixed_c2": report_module_c(3072, 512),
    }
    aux_heads = []
    if aux_logits:
        for tap in ("mixed_a2", "mixed_b2"):
            features = stages[tap].out_channels * 5 * 5
            aux_heads.append((tap, dense_head(features, (1000, 1000), num_classes,
                                              nn.AvgPool2d(3, stride=3), AUX_DROPOUT)))
    head = dense_head(3072 * 5 * 5, (1000,), num_classes, nn.AvgPool2d(3, stride=3),
                      MAIN_DROPOUT)
    model = InceptionNet(stages, head, aux_heads, aux_weight=REPORT_AUX_WEIGHT,
                         sizes=REPORT_SIZES)
    init_keras_defaults(model)
    return model
