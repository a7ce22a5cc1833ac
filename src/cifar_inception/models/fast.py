"""Small Inception networks built for time-to-accuracy: ``inception-cpu`` and ``inception-fast``.

The shape follows the fastest known CIFAR-10 trainers (a whitening stem, three groups that
each halve the grid, no residual connections, a max-pooled linear head), with the plain
convolutions replaced by Inception modules: parallel branches concatenated along the
channels.

- **Stem**: a 2x2 convolution without padding (32 -> 31 pixels) to 24 channels, then GELU.
  Its weights can be set from the data (:meth:`FastInception.init_from_data`): the
  eigenvectors of the 2x2-patch covariance scaled to unit variance, each with its negative,
  so the first layer whitens its input (a ZCA-like preprocessing learnt in one shot).
- **Groups** (three): Inception module -> 2x2 max-pool -> batch norm -> GELU ->
  Inception module -> batch norm -> GELU. Pooling before the norm makes the norm and the
  activation run on a quarter of the pixels. With ``reduce`` the first module reduces the
  grid itself, as Inception-v3's grid-reduction modules do: each branch pools right after
  its first convolution, so the deep branch's norm, activation and second convolution run
  on a quarter of the pixels too (15 to 16% fewer multiply-adds, and a quarter more
  training images per second on a 2-core CPU, BENCHMARKS.md). With ``fuse`` the two first
  convolutions of every module (one per branch, both reading the same input) run as one
  convolution whose output is split (:class:`FusedInceptionConv`): the same function,
  computed a few per cent faster on a CPU.
- **Inception module** (:class:`InceptionConv`): a 3x3 branch (half the output channels)
  and a stacked 3x3 -> 3x3 branch (a 5x5 receptive field, the factorisation of
  Inception-v2), concatenated. The branch outputs share one batch norm and activation after
  the concatenation, which is the same as one per branch but runs as a single pass.
- **Batch norm** without a learnt scale by default (``bn_scale=false``: the scale is frozen
  at 1; only the shift learns), with a high momentum so the running statistics follow the
  fast-changing weights of a short run.
- **Head**: global max pooling, a linear layer without bias, and a fixed scale (1/9) on the
  logits, which keeps the first logits small without a special initialisation.
- **Auxiliary heads** (``aux``, none by default): GoogLeNet's auxiliary classifiers, each the
  main head's shape, on the output of group 2 (or groups 1 and 2), their losses weighted 0.3.
  They run in training only. At 10 minutes on a 2-core AMD EPYC Zen 4 (capability AVX512,
  bf16) they measured no gain (BENCHMARKS.md), so ``cpu10`` trains without them.

``inception-cpu`` is sized for about ten minutes of training on a 2-core CPU;
``inception-fast`` is wider, for one GPU. ``widths`` sets the three groups' channels and
``width`` multiplies them (with ``widen_first=false`` only those of the last two groups: the
first, on the full grid, costs a CPU the most time per multiply-add).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn as nn

from cifar_inception.errors import ModelError
from cifar_inception.models.blocks import (
    Branches,
    ImageSizes,
    InceptionNet,
    check_count,
    check_flag,
    check_width,
    scale_width,
)
from cifar_inception.models.registry import register_model

STEM_PATCH = 2
STEM_CHANNELS = 2 * 3 * STEM_PATCH ** 2   # every eigenvector of a 2x2x3 patch, and its negative
LOGIT_SCALE = 1 / 9
BN_MOMENTUM = 0.6                         # PyTorch's convention: weight of the newest batch
BN_EPS = 1e-12
AUX_WEIGHT = 0.3                          # GoogLeNet's weight of each auxiliary loss
ACTIVATIONS = ("gelu", "relu")
# The unpadded 2x2 stem takes a pixel off the side and the three groups halve it (rounding
# down), so 9 pixels are the fewest that leave the head a 1x1 map; it pools globally, so
# there is no largest.
SIZES = ImageSizes(9, None)


def _activation(name: str) -> nn.Module:
    return nn.GELU() if name == "gelu" else nn.ReLU(inplace=True)


def batch_norm(channels: int, scale: bool) -> nn.BatchNorm2d:
    """Batch norm whose scale is frozen at 1 unless ``scale`` (the shift always learns)."""
    norm = nn.BatchNorm2d(channels, momentum=BN_MOMENTUM, eps=BN_EPS)
    norm.weight.requires_grad_(scale)
    return norm


def conv3x3(in_channels: int, out_channels: int) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False)


def _split(out_channels: int) -> tuple[int, int, int]:
    """An Inception module's widths: its 3x3 branch, the deep branch's inner layer, and the
    deep branch's output (half the channels each branch, a quarter inside the deep one)."""
    half = out_channels // 2
    return out_channels - half, max(8, out_channels // 4), half


class InceptionConv(Branches):
    """A 3x3 branch and a 3x3 -> 3x3 branch (5x5 field), half the output channels each.

    The inner layer of the deep branch gets its own norm and activation; the two outputs
    are left raw, to be normalised together after the concatenation (and the pooling).
    With ``reduce`` both branches halve the grid with a 2x2 max-pool after their first
    convolution: the 3x3 branch computes what it did (pooling commutes with the
    concatenation), the deep branch sees an 8x8 field instead of 5x5.
    """

    def __init__(self, in_channels: int, out_channels: int, *, act: str, bn_scale: bool,
                 reduce: bool = False):
        wide_out, inner, deep_out = _split(out_channels)
        pool = [nn.MaxPool2d(2)] if reduce else []
        wide = conv3x3(in_channels, wide_out)
        super().__init__(
            [
                nn.Sequential(wide, *pool) if reduce else wide,  # a bare conv keeps old keys
                nn.Sequential(conv3x3(in_channels, inner), *pool, batch_norm(inner, bn_scale),
                              _activation(act), conv3x3(inner, deep_out)),
            ],
            out_channels=out_channels,
        )


class FusedInceptionConv(nn.Module):
    """:class:`InceptionConv` with the two branches' first convolutions run as one.

    Both read the same input, so one convolution with the filters of both (the 3x3 branch's
    output, then the deep branch's inner layer) computes the two, and its output is split
    along the channels: one larger matrix product instead of two, one read of the input,
    and one input gradient instead of two summed. The same function, the same weights in a
    different layout (``first`` holds both branches' filters), and the same initialisation
    (:func:`_init` sets identity filters in each part as it does in each branch).
    """

    def __init__(self, in_channels: int, out_channels: int, *, act: str, bn_scale: bool,
                 reduce: bool = False):
        super().__init__()
        wide_out, inner, deep_out = _split(out_channels)
        self.parts = (wide_out, inner)
        self.first = conv3x3(in_channels, wide_out + inner)
        self.pool = nn.MaxPool2d(2) if reduce else nn.Identity()
        self.deep = nn.Sequential(batch_norm(inner, bn_scale), _activation(act),
                                  conv3x3(inner, deep_out))
        self.out_channels = out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        wide, inner = self.pool(self.first(x)).split(self.parts, dim=1)
        # batch norm on a slice of the channels takes a slow path: give it its own copy, in
        # the input's layout (clone(memory_format=preserve_format) profiled as slow as the slice)
        inner = inner.contiguous(memory_format=_memory_format(x))
        return torch.cat([wide, self.deep(inner)], dim=1)


def _memory_format(x: torch.Tensor) -> torch.memory_format:
    channels_last = x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last)
    return torch.channels_last if channels_last else torch.contiguous_format


