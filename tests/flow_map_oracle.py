"""Ground truth for flow-map tests: the exact flow map ``Phi(x_t, t, s)`` of a Gaussian mixture (a fine RK4 solve of
its exact probability-flow ODE, differentiable in ``x_t``, ``t`` and ``s``, forward-mode AD included) and a model
whose raw output reproduces it on any transport."""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor, nn

from ucgm.data.mixtures import GaussianMixture
from ucgm.methods.flow_maps.core import FlowMapParameterisation, output_from_average_velocity
from ucgm.transports import Transport, broadcast_time


def unconditional_velocity(mixture: GaussianMixture, transport: Transport, x_t: Tensor, t: Tensor) -> Tensor:
    """The mixture's probability-flow velocity ``alpha' E[z | x_t] + gamma' E[x | x_t]`` (float64, ``t`` per sample),
    the closed form of :meth:`GaussianMixture.velocity` written to be differentiable in ``t`` as well (the oracle
    treats its time as a constant): components ``d_k = x_t - gamma mu_k``, ``v_k = gamma^2 s_k^2 + alpha^2``,
    responsibilities ``softmax_k(log w_k + log N(x_t; gamma mu_k, v_k I))``."""
    path = transport.path
    alpha, gamma = path.alpha(t)[:, None], path.gamma(t)[:, None]
    means, stds = mixture.means.to(x_t.device), mixture.stds.to(x_t.device)
    offsets = x_t[:, None, :] - gamma[:, :, None] * means[None]
    variances = gamma**2 * stds[None] ** 2 + alpha**2
    log_joint = mixture.weights.log().to(x_t.device) - 0.5 * x_t.shape[1] * torch.log(2 * math.pi * variances) \
        - (offsets**2).sum(dim=-1) / (2 * variances)
    weighted = (torch.softmax(log_joint, dim=1) / variances)[:, :, None] * offsets
    data = torch.softmax(log_joint, dim=1) @ means + gamma * (stds[None, :, None] ** 2 * weighted).sum(dim=1)
    noise = alpha * weighted.sum(dim=1)
    return path.alpha_dot(t)[:, None] * noise + path.gamma_dot(t)[:, None] * data


def exact_flow_map(mixture: GaussianMixture, transport: Transport, x_t: Tensor, t: Tensor, s: Tensor,
                   labels: Optional[Tensor] = None, steps: int = 400) -> Tensor:
    """``Phi(x_t, t, s)`` in float64: RK4 on ``dx/dlam = (s - t) v(x, t + lam (s - t))``, ``lam`` in [0, 1]."""
    state = x_t.to(torch.float64)
    t64, s64 = torch.as_tensor(t, dtype=torch.float64).expand(x_t.shape[0]), \
        torch.as_tensor(s, dtype=torch.float64).expand(x_t.shape[0])
    span = broadcast_time(s64 - t64, state)

    def slope(point: Tensor, lam: float) -> Tensor:
        time = t64 + lam * (s64 - t64)
        if labels is None:
            return span * unconditional_velocity(mixture, transport, point, time)
        return span * mixture.velocity(point, time, transport, labels).to(torch.float64)

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
        velocity = unconditional_velocity(self.mixture, self.transport, x64, t64) if labels is None \
            else self.mixture.velocity(x64, t64, self.transport, labels).to(torch.float64)
        average = torch.where(gap > 0, (x64 - target) / torch.where(gap > 0, gap, torch.ones_like(gap)), velocity)
        return output_from_average_velocity(self.transport, average, x64, t64, s64).to(x_t.dtype)
