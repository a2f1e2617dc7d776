"""Resolution pyramids of signals ``(B, C, L)`` and images ``(B, C, H, W)``: the operators a cascade uses.

* :func:`downsample` averages non-overlapping blocks of ``factor`` (per spatial axis), the low-resolution view of
  the data a cascade's lowest stage generates;
* :func:`upsample` repeats every value ``factor`` times per spatial axis (nearest neighbour), how a lower stage's
  output enters the next stage as its ``low_res`` condition. ``downsample(upsample(y)) = y`` exactly, so the
  condition carries the lower stage's sample without loss.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from ..validation import check_positive_int


def check_pyramid_shape(shape: tuple, levels: int) -> None:
    """Raise unless samples of ``shape`` (without the batch axis) have a channel axis and 1 or 2 spatial axes
    divisible by ``2^(levels - 1)``."""
    check_positive_int("levels", levels)
    if len(shape) not in (2, 3):
        raise ValueError(f"a resolution pyramid needs signals (C, L) or images (C, H, W); got samples of shape "
                         f"{tuple(shape)}")
    factor = 2 ** (levels - 1)
    if any(size % factor for size in shape[1:]):
        raise ValueError(f"spatial sizes {tuple(shape[1:])} must be divisible by 2^(levels - 1) = {factor} for "
                         f"{levels} levels")


def level_shape(shape: tuple, level: int, levels: int) -> tuple:
    """The sample shape at pyramid ``level`` (0 = lowest resolution, ``levels - 1`` = full resolution)."""
    factor = 2 ** (levels - 1 - level)
    return (shape[0],) + tuple(size // factor for size in shape[1:])


def downsample(x: Tensor, factor: int = 2) -> Tensor:
    """Block means over ``factor`` samples per spatial axis: ``(B, C, L) -> (B, C, L / f)`` or
    ``(B, C, H, W) -> (B, C, H / f, W / f)``."""
    if factor == 1:
        return x
    if x.ndim == 3:
        return F.avg_pool1d(x, factor)
    if x.ndim == 4:
        return F.avg_pool2d(x, factor)
    raise ValueError(f"downsample needs (B, C, L) or (B, C, H, W); got shape {tuple(x.shape)}")


def upsample(x: Tensor, factor: int = 2) -> Tensor:
    """Nearest-neighbour repetition, ``factor`` per spatial axis (the right inverse of :func:`downsample`)."""
    if x.ndim not in (3, 4):
        raise ValueError(f"upsample needs (B, C, L) or (B, C, H, W); got shape {tuple(x.shape)}")
    for axis in range(2, x.ndim):
        x = x.repeat_interleave(factor, dim=axis)
    return x
