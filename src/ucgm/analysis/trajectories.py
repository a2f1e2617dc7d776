"""Straightness and curvature of sampling trajectories.

A trajectory is the states ``x_0, ..., x_N`` of every sample at the grid times ``t_0 > t_1 > ... > t_N`` (a
sampler's ``SampleResult.trajectory`` with the grid it ran on, or :func:`integrate_trajectory`). Per sample,

* segment velocity ``u_i = (x_{i+1} - x_i) / (t_{i+1} - t_i)``, ``i = 0 .. N-1`` (Euler's velocity ``v(x_i, t_i)``
  exactly; the mean velocity over the interval for other samplers);
* chord velocity ``c = (x_N - x_0) / (t_N - t_0)``: the constant velocity of the straight path between the ends.

**Straightness** (Liu et al. 2022, rectified flow; ``E`` is the mean over samples):

    S = 1 / (t_0 - t_N) * sum_i (t_i - t_{i+1}) E |u_i - c|^2

the time average of ``E |v_t - c|^2``; over ``[0, 1]`` it is ``int_0^1 E |v(x_t, t) - (x_1 - x_0)|^2 dt`` with
``x_1`` the noise end and ``x_0`` the sample end (the same number as the integral written in reversed time).
``S = 0`` exactly when every path is a straight segment run at constant speed.

**Curvature**: the mean angle (radians) between the directions of consecutive segments,

    K = 1 / (N - 1) * sum_{i=1}^{N-1} E arccos(<u_{i-1}, u_i> / (|u_{i-1}| |u_i|)),

zero for straight paths whatever their speed, and independent of the time parameterisation. It is the
typical turn *per step*, so it shrinks like ``1 / N`` on finer grids of a smooth path; the grid-independent
quantity is the **total turning** ``T = E sum_{i=1}^{N-1} arccos(...) = (N - 1) K``, which tends to the
integral of the path's curvature over its arc length. All three are measured in the coordinates of the state
``x_t``.
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Optional, Sequence

import torch
from torch import Tensor

from ..sampling.solvers import euler_sample
from ..timegrids import uniform_grid
from ..transports import Transport
from ..validation import check_finite

_TINY = 1e-30


class TrajectoryGeometry(NamedTuple):
    """``straightness`` S, ``curvature`` K and ``total_turning`` T (radians) as defined in
    :mod:`ucgm.analysis.trajectories`."""

    straightness: float
    curvature: float
    total_turning: float


def _as_states_and_times(trajectory: Tensor, times: Sequence[float] | Tensor) -> tuple[Tensor, Tensor]:
    """Flatten the trajectory to float64 ``(N + 1, B, D)`` and check it against the decreasing grid."""
    if not isinstance(trajectory, Tensor) or trajectory.ndim < 2:
        raise ValueError("trajectory must be a tensor of shape (N + 1, B, ...) holding the states at the grid times")
    grid = torch.as_tensor(times, dtype=torch.float64).detach().cpu()
    if grid.ndim != 1 or grid.numel() != trajectory.shape[0]:
        raise ValueError(f"times has shape {tuple(grid.shape)}; expected ({trajectory.shape[0]},), one per state")
    if grid.numel() < 2 or not bool((grid[1:] < grid[:-1]).all()):
        raise ValueError(f"times={grid.tolist()} must hold at least 2 strictly decreasing times")
    check_finite("trajectory", trajectory)
    states = trajectory.detach().to(device="cpu", dtype=torch.float64)
    return states.reshape(states.shape[0], states.shape[1], -1), grid


def _velocities(states: Tensor, grid: Tensor) -> Tensor:
    return (states[1:] - states[:-1]) / (grid[1:] - grid[:-1])[:, None, None]


def segment_velocities(trajectory: Tensor, times: Sequence[float] | Tensor) -> Tensor:
    """``u_i = (x_{i+1} - x_i) / (t_{i+1} - t_i)``, float64 ``(N, B, D)``."""
    return _velocities(*_as_states_and_times(trajectory, times))


def straightness(trajectory: Tensor, times: Sequence[float] | Tensor) -> float:
    """``S = 1 / (t_0 - t_N) sum_i (t_i - t_{i+1}) E |u_i - c|^2`` with ``c = (x_N - x_0) / (t_N - t_0)``."""
    states, grid = _as_states_and_times(trajectory, times)
    velocities = _velocities(states, grid)
    chord = (states[-1] - states[0]) / (grid[-1] - grid[0])
    squared_deviation = ((velocities - chord[None]) ** 2).sum(dim=-1).mean(dim=1)  # (N,)
    durations = grid[:-1] - grid[1:]
    return float((durations * squared_deviation).sum() / (grid[0] - grid[-1]))


def turning_angles(trajectory: Tensor, times: Sequence[float] | Tensor) -> Tensor:
    """``theta_i = arccos(<u_{i-1}, u_i> / (|u_{i-1}| |u_i|))``, float64 ``(N - 1, B)`` radians."""
    velocities = segment_velocities(trajectory, times)
    previous, following = velocities[:-1], velocities[1:]
    norms = previous.norm(dim=-1) * following.norm(dim=-1)
    cosine = (previous * following).sum(dim=-1) / norms.clamp_min(_TINY)
    return torch.arccos(cosine.clamp(-1.0, 1.0))


def curvature(trajectory: Tensor, times: Sequence[float] | Tensor) -> float:
    """``K = mean_i E theta_i`` in radians; 0 for a trajectory of a single segment."""
    angles = turning_angles(trajectory, times)
    return float(angles.mean()) if angles.numel() else 0.0


def total_turning(trajectory: Tensor, times: Sequence[float] | Tensor) -> float:
    """``T = E sum_i theta_i`` in radians."""
    return float(turning_angles(trajectory, times).sum(dim=0).mean())


def trajectory_geometry(trajectory: Tensor, times: Sequence[float] | Tensor) -> TrajectoryGeometry:
    """Straightness, curvature and total turning of one trajectory on its grid."""
    return TrajectoryGeometry(straightness(trajectory, times), curvature(trajectory, times),
                              total_turning(trajectory, times))


def integrate_trajectory(
    model: Callable,
    transport: Transport,
    noise: Tensor,
    labels: Optional[Tensor] = None,
    steps: int = 200,
    t_max: float = 1.0,
) -> tuple[Tensor, Tensor]:
    """Integrate the model's probability-flow ODE with ``steps`` Euler steps on the uniform grid from ``t_max`` to
    0 (without gradients) and return ``(trajectory, times)``; the segment velocities are then the model's own
    velocities ``v(x_i, t_i)``, so S and K are Riemann sums of their continuous definitions."""
    times = uniform_grid(steps, t_max=t_max)
    with torch.no_grad():
        result = euler_sample(model, transport, noise, labels, times=times, return_trajectory=True)
    return result.trajectory, times


def model_trajectory_geometry(
    model: Callable,
    transport: Transport,
    noise: Tensor,
    labels: Optional[Tensor] = None,
    steps: int = 200,
    t_max: float = 1.0,
) -> TrajectoryGeometry:
    """:func:`trajectory_geometry` of :func:`integrate_trajectory`."""
    return trajectory_geometry(*integrate_trajectory(model, transport, noise, labels, steps, t_max))
