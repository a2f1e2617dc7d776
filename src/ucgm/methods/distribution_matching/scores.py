"""Real and fake scores in data-prediction form, DMD's distribution-matching gradient and the fake-score loss.

Every score here is read as a data prediction ``x_hat(x_t, t)`` at a point ``x_t = alpha z + gamma x`` of the run's
path: ``s(x_t) = (gamma x_hat - x_t) / alpha^2``, so the difference of two scores is ``gamma (x_hat_1 - x_hat_2) /
alpha^2`` and every loss below is transport-agnostic (distribution_matching.md §0).

* **Real score** (:func:`real_data_prediction`): the teacher (the exact mixture oracle, a checkpoint, any model) on
  its own path through :class:`~ucgm.methods.teachers.TeacherODE` (``x_sigma = x_t / gamma``, ``sigma = alpha /
  gamma``), with classifier-free guidance ``x_hat = x_hat_u + w (x_hat_c - x_hat_u)`` when ``w != 1`` (DMD2's
  ``real_guidance_scale``; the fake score is never guided).
* **Distribution-matching gradient** (:func:`distribution_matching_gradient`, DMD2
  ``compute_distribution_matching_loss``): ``g = (x_hat_fake - x_hat_real) / mean_features |x - x_hat_real|`` per
  sample (several noise draws per sample: their mean over the pooled normaliser), non-finite values set to 0;
  :func:`distribution_matching_loss` ``L = 0.5 mean((x - sg(x - g))^2)`` injects it (``dL/dx = g / numel``). Descent moves ``x`` along ``x_hat_real - x_hat_fake``, i.e. along
  ``s_real - s_fake``: the reverse-KL gradient, normalised per sample.
* **Fake-score loss** (:func:`fake_score_loss`): the run transport's own regression on (detached) generator
  samples, ``mean ||F(x_t, t) - (alpha_hat z + gamma_hat x)||^2``; its minimiser is the posterior mean of the
  generated distribution, i.e. the generator's true score. DMD2's EDM code weights the x_hat error by
  ``1 / sigma^2 + 1 / sigma_data^2``; on the linear transport the velocity error is the x_hat error times
  ``(1 + sigma)^2 / sigma^2 = 1 / sigma^2 + 2 / sigma + 1`` — the same minimiser, a similar weighting.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor

from ...transports import Path, Transport, broadcast_time
from ..base import resolve_null_label
from ..teachers import Teacher, TeacherODE

#: ``(x_t, t, labels) -> x_hat``: a score read as a data prediction.
DataPrediction = Callable[[Tensor, Tensor, Optional[Tensor]], Tensor]


class RealScore:
    """The teacher as a data prediction on the run's ``path``, guided with scale ``guidance_scale`` (1: none)."""

    def __init__(self, teacher: Teacher, path: Path, guidance_scale: float = 1.0, null_label: Optional[int] = None):
        self.teacher, self.path = teacher, path
        self.guidance_scale = float(guidance_scale)
        self.null_label = null_label
        self._ode: Optional[TeacherODE] = None

    def _teacher_ode(self) -> TeacherODE:
        model, transport = self.teacher.resolved()
        if self._ode is None or self._ode.teacher is not model:
            self._ode = TeacherODE(model, transport, self.path)
        return self._ode

    def __call__(self, x_t: Tensor, t: Tensor, labels: Optional[Tensor]) -> Tensor:
        """``x_hat_real(x_t, t)`` (gradients flow through the input; the teacher's weights are frozen)."""
        return real_data_prediction(self._teacher_ode(), x_t, t, labels, self.guidance_scale, self.null_label)


def real_data_prediction(ode: TeacherODE, x_t: Tensor, t: Tensor, labels: Optional[Tensor],
                         guidance_scale: float = 1.0, null_label: Optional[int] = None) -> Tensor:
    """The teacher's data prediction at ``x_t`` (library time ``t``, ``(B,)``), guided ``x_hat_u + w (x_hat_c -
    x_hat_u)`` for ``w = guidance_scale != 1`` with labels (the unconditional pass uses ``null_label``, default the
    teacher's ``num_classes``)."""
    path = ode.path
    gamma = broadcast_time(path.gamma(t), x_t)
    sigma = path.alpha(t) / path.gamma(t)
    x_sigma = x_t / gamma
    conditional = ode.denoise(x_sigma, sigma, t, labels)
    if guidance_scale == 1.0 or labels is None:
        return conditional
    null = resolve_null_label(ode.teacher, null_label)
    if null is None:
        raise ValueError("real_guidance_scale != 1 needs a teacher with a null label (num_classes) or null_label")
    unconditional = ode.denoise(x_sigma, sigma, t, torch.full_like(labels, null))
    return unconditional + guidance_scale * (conditional - unconditional)


def fake_data_prediction(fake: Callable, transport: Transport, x_t: Tensor, t: Tensor,
                         labels: Optional[Tensor]) -> Tensor:
    """The fake score network's data prediction through the run's transport."""
    return transport.predict(fake, x_t, t, labels).data


def per_sample_mean(values: Tensor) -> Tensor:
    """``(B,)`` means over every feature of each sample."""
    return values.flatten(1).mean(dim=1)


def distribution_matching_gradient(x: Tensor, real: Tensor, fake: Tensor) -> Tensor:
    """``g = mean_d (fake_d - real_d) / mean_{d, features} |x - real_d|`` per sample over the leading axis ``d`` of
    ``real`` and ``fake`` (``(draws, *x.shape)``: noise draws of ``x_t`` at the sample's level), non-finite entries
    replaced by 0 (``nan_to_num``). One draw is DMD2's ``(p_real - p_fake) / weight_factor`` with ``p = x - x_hat``;
    several pool the normaliser, an estimate of ``E|x - x_hat_real|`` at the level whose relative spread falls as
    ``1 / sqrt(draws * features)`` (``docs/distribution_matching.md`` section 5: with 2 features one draw makes
    ``1 / normaliser`` heavy-tailed)."""
    if real.shape != fake.shape or real.shape[1:] != x.shape:
        raise ValueError(f"real {tuple(real.shape)} and fake {tuple(fake.shape)} must be (draws, *{tuple(x.shape)})")
    normaliser = broadcast_time(per_sample_mean((x - real).abs().transpose(0, 1)), x)
    return torch.nan_to_num((fake - real).mean(dim=0) / normaliser)


def distribution_matching_loss(x: Tensor, gradient: Tensor) -> tuple[Tensor, Tensor]:
    """``(L, per-sample L)`` of ``L = 0.5 mean((x - sg(x - g))^2)``, whose gradient in ``x`` is ``g / numel``. Its value
    is ``0.5 mean(g^2)``: it injects ``g``, it does not measure convergence."""
    squared = 0.5 * (x - (x - gradient).detach()) ** 2
    return squared.mean(), per_sample_mean(squared).detach()


def fake_score_loss(fake: Callable, transport: Transport, samples: Tensor, t: Tensor, noise: Tensor,
                    labels: Optional[Tensor]) -> Tensor:
    """Per-sample ``mean ||F_fake(x_t, t) - target||^2`` on ``x_t = alpha noise + gamma samples`` (``samples``
    detached: no gradient reaches the generator)."""
    samples = samples.detach()
    x_t = transport.interpolate(samples, noise, t)
    output = transport.network_output(fake, x_t, t, labels)
    return per_sample_mean((output - transport.target(samples, noise, t)) ** 2)
