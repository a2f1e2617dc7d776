"""CoSIM — continuous semi-implicit models (Yu, Zha, Yang, Xie, Zhang, Chan, Zhang; ICML 2025), as far as the
sources allow. There is no public code; what is verified (abstract, OpenReview lay summary) is the shape: a
hierarchical semi-implicit model (HSIVI, NeurIPS 2023) with a **continuous** transition kernel, trained
simulation-free, whose objective "alternates between refining the generator and updating an auxiliary score
network, using a scaled Fisher divergence and an additional regularization term"; sampling is multi-step.
The loss below is the verified HSIVI-SM objective (``longinYu/HSIVI`` ``torch_utils/losses.py::loss_fn_speedup``)
rewritten in data predictions; everything specific to CoSIM is ucgm's reading, each choice listed here.

**Kernel** (ucgm's choice). One network ``x_hat_phi(x_t, t)`` on continuous times; the kernel from ``t`` to a level
``s`` is ``x_s = alpha(s) eps + gamma(s) x_hat_phi(x_t, t)`` (a Gaussian semi-implicit layer whose conditional
score is ``-eps / alpha(s)``), so sampling jumps over any grid ``1 = t_0 > t_1 > ...`` (the ``generator`` sampler
without fixed times: any NFE).

**Simulation-free training** (ucgm's reading of "simulation-free"). The kernel's inputs are not simulated by the
model's earlier layers (HSIVI) but drawn from the forward process of the data: with probability
``pure_noise_fraction`` ``x_1 = z`` (``t = 1``, where sampling starts), else ``x_t = alpha(t) z + gamma(t) x`` with
``t ~ U[source_time_range)`` and ``x`` a data batch. A kernel whose outputs follow the data at every ``t`` is
consistent: sampling feeds it its own re-noised outputs, which then follow the same marginals.

**Objective** (HSIVI-SM, verified, in x_hat units: scaled by ``(alpha^2 / gamma)^2``). Auxiliary network ``f_psi``
(role ``fake_score``): the fake-score loss on detached kernel outputs (DSM, so ``f* = E[x_hat_phi | x_s]``, the
semi-implicit score). Kernel update, at ``x_s`` with ``s`` from ``matching_time_range``::

    L_phi = mean_features[2 g (x_hat_phi - x_hat_real(x_s)) - g^2],   g = x_hat_f(x_s) - x_hat_real(x_s)

with gradients through ``x_hat_phi`` and through both networks' inputs. At ``f = f*`` its expectation is the scaled
Fisher divergence ``E ||x_hat_f* - x_hat_real||^2`` (SIVI-SM's minimax identity; tested). It equals SIM's
``d = ||.||^2`` loss plus ``||g||^2`` — the term SIM drops — i.e. the full Fisher-divergence gradient.

**Unverified and not implemented**: CoSIM's "additional regularization term" (unknown: none is added), its kernel
parameterisation and weights, its time schedule. ``update_ratio`` defaults to HSIVI's 20 auxiliary updates per
kernel update (CIFAR config).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from torch import Tensor

from ...transports import Transport, broadcast_time
from ...validation import check_range
from ..base import Batch, Networks, ObjectiveOutput, draw_noise
from .base import DistributionMatchingMethod, MatchingOptions
from .scores import DataPrediction, fake_data_prediction, per_sample_mean
from .times import karras_index_times

HSIVI_UPDATE_RATIO = 20


def semi_implicit_fisher_loss(x_hat: Tensor, noise: Tensor, s: Tensor, transport: Transport,
                              real: DataPrediction, fake: DataPrediction,
                              labels: Optional[Tensor]) -> Tensor:
    """Per-sample ``mean[2 g (x_hat - x_hat_real) - g^2]`` at ``x_s = alpha(s) noise + gamma(s) x_hat`` with ``g =
    x_hat_fake(x_s) - x_hat_real(x_s)`` (the HSIVI-SM kernel loss in data-prediction units)."""
    x_s = transport.interpolate(x_hat, noise, s)
    real_prediction = real(x_s, s, labels)
    gap = fake(x_s, s, labels) - real_prediction
    return per_sample_mean(2 * gap * (x_hat - real_prediction) - gap**2)


@dataclass(frozen=True)
class CoSIMOptions(MatchingOptions):
    """CoSIM's options: the shared ones (:class:`~.base.MatchingOptions`; no ``generator_steps``: the kernel is
    continuous) with HSIVI's update ratio, and the simulation-free source law."""

    update_ratio: int = HSIVI_UPDATE_RATIO
    pure_noise_fraction: float = 0.5
    source_time_range: Sequence[float] = (0.1, 1.0)


class CoSIM(DistributionMatchingMethod):
    """CoSIM (ucgm's reading, module docstring): a continuous semi-implicit kernel, an auxiliary score, a teacher."""

    options_type = CoSIMOptions

    def __init__(self, transport: Transport | str = "linear", **options):
        super().__init__(transport, **options)
        check_range("pure_noise_fraction", self.options.pure_noise_fraction, 0.0, 1.0)
        low, high = (float(value) for value in self.options.source_time_range)
        if not 0 < low < high <= 1:
            raise ValueError(f"source_time_range={list(self.options.source_time_range)!r} must be [low, high] with "
                             f"0 < low < high <= 1")
        self.pure_noise_fraction = float(self.options.pure_noise_fraction)
        self.source_time_range = (low, high)

    def sampler(self) -> tuple[str, dict]:
        """The ``generator`` sampler on the uniform grid ``1 - i / n`` (a continuous kernel: any NFE)."""
        return "generator", {}

    def generate(self, networks: Networks, batch: Batch, with_gradient: bool) -> Tensor:
        """Kernel outputs ``x_hat_phi(x_t, t)`` at simulation-free sources ``x_t`` (module docstring)."""
        data, generator = batch.data, batch.generator
        low, high = self.source_time_range
        pure = torch.rand(data.shape[0], generator=generator) < self.pure_noise_fraction
        t = torch.where(pure, torch.ones(()), low + (high - low) * torch.rand(data.shape[0], generator=generator))
        t = t.to(dtype=data.dtype, device=data.device)
        noise = draw_noise(data, None, generator)
        x_t = torch.where(broadcast_time(pure.to(data.device), data), broadcast_time(self.transport.alpha(t), noise)
                          * noise, self.transport.interpolate(data, noise, t))
        with torch.set_grad_enabled(with_gradient):
            return self.transport.predict(self.generator_model(networks, with_gradient), x_t, t, batch.labels).data

    def generator_loss(self, networks: Networks, batch: Batch) -> ObjectiveOutput:
        x_hat = self.generate(networks, batch, with_gradient=True)
        s = karras_index_times(self.transport.path, x_hat.shape[0], self.matching_time_range, batch.generator,
                               x_hat.dtype, x_hat.device)
        noise = draw_noise(x_hat, None, batch.generator)
        fake_module = self.matching_fake_score(networks)

        def fake(x_s: Tensor, time: Tensor, labels: Optional[Tensor]) -> Tensor:
            return fake_data_prediction(fake_module, self.transport, x_s, time, labels)

        per_sample = semi_implicit_fisher_loss(x_hat, noise, s, self.transport, self.real_score, fake, batch.labels)
        return ObjectiveOutput(per_sample.mean(), per_sample.detach(), {})
