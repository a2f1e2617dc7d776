"""An infinite dataset of fresh draws from a named toy Gaussian mixture (see :mod:`ucgm.data.mixtures`)."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..validation import check_positive_int
from .base import AffineNormalisation, Dataset


class MixtureDataset(Dataset):
    """Samples ``(D,)`` of ``make_mixture(mixture, **mixture_options)``, drawn anew for every batch.

    Data stay in the mixture's own units (identity normalisation), so :attr:`mixture` is the exact oracle of the
    model-space data. ``conditional=True`` returns the component class labels (``num_classes`` of the mixture);
    ``conditional=False`` returns ``None`` labels and ``num_classes == 0``.
    """

    def __init__(self, mixture: str = "8gaussians", mixture_options: Optional[dict] = None, conditional: bool = True):
        from .mixtures import make_mixture

        self.mixture = make_mixture(mixture, **(mixture_options or {}))
        self.conditional = conditional
        self.num_classes = self.mixture.num_classes if conditional else 0
        self.shape = (self.mixture.dim,)
        self.normaliser = AffineNormalisation(1.0, 0.0)

    def sample_batch(self, batch_size: int, generator: torch.Generator) -> tuple[Tensor, Optional[Tensor]]:
        check_positive_int("batch_size", batch_size)
        x, labels = self.mixture.sample(batch_size, generator=generator)
        return x.to(torch.float32), labels if self.conditional else None
