"""Reference solutions of the probability-flow ODE for tests: classical RK4 on a model read through its transport."""

from __future__ import annotations

import torch

from ucgm.methods.probability_flow import probability_flow_velocity


def rk4_flow(model, transport, x, t, s, labels=None, steps=200):
    """``Phi_{t -> s}(x)`` (scalar times) by ``steps`` classical RK4 steps of ``dx/dt = v(x, t)``."""
    grid = torch.linspace(float(t), float(s), steps + 1, dtype=torch.float64).tolist()
    velocity = lambda y, time: probability_flow_velocity(model, transport, y, time, labels)  # noqa: E731
    for a, b in zip(grid[:-1], grid[1:]):
        h = b - a
        k1 = velocity(x, a)
        k2 = velocity(x + h / 2 * k1, a + h / 2)
        k3 = velocity(x + h / 2 * k2, a + h / 2)
        x = x + h / 6 * (k1 + 2 * k2 + 2 * k3 + velocity(x + h * k3, b))
    return x