def plain_conv(in_channels: int, out_channels: int, *, act: str, bn_scale: bool,
               reduce: bool = False) -> nn.Module:
    """The baseline's layer where the Inception nets have a module: one 3x3 convolution
    (then the 2x2 max-pool, with ``reduce``)."""
    conv = conv3x3(in_channels, out_channels)
    return nn.Sequential(conv, nn.MaxPool2d(2)) if reduce else conv


class ConvGroup(nn.Sequential):
    """Layer, 2x2 max-pool, norm, act, layer, norm, act; the layer an Inception module
    (:class:`InceptionConv` or :class:`FusedInceptionConv`) or, in the plain baseline, a 3x3
    convolution. With ``reduce`` the first layer pools itself (an Inception module inside its
    branches) instead of being followed by the pool. A ``depth`` above 2 appends more
    layer-norm-act triples on the pooled grid (the earlier layers keep their names)."""

    def __init__(self, in_channels: int, out_channels: int, *, act: str, bn_scale: bool,
                 layer: Callable[..., nn.Module] = InceptionConv, reduce: bool = False,
                 depth: int = 2):
        if reduce:
            first = [layer(in_channels, out_channels, act=act, bn_scale=bn_scale, reduce=True)]
        else:
            first = [layer(in_channels, out_channels, act=act, bn_scale=bn_scale),
                     nn.MaxPool2d(2)]
        later = [(layer(out_channels, out_channels, act=act, bn_scale=bn_scale),
                  batch_norm(out_channels, bn_scale), _activation(act))
                 for _ in range(depth - 1)]
        super().__init__(
            *first,
            batch_norm(out_channels, bn_scale),
            _activation(act),
            *(module for triple in later for module in triple),
        )
        self.out_channels = out_channels


