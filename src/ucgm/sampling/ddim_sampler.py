"""DDIM on a uniform time grid and Meng et al.'s stochastic variant, on any ucgm transport (the samplers of
progressive / guided distillation, :mod:`ucgm.methods.distillation.guided`).

Grid ``t_i = i / N``, ``i = N .. 0``, start ``x = alpha(1) z``; the data prediction ``x_hat`` of the model at
``(x, t_i)`` gives ``z_hat = (x - gamma(t_i) x_hat) / alpha(t_i)``.

* ``ddim_sample``: ``x_{i-1} = gamma(t_{i-1}) x_hat + alpha(t_{i-1}) z_hat`` (the official ``ddim_step``); the
  sample is the last ``x_hat``. NFE = ``N``.
* ``stochastic_ddim_sample`` (Meng et al. 2023, Sec. "stochastic sampling"; the exact form is unverified, no code):
  from ``t_i`` one deterministic DDIM step of twice the length to ``t_{i-2}``, then one forward (noising) step
  back to ``t_{i-1}``, ``x_{i-1} = (gamma_{i-1} / gamma_{i-2}) x_{i-2} + sqrt(alpha_{i-1}^2 - (gamma_{i-1}
  alpha_{i-2} / gamma_{i-2})^2) eps`` (``q(x_{i-1} | x_{i-2})`` of the path); the last step (``i = 1``) is
  deterministic. NFE = ``N``; each jump is ``2 / N`` long, the step of an ``N / 2``-step student.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor

from ..methods.consistency.mcm import ddim_step
from ..timegrids import uniform_grid
from ..transports import Path, Transport
from ..validation import check_batch, check_finite, check_positive_int
from .noise import NoiseSource, normal_noise
from .result import SampleResult


def forward_step(path: Path, x_s: Tensor, s: Tensor, r: Tensor, fresh: Tensor) -> Tensor:
    """A draw of ``q(x_r | x_s)`` for ``r > s``: ``x_r = (gamma_r / gamma_s) x_s + sqrt(alpha_r^2 - (gamma_r alpha_s /
    gamma_s)^2) eps``."""
    scale = path.gamma(r) / path.gamma(s)
    spread = torch.sqrt((path.alpha(r) ** 2 - (scale * path.alpha(s)) ** 2).clamp_min(0))
    return scale.to(x_s.dtype) * x_s + spread.to(x_s.dtype) * fresh


def _run(model: Callable, transport: Transport, noise: Tensor, labels: Optional[Tensor], steps: int,
         generator: NoiseSource, stochastic: bool, return_trajectory: bool) -> SampleResult:
    check_positive_int("steps", steps)
    check_finite("noise", noise)
    check_batch("labels", labels, noise.shape[0])
    path = transport.path
    grid = uniform_grid(steps).to(noise.device)
    state = path.alpha(grid[0]).to(noise.dtype) * noise
    states = [] if return_trajectory else None
    sample = state
    with torch.no_grad():
        for i in range(steps, 0, -1):
            if states is not None:
                states.append(state)
            t = grid[steps - i].to(noise.dtype).expand(noise.shape[0])
            sample = transport.predict(model, state, t, labels).data
            if i == 1:
                break
            if not stochastic:
                state = ddim_step(path, state, sample, t, grid[steps - i + 1].to(noise.dtype))
                continue
            landing, back = grid[steps - i + 2], grid[steps - i + 1]
            jumped = ddim_step(path, state, sample, t, landing.to(noise.dtype))
            fresh = normal_noise(noise.shape, generator, noise.dtype, noise.device)
            state = forward_step(path, jumped, landing, back, fresh)
    trajectory = torch.stack(states + [sample]) if states is not None else None
    return SampleResult(sample, trajectory, steps)


def ddim_sample(model: Callable, transport: Transport, noise: Tensor, labels: Optional[Tensor] = None,
                steps: int = 4, return_trajectory: bool = False) -> SampleResult:
    """Deterministic DDIM over ``steps`` uniform intervals (module docstring); the trajectory holds the state at
    every grid time before the last followed by the sample."""
    return _run(model, transport, noise, labels, steps, None, False, return_trajectory)


def stochastic_ddim_sample(model: Callable, transport: Transport, noise: Tensor, labels: Optional[Tensor] = None,
                           steps: int = 4, generator: NoiseSource = None,
                           return_trajectory: bool = False) -> SampleResult:
    """Meng et al.'s stochastic sampler over ``steps`` uniform intervals (module docstring); ``generator`` drives
    the re-noising draws."""
    return _run(model, transport, noise, labels, steps, generator, True, return_trajectory)
