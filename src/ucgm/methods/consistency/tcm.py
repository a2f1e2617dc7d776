"""Truncated consistency models (TCM; Lee et al. 2024): a standard CM first, then truncated-time training.

* ``stage=1``: ECT on the full range ``[sigma_min, sigma_max]`` (:class:`~.consistency.EasyConsistencyTuning`).
* ``stage=2``: a new run initialised from the stage-1 checkpoint; the trainer keeps that model frozen as the
  reference (``reference_mode = "frozen"``, ``f_1`` below). Per sample, with probability ``boundary_prob`` a
  *boundary* sample at ``sigma_t = sigma_tr`` (``transition_sigma``) with loss
  ``w_b d(f(x_t, t), f_1(x_t, t))``; otherwise ``sigma_t`` lognormal truncated to ``[sigma_tr, sigma_max]``,
  ``sigma_r`` ECT's map, and the consistency loss ``d(f(x_t, t), target) / (sigma_t - sigma_r)`` with the
  truncated target ``target = f^-(x_r, r)`` (online, no gradient) if ``sigma_r >= sigma_tr`` else ``f_1(x_r, r)``.

Deviation: TCM samples stage-2 times from a truncated log-Student-t; ucgm uses ECT's lognormal truncated to
``[sigma_tr, sigma_max]`` (inverse CDF).
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor

from ...transports import Transport, broadcast_time
from ...validation import check_choice, check_range
from ..base import ObjectiveOutput
from .cm import EasyConsistencyTuning
from .base import shared_randomness

TCM_STAGES = (1, 2)


class TruncatedConsistency(EasyConsistencyTuning):
    """TCM (module docstring). Defaults: FastGen's CIFAR values ``transition_sigma = 1``, ``boundary_prob = 0.25``,
    ``boundary_weight = 0.1``, ECT's loss and time distribution otherwise."""

    def __init__(self, transport: Transport | str = "linear", stage: int = 2, transition_sigma: float = 1.0,
                 boundary_prob: float = 0.25, boundary_weight: float = 0.1, p_mean: float = -1.1,
                 p_std: float = 2.0, mapping: str = "sigmoid", q: float = 2.0, k: float = 8.0, b: float = 1.0,
                 num_stages: int = 8, metric: str = "pseudo_huber", huber_constant: Optional[float] = None,
                 parameterisation: str = "transport", sigma_min: float = 0.002, sigma_max: float = 80.0,
                 sigma_data: float = 0.5, label_dropout: float = 0.0, null_label: Optional[int] = None):
        check_choice("stage", stage, TCM_STAGES)
        check_range("boundary_prob", boundary_prob, 0.0, 1.0)
        check_range("boundary_weight", boundary_weight, 0.0, float("inf"))
        if not (isinstance(transition_sigma, (int, float)) and sigma_min < transition_sigma < sigma_max):
            raise ValueError(f"transition_sigma={transition_sigma!r} must lie in (sigma_min, sigma_max) = "
                             f"({sigma_min}, {sigma_max})")
        self._configure(transport, parameterisation, sigma_min, sigma_max, sigma_data, metric, huber_constant,
                        label_dropout, null_label, "online" if stage == 1 else "frozen", 0.0)
        self._configure_ect(p_mean, p_std, mapping, q, k, b, num_stages)
        self.stage_index, self.transition_sigma = stage, float(transition_sigma)
        self.boundary_prob, self.boundary_weight = float(boundary_prob), float(boundary_weight)

    def __call__(self, model: Callable, data: Tensor, labels: Optional[Tensor] = None, *,
                 reference_model: Optional[Callable] = None, generator: Optional[torch.Generator] = None,
                 noise: Optional[Tensor] = None) -> ObjectiveOutput:
        """Stage 1: the ECT loss. Stage 2: the truncated loss; ``reference_model`` must be the stage-1 model."""
        if self.stage_index == 1:
            return super().__call__(model, data, labels, reference_model=reference_model, generator=generator,
                                    noise=noise)
        if reference_model is None:
            raise ValueError("tcm stage 2 needs reference_model = the frozen stage-1 model (reference_mode 'frozen')")
        noise, labels, seed = self.prepare(model, data, labels, noise, generator)
        batch_size = data.shape[0]
        boundary = torch.rand(batch_size, generator=generator, dtype=torch.float64) < self.boundary_prob
        sigma_t, sigma_r = self.sample_sigmas(batch_size, generator, low=self.transition_sigma)
        sigma_t = torch.where(boundary, torch.full_like(sigma_t, self.transition_sigma), sigma_t)
        sigma_r = torch.where(boundary, sigma_t, self.reference_sigmas(sigma_t))
        t, r = (self.time_range.times(s).to(data.device, data.dtype) for s in (sigma_t, sigma_r))
        x_t = self.transport.interpolate(data, noise, t)
        x_r = self.transport.interpolate(data, noise, r)
        online, online_target = self.paired_predictions(model, None, x_t, t, x_r, r, labels, seed)
        with torch.no_grad(), shared_randomness(seed, data.device):
            stage1_target = self.consistency_function(reference_model, x_r, r, labels)
        device_boundary = boundary.to(data.device)
        truncated = broadcast_time((sigma_r >= self.transition_sigma).to(data.device) & ~device_boundary, x_t)
        target = torch.where(truncated, online_target, stage1_target)
        distance = self.distance(online, target)
        gap = (sigma_t - sigma_r).to(data.device, data.dtype)
        consistency_loss = distance / torch.where(device_boundary, torch.ones_like(gap), gap)
        per_sample = torch.where(device_boundary, self.boundary_weight * distance, consistency_loss)
        stats = {"stage": float(self.stage()), "boundary_share": float(boundary.double().mean())}
        return ObjectiveOutput(per_sample.mean(), per_sample.detach(), stats)