class Scale(nn.Module):
    def __init__(self, factor: float):
        super().__init__()
        self.factor = factor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.factor

    def extra_repr(self) -> str:
        return f"factor={self.factor:.4g}"


class FastInception(InceptionNet):
    """An :class:`InceptionNet` whose stem can be initialised from the training images."""

    def stem_conv(self) -> nn.Conv2d:
        return self.stem[0]

    @torch.no_grad()
    def init_from_data(self, images: torch.Tensor, eps: float = 5e-4) -> None:
        """Set the stem to whiten 2x2 patches of ``images`` (normalised float NCHW).

        The weights are the patch covariance's eigenvectors divided by the square root of
        their eigenvalues (plus ``eps``), each followed by its negative so that the GELU after
        the stem keeps both signs of every component. The bias is reset to zero.
        """
        conv = self.stem_conv()
        patches = images.float().unfold(2, STEM_PATCH, 1).unfold(3, STEM_PATCH, 1)
        # (N, C, H', W', h, w) -> one row per patch, laid out (c, h, w) like a conv weight
        patches = patches.transpose(1, 3).reshape(-1, 3 * STEM_PATCH ** 2)
        patches = patches - patches.mean(0, keepdim=True)
        covariance = patches.T @ patches / len(patches)
        eigenvalues, eigenvectors = torch.linalg.eigh(covariance.double())
        eigenvalues, eigenvectors = eigenvalues.flip(0).float(), eigenvectors.T.flip(0).float()
        filters = eigenvectors.reshape(-1, 3, STEM_PATCH, STEM_PATCH)
        filters = filters / torch.sqrt(eigenvalues + eps).view(-1, 1, 1, 1)
        weight = torch.cat([filters, -filters])
        conv.weight.copy_(weight.to(conv.weight.dtype))
        if conv.bias is not None:
            conv.bias.zero_()


def _check_act(act: object) -> str:
    if act not in ACTIVATIONS:
        raise ModelError(f"act must be one of {', '.join(ACTIVATIONS)}, not {act!r}")
    return str(act)


def check_widths(widths: object) -> tuple[int, int, int]:
    """Three groups' channel counts, each a multiple of 8 from 8 to 4096: a sequence of three
    integers, or the same as a string (``"32/128/256"`` or ``"32,128,256"``, as
    ``--option widths=...`` gives)."""
    return _three_counts(widths, "widths", "channel counts, multiples of 8 from 8 to 4096, "
                         "such as 32/128/256", low=8, high=4096, multiple=8)


def check_depths(depths: object) -> tuple[int, int, int]:
    """Three groups' layer counts, each from 2 to 8, written as :func:`check_widths` reads
    widths (``"2/2/3"``)."""
    return _three_counts(depths, "depths", "layer counts from 2 to 8, such as 2/2/3",
                         low=2, high=8)


def _three_counts(value: object, name: str, what: str, *, low: int, high: int,
                  multiple: int = 1) -> tuple[int, int, int]:
    values = value.replace(",", "/").split("/") if isinstance(value, str) else value
    try:
        counts = tuple(int(str(v).strip()) for v in values)  # type: ignore[union-attr]
    except (TypeError, ValueError):
        counts = ()
    if len(counts) != 3 or any(c < low or c > high or c % multiple for c in counts):
        raise ModelError(f"{name} must be three {what}; not {value!r}")
    return counts  # type: ignore[return-value]


