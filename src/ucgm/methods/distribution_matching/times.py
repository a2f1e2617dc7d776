"""The noise levels of the distribution-matching losses: DMD2's uniform draws of a Karras index grid.

DMD2 (EDM code, ``edm_guidance.py``) keeps the 1000 Karras noise levels
``sigma_i = (sigma_min^(1/rho) + i/999 (sigma_max^(1/rho) - sigma_min^(1/rho)))^rho``, ``i = 0 .. 999`` (index 0 the
smallest, ``sigma`` in [0.002, 80], ``rho = 7``) and draws an index uniformly per sample: ``i ~ U{20 .. 980}`` for the
distribution-matching loss (``min_step_percent`` 0.02, ``max_step_percent`` 0.98, upper bound included), ``i ~
U{0 .. 999}`` for the fake-score loss and the GAN's noise. A fraction range ``(low, high)`` here means the indices
``floor(low * 1000) .. floor(high * 1000)`` clipped to 999 — the official bounds for ``(0.02, 0.98)`` and
``(0, 1)``. The library time of a level is ``t = path.time_for_ratio(sigma)`` (``sigma / (1 + sigma)`` on the
linear path: i = 20 -> t = 0.0032, i = 980 -> t = 0.986), so the draws are uniform in the index, not in ``t``.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from ...transports import Path
from ...validation import check_positive_int

KARRAS_LEVELS = 1000
KARRAS_SIGMA_MIN = 0.002
KARRAS_SIGMA_MAX = 80.0
KARRAS_RHO = 7.0


def karras_index_sigmas(levels: int = KARRAS_LEVELS, sigma_min: float = KARRAS_SIGMA_MIN,
                        sigma_max: float = KARRAS_SIGMA_MAX, rho: float = KARRAS_RHO) -> Tensor:
    """The ``levels`` Karras noise levels in increasing order (float64): ``sigma_i`` of the module docstring."""
    check_positive_int("levels", levels, minimum=2)
    fractions = torch.arange(levels, dtype=torch.float64) / (levels - 1)
    low, high = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (low + fractions * (high - low)) ** rho


def check_fraction_range(name: str, fractions: Sequence[float]) -> tuple[float, float]:
    """``(low, high)`` with ``0 <= low <= high <= 1``, or ``ValueError`` naming ``name``."""
    values = tuple(float(value) for value in fractions)
    if len(values) != 2 or not 0.0 <= values[0] <= values[1] <= 1.0:
        raise ValueError(f"{name}={list(fractions)!r} must be [low, high] with 0 <= low <= high <= 1 (fractions of "
                         f"the {KARRAS_LEVELS}-level Karras grid)")
    return values


def index_bounds(fractions: Sequence[float], levels: int = KARRAS_LEVELS) -> tuple[int, int]:
    """The inclusive index range ``floor(low * levels) .. min(floor(high * levels), levels - 1)``."""
    low, high = fractions
    return int(low * levels), min(int(high * levels), levels - 1)


def karras_index_times(path: Path, batch_size: int, fractions: Sequence[float], generator: torch.Generator,
                       dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> Tensor:
    """``(batch_size,)`` library times of Karras levels whose indices are drawn uniformly from the index range of
    ``fractions`` (DMD2's time law), with ``generator``."""
    check_positive_int("batch_size", batch_size)
    first, last = index_bounds(fractions)
    indices = torch.randint(first, last + 1, (batch_size,), generator=generator)
    times = path.time_for_ratio(karras_index_sigmas()[indices])
    return times.to(dtype=dtype, device=device)
