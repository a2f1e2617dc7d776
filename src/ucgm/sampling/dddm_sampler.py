"""Iterative refinement sampling of directly denoising diffusion models (DDDM, Zhang et al. 2024).

A fixed noisy point ``x_T = alpha(t_max) z`` at ``t_max`` (1: pure noise) and an independent first estimate
``x_bar^0 ~ N(0, I)`` (drawn through :func:`~ucgm.sampling.noise.normal_noise`); each network call refines it,
``x_bar^{n+1} = f(x_T, t_max, x_bar^n)`` — the data prediction of ``model`` read through ``transport`` with the
model condition ``self_condition = x_bar^n``. NFE = the number of refinements.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor

from ..transports import Transport
from ..validation import check_batch, check_finite, check_positive_int, check_range
from .noise import NoiseSource, normal_noise
from .result import SampleResult


def dddm_sample(model: Callable, transport: Transport, noise: Tensor, labels: Optional[Tensor] = None,
                steps: int = 1, generator: NoiseSource = None, t_max: float = 1.0, clip: Optional[float] = None,
                return_trajectory: bool = False) -> SampleResult:
    """``steps`` refinements (see the module docstring); ``clip`` clamps every estimate to ``[-clip, clip]`` (the
    official sampler clamps images to [-1, 1]); the trajectory holds ``x_bar^0 .. x_bar^steps``."""
    check_positive_int("steps", steps)
    check_finite("noise", noise)
    check_batch("labels", labels, noise.shape[0])
    check_range("t_max", t_max, 0.0, 1.0)
    if clip is not None:
        check_range("clip", clip, 0.0, float("inf"))
    time = torch.full((noise.shape[0],), float(t_max), dtype=noise.dtype, device=noise.device)
    state = transport.alpha(time[:1]).to(noise.dtype) * noise
    estimate = normal_noise(noise.shape, generator, noise.dtype, noise.device)
    estimates = [estimate] if return_trajectory else None
    for _ in range(steps):
        estimate = transport.predict(model, state, time, labels, self_condition=estimate).data
        if clip is not None:
            estimate = estimate.clamp(-clip, clip)
        if estimates is not None:
            estimates.append(estimate)
    trajectory = torch.stack(estimates) if estimates is not None else None
    return SampleResult(estimate, trajectory, steps)
