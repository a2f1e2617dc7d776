"""Samplers of two-time flow maps ``F(x_t, t, s)`` (:mod:`ucgm.methods.flow_maps.core`): one network call per jump.

``model`` is called ``transport.network_output(model, x, t, labels, s=s)`` (a
:class:`~ucgm.methods.flow_maps.core.FlowMapModel` with its ``transport``, possibly inside a guidance wrapper: the
jump is affine in the raw output, so guiding the output guides the jump), and the jump is
``x_s = x_t - (t - s) u`` (:func:`~ucgm.methods.flow_maps.core.jump`). Conventions as the ODE solvers': the state
starts at ``alpha(t_0) z``, is kept in float64, the network runs in the dtype of ``noise``; the sample is the
last state divided by ``gamma(t_N)`` (data scale); the trajectory holds the state at every grid time followed by
the sample. NFE = number of jumps.

* :func:`flow_map_sample`: any decreasing grid ``t_0 > ... > t_N`` with CTM's **gamma-sampling** (Kim et al. 2024,
  ``sample_gamma_multistep``): in noise levels ``sigma = alpha / gamma`` (``x_sigma = x_t / gamma``), jump from
  ``sigma_i`` to ``sigma' = sqrt(1 - gamma^2) (sigma_{i+1} - sigma_N) + sigma_N`` and add fresh noise
  ``sqrt(sigma_{i+1}^2 - sigma'^2) eps`` (none on the last jump). ``gamma = 0`` is the deterministic chain
  ``x <- F(x, t_i, t_{i+1})``; ``gamma = 1`` jumps to the end and re-noises, CM's multistep sampler.
* :func:`dyadic_grid` / the ``shortcut`` sampler: Shortcut's step-size-conditioned sampling on step sizes
  ``2^-k`` (the only ones a shortcut model is trained on) for any NFE: ``N = 2^k0 + m`` jumps are ``2^k0 - m``
  steps of ``2^-k0`` followed by ``2m`` steps of ``2^-(k0+1)`` (the uniform ``d = 1 / N`` grid of the official
  sampler when ``N`` is a power of two).
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch
from torch import Tensor

from ..methods.flow_maps.core import jump
from ..timegrids import karras_sigmas, uniform_grid
from ..transports import Transport
from ..validation import check_batch, check_finite, check_positive_int, check_range
from .noise import NoiseSource, normal_noise
from .result import SampleResult

FLOW_MAP_GRIDS = ("uniform", "karras", "log_snr")


def dyadic_grid(steps: int, dtype: torch.dtype = torch.float64) -> Tensor:
    """``steps + 1`` times from 1 to 0 whose gaps are powers of two (module docstring), larger steps first."""
    check_positive_int("steps", steps)
    coarse = 1 << (steps.bit_length() - 1)  # 2^k0 <= steps
    split = steps - coarse
    gaps = [1.0 / coarse] * (coarse - split) + [0.5 / coarse] * (2 * split)
    times = 1.0 - torch.cumsum(torch.tensor([0.0] + gaps, dtype=dtype), dim=0)
    times[-1] = 0.0
    return times


def training_grid_indices(steps: int, points: int) -> Tensor:
    """``steps + 1`` indices ``round(i (points - 1) / steps)``, ``i = 0..steps``, of a ``points``-point grid: both
    ends and evenly spread points between (distinct while ``steps <= points - 1``)."""
    check_positive_int("steps", steps)
    check_positive_int("karras_points", points, minimum=2)
    if steps > points - 1:
        raise ValueError(f"{steps} jumps do not fit on a grid of karras_points={points} points; allowed: at most "
                         f"{points - 1} jumps")
    ramp = torch.arange(steps + 1, dtype=torch.float64) * (points - 1) / steps
    return torch.floor(ramp + 0.5).long()


def log_snr_grid(path, steps: int, t_max: float, t_min: float) -> Tensor:
    """``steps + 1`` float64 times from ``t_max`` to ``t_min`` evenly spaced in ``log sigma(t)`` (``sigma = alpha /
    gamma``): ``t_i = sigma^-1(exp(log sigma(t_max) + i / steps (log sigma(t_min) - log sigma(t_max))))`` (on the
    linear path ``log sigma = logit t``), the ends exact."""
    check_positive_int("steps", steps)
    if not 0.0 < t_min < t_max < 1.0:
        raise ValueError(f"the log_snr grid needs 0 < t_min < t_max < 1 (finite log-SNR at both ends); got "
                         f"t_max={t_max}, t_min={t_min}")
    ends = path.sigma(torch.tensor([t_max, t_min], dtype=torch.float64)).log()
    values = path.time_for_sigma(torch.linspace(float(ends[0]), float(ends[1]), steps + 1, dtype=torch.float64).exp())
    values[0], values[-1] = t_max, t_min
    return values


def flow_map_grid(path, steps: int, grid: str = "uniform", t_max: float = 1.0, t_min: float = 0.0,
                  sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0,
                  times: Optional[Sequence[float]] = None, karras_points: Optional[int] = None) -> Tensor:
    """The float64 grid of ``steps`` jumps: explicit ``times`` (``steps + 1`` decreasing times in [0, 1]), the
    uniform grid from ``t_max`` to ``t_min``, the ``log_snr`` grid from ``t_max`` to ``t_min`` (``steps + 1``
    noise-to-signal ratios ``sigma = alpha / gamma`` evenly spaced in ``log sigma``, i.e. in log-SNR ``lambda = -2
    log sigma``, mapped to ucgm time on ``path``; needs ``0 < t_min``, ``t_max < 1``), or the Karras grid of
    ``steps + 1`` noise levels from ``sigma_max`` to ``sigma_min`` mapped to ucgm time on ``path`` (CTM's sampler).
    With ``karras_points = P`` the Karras times are ``steps + 1`` points of the ``P``-point Karras grid a model was
    trained on (:func:`training_grid_indices`; the official CTM / CM samplers' ``ts`` indices); budgets above
    ``P - 1`` jumps, which no sub-grid holds, use the Karras grid of ``steps + 1`` points."""
    check_positive_int("steps", steps)
    if karras_points is not None and grid != "karras":
        raise ValueError(f"karras_points={karras_points} needs grid='karras' (got grid={grid!r})")
    if times is not None:
        values = torch.as_tensor(times, dtype=torch.float64).detach().clone()
        if values.ndim != 1 or values.numel() != steps + 1:
            raise ValueError(f"times has {values.numel()} entries; {steps} jumps need {steps + 1}")
    elif grid == "uniform":
        values = uniform_grid(steps, t_max=t_max, t_min=t_min)
    elif grid == "log_snr":
        values = log_snr_grid(path, steps, t_max, t_min)
    elif grid == "karras" and karras_points is not None and steps <= karras_points - 1:
        indices = training_grid_indices(steps, karras_points)
        values = path.time_for_sigma(karras_sigmas(karras_points, sigma_min, sigma_max, rho))[indices]
    elif grid == "karras":
        values = path.time_for_sigma(karras_sigmas(steps + 1, sigma_min, sigma_max, rho))
    else:
        raise ValueError(f"unknown flow-map grid {grid!r}; allowed: {', '.join(FLOW_MAP_GRIDS)}")
    check_finite("times", values)
    if not bool((values[1:] < values[:-1]).all()) or values[0] > 1 or values[-1] < 0:
        raise ValueError(f"times={values.tolist()} must decrease strictly inside [0, 1]")
    return values


def flow_map_sample(
    model: Callable,
    transport: Transport,
    noise: Tensor,
    labels: Optional[Tensor] = None,
    times: Optional[Sequence[float] | Tensor] = None,
    steps: int = 1,
    gamma: float = 0.0,
    clip: Optional[float] = None,
    generator: NoiseSource = None,
    return_trajectory: bool = False,
) -> SampleResult:
    """Jump along ``times`` (a grid from :func:`flow_map_grid` or :func:`dyadic_grid`; default the uniform grid of
    ``steps`` jumps from 1 to 0) with CTM's ``gamma`` (module docstring; fresh noise from ``generator``); ``clip``
    clamps the sample to ``[-clip, clip]``."""
    if not isinstance(noise, Tensor) or not noise.is_floating_point() or noise.ndim < 1:
        raise ValueError("noise must be a floating tensor of shape (B, *sample_shape)")
    check_finite("noise", noise)
    check_batch("labels", labels, noise.shape[0])
    check_range("gamma", gamma, 0.0, 1.0)
    if clip is not None:
        check_range("clip", clip, 0.0, float("inf"))
    jumps = steps if times is None else len(times) - 1
    grid = flow_map_grid(transport.path, jumps, times=times).to(noise.device)
    path, dtype = transport.path, noise.dtype
    sigma_end = path.sigma(grid[-1])
    state = noise.to(torch.float64) * path.alpha(grid[0])
    states = [state]
    with torch.no_grad():
        for index in range(grid.numel() - 1):
            t, following = grid[index], grid[index + 1]
            renoise = gamma > 0 and index < grid.numel() - 2  # no noise after the last jump
            target = following
            if renoise:
                sigma_jump = (1 - gamma**2) ** 0.5 * (path.sigma(following) - sigma_end) + sigma_end
                target = path.time_for_sigma(sigma_jump).to(grid.dtype)
            state = _jump(model, transport, state, t, target, labels, dtype)
            if renoise:
                sigma_jump, sigma_next = path.sigma(target), path.sigma(following)
                fresh = normal_noise(noise.shape, generator, dtype, noise.device).to(torch.float64)
                x_sigma = state / path.gamma(target) + torch.sqrt(sigma_next**2 - sigma_jump**2) * fresh
                state = x_sigma * path.gamma(following)
            states.append(state)
    sample = (state / path.gamma(grid[-1])).to(dtype)
    if clip is not None:
        sample = sample.clamp(-clip, clip)
    trajectory = torch.stack([s.to(dtype) for s in states[:-1]] + [sample]) if return_trajectory else None
    return SampleResult(sample, trajectory, grid.numel() - 1)


def _jump(model: Callable, transport: Transport, state: Tensor, t: Tensor, s: Tensor, labels: Optional[Tensor],
          dtype: torch.dtype) -> Tensor:
    """One jump of the float64 ``state`` from ``t`` to ``s`` (scalars), the network called in ``dtype``."""
    batch = state.shape[0]
    t_batch = t.to(dtype).expand(batch)
    s_batch = s.to(dtype).expand(batch)
    output = transport.network_output(model, state.to(dtype), t_batch, labels, s=s_batch)
    return jump(transport, output.to(torch.float64), state, t.expand(batch), s.expand(batch))
