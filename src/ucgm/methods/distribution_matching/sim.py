"""SIM — one-step diffusion distillation through score implicit matching (Luo, Huang, Geng, Kolter, Qi; NeurIPS
2024). The official repository (``maple-research-lab/SIM``) holds inference code only; the loss follows the paper's
divergence and the score-gradient identity (distribution_matching.md §3, derived and checked numerically in
``tests/test_distribution_matching.py``), the training setup follows SiD (``mingyuanzhou/SiD``).

Divergence ``D = int w(t) E_{x_t ~ pi_t} d(y_t) dt`` with ``y_t = s_{p_theta,t}(x_t) - s_{q_t}(x_t)``, the pseudo-Huber
distance ``d(y) = sqrt(||y||^2 + c^2) - c`` (norm over the whole sample) and ``pi`` the stop-gradient generator
marginal. Its gradient is, for ``u = d'(y) = y / sqrt(||y||^2 + c^2)`` and any fixed field,
``E_{p_theta}[u^T d_theta s_theta] = -d_theta E_{x0 = G_theta(eps), x_t | x0}[u(x_t)^T (s_sg(x_t) - grad log q(x_t | x0))]``
(differentiating through ``x_t`` and ``x0`` only, networks frozen). With the fake score ``s_psi`` standing in for
``s_theta`` the generator loss is

    L_SIM = -w(t) u(x_t)^T (s_psi(x_t) + z / alpha),   x_t = alpha z + gamma G_theta(eps),

with gradients through the **frozen teacher and fake networks' inputs** (both enter ``u``). In data predictions
(``Delta = x_hat_psi - x_hat_real``, ``s_psi + z / alpha = gamma (x_hat_psi - x0) / alpha^2``) and with ucgm's weight
``w(t) = alpha^2 / gamma``: ``L_SIM = -Delta^T (x_hat_psi - x0) / sqrt(||Delta||^2 + (c alpha^2 / gamma)^2)`` — the
form computed (no ``1 / alpha^2`` factors, stable at small ``t``).

Schedule: ``update_ratio`` (default 1, SiD's 1:1 alternation) fake-score updates, then one generator update;
generator times at Karras levels ``i ~ U{0 .. 800}`` (``matching_time_range`` (0, 0.8), SiD's ``tmax`` 800).
Unverified choices (SIM's own settings are not public): ``w(t)``, ``huber_constant`` 1e-3 (a report on the
related TDM finds pseudo-Huber insensitive to ``c``; 1e-3 is used there), the time range and the update ratio;
SiD's optimiser (Adam lr 1e-5, generator beta1 = 0) is not imposed (the run's optimizer section applies).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from torch import Tensor

from ...transports import Path, Transport, broadcast_time
from ...validation import check_range
from ..base import Batch, Networks, ObjectiveOutput, draw_noise
from .base import DistributionMatchingMethod, GeneratorOptions
from .scores import DataPrediction, fake_data_prediction
from .times import karras_index_times

#: SiD's generator time range: indices 0 .. 800 of the Karras grid (sigma <= 24.4).
SIM_TIME_RANGE = (0.0, 0.8)
SIM_HUBER_CONSTANT = 1e-3


def sim_generator_loss(x0: Tensor, noise: Tensor, t: Tensor, path: Path, real: DataPrediction,
                       fake: DataPrediction, labels: Optional[Tensor], huber_constant: float) -> Tensor:
    """Per-sample ``L_SIM = -Delta^T (x_hat_fake - x0) / sqrt(||Delta||^2 + (c alpha^2 / gamma)^2)`` at ``x_t = alpha
    noise + gamma x0`` (``Delta = x_hat_fake(x_t) - x_hat_real(x_t)``; gradients flow through ``x0`` and through both
    predictions' inputs)."""
    alpha, gamma = broadcast_time(path.alpha(t), x0), broadcast_time(path.gamma(t), x0)
    x_t = alpha * noise + gamma * x0
    fake_prediction = fake(x_t, t, labels)
    difference = (fake_prediction - real(x_t, t, labels)).flatten(1)
    scale = (huber_constant * alpha**2 / gamma).flatten(1)[:, 0]
    norm = torch.sqrt((difference**2).sum(dim=1) + scale**2)
    return -(difference * (fake_prediction - x0).flatten(1)).sum(dim=1) / norm


@dataclass(frozen=True)
class SIMOptions(GeneratorOptions):
    """SIM's options: the shared ones (:class:`~.base.MatchingOptions`) with SiD's time range, and the
    pseudo-Huber constant."""

    matching_time_range: Sequence[float] = SIM_TIME_RANGE
    huber_constant: float = SIM_HUBER_CONSTANT


class SIM(DistributionMatchingMethod):
    """SIM: a one-step (or backward-simulated few-step) generator, a fake score, a teacher."""

    options_type = SIMOptions

    def __init__(self, transport: Transport | str = "linear", **options):
        super().__init__(transport, **options)
        check_range("huber_constant", self.options.huber_constant, 0.0, float("inf"))
        self.huber_constant = float(self.options.huber_constant)

    def generator_loss(self, networks: Networks, batch: Batch) -> ObjectiveOutput:
        x0 = self.generate(networks, batch, with_gradient=True)
        t = karras_index_times(self.transport.path, x0.shape[0], self.matching_time_range, batch.generator, x0.dtype,
                               x0.device)
        noise = draw_noise(x0, None, batch.generator)
        fake_module = self.matching_fake_score(networks)

        def fake(x_t: Tensor, time: Tensor, labels: Optional[Tensor]) -> Tensor:
            return fake_data_prediction(fake_module, self.transport, x_t, time, labels)

        per_sample = sim_generator_loss(x0, noise, t, self.transport.path, self.real_score, fake, batch.labels,
                                        self.huber_constant)
        return ObjectiveOutput(per_sample.mean(), per_sample.detach(), {})
