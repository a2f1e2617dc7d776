"""The reference network an objective asks for next to the online model (``Objective.reference_mode``)."""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

REFERENCE_MODES = (None, "ema", "online", "frozen")


def next_reference_decay(decay: float, target: float) -> float:
    """Warm-up of the reference EMA decay: ``d_{k+1} = d_k + (1 - d_k)(mu - d_k) / 2`` from ``d_0 = 0``."""
    return decay + (1.0 - decay) * (target - decay) / 2.0


class ReferenceNetwork:
    """Maintains :attr:`module`, the network handed to the objective as ``reference_model``.

    ``module`` is the online model for ``"online"`` and a separate copy of ``model`` for ``"frozen"`` and ``"ema"``:

    * ``None``: no reference (:attr:`module` is ``None``).
    * ``"online"``: the online model itself (the objective calls it without gradient).
    * ``"frozen"``: the copy, as the run started.
    * ``"ema"``: the copy, updated *before* each step's loss with decay ``d_k`` (``d_0 = 0``, warming up to the
      objective's ``reference_decay``, read at every step since it may follow a curriculum; see
      :func:`next_reference_decay`).
    """

    def __init__(self, mode: Optional[str], module: nn.Module, model: nn.Module):
        if mode not in REFERENCE_MODES:
            raise ValueError(f"reference_mode={mode!r} is not allowed; allowed values: {REFERENCE_MODES}")
        self.mode = mode
        self.decay = 0.0
        self.module: Optional[nn.Module] = None if mode is None else module
        if self.owns_weights:
            module.requires_grad_(False)
        self._targets = list(module.parameters()) if mode == "ema" else []
        self._sources = list(model.parameters()) if mode == "ema" else []

    @property
    def owns_weights(self) -> bool:
        """Whether the reference is a separate copy whose weights belong in a checkpoint."""
        return self.mode in ("ema", "frozen")

    @torch.no_grad()
    def before_step(self, target_decay: float) -> None:
        """Update an EMA reference towards the model with the current decay, then advance the decay towards
        ``target_decay``."""
        if self.mode != "ema":
            return
        torch._foreach_lerp_(self._targets, self._sources, 1.0 - self.decay)
        self.decay = next_reference_decay(self.decay, float(target_decay))
