"""Batched preprocessing and augmentation on uint8 image tensors, on whatever device they are.

Images travel as uint8 (N, 32, 32, 3) until they reach the model's device; only there are
they converted to float and normalised, so the host never holds a float copy of the data.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


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
