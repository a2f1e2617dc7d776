"""Samplers of consistency and multistep consistency models, on any ucgm transport.

``model`` is read through ``transport``: ``transport.predict(model, x_t, t, labels).data`` is the data prediction
(for a network trained with a consistency objective use ``objective.sampling_model(backbone)``; any few-step
model, e.g. UCGM with lambda = 1, works with its own transport). States are in ucgm coordinates
``x_t = alpha z + gamma x``; ``sigma = alpha / gamma``.
"""

from __future__ import annotations

import math
from typing import Callable, Optional, Sequence

import torch
from torch import Tensor

from ..methods.consistency.parameterisation import TimeRange
from ..methods.consistency.mcm import segment_edges
from ..timegrids import karras_sigmas
from ..transports import Path, Transport, broadcast_time
from ..validation import check_batch, check_finite, check_positive_int, check_range
from .noise import normal_noise
from .result import SampleResult


def _check_noise(noise: Tensor, labels: Optional[Tensor]) -> None:
    if not isinstance(noise, Tensor) or not noise.is_floating_point() or noise.ndim < 1:
        raise ValueError("noise must be a floating tensor of shape (B, *sample_shape)")
    check_finite("noise", noise)
    check_batch("labels", labels, noise.shape[0])


def consistency_times(path: Path, steps: int, sigma_min: float = 0.002, sigma_max: float = 80.0,
                      rho: float = 7.0) -> Tensor:
    """The ``steps`` evaluation times of the multistep sampler: the first ``steps`` points of the Karras grid of
    ``steps + 1`` noise levels from ``sigma_max`` to ``sigma_min`` (float64 ucgm times, decreasing)."""
    check_positive_int("steps", steps)
    time_range = TimeRange(path, sigma_min, sigma_max)
    return time_range.times(karras_sigmas(steps + 1, sigma_min, sigma_max, rho)[:-1])


def consistency_sample(
    model: Callable,
    transport: Transport,
    noise: Tensor,
    labels: Optional[Tensor] = None,
    steps: int = 1,
    times: Optional[Sequence[float] | Tensor] = None,
    sigma_min: float = 0.002,
    sigma_max: float = 80.0,
    rho: float = 7.0,
    generator: Optional[torch.Generator] = None,
    return_trajectory: bool = False,
) -> SampleResult:
    """CM's multistep sampler (Song et al. 2023, Algorithm 1) in ucgm coordinates.

    ``x = alpha(tau_0) z`` (EDM's ``sigma_max z``); for each evaluation time ``tau_i``: ``x0 = f(x, tau_i)`` and,
    before the next one, ``x = gamma(tau_{i+1}) (x0 + sqrt(sigma_{i+1}^2 - sigma_min^2) eps)``. The sample is the
    last ``x0``; NFE = number of evaluation times. ``times``: decreasing ucgm times (default
    :func:`consistency_times` ``(steps)``; ``times`` overrides ``steps``). The trajectory holds the state at every
    ``tau_i`` followed by the sample.
    """
    _check_noise(noise, labels)
    path = transport.path
    grid = consistency_times(path, steps, sigma_min, sigma_max, rho) if times is None else \
        torch.as_tensor(times, dtype=torch.float64).detach().clone().reshape(-1)
    check_finite("times", grid)
    if grid.numel() < 1 or bool((grid[1:] >= grid[:-1]).any()) or bool((grid < 0).any() | (grid > 1).any()):
        raise ValueError(f"times={grid.tolist()} must be a non-empty strictly decreasing sequence in [0, 1]")
    grid = grid.to(noise.device)
    sigmas = path.alpha(grid) / path.gamma(grid)
    if bool((sigmas < sigma_min * (1 - 1e-9)).any()) or not bool(torch.isfinite(sigmas).all()):
        raise ValueError(f"times={grid.tolist()} must have finite noise levels sigma >= sigma_min={sigma_min}")
    state = path.alpha(grid[0]).to(noise.dtype) * noise
    states = [] if return_trajectory else None
    sample = state
    for i in range(grid.numel()):
        if states is not None:
            states.append(state)
        t = grid[i].to(noise.dtype).expand(noise.shape[0])
        sample = transport.predict(model, state, t, labels).data
        if i + 1 < grid.numel():
            fresh = normal_noise(noise.shape, generator, noise.dtype, noise.device)
            scale = torch.sqrt((sigmas[i + 1] ** 2 - sigma_min**2).clamp_min(0)).to(noise.dtype)
            state = path.gamma(grid[i + 1]).to(noise.dtype) * (sample + scale * fresh)
    trajectory = torch.stack(states + [sample]) if states is not None else None
    return SampleResult(sample, trajectory, grid.numel())


