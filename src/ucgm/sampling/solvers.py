"""Baseline ODE/SDE solvers that UCGM-S is compared with, on any ucgm :class:`~ucgm.transports.Transport`.

Shared conventions of every solver here:

* grid ``t_0 > t_1 > ... > t_N = 0`` (``times``), or a default grid of ``steps`` intervals;
* initial state ``x_{t_0} = alpha(t_0) z`` with ``z = noise`` (the noise-dominated prior at ``t_0``, exact when
  ``gamma(t_0) = 0``; EDM's ``sigma_max z`` in ``x_sigma = x_t / gamma`` coordinates);
* the state is kept in float64, the network is called in the dtype of ``noise``;
* the sample is ``x_{t_N} / gamma(t_N)``, the state at the last grid time in data scale (the data itself when
  ``alpha(t_N) = 0``, as on the Linear, TrigFlow and VP paths; EDM's path keeps ``sigma(0) ~ 0.0017`` at t = 0);
* the trajectory holds ``x_{t_0}, ..., x_{t_{N-1}}`` followed by the sample, shape ``(N + 1, *noise.shape)``;
* a grid may start at t = 1 wherever the transport can recover its predictions there (``D(1) != 0``); the EDM
  stochastic sampler needs a finite ``sigma(t_0) = alpha / gamma``, so on paths with ``gamma(1) = 0`` its grid
  must start below 1 (its default Karras grid does). Pass e.g. ``times=uniform_grid(steps, t_max=0.999)``
  to start any solver below 1.
"""

from __future__ import annotations

import math
from typing import Callable, Optional, Sequence

import torch
from torch import Tensor

from ..timegrids import karras_grid, uniform_grid
from ..transports import Transport
from ..validation import check_batch, check_finite, check_positive_int, check_range
from .noise import normal_noise
from .result import SampleResult

#: EDM's largest noise level (Karras et al. 2022), capped by the path's own ratio at t = 1.
EDM_SIGMA_MAX = 80.0


