"""A learned per-time loss weighting (log-variance head) in the style of EDM2 and sCM.

``w_phi(s) = Linear(sqrt(2) cos(2 pi (f_k u + p_k)))``, ``u = log(tan s)`` the log noise-to-signal ratio of the
TrigFlow angle ``s``, with fixed random frequencies ``f_k ~ N(0, 1)`` and phases ``p_k ~ U[0, 1)`` drawn from a
seeded generator (so two heads built with the same seed are identical, and building one leaves the global
generator untouched). The linear layer starts at zero, so ``w = 0`` before training. Used as
``L = exp(-w) * error + w``: at the optimum ``w = log E[error | s]``, which divides each time's error by its own
scale (homoscedastic uncertainty weighting).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ...validation import check_positive_int

#: Keeps ``log tan s`` finite at the ends of [0, pi/2].
_ANGLE_MARGIN = 1e-7


class AdaptiveWeighting(nn.Module):
    """Log-variance head ``w_phi(s)``: angles ``(B,)`` -> log-variances ``(B,)`` (see the module docstring)."""

    def __init__(self, num_features: int = 128, seed: int = 0):
        super().__init__()
        check_positive_int("num_features", num_features)
        generator = torch.Generator().manual_seed(seed)
        self.register_buffer("frequencies", torch.randn(num_features, generator=generator))
        self.register_buffer("phases", torch.rand(num_features, generator=generator))
        self.weight = nn.Parameter(torch.zeros(num_features))
        self.bias = nn.Parameter(torch.zeros(()))

    def forward(self, angle: Tensor) -> Tensor:
        """``w_phi(s)`` for TrigFlow angles ``s`` in (0, pi/2)."""
        angle = torch.clamp(angle.to(torch.float64), _ANGLE_MARGIN, math.pi / 2 - _ANGLE_MARGIN)
        log_ratio = (torch.log(torch.sin(angle)) - torch.log(torch.cos(angle))).to(self.frequencies.dtype)
        features = math.sqrt(2) * torch.cos(2 * math.pi * (log_ratio[:, None] * self.frequencies + self.phases))
        return features @ self.weight + self.bias
