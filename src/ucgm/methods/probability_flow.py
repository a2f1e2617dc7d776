"""A teacher's probability-flow ODE integrated from pure noise to data, in the methods layer.

``dx_t/dt = v(x_t, t) = alpha'(t) z_hat + gamma'(t) x_hat`` (``x_hat``, ``z_hat``: the model's data and noise
predictions read through its transport) from ``x_1 = alpha(1) z`` at ``t = 1`` to ``t = 0``; the sample is
``x_0 / gamma(0)``. Stepping in ``t`` (not in ``sigma = alpha / gamma``) starts at ``t = 1`` exactly, where the
linear path's ``sigma`` is infinite. The map ``z -> x`` does not depend on the path: every path ``x_t = alpha z +
gamma x`` is a re-timing of the same ODE in ``(x / gamma, sigma)``, so pairs made on the teacher's own transport
serve a student on any other.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor

from ..timegrids import uniform_grid
from ..transports import Transport
from ..validation import check_choice, check_positive_int

PROBABILITY_FLOW_SOLVERS = ("euler", "heun")


def probability_flow_velocity(model: Callable, transport: Transport, x_t: Tensor, t: float,
                              labels: Optional[Tensor]) -> Tensor:
    """``v(x_t, t) = alpha'(t) z_hat + gamma'(t) x_hat`` of ``model`` read through ``transport`` at the scalar
    time ``t``."""
    time = torch.full((x_t.shape[0],), float(t), dtype=x_t.dtype, device=x_t.device)
    prediction = transport.predict(model, x_t, time, labels)
    return transport.velocity(prediction.data, prediction.noise, time)


@torch.no_grad()
def probability_flow_sample(model: Callable, transport: Transport, noise: Tensor, labels: Optional[Tensor] = None,
                            steps: int = 64, solver: str = "heun") -> Tensor:
    """The data point ``Phi_{1 -> 0}(z)`` the ODE carries ``noise`` ``z`` to, by ``steps`` Euler or Heun steps on the
    uniform grid ``1, 1 - 1/steps, ..., 0``: Euler ``x' = x + (t' - t) v(x, t)``; Heun
    ``x' = x + (t' - t) (v(x, t) + v(x_euler, t')) / 2`` (``2 steps`` evaluations). On the 8-Gaussians oracle Heun
    with 64 steps is within 7e-4 (mean distance) of a 2000-step RK4 solve."""
    check_positive_int("steps", steps)
    check_choice("solver", solver, PROBABILITY_FLOW_SOLVERS)
    grid = uniform_grid(steps).tolist()
    state = transport.alpha(torch.tensor(grid[0], dtype=torch.float64)).item() * noise
    for start, end in zip(grid[:-1], grid[1:]):
        slope = probability_flow_velocity(model, transport, state, start, labels)
        euler = state + (end - start) * slope
        if solver == "euler":
            state = euler
        else:
            state = state + (end - start) * 0.5 * (slope + probability_flow_velocity(model, transport, euler, end,
                                                                                      labels))
    return state / transport.gamma(torch.tensor(grid[-1], dtype=torch.float64)).item()