class _CountingPredictor:
    """Data and noise predictions on a float64 state from a model called in ``network_dtype``; counts the calls."""

    def __init__(self, model: Callable, transport: Transport, labels: Optional[Tensor], network_dtype: torch.dtype):
        self.model, self.transport, self.labels, self.network_dtype = model, transport, labels, network_dtype
        self.calls = 0

    def __call__(self, state: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        self.calls += 1
        output = self.transport.network_output(self.model, state.to(self.network_dtype), t, self.labels)
        return self.transport.recover(output.to(state.dtype), state, t)

    def velocity(self, state: Tensor, t: Tensor) -> Tensor:
        """``v(x_t, t) = alpha'(t) z_hat + gamma'(t) x_hat``."""
        data, noise = self(state, t)
        return self.transport.velocity(data, noise, t)


def _sampling_grid(transport: Transport, steps: int, times: Optional[Sequence[float] | Tensor], default: Callable,
                   device: torch.device) -> Tensor:
    """Validate ``steps`` / ``times`` and return the float64 grid (``times`` when given, else ``default(steps)``)."""
    check_positive_int("steps", steps)
    grid = default(steps) if times is None else torch.as_tensor(times, dtype=torch.float64).detach().clone()
    grid = grid.to(device=device, dtype=torch.float64)
    if grid.ndim != 1 or grid.numel() < 2:
        raise ValueError(f"times has shape {tuple(grid.shape)}; it must be a 1-D grid of at least 2 times")
    check_finite("times", grid)
    if not (grid[1:] < grid[:-1]).all() or grid[0] > 1 or grid[-1] != 0:
        raise ValueError(f"times={grid.tolist()} must decrease strictly from at most 1 and end at 0")
    unrecoverable = grid[:-1][transport.denominator(grid[:-1]) == 0]
    if unrecoverable.numel():
        raise ValueError(
            f"transport {transport.name!r} ({transport.parameterisation}) cannot recover predictions at "
            f"t={unrecoverable.tolist()} (D = 0); start the grid below, e.g. uniform_grid(steps, t_max=0.999)"
        )
    return grid


def _check_inputs(noise: Tensor, labels: Optional[Tensor]) -> None:
    if not isinstance(noise, Tensor) or not noise.is_floating_point() or noise.ndim < 1:
        raise ValueError("noise must be a floating tensor of shape (B, *sample_shape)")
    check_finite("noise", noise)
    check_batch("labels", labels, noise.shape[0])


def _initial_state(transport: Transport, noise: Tensor, t_start: Tensor) -> Tensor:
    return transport.alpha(t_start) * noise.to(torch.float64)


def _result(states: Optional[list[Tensor]], sample: Tensor, nfe: int, dtype: torch.dtype) -> SampleResult:
    sample = sample.to(dtype)
    trajectory = None if states is None else torch.stack([state.to(dtype) for state in states] + [sample])
    return SampleResult(sample, trajectory, nfe)


def euler_sample(
    model: Callable,
    transport: Transport,
    noise: Tensor,
    labels: Optional[Tensor] = None,
    steps: int = 50,
    times: Optional[Sequence[float] | Tensor] = None,
    return_trajectory: bool = False,
) -> SampleResult:
    """Euler on the probability-flow ODE: ``x_{t'} = x_t + (t' - t) v(x_t, t)``, ``v = alpha' z_hat + gamma' x_hat``.

    Default grid :func:`~ucgm.timegrids.uniform_grid` ``(steps)``; NFE = number of intervals.
    """
    _check_inputs(noise, labels)
    grid = _sampling_grid(transport, steps, times, uniform_grid, noise.device)
    predictor = _CountingPredictor(model, transport, labels, noise.dtype)
    state = _initial_state(transport, noise, grid[0])
    states = [] if return_trajectory else None
    for t, t_next in zip(grid[:-1], grid[1:]):
        if states is not None:
            states.append(state)
        state = state + (t_next - t) * predictor.velocity(state, t)
    return _result(states, state / transport.gamma(grid[-1]), predictor.calls, noise.dtype)


def heun_sample(
    model: Callable,
    transport: Transport,
    noise: Tensor,
    labels: Optional[Tensor] = None,
    steps: int = 50,
    times: Optional[Sequence[float] | Tensor] = None,
    return_trajectory: bool = False,
) -> SampleResult:
    """EDM's second-order Heun on the probability-flow ODE (Karras et al. 2022, Algorithm 1, in time ``t``).

    ``d = v(x_t, t)``, ``x' = x_t + (t' - t) d``; on every interval but the last (which ends at t = 0 and stays
    Euler) the trapezoid correction ``x_{t'} = x_t + (t' - t) (d + v(x', t')) / 2``. NFE = 2 * intervals - 1;
    default grid :func:`~ucgm.timegrids.uniform_grid` ``(steps)``.
    """
    _check_inputs(noise, labels)
    grid = _sampling_grid(transport, steps, times, uniform_grid, noise.device)
    predictor = _CountingPredictor(model, transport, labels, noise.dtype)
    state = _initial_state(transport, noise, grid[0])
    states = [] if return_trajectory else None
    intervals = grid.numel() - 1
    for i, (t, t_next) in enumerate(zip(grid[:-1], grid[1:])):
        if states is not None:
            states.append(state)
        slope = predictor.velocity(state, t)
        next_state = state + (t_next - t) * slope
        if i < intervals - 1:
            slope = 0.5 * (slope + predictor.velocity(next_state, t_next))
            next_state = state + (t_next - t) * slope
        state = next_state
    return _result(states, state / transport.gamma(grid[-1]), predictor.calls, noise.dtype)


def dpm_solver_pp_2m_sample(
    model: Callable,
    transport: Transport,
    noise: Tensor,
    labels: Optional[Tensor] = None,
    steps: int = 20,
    times: Optional[Sequence[float] | Tensor] = None,
    return_trajectory: bool = False,
) -> SampleResult:
    """DPM-Solver++(2M) (Lu et al. 2022), data-prediction multistep form, with ``lambda = log(gamma / alpha)``.

    Step i (``t -> t'``, ``h_i = lambda(t') - lambda(t)``):
    ``x_{t'} = (alpha(t') / alpha(t)) x_t - gamma(t') (e^{-h_i} - 1) D_i``, with ``D_0 = x_hat_0`` and afterwards
    ``D_i = (1 + 1 / (2 r_i)) x_hat_i - 1 / (2 r_i) x_hat_{i-1}``, ``r_i = h_{i-1} / h_i``. A step to a time where
    ``alpha = 0`` (``lambda = inf``, t = 0 on Linear/TrigFlow/VP) returns the data prediction:
    ``x_{t'} = gamma(t') x_hat_i``. A start at ``gamma = 0`` (``lambda = -inf``, t = 1 on Linear) is well defined:
    ``e^{-h} = 0`` there, and ``1 / r = 0`` on the next step (which is therefore first order too).
    NFE = number of intervals; default grid :func:`~ucgm.timegrids.uniform_grid` ``(steps)``.
    """
    _check_inputs(noise, labels)
    grid = _sampling_grid(transport, steps, times, uniform_grid, noise.device)
    predictor = _CountingPredictor(model, transport, labels, noise.dtype)
    alphas, gammas = transport.alpha(grid), transport.gamma(grid)
    log_snr = torch.log(gammas) - torch.log(alphas)
    state = _initial_state(transport, noise, grid[0])
    states = [] if return_trajectory else None
    previous_data = previous_step = None
    for i in range(grid.numel() - 1):
        if states is not None:
            states.append(state)
        data, _ = predictor(state, grid[i])
        step = log_snr[i + 1] - log_snr[i]
        if alphas[i + 1] == 0:
            state = gammas[i + 1] * data
        else:
            combined = data
            if previous_data is not None:
                combined = data + step / (2 * previous_step) * (data - previous_data)
            state = alphas[i + 1] / alphas[i] * state - gammas[i + 1] * torch.expm1(-step) * combined
        previous_data, previous_step = data, step
    return _result(states, state / gammas[-1], predictor.calls, noise.dtype)


def edm_stochastic_sample(
    model: Callable,
    transport: Transport,
    noise: Tensor,
    labels: Optional[Tensor] = None,
    steps: int = 18,
    times: Optional[Sequence[float] | Tensor] = None,
    s_churn: float = 40.0,
    s_tmin: float = 0.05,
    s_tmax: float = 50.0,
    s_noise: float = 1.003,
    generator: Optional[torch.Generator] = None,
    return_trajectory: bool = False,
) -> SampleResult:
    """EDM's stochastic sampler (Karras et al. 2022, Algorithm 2) on any path, with ``sigma = alpha / gamma`` and
    ``x_sigma = x_t / gamma`` and the denoiser ``D(x_sigma; sigma) = x_hat(gamma(t) x_sigma, t)``,
    ``t = time_for_ratio(sigma)``.

    Step i, ``N`` intervals, ``eta = min(s_churn / N, sqrt(2) - 1)`` if ``s_tmin <= sigma_i <= s_tmax`` else 0:
    ``sigma_hat = sigma_i (1 + eta)`` (capped at the path's ratio at t = 1),
    ``x_hat = x_i + sqrt(sigma_hat^2 - sigma_i^2) s_noise eps``, ``d = (x_hat - D(x_hat; sigma_hat)) / sigma_hat``,
    ``x_{i+1} = x_hat + (sigma_{i+1} - sigma_hat) d``, and except on the last interval the Heun correction
    ``x_{i+1} = x_hat + (sigma_{i+1} - sigma_hat) (d + d') / 2`` with
    ``d' = (x_{i+1} - D(x_{i+1}; sigma_{i+1})) / sigma_{i+1}``.
    ``s_churn = 0`` is the deterministic Heun sampler in sigma. Defaults: EDM's ImageNet-64 settings; default grid
    :func:`~ucgm.timegrids.karras_grid` ``(steps)`` with ``sigma_max = min(80, sigma(1))``. NFE = 2 * intervals - 1.
    ``eps`` is drawn with ``generator``.
    """
    _check_inputs(noise, labels)
    check_range("s_churn", s_churn, 0.0, math.inf)
    check_range("s_noise", s_noise, 0.0, math.inf)
    check_range("s_tmin", s_tmin, 0.0, math.inf)
    check_range("s_tmax", s_tmax, s_tmin, math.inf)
    one = torch.ones((), dtype=torch.float64, device=noise.device)
    sigma_ceiling = transport.alpha(one) / transport.gamma(one)
    sigma_max = min(EDM_SIGMA_MAX, float(sigma_ceiling))
    grid = _sampling_grid(transport, steps, times, lambda n: karras_grid(n, transport.path, sigma_max=sigma_max),
                          noise.device)
    gammas = transport.gamma(grid)
    if gammas[0] == 0:
        raise ValueError(
            f"times start at t={grid[0].item()} where gamma = 0 (infinite sigma) on transport {transport.name!r}; "
            "start the grid below 1, e.g. with the default karras_grid"
        )
    sigmas = transport.alpha(grid) / gammas
    predictor = _CountingPredictor(model, transport, labels, noise.dtype)

    def denoise(x_sigma: Tensor, t: Tensor) -> Tensor:
        return predictor(transport.gamma(t) * x_sigma, t)[0]

    intervals = grid.numel() - 1
    churn = min(s_churn / intervals, math.sqrt(2) - 1)
    state = sigmas[0] * noise.to(torch.float64)
    states = [] if return_trajectory else None
    for i in range(intervals):
        if states is not None:
            states.append(gammas[i] * state)
        sigma, sigma_next, t_next = sigmas[i], sigmas[i + 1], grid[i + 1]
        sigma_hat, t_hat, churned = sigma, grid[i], state
        if churn > 0 and s_tmin <= sigma <= s_tmax:
            sigma_hat = torch.minimum(sigma * (1 + churn), sigma_ceiling)
            t_hat = transport.path.time_for_ratio(sigma_hat).clamp(max=1.0)
            fresh = normal_noise(state.shape, generator, torch.float64, state.device)
            churned = state + (sigma_hat**2 - sigma**2).sqrt() * s_noise * fresh
        slope = (churned - denoise(churned, t_hat)) / sigma_hat
        next_state = churned + (sigma_next - sigma_hat) * slope
        if i < intervals - 1:
            slope = 0.5 * (slope + (next_state - denoise(next_state, t_next)) / sigma_next)
            next_state = churned + (sigma_next - sigma_hat) * slope
        state = next_state
    return _result(states, state, predictor.calls, noise.dtype)
