"""scikit-learn's 8x8 digits enlarged to ``size x size`` (bilinear, 16 by default): an offline image set at a
resolution a two-level cascade (8x8 then 16x16) can work on. Values stay in [-1, 1] (the digits'
normalisation commutes with the interpolation); the held-out split is the digits' (index % 5 == 0)."""

from __future__ import annotations

import torch.nn.functional as F

from ..validation import check_positive_int
from .digits import DIGITS_NORMALISATION, load_digits_split
from .base import TensorDataset

DIGITS_SIZE = 8


def upsampled_digits(split: str, size: int):
    """``(N, 1, size, size)`` digits of ``split`` in [-1, 1] (bilinear, ``align_corners=False``) and labels."""
    images, labels = load_digits_split(split)
    normalised = DIGITS_NORMALISATION.normalise(images)
    if size == DIGITS_SIZE:
        return normalised, labels
    return F.interpolate(normalised, size=(size, size), mode="bilinear", align_corners=False), labels


class UpsampledDigitsDataset(TensorDataset):
    """The digits as ``(1, size, size)`` images in [-1, 1] with 10 classes."""

    def __init__(self, size: int = 16, split: str = "train"):
        check_positive_int("size", size, minimum=DIGITS_SIZE)
        images, labels = upsampled_digits(split, size)
        super().__init__(images, labels, 10, DIGITS_NORMALISATION)
        self.size, self.split = size, split
