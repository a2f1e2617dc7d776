"""The sampler of constant acceleration flows (CAF, Park et al. 2024; official ``CAFDenoiser.sample``).

``model`` is a trained CAF (:class:`ucgm.methods.flow_maps.caf.ConstantAccelerationFlow`): ``v_hat0 =
model.initial_velocity(x0, labels)`` once, then ``N`` steps in CAF time ``tau`` (0 noise, 1 data) of the kinematic
update ``x <- x + v_hat0 dt + (tau_k + dt / 2) a(x, tau_k, v_hat0) dt`` with ``tau_k = k / N``, ``dt = 1 / N``: the
midpoint rule for ``dx/dtau = v_hat0 + a tau``, exact when ``a`` does not change along the path. NFE = ``N + 1``.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor

from ..transports import Transport
from ..validation import check_batch, check_finite, check_positive_int, check_range
from .result import SampleResult


def caf_sample(model: Callable, transport: Transport, noise: Tensor, labels: Optional[Tensor] = None,
               steps: int = 1, clip: Optional[float] = None, return_trajectory: bool = False) -> SampleResult:
    """``steps`` CAF steps from ``x0 = noise`` (see the module docstring); ``clip`` clamps the sample to
    ``[-clip, clip]`` (the official sampler clamps images to [-1, 1]); the trajectory holds the state at every
    ``tau_k`` followed by the sample. ``transport`` is not used (CAF has its own path)."""
    check_positive_int("steps", steps)
    check_finite("noise", noise)
    check_batch("labels", labels, noise.shape[0])
    if clip is not None:
        check_range("clip", clip, 0.0, float("inf"))
    state = noise
    states = [] if return_trajectory else None
    initial_velocity = model.initial_velocity(noise, labels)
    step = 1.0 / steps
    for k in range(steps):
        if states is not None:
            states.append(state)
        tau = k * step
        acceleration = model.acceleration(state, tau, labels, initial_velocity)
        state = state + initial_velocity * step + (tau + step / 2) * acceleration * step
    if clip is not None:
        state = state.clamp(-clip, clip)
    trajectory = torch.stack(states + [state]) if states is not None else None
    return SampleResult(state, trajectory, steps + 1)
