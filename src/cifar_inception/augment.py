"""Batched preprocessing and augmentation on uint8 image tensors, on whatever device they are.

Images travel as uint8 (N, H, W, C) until they reach the model's device; only there are
they converted to float and normalised, so the host never holds a float copy of the data.

Every random operation here works on a whole batch at once (no per-image Python loop), draws
its random numbers from the ``torch.Generator`` it is given (so a run is repeatable), and
accepts uint8 or float tensors in (N, H, W, C) layout on any device. The generator must live
on the same device as the images.

Random crop pads by *reflection* by default (the border pixels are mirrored, as in
airbench), so a shifted image never shows an artificial black band; ``padding_mode="zeros"``
gives the classic zero-padded crop instead. Both are done by index arithmetic, without
building a padded copy of the batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from cifar_inception.recipes import PADDING_MODES  # the modes a configuration may name


def normalize(images_nhwc_uint8: torch.Tensor, mean: Sequence[float], std: Sequence[float],
              *, dtype: torch.dtype = torch.float32,
              channels_last: bool = False) -> torch.Tensor:
    """uint8 (N, H, W, 3) -> normalised float (N, 3, H, W); mean and std on the 0-1 scale."""
    x = images_nhwc_uint8.permute(0, 3, 1, 2).to(dtype)
    mean_t = torch.tensor(mean, dtype=dtype, device=x.device).view(1, 3, 1, 1) * 255.0
    std_t = torch.tensor(std, dtype=dtype, device=x.device).view(1, 3, 1, 1) * 255.0
    x = (x - mean_t) / std_t
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    return x.contiguous(memory_format=memory_format)


# --- deterministic building blocks: the random functions below only choose their arguments


def _source_index(size: int, shift: torch.Tensor, padding_mode: str
                  ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """For each image's shift, which source row (or column) lands at each output position.

    Returns (index, inside): ``index`` is (N, size); ``inside`` marks positions that fall in the
    image (None for reflection, where every position has a mirrored source pixel).
    """
    index = torch.arange(size, device=shift.device).unsqueeze(0) + shift.unsqueeze(1)
    if padding_mode == "reflect":
        index = index.abs()                                   # -k -> k
        index = torch.where(index > size - 1, 2 * (size - 1) - index, index)
        return index, None
    inside = (index >= 0) & (index <= size - 1)
    return index.clamp(0, size - 1), inside


def translate(images: torch.Tensor, dy: torch.Tensor, dx: torch.Tensor, *,
              padding_mode: str = "reflect") -> torch.Tensor:
    """Shift each image by its own (dy, dx) pixels, keeping its size.

    Output pixel (i, j) of image n is input pixel (i + dy[n], j + dx[n]); positions outside
    the image are mirrored (``reflect``, valid for shifts smaller than the image) or zero.
    This is a crop of the padded image, so a random crop is a translate with random shifts.
    """
    if padding_mode not in PADDING_MODES:
        raise ValueError(f"padding_mode must be one of {PADDING_MODES}, not {padding_mode!r}")
    n, height, width, channels = images.shape
    rows, rows_inside = _source_index(height, dy.to(images.device), padding_mode)
    cols, cols_inside = _source_index(width, dx.to(images.device), padding_mode)
    # Two gathers (rows, then columns) select the shifted window for every image at once.
    out = torch.gather(images, 1, rows[:, :, None, None].expand(n, height, width, channels))
    out = torch.gather(out, 2, cols[:, None, :, None].expand(n, height, width, channels))
    if padding_mode == "zeros":
        inside = rows_inside[:, :, None, None] & cols_inside[:, None, :, None]
        out = out * inside.to(out.dtype)
    return out


def flip_where(images: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mirror left-right the images whose ``mask`` entry is True."""
    return torch.where(mask.to(images.device)[:, None, None, None], images.flip(2), images)