def fast_inception(widths: tuple[int, int, int] | str, num_classes: int, *, width: float,
                   act: str, bn_scale: bool, dirac: bool, reduce: bool = False,
                   fuse: bool = False, widen_first: bool = True, dirac_offset: bool = False,
                   depths: tuple[int, int, int] | str = (2, 2, 2), aux: int = 0,
                   layer: Callable[..., nn.Module] | None = None) -> FastInception:
    """The network of this module's docstring, its groups ``widths`` wide (three channel
    counts, or a string such as ``"32/128/256"``) times ``width``, the first group's too
    unless ``widen_first`` is false; ``layer`` replaces the Inception module (the plain
    baseline's 3x3 convolution). ``aux`` auxiliary heads (0 to 2), as GoogLeNet's, read the
    last groups but one (:func:`_aux_heads`)."""
    widths = check_widths(widths)
    depths = check_depths(depths)
    width = check_width(width)
    act = _check_act(act)
    bn_scale = check_flag("bn_scale", bn_scale)
    dirac = check_flag("dirac", dirac)
    reduce = check_flag("reduce", reduce)
    fuse = check_flag("fuse", fuse)
    widen_first = check_flag("widen_first", widen_first)
    dirac_offset = check_flag("dirac_offset", dirac_offset)
    aux = check_count("aux", aux, 0, 2)
    if layer is None:
        layer = FusedInceptionConv if fuse else InceptionConv
    channels = [c if index == 0 and not widen_first else scale_width(c, width)
                for index, c in enumerate(widths)]
    stages: dict[str, nn.Module] = {
        "stem": nn.Sequential(nn.Conv2d(3, STEM_CHANNELS, STEM_PATCH, padding=0, bias=True),
                              _activation(act)),
    }
    previous = STEM_CHANNELS
    for index, (out, depth) in enumerate(zip(channels, depths), start=1):
        stages[f"group{index}"] = ConvGroup(previous, out, act=act, bn_scale=bn_scale,
                                            layer=layer, reduce=reduce, depth=depth)
        previous = out
    model = FastInception(stages, _max_pool_head(previous, num_classes),
                          _aux_heads(channels, num_classes, aux), AUX_WEIGHT, sizes=SIZES)
    _init(model, dirac, dirac_offset)
    return model


def _max_pool_head(channels: int, num_classes: int) -> nn.Sequential:
    return nn.Sequential(nn.AdaptiveMaxPool2d(1), nn.Flatten(),
                         nn.Linear(channels, num_classes, bias=False), Scale(LOGIT_SCALE))


def _aux_heads(channels: list[int], num_classes: int, count: int) -> list[tuple[str, nn.Module]]:
    """``count`` auxiliary heads on the groups before the last: one reads group 2, two read
    groups 1 and 2. Each is the main head's shape (max-pool, linear, the same logit scale),
    so a head costs a pooling and a 10-way linear layer: the deep supervision of GoogLeNet's
    auxiliary classifiers at almost no cost, and only in training
    (:class:`~cifar_inception.models.blocks.InceptionNet`). Their loss weights default to
    AUX_WEIGHT; ``--aux-weights`` sets others."""
    taps = range(len(channels) - 1 - count, len(channels) - 1)
    return [(f"group{index + 1}", _max_pool_head(channels[index], num_classes)) for index in taps]


def _init(model: nn.Module, dirac: bool, dirac_offset: bool = False) -> None:
    """PyTorch's default initialisation, then (``dirac``) identity filters in each 3x3 conv.

    With ``dirac`` the first ``min(in, out)`` filters of every 3x3 convolution start as the
    identity (the others keep their random init), so at the start each module passes its
    input through as a residual block would, and a network without skip connections trains
    fast from the first step. A fused convolution gets them in each branch's part, as the
    separate convolutions would.

    With ``dirac_offset`` the deep branch's first convolution takes as its identity the input
    channels after those the 3x3 branch passes on (wrapping round a narrower input), so an
    Inception module starts as the identity on three quarters of its channels instead of
    passing the first quarter twice, and each branch's identity path runs on into the same
    branch of the next module.
    """
    parts = _identity_parts(model, dirac_offset)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
        elif dirac and isinstance(module, nn.Conv2d) and module.kernel_size == (3, 3):
            weights = module.weight.data
            for part, offset in parts.get(id(module), [(module.out_channels, 0)]):
                _identity_filters(weights[:part], offset)
                weights = weights[part:]


def _identity_parts(model: nn.Module, offset: bool) -> dict[int, list[tuple[int, int]]]:
    """For the Inception modules' first convolutions: each branch's filters (how many) and the
    input channel its identity filters start from."""
    parts: dict[int, list[tuple[int, int]]] = {}
    for module in model.modules():
        if isinstance(module, FusedInceptionConv):
            wide, inner = module.parts
            start = wide % module.first.in_channels if offset else 0
            parts[id(module.first)] = [(wide, 0), (inner, start)]
        elif isinstance(module, InceptionConv) and offset:
            wide = next(m for m in module.branches[0].modules() if isinstance(m, nn.Conv2d))
            inner = module.branches[1][0]
            parts[id(inner)] = [(inner.out_channels, wide.out_channels % inner.in_channels)]
    return parts


