"""Multistep consistency models (Heek, Hoogeboom, Salimans 2024) on any ucgm path.

``[t_min, t_max]`` is cut into ``S`` segments of equal length in ucgm time (:func:`segment_edges`); within a
segment ``(s, e]`` the model is consistent towards the segment start ``s``: the DDIM step with its data prediction,
``DDIM(x_t, x_hat; t -> s) = gamma_s x_hat + alpha_s (x_t - gamma_t x_hat) / alpha_t``, must land on the same point
for every ``t`` on one ODE trajectory. With ``N`` substeps of length ``h = (e - s) / N``, per sample:

* ``t = s + n h`` (segment and ``n in 1..N`` uniform), ``t' = t - h``, ``x_t = alpha(t) z + gamma(t) x``;
* ``x_t'``: one teacher Euler (= DDIM) step from ``x_t`` (distillation, ``teacher`` given) or
  ``alpha(t') z + gamma(t') x`` with the same ``z`` (training);
* target ``x_s = x_t'`` when ``t' = s``, else ``DDIM(x_t', f^-(x_t', t'); t' -> s)`` (target network, no gradient);
* the data prediction that makes the student's DDIM step from ``x_t`` land on ``x_s``:
  ``x_ref = (x_s - (alpha_s / alpha_t) x_t) / (gamma_s - alpha_s gamma_t / alpha_t)``;
* ``L = d(f(x_t, t), x_ref)``.

``S = 1`` is a consistency model (trained towards ``t_min``); ``S -> inf`` a diffusion model. Sample with
:func:`ucgm.sampling.consistency_sampler.multistep_consistency_sample` and the same ``segments``.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor

from ...transports import EDM_SIGMA_DATA, EDM_SIGMA_MAX, EDM_SIGMA_MIN, Path, Transport, broadcast_time
from ...validation import check_batch, check_finite, check_positive_int
from ..base import ObjectiveOutput
from .base import ConsistencyObjectiveBase
from .parameterisation import TimeRange
from ..teachers import Teacher


def segment_edges(path: Path, segments: int, sigma_min: float = EDM_SIGMA_MIN, sigma_max: float = EDM_SIGMA_MAX
                  ) -> Tensor:
    """``S + 1`` float64 times from ``t_max`` down to ``t_min`` (``time_for_ratio`` of the sigmas), evenly spaced."""
    check_positive_int("segments", segments)
    time_range = TimeRange(path, sigma_min, sigma_max)
    return torch.linspace(time_range.t_max, time_range.t_min, segments + 1, dtype=torch.float64)


def ddim_step(path: Path, x_t: Tensor, data_hat: Tensor, t: Tensor, s: Tensor) -> Tensor:
    """``x_s = gamma(s) x_hat + alpha(s) z_hat`` with ``z_hat = (x_t - gamma(t) x_hat) / alpha(t)``."""
    noise_hat = (x_t - broadcast_time(path.gamma(t), x_t) * data_hat) / broadcast_time(path.alpha(t), x_t)
    return broadcast_time(path.gamma(s), x_t) * data_hat + broadcast_time(path.alpha(s), x_t) * noise_hat


class MultistepConsistency(ConsistencyObjectiveBase):
    """Multistep consistency training / distillation (module docstring).

    Defaults: 4 segments, 16 substeps, the run transport's data prediction (tune or train like a diffusion model),
    stop-gradient online target, L2. ``teacher`` (model, ``"oracle:<mixture>"`` or ``"checkpoint:<path>"``)
    switches to distillation.
    """

    def __init__(self, transport: Transport | str = "linear", segments: int = 4, substeps: int = 16, teacher=None,
                 teacher_transport: Optional[Transport | str] = None, metric: str = "l2",
                 huber_constant: Optional[float] = None, parameterisation: str = "transport",
                 sigma_min: float = EDM_SIGMA_MIN, sigma_max: float = EDM_SIGMA_MAX,
                 sigma_data: float = EDM_SIGMA_DATA, label_dropout: float = 0.0, null_label: Optional[int] = None,
                 reference: str = "online", reference_decay: float = 0.0):
        check_positive_int("segments", segments)
        check_positive_int("substeps", substeps)
        self._configure(transport, parameterisation, sigma_min, sigma_max, sigma_data, metric, huber_constant,
                        label_dropout, null_label, reference, reference_decay)
        self.segments, self.substeps = segments, substeps
        self.teacher = None if teacher is None else Teacher(teacher, teacher_transport, self.transport)

    def edges(self) -> Tensor:
        """The segment boundaries, decreasing from ``t_max`` to ``t_min``."""
        return segment_edges(self.transport.path, self.segments, self.time_range.sigma_min, self.time_range.sigma_max)

    def sample_times(self, batch_size: int, generator: Optional[torch.Generator]) -> Tensor:
        """Float64 ``t = s + n h`` with a uniform segment and ``n`` uniform in ``1..N``."""
        edges = self.edges()
        segment = torch.randint(0, self.segments, (batch_size,), generator=generator)
        substep = torch.randint(1, self.substeps + 1, (batch_size,), generator=generator)
        start, end = edges[segment + 1], edges[segment]
        return start + substep * (end - start) / self.substeps

    def segment_of(self, t: Tensor) -> tuple[Tensor, Tensor]:
        """``(s, h)``: the start of the segment ``(s, e]`` holding each ``t`` and its substep length."""
        ascending = self.edges().flip(0)
        if bool(((t <= ascending[0]) | (t > ascending[-1])).any()):
            raise ValueError(f"time must lie in (t_min, t_max] = ({float(ascending[0])}, {float(ascending[-1])}]")
        index = torch.searchsorted(ascending, t)
        start, end = ascending[index - 1], ascending[index]
        return start, (end - start) / self.substeps

    def sampler(self) -> tuple[str, dict]:
        """Multistep consistency sampling along the training segments (NFE = number of segments)."""
        return "mcm", {"sigma_min": self.time_range.sigma_min, "sigma_max": self.time_range.sigma_max,
                       "sigma_data": self.consistency.sigma_data}

    def __call__(self, model: Callable, data: Tensor, labels: Optional[Tensor] = None, *,
                 reference_model: Optional[Callable] = None, generator: Optional[torch.Generator] = None,
                 time: Optional[Tensor] = None, noise: Optional[Tensor] = None) -> ObjectiveOutput:
        """One loss; ``time`` ``(B,)`` in ``(t_min, t_max]`` and ``noise`` may be fixed."""
        noise, labels, seed = self.prepare(model, data, labels, noise, generator)
        if time is None:
            t64 = self.sample_times(data.shape[0], generator)
        else:
            t64 = torch.as_tensor(time, dtype=torch.float64).reshape(-1).cpu()
            check_batch("time", t64, data.shape[0])
            check_finite("time", t64)
        start64, step64 = self.segment_of(t64)
        earlier = t64 - step64  # within a relative 1e-9 of the segment start counts as the start itself
        previous64 = torch.where(earlier <= start64 + 1e-9 * step64, start64, earlier)
        t, previous, start = (v.to(data.device, data.dtype) for v in (t64, previous64, start64))
        path = self.transport.path
        x_t = self.transport.interpolate(data, noise, t)
        with torch.no_grad():
            if self.teacher is None:
                x_previous = self.transport.interpolate(data, noise, previous)
            else:
                x_previous = self.teacher.ode(self.transport.path).step(x_t, t, previous, labels, "euler")
        online, target_data = self.paired_predictions(model, reference_model, x_t, t, x_previous, previous,
                                                      labels, seed)
        at_start = broadcast_time((previous64 == start64).to(data.device), x_t)
        x_start = torch.where(at_start, x_previous, ddim_step(path, x_previous, target_data, previous, start))
        alpha_t, gamma_t = broadcast_time(path.alpha(t), x_t), broadcast_time(path.gamma(t), x_t)
        alpha_s, gamma_s = broadcast_time(path.alpha(start), x_t), broadcast_time(path.gamma(start), x_t)
        reference_data = (x_start - alpha_s / alpha_t * x_t) / (gamma_s - alpha_s * gamma_t / alpha_t)
        per_sample = self.distance(online, reference_data)
        return ObjectiveOutput(per_sample.mean(), per_sample.detach(), {"segments": float(self.segments)})