def adjusted_ddim_step(path: Path, x_t: Tensor, data_hat: Tensor, t: Tensor, s: Tensor, eta: float = 0.0,
                       sigma_data: float = 0.5) -> Tensor:
    """aDDIM-style step ``t -> s`` (ucgm's form; the paper's exact form is unverified):

    ``x_s = gamma_s x_hat + sqrt(alpha_s^2 ||z_hat||^2 + eta D c^2 v_t) z_hat / ||z_hat||`` with
    ``z_hat = (x_t - gamma_t x_hat) / alpha_t``, ``c = gamma_s - alpha_s gamma_t / alpha_t``, ``D`` the number of
    values per sample and ``v_t = sigma_data^2 alpha_t^2 / (alpha_t^2 + sigma_data^2 gamma_t^2)`` the per-value
    posterior variance of ``x`` given ``x_t`` for data ``N(0, sigma_data^2 I)``. Replacing ``x`` by its posterior
    mean ``x_hat`` in DDIM's ``x_s = c x + (alpha_s / alpha_t) x_t`` drops the variance ``c^2 Var(x | x_t)``; the
    step puts ``eta`` times that estimate back along the predicted noise. ``eta = 0`` is DDIM.
    """
    alpha_t, gamma_t = broadcast_time(path.alpha(t), x_t), broadcast_time(path.gamma(t), x_t)
    alpha_s, gamma_s = broadcast_time(path.alpha(s), x_t), broadcast_time(path.gamma(s), x_t)
    noise_hat = (x_t - gamma_t * data_hat) / alpha_t
    if eta == 0.0:
        return gamma_s * data_hat + alpha_s * noise_hat
    values = noise_hat[0].numel()
    norm = noise_hat.flatten(1).norm(dim=1).clamp_min(torch.finfo(noise_hat.dtype).tiny)
    norm = broadcast_time(norm, x_t)
    lost = (gamma_s - alpha_s * gamma_t / alpha_t) ** 2 * sigma_data**2 * alpha_t**2 / (
        alpha_t**2 + sigma_data**2 * gamma_t**2)
    length = torch.sqrt(alpha_s**2 * norm**2 + eta * values * lost)
    return gamma_s * data_hat + length * noise_hat / norm


def multistep_consistency_sample(
    model: Callable,
    transport: Transport,
    noise: Tensor,
    labels: Optional[Tensor] = None,
    segments: int = 4,
    eta: float = 0.0,
    sigma_min: float = 0.002,
    sigma_max: float = 80.0,
    sigma_data: float = 0.5,
    return_trajectory: bool = False,
) -> SampleResult:
    """Multistep consistency sampling: ``S`` (a)DDIM jumps along the segment edges ``t_max = e_0 > ... > e_S =
    t_min`` of :func:`~ucgm.methods.consistency.mcm.segment_edges` (use the training ``segments``,
    ``sigma_min``, ``sigma_max``): ``x_{e_{j+1}} = aDDIM(x_{e_j}, f(x_{e_j}, e_j); e_j -> e_{j+1}, eta)``
    (:func:`adjusted_ddim_step`), from ``x_{e_0} = alpha(e_0) z``. The sample is ``x_{t_min} / gamma(t_min)``;
    NFE = ``S``."""
    _check_noise(noise, labels)
    check_range("eta", eta, 0.0, math.inf)
    path = transport.path
    edges = segment_edges(path, segments, sigma_min, sigma_max).to(noise.device)
    state = path.alpha(edges[0]).to(noise.dtype) * noise
    states = [] if return_trajectory else None
    for start, end in zip(edges[:-1], edges[1:]):
        if states is not None:
            states.append(state)
        t = start.to(noise.dtype).expand(noise.shape[0])
        data_hat = transport.predict(model, state, t, labels).data
        state = adjusted_ddim_step(path, state, data_hat, t, end.to(noise.dtype).expand(noise.shape[0]), eta,
                                   sigma_data)
    sample = state / path.gamma(edges[-1]).to(noise.dtype)
    trajectory = torch.stack(states + [sample]) if states is not None else None
    return SampleResult(sample, trajectory, segments)
