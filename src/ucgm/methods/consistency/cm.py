"""Consistency distillation / training (CD, CT; Song et al. 2023), improved CT (iCT; Song & Dhariwal 2023) and
Easy Consistency Tuning (ECT; Geng et al. 2024) on any ucgm transport.

Noise levels are EDM's ``sigma = alpha(t) / gamma(t)`` of the run's path; the grid ``sigma_0 = sigma_max > ... >
sigma_{N-1} = sigma_min`` is Karras' (:func:`~ucgm.timegrids.karras_sigmas`) mapped to ucgm time. With
``f`` the consistency function (:mod:`.consistency_param`; the online model with gradient, ``f^-`` the target
network without, under the same dropout RNG), one loss is, per sample,

* CD / CT / iCT: pair ``(t, r) = (t_i, t_{i+1})``, ``x_t = alpha(t) z + gamma(t) x``,
  ``L = w(sigma_t, sigma_r) d(f(x_t, t), f^-(x_r, r))`` with ``x_r`` one teacher ODE step from ``x_t`` (CD) or
  ``alpha(r) z + gamma(r) x`` with the same ``z`` (CT, iCT);
* ECT: ``sigma_t`` lognormal, ``sigma_r`` ECT's shrinking map, ``L = d(f(x_t, t), f^-(x_r, r)) / (sigma_t - sigma_r)``.

``reference_model`` is the target network the trainer maintains (``reference_mode``): an EMA copy (CD, CT) or
the online model itself (iCT, ECT: stop-gradient target); when it is ``None`` the online model is used.
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import torch
from torch import Tensor

from ...timegrids import karras_sigmas
from ...transports import EDM_SIGMA_DATA, EDM_SIGMA_MAX, EDM_SIGMA_MIN, Transport, broadcast_time
from ...validation import check_choice, check_positive_int, check_range
from ..base import ObjectiveOutput
from .base import WEIGHTINGS, ConsistencyObjectiveBase
from .schedules import (
    ECT_MAPPINGS,
    adaptive_ema_decay,
    adaptive_num_scales,
    doubling_num_scales,
    ect_reference_sigma,
    ect_stage,
    lognormal_pair_probabilities,
    sample_truncated_lognormal,
)
from ..teachers import TEACHER_SOLVERS, Teacher

DISCRETISATIONS = ("fixed", "adaptive", "doubling")
"""``N(k)``: ``fixed`` = ``initial_scales`` points; ``adaptive`` = CM's progressive schedule from ``initial_scales``
to ``final_scales + 1``; ``doubling`` = iCT's curriculum."""
PAIR_DISTRIBUTIONS = ("uniform", "lognormal")
"""Which adjacent pair ``(t_i, t_{i+1})`` a sample trains on: uniform ``i`` (CM) or iCT's discretised lognormal."""


