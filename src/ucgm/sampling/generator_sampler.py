"""Sampling few-step generators (DMD, DMD2, MSD, SIM, CoSIM): jump to data, re-noise, repeat.

On decreasing times ``tau_0 > tau_1 > ... > tau_{n-1}`` in (0, 1]: ``x = alpha(tau_0) z``; at each time
``x_hat = transport.predict(model, x, tau_i).data`` and, before the next one, ``x = alpha(tau_{i+1}) eps +
gamma(tau_{i+1}) x_hat`` with fresh ``eps`` (DMD2's multi-step sampler; UCGM-S with full re-noising). The sample is
the last ``x_hat``; NFE = n.

``times``: a generator trained on fixed times (``generator_steps`` K, ``tau_j = 1 - j / K``) is sampled on a prefix of
them — every prefix of its chain is trained, later times are not, so ``n > K`` is an error. Without ``times``
(generators trained at every time, e.g. CoSIM's continuous kernel) the grid is ``tau_i = 1 - i / n``.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch
from torch import Tensor

from ..transports import Transport
from ..validation import check_batch, check_finite, check_positive_int
from .noise import normal_noise
from .result import SampleResult


def generator_grid(steps: int, times: Optional[Sequence[float]] = None) -> list[float]:
    """The ``steps`` times of a run: the first ``steps`` of the trained ``times``, or ``1 - i / steps``."""
    check_positive_int("steps", steps)
    if times is None:
        return [1.0 - i / steps for i in range(steps)]
    grid = [float(time) for time in times]
    if not grid or any(not 0 < time <= 1 for time in grid) or any(b >= a for a, b in zip(grid, grid[1:])):
        raise ValueError(f"times={list(times)!r} must decrease strictly inside (0, 1]")
    if steps > len(grid):
        raise ValueError(f"nfe={steps}: this generator was trained for {len(grid)} step(s) (times {grid}); "
                         f"allowed: nfe 1 to {len(grid)}")
    return grid[:steps]


def generator_sample(
    model: Callable,
    transport: Transport,
    noise: Tensor,
    labels: Optional[Tensor] = None,
    steps: int = 1,
    times: Optional[Sequence[float]] = None,
    generator: Optional[torch.Generator] = None,
    return_trajectory: bool = False,
) -> SampleResult:
    """Sample in ``steps`` network calls (module docstring); ``generator`` drives the re-noising draws. The
    trajectory holds the state at every time followed by the sample: ``(steps + 1, *noise.shape)``."""
    check_finite("noise", noise)
    check_batch("labels", labels, noise.shape[0])
    grid = generator_grid(steps, times)
    state = transport.alpha(torch.tensor(grid[0], dtype=torch.float64)).item() * noise
    states = [state]
    with torch.no_grad():
        for index, time in enumerate(grid):
            t = torch.full((noise.shape[0],), time, dtype=noise.dtype, device=noise.device)
            sample = transport.predict(model, state, t, labels).data
            if index + 1 < len(grid):
                fresh = normal_noise(noise.shape, generator, noise.dtype, noise.device)
                state = transport.interpolate(sample, fresh, grid[index + 1])
                states.append(state)
    trajectory = torch.stack(states + [sample]) if return_trajectory else None
    return SampleResult(sample, trajectory, len(grid))
