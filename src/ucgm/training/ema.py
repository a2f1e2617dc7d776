"""Evaluation EMA of a model's weights: constant decay or the EDM2 power-function EMA."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from .settings import EMAConfig


def power_ema_exponent(std: float) -> float:
    """The exponent ``gamma`` of a power-function EMA whose relative std is ``std`` (Karras et al., EDM2).

    The profile ``w(t) ~ t^gamma`` has relative std ``sqrt((gamma + 1) / ((gamma + 2)^2 (gamma + 3)))``; solving
    for ``gamma`` gives the largest real root of ``g^3 + 7 g^2 + (16 - s^-2) g + (12 - s^-2)``.
    """
    inverse_variance = std**-2
    roots = np.roots([1.0, 7.0, 16.0 - inverse_variance, 12.0 - inverse_variance])
    return float(roots[np.isreal(roots)].real.max())


class EvaluationEMA:
    """An averaged copy of a model (:attr:`module`) for sampling and evaluation.

    ``constant``: ``ema <- decay * ema + (1 - decay) * theta`` after every step. ``power``: the decay after
    update ``k`` (0-based) is ``(1 - 1 / (k + 1))^(gamma + 1)``, so the average weighs step ``j`` like ``j^gamma``.
    Buffers are copied from the model. ``module`` is the copy to average into (taken from ``model`` at the start);
    ``model`` is the trained network whose parameters are averaged.
    """

    def __init__(self, module: nn.Module, model: nn.Module, settings: EMAConfig):
        if settings.kind not in ("constant", "power"):
            raise ValueError(f"EvaluationEMA needs kind 'constant' or 'power', got {settings.kind!r}")
        self.settings = settings
        self.exponent = power_ema_exponent(settings.std) if settings.kind == "power" else None
        self.module = module.requires_grad_(False).eval()
        self._targets = list(self.module.parameters())
        self._sources = list(model.parameters())
        self._target_buffers = [buffer for buffer in self.module.buffers() if buffer.is_floating_point()]
        self._source_buffers = [buffer for buffer in model.buffers() if buffer.is_floating_point()]
        if len(self._targets) != len(self._sources) or len(self._target_buffers) != len(self._source_buffers):
            raise ValueError("the EMA copy and the model must have the same parameters and buffers")

    def decay(self, step: int) -> float:
        """The decay applied by the update that follows optimisation step ``step`` (0-based)."""
        if self.exponent is None:
            return self.settings.decay
        return (1.0 - 1.0 / (step + 1)) ** (self.exponent + 1)

    @torch.no_grad()
    def update(self, step: int) -> None:
        """Move the average towards the model's current weights (after optimisation step ``step``)."""
        torch._foreach_lerp_(self._targets, self._sources, 1.0 - self.decay(step))
        if self._target_buffers:
            torch._foreach_copy_(self._target_buffers, self._source_buffers)