class PairedConsistencyObjective(ConsistencyObjectiveBase):
    """The discrete-grid consistency loss shared by CD, CT and iCT (module docstring)."""

    def _configure_pairs(self, discretisation: str, initial_scales: int, final_scales: int, rho: float,
                         pair_distribution: str, p_mean: float, p_std: float, weighting: str,
                         adaptive_decay: bool) -> None:
        check_choice("discretisation", discretisation, DISCRETISATIONS)
        check_choice("pair_distribution", pair_distribution, PAIR_DISTRIBUTIONS)
        check_choice("weighting", weighting, WEIGHTINGS)
        check_positive_int("initial_scales", initial_scales, minimum=2)
        if discretisation != "fixed":
            check_positive_int("final_scales", final_scales, minimum=initial_scales)
        check_range("rho", rho, 1e-6, math.inf)
        check_range("p_std", p_std, 1e-6, math.inf)
        self.discretisation, self.initial_scales, self.final_scales = discretisation, initial_scales, final_scales
        self.rho, self.pair_distribution, self.p_mean, self.p_std = float(rho), pair_distribution, p_mean, p_std
        self.weighting, self.adaptive_decay = weighting, bool(adaptive_decay)

    def num_scales(self) -> int:
        """``N(k)``, the number of grid points at the current progress."""
        if self.discretisation == "fixed":
            return self.initial_scales
        if self.discretisation == "adaptive":
            return adaptive_num_scales(self.step, self.total_steps, self.initial_scales, self.final_scales)
        return doubling_num_scales(self.step, self.total_steps, self.initial_scales, self.final_scales)

    @property
    def reference_decay(self) -> float:
        """Target EMA decay: ``mu0`` (``reference_decay``) or CM's ``mu(k) = exp(s0 ln(mu0) / (N(k) - 1))``
        with ``adaptive_decay`` (the trainer reads it every step)."""
        if self.adaptive_decay:
            return adaptive_ema_decay(self.num_scales(), self.initial_scales, self._reference_decay)
        return self._reference_decay

    def sample_pairs(self, batch_size: int, generator: Optional[torch.Generator]) -> tuple[Tensor, Tensor]:
        """Float64 ``(t_i, t_{i+1})`` per sample from the current grid."""
        sigmas = karras_sigmas(self.num_scales(), self.time_range.sigma_min, self.time_range.sigma_max, self.rho)
        times = self.time_range.times(sigmas)
        if self.pair_distribution == "lognormal":
            probabilities = lognormal_pair_probabilities(sigmas, self.p_mean, self.p_std)
            index = torch.multinomial(probabilities, batch_size, replacement=True, generator=generator)
        else:
            index = torch.randint(0, sigmas.numel() - 1, (batch_size,), generator=generator)
        return times[index], times[index + 1]

    def target_point(self, x_t: Tensor, t: Tensor, r: Tensor, data: Tensor, noise: Tensor,
                     labels: Optional[Tensor]) -> Tensor:
        """``x_r`` on the same trajectory as ``x_t`` (CT: the one-sample estimate ``alpha(r) z + gamma(r) x``)."""
        return self.transport.interpolate(data, noise, r)

    def __call__(self, model: Callable, data: Tensor, labels: Optional[Tensor] = None, *,
                 reference_model: Optional[Callable] = None, generator: Optional[torch.Generator] = None,
                 time: Optional[Tensor] = None, target_time: Optional[Tensor] = None,
                 noise: Optional[Tensor] = None) -> ObjectiveOutput:
        """One loss; ``time`` / ``target_time`` (the pair, ``(B,)`` each) and ``noise`` may be fixed."""
        noise, labels, seed = self.prepare(model, data, labels, noise, generator)
        pair = self.given_times(time, target_time, data)
        t64, r64 = self.sample_pairs(data.shape[0], generator) if pair is None else (pair[0].double(), pair[1].double())
        t, r = t64.to(data.device, data.dtype), r64.to(data.device, data.dtype)
        x_t = self.transport.interpolate(data, noise, t)
        with torch.no_grad():
            x_r = self.target_point(x_t, t, r, data, noise, labels)
        online, target = self.paired_predictions(model, reference_model, x_t, t, x_r, r, labels, seed)
        per_sample = self.distance(online, target)
        if self.weighting == "inverse_gap":
            gap = self.time_range.sigma(t64) - self.time_range.sigma(r64)
            per_sample = per_sample / gap.clamp_min(torch.finfo(torch.float64).tiny).to(data.device, data.dtype)
        return ObjectiveOutput(per_sample.mean(), per_sample.detach(), {"num_scales": float(self.num_scales())})


class ConsistencyDistillation(PairedConsistencyObjective):
    """CD: ``x_r`` is one Euler or Heun step of the teacher's PF-ODE from ``x_t`` (:class:`~.teacher.TeacherODE`).

    ``teacher``: a model read through ``teacher_transport`` (default: the run transport, or the teacher's own
    ``transport`` attribute), ``"oracle:<mixture>"`` (exact posterior of a toy mixture, e.g. ``oracle:8gaussians``)
    or ``"checkpoint:<path>"``. Defaults: CM's CD (fixed N = 18, EMA target mu = 0.95, Heun, L2, uniform weights).
    """

    def __init__(self, transport: Transport | str = "linear", teacher=None,
                 teacher_transport: Optional[Transport | str] = None, solver: str = "heun",
                 discretisation: str = "fixed", initial_scales: int = 18, final_scales: int = 18, rho: float = 7.0,
                 pair_distribution: str = "uniform", p_mean: float = -1.1, p_std: float = 2.0,
                 weighting: str = "uniform", metric: str = "l2", huber_constant: Optional[float] = None,
                 parameterisation: str = "consistency", sigma_min: float = EDM_SIGMA_MIN,
                 sigma_max: float = EDM_SIGMA_MAX, sigma_data: float = EDM_SIGMA_DATA, label_dropout: float = 0.0,
                 null_label: Optional[int] = None,
                 reference: str = "ema", reference_decay: float = 0.95, adaptive_decay: bool = False):
        if teacher is None:
            raise ValueError("cd needs a teacher: a model, 'oracle:<mixture>' (e.g. 'oracle:8gaussians') or "
                             "'checkpoint:<path>'")
        check_choice("solver", solver, TEACHER_SOLVERS)
        self._configure(transport, parameterisation, sigma_min, sigma_max, sigma_data, metric, huber_constant,
                        label_dropout, null_label, reference, reference_decay)
        self._configure_pairs(discretisation, initial_scales, final_scales, rho, pair_distribution, p_mean, p_std,
                              weighting, adaptive_decay)
        self.teacher = Teacher(teacher, teacher_transport, self.transport)
        self.solver = solver

    def target_point(self, x_t, t, r, data, noise, labels):
        """``x_r`` = one teacher solver step from ``(x_t, t)`` to ``r``."""
        return self.teacher.ode(self.transport.path).step(x_t, t, r, labels, self.solver)


