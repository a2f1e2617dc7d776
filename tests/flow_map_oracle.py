"""Ground truth for flow-map tests: the exact flow map ``Phi(x_t, t, s)`` of a Gaussian mixture (a fine RK4 solve of
its exact probability-flow ODE) and a model whose raw output reproduces it on any transport."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from ucgm.data.mixtures import GaussianMixture
from ucgm.methods.flow_maps.core import FlowMapParameterisation, output_from_average_velocity
from ucgm.transports import Transport, broadcast_time


def exact_flow_map(mixture: GaussianMixture, transport: Transport, x_t: Tensor, t: Tensor, s: Tensor,
                   labels: Optional[Tensor] = None, steps: int = 400) -> Tensor:
    """``Phi(x_t, t, s)`` in float64: RK4 on ``dx/dlam = (s - t) v(x, t + lam (s - t))``, ``lam`` in [0, 1]."""
    state = x_t.to(torch.float64)
    t64, s64 = torch.as_tensor(t, dtype=torch.float64).expand(x_t.shape[0]), \
        torch.as_tensor(s, dtype=torch.float64).expand(x_t.shape[0])
    span = broadcast_time(s64 - t64, state)

    def slope(point: Tensor, lam: float) -> Tensor:
        return span * mixture.velocity(point, t64 + lam * (s64 - t64), transport, labels).to(torch.float64)

    step = 1.0 / steps
    for index in range(steps):
        lam = index * step
        k1 = slope(state, lam)
        k2 = slope(state + step / 2 * k1, lam + step / 2)
        k3 = slope(state + step / 2 * k2, lam + step / 2)
        k4 = slope(state + step * k3, lam + step)
        state = state + step / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
    return state


class ExactFlowMapModel(nn.Module):
    """``forward(x_t, t, labels, s=None)``: the raw output ``F`` whose jump (:mod:`ucgm.methods.flow_maps.core`) is
    the exact ``Phi(x_t, t, s)`` (the exact ODE velocity's output at ``s = t``), read through :attr:`transport`."""

    def __init__(self, mixture: GaussianMixture, transport: Transport, steps: int = 400):
        super().__init__()
        self.mixture, self.steps = mixture, steps
        self.num_classes = mixture.num_classes
        self.transport = FlowMapParameterisation(transport).sampling_transport()

    def forward(self, x_t: Tensor, t: Tensor, labels: Optional[Tensor] = None, s: Optional[Tensor] = None
                ) -> Tensor:
        s = t if s is None else s
        x64, t64, s64 = x_t.to(torch.float64), t.to(torch.float64), s.to(torch.float64)
        gap = broadcast_time(t64 - s64, x64)
        target = exact_flow_map(self.mixture, self.transport, x64, t64, s64, labels, self.steps)
        velocity = self.mixture.velocity(x64, t64, self.transport, labels).to(torch.float64)
        average = torch.where(gap > 0, (x64 - target) / torch.where(gap > 0, gap, torch.ones_like(gap)), velocity)
        return output_from_average_velocity(self.transport, average, x64, t64, s64).to(x_t.dtype)
