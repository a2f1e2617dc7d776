"""Few-step consistency sampling on a TrigFlow transport (sCM, Lu & Song 2024).

Angles ``s_0 = h > s_1 > ... > s_{N-1} > 0`` (``h`` = the transport's ``half_pi``, ``s = h t``). Start at
``x = z`` (pure noise at ``t = 1``); at each angle take the consistency prediction
``x_hat = cos(s) x - sin(s) F(x, s)`` (the transport's data prediction) and, before every further step, re-noise
it: ``x = cos(s_{i+1}) x_hat + sin(s_{i+1}) eps``, ``eps ~ N(0, I)`` fresh. The sample is the last ``x_hat``.
sCM's 2-step sampler uses ``s_1 = 1.1``.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch
from torch import Tensor

from ..transports import Transport, TrigPath
from ..validation import check_batch, check_finite, check_positive_int
from .noise import normal_noise
from .result import SampleResult

#: sCM's intermediate angle of its 2-step sampler (radians).
SCM_MID_ANGLE = 1.1


def default_intermediate_angles(steps: int) -> list[float]:
    """``steps - 1`` angles evenly spaced from :data:`SCM_MID_ANGLE` towards 0 (``[1.1]`` for 2 steps; a ucgm
    choice for more steps, not from the paper)."""
    check_positive_int("steps", steps)
    return [SCM_MID_ANGLE * (1 - k / (steps - 1)) for k in range(steps - 1)] if steps > 1 else []


def scm_sample(
    model: Callable,
    transport: Transport,
    noise: Tensor,
    labels: Optional[Tensor] = None,
    steps: int = 1,
    intermediate_angles: Optional[Sequence[float]] = None,
    generator: Optional[torch.Generator] = None,
    return_trajectory: bool = False,
) -> SampleResult:
    """Sample in ``steps`` network calls (see the module docstring).

    ``intermediate_angles``: the ``steps - 1`` re-noising angles in radians, strictly decreasing inside
    ``(0, h)``; default :func:`default_intermediate_angles`. ``generator`` drives the re-noising draws.
    ``return_trajectory`` stacks the states at every angle followed by the sample: ``(steps + 1, *noise.shape)``.
    """
    check_positive_int("steps", steps)
    check_finite("noise", noise)
    check_batch("labels", labels, noise.shape[0])
    if not isinstance(transport.path, TrigPath):
        raise ValueError(f"scm_sample needs a TrigFlow transport (trig path); got path {transport.path.name!r}")
    half_pi = transport.path.half_pi
    if intermediate_angles is None:
        intermediate_angles = default_intermediate_angles(steps)
    angles = [half_pi] + [float(angle) for angle in intermediate_angles]
    if len(angles) != steps:
        raise ValueError(f"intermediate_angles has {len(angles) - 1} entries; steps={steps} needs {steps - 1}")
    if any(not later < earlier for earlier, later in zip(angles, angles[1:])) or angles[-1] <= 0:
        raise ValueError(f"intermediate_angles={list(intermediate_angles)!r} must decrease strictly inside "
                         f"(0, {half_pi})")

    times = [torch.full((noise.shape[0],), angle / half_pi, dtype=noise.dtype, device=noise.device) for angle in angles]
    states = [noise]
    with torch.no_grad():
        sample = transport.predict(model, noise, times[0], labels).data
        for time in times[1:]:
            fresh = normal_noise(noise.shape, generator, noise.dtype, noise.device)
            states.append(transport.interpolate(sample, fresh, time))
            sample = transport.predict(model, states[-1], time, labels).data
    trajectory = torch.stack(states + [sample]) if return_trajectory else None
    return SampleResult(sample, trajectory, steps)