class ConsistencyTraining(PairedConsistencyObjective):
    """CT: the teacher step is replaced by the one-sample estimate ``x_r = alpha(r) z + gamma(r) x`` (same ``z``).
    Defaults: CM's CT (adaptive N from s0 = 2 to s1 = 150, adaptive EMA target from mu0 = 0.9, L2)."""

    def __init__(self, transport: Transport | str = "linear", discretisation: str = "adaptive",
                 initial_scales: int = 2, final_scales: int = 150, rho: float = 7.0,
                 pair_distribution: str = "uniform", p_mean: float = -1.1, p_std: float = 2.0,
                 weighting: str = "uniform", metric: str = "l2", huber_constant: Optional[float] = None,
                 parameterisation: str = "consistency", sigma_min: float = EDM_SIGMA_MIN,
                 sigma_max: float = EDM_SIGMA_MAX, sigma_data: float = EDM_SIGMA_DATA, label_dropout: float = 0.0,
                 null_label: Optional[int] = None,
                 reference: str = "ema", reference_decay: float = 0.9, adaptive_decay: bool = True):
        self._configure(transport, parameterisation, sigma_min, sigma_max, sigma_data, metric, huber_constant,
                        label_dropout, null_label, reference, reference_decay)
        self._configure_pairs(discretisation, initial_scales, final_scales, rho, pair_distribution, p_mean, p_std,
                              weighting, adaptive_decay)


class ImprovedConsistencyTraining(ConsistencyTraining):
    """iCT: CT with a stop-gradient target (``reference="online"``, no EMA), pseudo-Huber metric
    (``c = 0.00054 sqrt(dim)``), weights ``1 / (sigma_{i} - sigma_{i+1})``, discretised lognormal pairs
    (P_mean = -1.1, P_std = 2.0) and the doubling curriculum ``N(k) = min(10 * 2^floor(k / K'), 1280) + 1``."""

    def __init__(self, transport: Transport | str = "linear", discretisation: str = "doubling",
                 initial_scales: int = 10, final_scales: int = 1280, rho: float = 7.0,
                 pair_distribution: str = "lognormal", p_mean: float = -1.1, p_std: float = 2.0,
                 weighting: str = "inverse_gap", metric: str = "pseudo_huber", huber_constant: Optional[float] = None,
                 parameterisation: str = "consistency", sigma_min: float = EDM_SIGMA_MIN,
                 sigma_max: float = EDM_SIGMA_MAX, sigma_data: float = EDM_SIGMA_DATA, label_dropout: float = 0.0,
                 null_label: Optional[int] = None,
                 reference: str = "online", reference_decay: float = 0.0, adaptive_decay: bool = False):
        super().__init__(transport, discretisation, initial_scales, final_scales, rho, pair_distribution, p_mean,
                         p_std, weighting, metric, huber_constant, parameterisation, sigma_min, sigma_max,
                         sigma_data, label_dropout, null_label, reference, reference_decay, adaptive_decay)