def _identity_filters(weight: torch.Tensor, start: int) -> None:
    """Filter i passes input channel ``(start + i) % in`` through unchanged, for the first
    ``min(in, out)`` filters: ``nn.init.dirac_``, its input channels rolled by ``start``."""
    identity = weight[:min(weight.shape[0], weight.shape[1])]
    nn.init.dirac_(identity)
    if start:
        identity.copy_(identity.roll(start, dims=1))


CPU_WIDTHS = (32, 128, 128)
FAST_WIDTHS = (64, 256, 256)
OPTIONS_DOC = """

    Options: ``width`` (channel multiplier), ``widths`` (the three groups' channels at width
    1, such as ``32/128/256``), ``widen_first`` (whether ``width`` multiplies the first
    group's channels too; default true), ``depths`` (Inception modules in each group, such as
    ``2/2/3``; default 2/2/2), ``act`` (gelu or relu), ``bn_scale`` (learn the
    batch-norm scale; default false: frozen at 1), ``dirac`` (identity-initialised 3x3
    filters; default true), ``dirac_offset`` (the deep branch's identity filters take the
    input channels after the 3x3 branch's; default false), ``reduce`` (the first module of
    each group reduces the grid inside its branches; default false), ``fuse`` (the
    branches' first convolutions run as one, :class:`FusedInceptionConv`: the same function,
    faster; default false, whose weights keep the layout of separate branches), ``aux``
    (auxiliary heads on groups 2, or 1 and 2, each loss weighted 0.3; default 0).
    """


def _inception_builder(widths: tuple[int, int, int], purpose: str) -> Callable[..., nn.Module]:
    """A registered builder of :func:`fast_inception` at ``widths``; its keyword arguments
    are the model's options (the registry reads them from the signature)."""
    table = "/".join(map(str, widths))  # the default of the widths option, as a user writes it

    def build(num_classes: int = 10, *, width: float = 1.0, widths: str = table,
              widen_first: bool = True, act: str = "gelu", bn_scale: bool = False,
              dirac: bool = True, dirac_offset: bool = False, reduce: bool = False,
              fuse: bool = False, depths: str = "2/2/2", aux: int = 0) -> FastInception:
        return fast_inception(widths, num_classes, width=width, widen_first=widen_first,
                              act=act, bn_scale=bn_scale, dirac=dirac, dirac_offset=dirac_offset,
                              reduce=reduce, fuse=fuse, depths=depths, aux=aux)
    build.__doc__ = purpose + OPTIONS_DOC
    return build


inception_cpu = register_model("inception-cpu", sizes=SIZES)(_inception_builder(
    CPU_WIDTHS, "Small Inception net for time-to-accuracy on a 2-core CPU (the cpu10 recipe's "
                "model)."))
inception_fast = register_model("inception-fast", sizes=SIZES)(_inception_builder(
    FAST_WIDTHS, "Inception net for time-to-accuracy on one GPU (the fast recipe's model)."))


BASELINE_WIDTHS = (64, 256, 256)


@register_model("baseline-plain", sizes=SIZES)
def baseline_plain(num_classes: int = 10, *, width: float = 1.0, act: str = "gelu",
                   bn_scale: bool = False, dirac: bool = True) -> FastInception:
    """Plain (non-Inception) baseline: airbench94's network, for side-by-side benchmarks.

    The fastest known CIFAR-10 trainer's network, written from its description: the same
    2x2 whitening stem to 24 channels and GELU, then three groups of conv-pool-norm-GELU-
    conv-norm-GELU of widths 64/256/256 (3x3 convolutions), a max-pool and a linear head with
    logits scaled by 1/9; about 1.97 million parameters. It is not an Inception net: it is
    here so that the Inception recipes are measured against it by the same loop, with the
    same tricks. Options ``width``, ``act``, ``bn_scale`` and ``dirac``, as ``inception-cpu``'s.
    """
    return fast_inception(BASELINE_WIDTHS, num_classes, width=width, act=act,
                          bn_scale=bn_scale, dirac=dirac, layer=plain_conv)
