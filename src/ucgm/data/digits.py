"""scikit-learn's bundled 8x8 digits (1,797 images, values 0..16, 10 classes), shipped offline with the package.

The split is fixed forever: sample ``i`` is held out when ``i % 5 == 0`` (360 images), the other 1,437 are the
training split. Generative models train on ``"train"``; the digits Fréchet distance uses ``"heldout"`` as reference.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..validation import check_choice
from .base import AffineNormalisation, TensorDataset

DIGITS_SPLITS = ("train", "heldout", "all")
DIGITS_MAX_VALUE = 16.0
HELDOUT_EVERY = 5

#: Raw pixel values 0..16 map to [-1, 1].
DIGITS_NORMALISATION = AffineNormalisation(scale=2.0 / DIGITS_MAX_VALUE, shift=-1.0)


def load_digits_split(split: str = "train") -> tuple[Tensor, Tensor]:
    """Raw digits ``(N, 1, 8, 8)`` float32 in 0..16 and labels ``(N,)`` of one split."""
    check_choice("split", split, DIGITS_SPLITS)
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = torch.as_tensor(bunch.images, dtype=torch.float32).unsqueeze(1)
    labels = torch.as_tensor(bunch.target, dtype=torch.long)
    if split == "all":
        return images, labels
    heldout = torch.arange(images.shape[0]) % HELDOUT_EVERY == 0
    keep = heldout if split == "heldout" else ~heldout
    return images[keep], labels[keep]


class DigitsDataset(TensorDataset):
    """The 8x8 digits as ``(1, 8, 8)`` float32 in [-1, 1] with 10 classes."""

    def __init__(self, split: str = "train"):
        images, labels = load_digits_split(split)
        super().__init__(DIGITS_NORMALISATION.normalise(images), labels, 10, DIGITS_NORMALISATION)
        self.split = split