class EasyConsistencyTuning(ConsistencyObjectiveBase):
    """ECT (module docstring): ``sigma_t ~ exp(P_mean + P_std n)`` truncated to ``[sigma_min, sigma_max]``,
    ``sigma_r = r(sigma_t, s)`` (:func:`~.schedules.ect_reference_sigma`, clamped at 0) at stage
    ``s = start_stage + min(floor(num_stages k / K), num_stages - 1)``; same ``z`` for ``x_t`` and ``x_r``;
    stop-gradient online target ``f^-(x_r, r)``, or the data ``x`` itself where ``sigma_r < sigma_min``;
    ``L = (sqrt(||f_t - f_r||^2 + c^2) - c) / (sigma_t - sigma_r)`` (or another metric over the gap).

    Defaults are locuslab/ect's (``training/loss.py``, ``ct_train.py``, ``run_ecm.sh``): P_mean = -1.1,
    P_std = 2.0, sigmoid mapping q = 2, k = 8, b = 1, ``c = 0`` (``||f_t - f_r|| / (sigma_t - sigma_r)``), 8 stages
    over the run (``run_ecm.sh``: 25.6 Mimg, a stage every 3.2 Mimg). ``start_stage`` starts the curriculum at a
    later stage (TCM's ``start_stage``, e.g. for a second run). ``parameterisation="transport"`` (default) reads
    the network through the run transport, so a multi-step checkpoint (e.g. flow matching) is tuned as it is.

    Deviations: ``sigma_t`` is truncated to the model's range ``[sigma_min, sigma_max]`` (ECT draws it
    untruncated: about 0.8% of its draws fall outside); ECT uses ``x`` as the target only at ``r = 0``, ucgm for
    every ``sigma_r`` below ``sigma_min`` (the consistency function's boundary value there).
    """

    def __init__(self, transport: Transport | str = "linear", p_mean: float = -1.1, p_std: float = 2.0,
                 mapping: str = "sigmoid", q: float = 2.0, k: float = 8.0, b: float = 1.0, num_stages: int = 8,
                 start_stage: int = 0, metric: str = "pseudo_huber", huber_constant: Optional[float] = 0.0,
                 parameterisation: str = "transport", sigma_min: float = EDM_SIGMA_MIN,
                 sigma_max: float = EDM_SIGMA_MAX, sigma_data: float = EDM_SIGMA_DATA, label_dropout: float = 0.0,
                 null_label: Optional[int] = None,
                 reference: str = "online", reference_decay: float = 0.0):
        self._configure(transport, parameterisation, sigma_min, sigma_max, sigma_data, metric, huber_constant,
                        label_dropout, null_label, reference, reference_decay)
        self._configure_ect(p_mean, p_std, mapping, q, k, b, num_stages, start_stage)

    def _configure_ect(self, p_mean: float, p_std: float, mapping: str, q: float, k: float, b: float,
                       num_stages: int, start_stage: int) -> None:
        check_choice("mapping", mapping, ECT_MAPPINGS)
        check_range("p_std", p_std, 1e-6, math.inf)
        check_range("q", q, 1.0 + 1e-9, math.inf)
        check_range("k", k, 0.0, math.inf)
        check_range("b", b, 0.0, math.inf)
        check_positive_int("num_stages", num_stages)
        check_positive_int("start_stage", start_stage, minimum=0)
        self.p_mean, self.p_std, self.mapping = float(p_mean), float(p_std), mapping
        self.q, self.k, self.b = float(q), float(k), float(b)
        self.num_stages, self.start_stage = num_stages, start_stage

    def stage(self) -> int:
        """ECT's stage at the current progress, counted from ``start_stage``."""
        return self.start_stage + ect_stage(self.step, self.total_steps, self.num_stages)

    def reference_sigmas(self, sigma_t: Tensor) -> Tensor:
        """``sigma_r = max(r(sigma_t, s), 0)``."""
        return ect_reference_sigma(sigma_t, self.stage(), self.q, self.k, self.b, self.mapping)

    def sample_sigmas(self, batch_size: int, generator: Optional[torch.Generator], low: Optional[float] = None
                      ) -> Tensor:
        """Float64 ``sigma_t`` truncated to ``[low (default sigma_min), sigma_max]``."""
        low = self.time_range.sigma_min if low is None else low
        return sample_truncated_lognormal(batch_size, self.p_mean, self.p_std, low, self.time_range.sigma_max,
                                          generator)

    def __call__(self, model: Callable, data: Tensor, labels: Optional[Tensor] = None, *,
                 reference_model: Optional[Callable] = None, generator: Optional[torch.Generator] = None,
                 time: Optional[Tensor] = None, target_time: Optional[Tensor] = None,
                 noise: Optional[Tensor] = None) -> ObjectiveOutput:
        """One ECT loss; ``time`` / ``target_time`` (``(B,)`` ucgm times t > r) and ``noise`` may be fixed."""
        noise, labels, seed = self.prepare(model, data, labels, noise, generator)
        pair = self.given_times(time, target_time, data)
        if pair is None:
            sigma_t = self.sample_sigmas(data.shape[0], generator)
            sigma_r = self.reference_sigmas(sigma_t)
        else:
            sigma_t, sigma_r = self.time_range.sigma(pair[0].double()), self.time_range.sigma(pair[1].double())
        below_range = sigma_r < self.time_range.sigma_min
        t64 = self.time_range.times(sigma_t)
        r64 = self.time_range.times(torch.where(below_range, torch.full_like(sigma_r, self.time_range.sigma_min),
                                                sigma_r))
        t, r = t64.to(data.device, data.dtype), r64.to(data.device, data.dtype)
        x_t = self.transport.interpolate(data, noise, t)
        x_r = self.transport.interpolate(data, noise, r)
        online, target = self.paired_predictions(model, reference_model, x_t, t, x_r, r, labels, seed)
        target = torch.where(broadcast_time(below_range.to(data.device), data), data, target)
        gap = (sigma_t - sigma_r).clamp_min(torch.finfo(torch.float64).tiny).to(data.device, data.dtype)
        per_sample = self.distance(online, target) / gap
        return ObjectiveOutput(per_sample.mean(), per_sample.detach(), {"stage": float(self.stage())})
