"""Time grids for samplers, in ucgm's convention (t = 1 noise first, ending at t = 0 data)."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from .transports import EDM_SIGMA_MAX, EDM_SIGMA_MIN, Path
from .validation import check_positive_int


def kumaraswamy(u: Tensor, a: float, b: float, c: float) -> Tensor:
    """Kumaraswamy-type warp ``K(u) = (1 - (1 - u^a)^b)^c`` of [0, 1] onto itself."""
    return (1 - (1 - u**a) ** b) ** c


def kumaraswamy_grid(
    intervals: int,
    warp: Sequence[float] = (1.0, 1.0, 1.0),
    gaps: Sequence[float] = (0.0, 0.0),
    dtype: torch.dtype = torch.float64,
) -> Tensor:
    """UCGM-S grid of ``intervals + 1`` times from noise to 0.

    With gaps ``(g0, g1)``: ``u`` is ``intervals`` evenly spaced points from ``g0`` to ``1 - g1`` (when
    ``g1 == 0``: ``intervals + 1`` points from ``g0`` to 1, the last dropped); the times are ``1 - K(u)``
    followed by 0. Gaps ``(0, 0)`` with the identity warp give ``1, 1 - 1/n, ..., 1/n, 0``. ``u`` is spaced in
    float64 and the warp is evaluated in ``dtype`` (the official sampler evaluates it in the noise dtype).
    """
    check_positive_int("intervals", intervals)
    start_gap, end_gap = float(gaps[0]), float(gaps[1])
    if end_gap == 0.0:
        u = torch.linspace(start_gap, 1.0, intervals + 1, dtype=torch.float64)[:-1]
    else:
        u = torch.linspace(start_gap, 1.0 - end_gap, intervals, dtype=torch.float64)
    u = u.to(dtype)
    times = 1 - kumaraswamy(u, *warp)
    return torch.cat([times, torch.zeros(1, dtype=dtype)])


def uniform_grid(steps: int, t_max: float = 1.0, t_min: float = 0.0, dtype: torch.dtype = torch.float64) -> Tensor:
    """``steps + 1`` evenly spaced times from ``t_max`` down to ``t_min``."""
    check_positive_int("steps", steps)
    return torch.linspace(t_max, t_min, steps + 1, dtype=dtype)


def karras_sigmas(num_points: int, sigma_min: float = EDM_SIGMA_MIN, sigma_max: float = EDM_SIGMA_MAX,
                  rho: float = 7.0) -> Tensor:
    """EDM's noise levels ``sigma_i = (sigma_max^(1/rho) + i / (N - 1) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho``,
    ``i = 0..N-1`` (float64, decreasing; ``sigma_0 = sigma_max`` and ``sigma_{N-1} = sigma_min`` exactly; ``N = 1``
    gives ``sigma_max``): the one Karras grid of ucgm (samplers, consistency curricula)."""
    check_positive_int("num_points", num_points)
    if not rho > 0:
        raise ValueError(f"rho={rho!r} must be positive")
    fraction = torch.arange(num_points, dtype=torch.float64) / max(num_points - 1, 1)
    top, bottom = sigma_max ** (1 / rho), sigma_min ** (1 / rho)
    sigmas = (top + fraction * (bottom - top)) ** rho
    sigmas[0] = sigma_max
    if num_points > 1:
        sigmas[-1] = sigma_min
    return sigmas


def karras_grid(
    steps: int,
    path: Path,
    sigma_min: float = EDM_SIGMA_MIN,
    sigma_max: float = EDM_SIGMA_MAX,
    rho: float = 7.0,
    dtype: torch.dtype = torch.float64,
) -> Tensor:
    """The ``steps`` noise levels of :func:`karras_sigmas` mapped to the path's time (``path.time_for_sigma``,
    clamped to [0, 1]), followed by 0."""
    check_positive_int("steps", steps)
    times = path.time_for_sigma(karras_sigmas(steps, sigma_min, sigma_max, rho)).clamp(0.0, 1.0).to(dtype)
    return torch.cat([times, torch.zeros(1, dtype=dtype)])


def checked_grid(times: Sequence[float] | Tensor, intervals: int | None = None,
                 dtype: torch.dtype = torch.float64) -> Tensor:
    """An explicit grid ``t_0 > t_1 > ... > t_N = 0`` with ``t_0 <= 1`` as a tensor of ``dtype``; ``ValueError``
    when it is not one or (``intervals`` given) when ``N != intervals``."""
    grid = torch.as_tensor(times, dtype=torch.float64).detach().clone().reshape(-1)
    if grid.numel() < 2 or not torch.isfinite(grid).all():
        raise ValueError(f"times={grid.tolist()} must be at least 2 finite times")
    if not (grid[1:] < grid[:-1]).all() or grid[0] > 1 or grid[-1] != 0:
        raise ValueError(f"times={grid.tolist()} must decrease strictly from at most 1 and end at 0")
    if intervals is not None and grid.numel() - 1 != intervals:
        raise ValueError(f"times has {grid.numel() - 1} intervals but the sampler runs {intervals} at this budget; "
                         "sample a schedule at the NFE it was made for")
    return grid.to(dtype)


def asymmetric_targets(grid: Tensor, time_difference: float = 0.0) -> Tensor:
    """The times each sampling step moves its state to, with Analog Bits' asymmetric time intervals (pix2seq's
    ``td``): step ``i`` starts at ``t_i`` and ends at ``max(t_{i+1} - td (t_i - t_{i+1}), 0)``, so from the second
    step on the network is told a time ``td`` intervals noisier than the state's (on the uniform grid
    ``t_i = 1 - i / N``, pix2seq's ``max(1 - (i + 1 + td) / N, 0)``). ``td = 0`` gives ``grid[1:]``."""
    if not isinstance(time_difference, (int, float)) or isinstance(time_difference, bool) or time_difference < 0:
        raise ValueError(f"time_difference={time_difference!r} must be a number >= 0 (pix2seq's td; 0: symmetric)")
    return (grid[1:] - time_difference * (grid[:-1] - grid[1:])).clamp(min=0.0)