def erase(images: torch.Tensor, cy: torch.Tensor, cx: torch.Tensor, size: int,
          fill: float | Sequence[float] = 0) -> torch.Tensor:
    """Fill a ``size`` x ``size`` square centred at (cy[n], cx[n]) of each image with ``fill``.

    The square may stick out of the image (then only its inside part is filled), as in the
    original cutout. ``fill`` is one value or one per channel, in the images' own scale.
    """
    n, height, width, channels = images.shape
    device = images.device
    top = (cy.to(device) - size // 2)[:, None]
    left = (cx.to(device) - size // 2)[:, None]
    rows = torch.arange(height, device=device)[None, :]
    cols = torch.arange(width, device=device)[None, :]
    in_rows = (rows >= top) & (rows < top + size)             # (N, H)
    in_cols = (cols >= left) & (cols < left + size)           # (N, W)
    square = (in_rows[:, :, None] & in_cols[:, None, :])[..., None]  # (N, H, W, 1)
    fill_t = torch.as_tensor(fill, dtype=images.dtype, device=device).reshape(-1)
    fill_t = fill_t.expand(channels).reshape(1, 1, 1, channels)
    return torch.where(square, fill_t, images)


# --- random augmentations


def _randint(high: int, n: int, generator: torch.Generator) -> torch.Tensor:
    return torch.randint(0, high, (n,), generator=generator, device=generator.device)


def random_crop(images: torch.Tensor, padding: int, *, generator: torch.Generator,
                padding_mode: str = "reflect") -> torch.Tensor:
    """Pad each side by ``padding`` and cut a random window of the original size."""
    if padding <= 0:
        return images
    n = images.shape[0]
    dy = _randint(2 * padding + 1, n, generator) - padding
    dx = _randint(2 * padding + 1, n, generator) - padding
    return translate(images, dy, dx, padding_mode=padding_mode)


def random_flip(images: torch.Tensor, *, generator: torch.Generator) -> torch.Tensor:
    """Mirror each image left-right with probability 1/2."""
    mask = _randint(2, images.shape[0], generator).bool()
    return flip_where(images, mask)


def alternating_flips(n_images: int, epoch: int, *, generator: torch.Generator) -> torch.Tensor:
    """Which of ``n_images`` to mirror in ``epoch``: a random half in even epochs, the other
    half in odd ones (airbench's alternating flip).

    ``generator`` must start from the same state in every epoch (seed it by the run, not by
    the epoch), so that each image is mirrored exactly every other epoch: over two epochs
    the network sees both views of every image, which random flips give only on average.
    """
    first = _randint(2, n_images, generator).bool()
    return first ^ bool(epoch % 2)


def random_cutout(images: torch.Tensor, size: int, *, generator: torch.Generator,
                  fill: float | Sequence[float] = 0) -> torch.Tensor:
    """Cutout (DeVries & Taylor, 2017): blank one ``size`` square at a random centre."""
    if size <= 0:
        return images
    n, height, width, _ = images.shape
    cy = _randint(height, n, generator)
    cx = _randint(width, n, generator)
    return erase(images, cy, cx, size, fill)


@dataclass(frozen=True)
class AugmentPolicy:
    """The training augmentation: crop (0 = none), flip, cutout (0 = none), in that order."""

    crop_padding: int = 0
    padding_mode: str = "reflect"
    flip: bool = False
    cutout: int = 0

    @property
    def active(self) -> bool:
        return self.crop_padding > 0 or self.flip or self.cutout > 0

    def __call__(self, images: torch.Tensor, *, generator: torch.Generator,
                 fill: float | Sequence[float] = 0,
                 flip_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Augment a batch; ``fill`` is the cutout value (the data mean makes it zero later).

        ``flip_mask`` (bool, one per image) says which images to mirror, for a schedule such
        as :func:`alternating_flips`; without it each is mirrored with probability 1/2.
        """
        if self.crop_padding > 0:
            images = random_crop(images, self.crop_padding, generator=generator,
                                 padding_mode=self.padding_mode)
        if self.flip:
            images = (flip_where(images, flip_mask) if flip_mask is not None
                      else random_flip(images, generator=generator))
        if self.cutout > 0:
            images = random_cutout(images, self.cutout, generator=generator, fill=fill)
        return images
