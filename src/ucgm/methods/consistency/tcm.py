"""Truncated consistency models (TCM; Lee et al. 2024): a standard CM first, then truncated-time training.

* ``stage=1``: ECT on the full range ``[sigma_min, sigma_max]`` (:class:`~.cm.EasyConsistencyTuning`).
* ``stage=2``: a new run initialised from the stage-1 checkpoint; the trainer keeps that model frozen as the
  reference (``reference_mode = "frozen"``, ``f_1`` below). As NVlabs/TCM (``training/loss.py``,
  ``TCMPrecond``) and FastGen (``TCMModel``): ``int(B boundary_prob)`` samples of a batch of ``B`` (chosen at random;
  each sample with probability ``boundary_prob`` when that count is 0) are *boundary* samples at
  ``sigma_t = sigma_tr + 1e-8`` just above the transition ``sigma_tr`` (``transition_sigma``); the others have
  ``sigma_t`` lognormal truncated to ``[sigma_tr, sigma_max]``. For every sample ``sigma_r = max(r(sigma_t, s),
  sigma_min)`` (ECT's map at stage ``s``), the truncated target

      ``target = f^-(x_r, r)`` (the online model without gradient) if ``sigma_r >= sigma_tr``, else ``f_1(x_r, r)``,

  and ``L_i = d(f(x_t, t), target) / (sigma_t - sigma_r)``; the loss is
  ``mean_{consistency samples} L_i + boundary_weight * mean_{boundary samples} L_i`` (a missing group adds 0).
  A boundary sample's ``r`` lies below ``sigma_tr``, so it is trained towards the stage-1 model.

Deviations: TCM (FastGen's CIFAR-10 config) draws stage-2 times from a truncated log-Student-t (P_mean 0, P_std 0.2,
df 0.01); ucgm uses ECT's lognormal truncated to ``[sigma_tr, sigma_max]`` (inverse CDF). ``sigma_r`` is floored at
``sigma_min`` (TCM: at 1e-6).
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor

from ...transports import EDM_SIGMA_DATA, EDM_SIGMA_MAX, EDM_SIGMA_MIN, Transport, broadcast_time
from ...validation import check_batch, check_choice, check_range
from ..base import ObjectiveOutput, shared_randomness
from .cm import EasyConsistencyTuning

TCM_STAGES = (1, 2)
#: How far above the transition noise level the boundary samples sit (TCM's ``transition_t + 1e-8``).
BOUNDARY_OFFSET = 1e-8


class TruncatedConsistency(EasyConsistencyTuning):
    """TCM (module docstring). Defaults: FastGen's CIFAR values ``transition_sigma = 1``, ``boundary_prob = 0.25``,
    ``boundary_weight = 0.1``; ECT's loss, mapping and time distribution otherwise (``c = 0``, as TCM).
    ``start_stage`` starts ECT's curriculum at a later stage (TCM's ``--start_stage``)."""

    def __init__(self, transport: Transport | str = "linear", stage: int = 2, transition_sigma: float = 1.0,
                 boundary_prob: float = 0.25, boundary_weight: float = 0.1, p_mean: float = -1.1,
                 p_std: float = 2.0, mapping: str = "sigmoid", q: float = 2.0, k: float = 8.0, b: float = 1.0,
                 num_stages: int = 8, start_stage: int = 0, metric: str = "pseudo_huber",
                 huber_constant: Optional[float] = 0.0, parameterisation: str = "transport",
                 sigma_min: float = EDM_SIGMA_MIN, sigma_max: float = EDM_SIGMA_MAX,
                 sigma_data: float = EDM_SIGMA_DATA, label_dropout: float = 0.0, null_label: Optional[int] = None):
        check_choice("stage", stage, TCM_STAGES)
        check_range("boundary_prob", boundary_prob, 0.0, 1.0)
        check_range("boundary_weight", boundary_weight, 0.0, float("inf"))
        if not (isinstance(transition_sigma, (int, float)) and sigma_min < transition_sigma < sigma_max):
            raise ValueError(f"transition_sigma={transition_sigma!r} must lie in (sigma_min, sigma_max) = "
                             f"({sigma_min}, {sigma_max})")
        self._configure(transport, parameterisation, sigma_min, sigma_max, sigma_data, metric, huber_constant,
                        label_dropout, null_label, "online" if stage == 1 else "frozen", 0.0)
        self._configure_ect(p_mean, p_std, mapping, q, k, b, num_stages, start_stage)
        self.stage_index, self.transition_sigma = stage, float(transition_sigma)
        self.boundary_prob, self.boundary_weight = float(boundary_prob), float(boundary_weight)

    def boundary_mask(self, batch_size: int, generator: Optional[torch.Generator]) -> Tensor:
        """Which samples are boundary samples: ``int(batch_size * boundary_prob)`` of them at random positions, or
        each with probability ``boundary_prob`` when that count is 0."""
        count = int(batch_size * self.boundary_prob)
        if count == 0:
            return torch.rand(batch_size, generator=generator, dtype=torch.float64) < self.boundary_prob
        mask = torch.zeros(batch_size, dtype=torch.bool)
        mask[torch.randperm(batch_size, generator=generator)[:count]] = True
        return mask

    def __call__(self, model: Callable, data: Tensor, labels: Optional[Tensor] = None, *,
                 reference_model: Optional[Callable] = None, generator: Optional[torch.Generator] = None,
                 noise: Optional[Tensor] = None, time: Optional[Tensor] = None,
                 boundary: Optional[Tensor] = None) -> ObjectiveOutput:
        """Stage 1: the ECT loss. Stage 2: the truncated loss; ``reference_model`` must be the stage-1 model.
        ``time`` (``(B,)`` ucgm times, stage 2: at or above the transition) and ``boundary`` (``(B,)`` bool; their
        times are replaced by the boundary time) may be fixed."""
        if self.stage_index == 1:
            return super().__call__(model, data, labels, reference_model=reference_model, generator=generator,
                                    noise=noise)
        if reference_model is None:
            raise ValueError("tcm stage 2 needs reference_model = the frozen stage-1 model (reference_mode 'frozen')")
        noise, labels, seed = self.prepare(model, data, labels, noise, generator)
        sigma_t, boundary = self._stage_two_sigmas(data, generator, time, boundary)
        sigma_r = self.reference_sigmas(sigma_t).clamp_min(self.time_range.sigma_min)
        t, r = (self.time_range.times(sigma).to(data.device, data.dtype) for sigma in (sigma_t, sigma_r))
        x_t = self.transport.interpolate(data, noise, t)
        x_r = self.transport.interpolate(data, noise, r)
        online, online_target = self.paired_predictions(model, None, x_t, t, x_r, r, labels, seed)
        with torch.no_grad(), shared_randomness(seed, data.device):
            stage_one_target = self.consistency_function(reference_model, x_r, r, labels)
        truncated = broadcast_time((sigma_r >= self.transition_sigma).to(data.device), x_t)
        target = torch.where(truncated, online_target, stage_one_target)
        per_sample = self.distance(online, target) / (sigma_t - sigma_r).to(data.device, data.dtype)
        on_boundary = boundary.to(data.device)
        consistency_loss = _masked_mean(per_sample, ~on_boundary)
        boundary_loss = _masked_mean(per_sample, on_boundary)
        stats = {"stage": float(self.stage()), "boundary_share": float(boundary.double().mean()),
                 "consistency_loss": consistency_loss.detach(), "boundary_loss": boundary_loss.detach()}
        return ObjectiveOutput(consistency_loss + self.boundary_weight * boundary_loss, per_sample.detach(), stats)

    def _stage_two_sigmas(self, data: Tensor, generator: Optional[torch.Generator], time: Optional[Tensor],
                          boundary: Optional[Tensor]) -> tuple[Tensor, Tensor]:
        """Float64 ``sigma_t`` (boundary samples at ``sigma_tr + BOUNDARY_OFFSET``) and the boundary mask."""
        batch_size = data.shape[0]
        if boundary is None:
            boundary = self.boundary_mask(batch_size, generator)
        else:
            boundary = torch.as_tensor(boundary, dtype=torch.bool).reshape(-1).cpu()
            check_batch("boundary", boundary, batch_size)
        if time is None:
            sigma_t = self.sample_sigmas(batch_size, generator, low=self.transition_sigma)
        else:
            time = torch.as_tensor(time, dtype=torch.float64).reshape(-1).cpu()
            check_batch("time", time, batch_size)
            sigma_t = self.time_range.sigma(time)
        sigma_t = torch.where(boundary, torch.full_like(sigma_t, self.transition_sigma + BOUNDARY_OFFSET), sigma_t)
        if bool((sigma_t < self.transition_sigma).any()):
            raise ValueError(f"tcm stage 2 trains at sigma >= transition_sigma = {self.transition_sigma}; "
                             f"time holds smaller noise levels")
        return sigma_t, boundary


def _masked_mean(values: Tensor, mask: Tensor) -> Tensor:
    """The mean of ``values[mask]`` (0 when ``mask`` selects nothing), without a device synchronisation."""
    weights = mask.to(values.dtype)
    return (values * weights).sum() / weights.sum().clamp_min(1.0)
