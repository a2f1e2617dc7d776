"""Guidance wrappers: models following the ucgm convention ``model(x, t, labels)`` whose output is a guided
combination of raw network outputs ``F``. Since every parameterisation is affine in ``F`` at fixed ``(x_t, t)``,
guiding ``F`` guides the data and noise predictions (and the velocity) alike, so any sampler or objective can
use them. The combination is ``torch.lerp``, exact at both ends: scale 1 gives the first term, scale 0 the second.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
from torch import Tensor, nn

from ..validation import check_batch


def _check_scale(scale: float) -> float:
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise ValueError(f"scale={scale!r} must be a finite number (1: no guidance)")
    return float(scale)


def _closed_interval(interval: Sequence[float]) -> tuple[float, float]:
    bounds = tuple(float(v) for v in interval)
    if len(bounds) != 2 or not all(math.isfinite(v) for v in bounds) or bounds[0] > bounds[1]:
        raise ValueError(f"interval={tuple(interval)!r} must be (low, high) with finite low <= high, or None")
    return bounds


class ClassifierFreeGuidance(nn.Module):
    """Classifier-free guidance (Ho & Salimans 2021) with an optional guidance interval (Kynkäänniemi et al. 2024).

    ``F = F_u + scale (F_c - F_u)`` with ``F_c = model(x, t, labels)`` and ``F_u = model(x, t, null)``, evaluated
    in one call on the doubled batch ``[x; x]`` with labels ``[labels; null]``, when the network time of the first
    sample lies in the closed ``interval`` (``None``: always), as the official UCGM code tests it; otherwise
    ``F = F_c`` with one call on the batch itself. Scale 1 is the conditional model and scale 0 the unconditional
    one, each in a single undoubled call. ``null_label`` defaults to ``model.num_classes``.
    """

    def __init__(self, model: nn.Module, scale: float, interval: Optional[Sequence[float]] = None,
                 null_label: Optional[int] = None):
        super().__init__()
        self.model, self.scale = model, _check_scale(scale)
        self.num_classes = getattr(model, "num_classes", None)
        self.null_label = self.num_classes if null_label is None else null_label
        if isinstance(self.null_label, bool) or not isinstance(self.null_label, int):
            raise ValueError(
                f"null_label={self.null_label!r}: pass an integer null label "
                "or wrap a model with an integer num_classes"
            )
        self.interval = None if interval is None else _closed_interval(interval)

    def guidance_active(self, t: Tensor) -> bool:
        """Whether ``t[0]`` (network time) lies in the guidance interval, compared in the dtype of ``t``."""
        if self.interval is None:
            return True
        first = t.reshape(-1)[0]
        return bool((first >= self.interval[0]) & (first <= self.interval[1]))

    def forward(self, x: Tensor, t: Tensor, labels: Optional[Tensor] = None, **conditions: Optional[Tensor]
                ) -> Tensor:
        if labels is None:
            raise ValueError("ClassifierFreeGuidance needs class labels; got labels=None")
        check_batch("labels", labels, x.shape[0])
        if self.scale == 1 or not self.guidance_active(t):
            return self.model(x, t, labels, **conditions)
        null = torch.full_like(labels, self.null_label)
        if self.scale == 0:
            return self.model(x, t, null, **conditions)
        doubled = {name: torch.cat([value, value]) if isinstance(value, Tensor) and value.ndim else value
                   for name, value in conditions.items()}
        both = self.model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([labels, null]), **doubled)
        conditional, unconditional = both.chunk(2)
        return torch.lerp(unconditional, conditional, self.scale)


class AutoGuidance(nn.Module):
    """Autoguidance (Karras et al. 2024): ``F = F_guide + scale (F_model - F_guide)``, both called with the same
    ``(x, t, labels)``; ``guide_model`` is a weaker model of the same task and conditioning. Scale 1 is the
    model alone and scale 0 the guide alone (one call each)."""

    def __init__(self, model: nn.Module, guide_model: nn.Module, scale: float):
        super().__init__()
        self.model, self.guide_model, self.scale = model, guide_model, _check_scale(scale)
        self.num_classes = getattr(model, "num_classes", None)
        guide_classes = getattr(guide_model, "num_classes", None)
        if guide_classes != self.num_classes:
            raise ValueError(
                f"guide_model has num_classes={guide_classes!r} but model has {self.num_classes!r}; they must match"
            )

    def forward(self, x: Tensor, t: Tensor, labels: Optional[Tensor] = None, **conditions: Optional[Tensor]
                ) -> Tensor:
        if self.scale == 1:
            return self.model(x, t, labels, **conditions)
        if self.scale == 0:
            return self.guide_model(x, t, labels, **conditions)
        return torch.lerp(self.guide_model(x, t, labels, **conditions), self.model(x, t, labels, **conditions),
                          self.scale)
