"""What DMD, DMD2, MSD, SIM and CoSIM share: a generator, a fake score network, a teacher, an update schedule.

Networks by role (:class:`~ucgm.methods.base.NetworkSpec`):

* ``generator`` — the sampling role (checkpoint groups ``model`` / ``ema``): the run's backbone read through the run's
  transport (:mod:`.generator`); start it from a teacher checkpoint with ``init.checkpoint=RUN``;
* ``fake_score`` — the score of the generator's distribution, trained on its (detached) samples with the fake-score
  loss (:mod:`.scores`); no evaluation EMA. ``fake_score_init``: ``"teacher"`` starts it from the teacher
  checkpoint's weights (DMD2: a copy of the real network), ``"scratch"`` from the run's backbone with the options
  ``fake_score_model`` over it; ``"auto"`` picks ``"teacher"`` for a checkpoint teacher, else ``"scratch"``;
* ``teacher`` — a ``checkpoint:PATH`` teacher, frozen (the exact ``oracle:MIXTURE`` teacher and module teachers are
  no networks: the method holds them).

Schedule: ``update_ratio`` fake-score updates, then one generator update (DMD2's two-time-scale rule). Every draw
of a loss comes from the batch generator. The generator's labels are the batch's data labels.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch
from torch import Tensor

from ...transports import Transport, make_transport
from ...validation import check_choice, check_positive_int
from ..base import Batch, Method, NetworkSpec, Networks, ObjectiveOutput, Phase, draw_noise
from ..teachers import Teacher
from .generator import draw_step, generator_step, generator_times, simulate_to_step
from .scores import (
    RealScore,
    distribution_matching_gradient,
    distribution_matching_loss,
    fake_data_prediction,
    fake_score_loss,
)
from .times import check_fraction_range, karras_index_times

FAKE_SCORE_INITS = ("auto", "teacher", "scratch")
#: DMD2's index fractions: 2-98 % of the Karras grid for the matching loss, all of it for the fake-score loss.
MATCHING_TIME_RANGE = (0.02, 0.98)
FULL_TIME_RANGE = (0.0, 1.0)


class DistributionMatchingMethod(Method):
    """The shared machinery; subclasses implement :meth:`generator_loss` (and may extend the fake-score loss)."""

    family = "distribution_matching"
    default_sampler = "generator"
    sampling_role = "generator"
    #: Whether the fake score network carries a classifier head (DMD2's GAN).
    uses_classifier_head = False

    def __init__(self, transport: Transport | str, teacher, teacher_transport: Optional[Transport | str],
                 real_guidance_scale: float, generator_steps: int, update_ratio: int, fake_score_init: str,
                 fake_score_model: Optional[dict], matching_time_range: Sequence[float],
                 fake_time_range: Sequence[float], null_label: Optional[int]):
        self.transport = make_transport(transport) if isinstance(transport, str) else transport
        check_positive_int("generator_steps", generator_steps)
        check_positive_int("update_ratio", update_ratio)
        check_choice("fake_score_init", fake_score_init, FAKE_SCORE_INITS)
        if fake_score_model is not None and not isinstance(fake_score_model, dict):
            raise ValueError(f"fake_score_model={fake_score_model!r} must be a mapping of model options or null")
        self.teacher = Teacher(teacher, teacher_transport, self.transport)
        if fake_score_init == "teacher" and self.teacher.checkpoint is None:
            raise ValueError("fake_score_init='teacher' needs a 'checkpoint:PATH' teacher (the oracle has no weights); "
                             "use 'scratch' or 'auto'")
        if fake_score_init == "teacher" and fake_score_model:
            raise ValueError("fake_score_model applies to a fake score built from scratch; with "
                             "fake_score_init='teacher' the fake score is the teacher's backbone")
        self.fake_score_init = ("teacher" if self.teacher.checkpoint else "scratch") if fake_score_init == "auto" \
            else fake_score_init
        self.real_score = RealScore(self.teacher, self.transport.path, real_guidance_scale, null_label)
        self.generator_steps = generator_steps
        self.times = generator_times(generator_steps)
        self.update_ratio = update_ratio
        self.fake_score_model = dict(fake_score_model or {})
        self.matching_time_range = check_fraction_range("matching_time_range", matching_time_range)
        self.fake_time_range = check_fraction_range("fake_time_range", fake_time_range)

    # ------------------------------------------------------------------------------------ declaration
    def fake_score_spec(self) -> NetworkSpec:
        head = {"classifier_head": True} if self.uses_classifier_head else {}
        if self.fake_score_init == "teacher":
            return NetworkSpec(init=self.teacher.checkpoint, model=head or None, ema={"kind": "none"})
        return NetworkSpec(model={**self.fake_score_model, **head} or None, ema={"kind": "none"})

    def generator_roles(self) -> tuple[str, ...]:
        return (self.sampling_role,)

    def networks(self) -> dict[str, NetworkSpec]:
        specs = {role: NetworkSpec() for role in self.generator_roles()}
        specs["fake_score"] = self.fake_score_spec()
        specs.update(self.teacher.network_specs())
        return specs

    def schedule(self) -> list[Phase]:
        return [Phase("fake_score", ("fake_score",), repeats=self.update_ratio),
                Phase("generator", self.generator_roles())]

    def sampler(self) -> tuple[str, dict]:
        """The ``generator`` sampler on the trained times (NFE up to ``generator_steps``)."""
        return "generator", {"times": list(self.times)}

    def to(self, device: torch.device | str) -> "DistributionMatchingMethod":
        model = self.teacher.model
        if isinstance(model, torch.nn.Module):
            model.to(device)
        return self

    # --------------------------------------------------------------------------------------- training
    def generator_model(self, networks: Networks, with_gradient: bool) -> Callable:
        """The generator to call: its training wrapper (one pass with gradient) or the plain module."""
        return networks[self.sampling_role] if with_gradient else networks.module(self.sampling_role)

    def simulated_state(self, networks: Networks, batch: Batch) -> tuple[Tensor, float]:
        """Backward simulation (:mod:`.generator`) for ``batch``: the state ``x_{tau_k}`` of a drawn step ``k``
        (reached without gradient from fresh noise) and ``tau_k``."""
        step = draw_step(self.generator_steps, batch.generator)
        noise = draw_noise(batch.data, None, batch.generator)
        state = simulate_to_step(self.generator_model(networks, False), self.transport, noise, batch.labels,
                                 self.times, step, batch.generator)
        return state, self.times[step]

    def generate(self, networks: Networks, batch: Batch, with_gradient: bool) -> Tensor:
        """Generator samples for ``batch``: ``x_hat_k = G(x_{tau_k}, tau_k)`` at the simulated state, with gradient
        into the generator when ``with_gradient``."""
        state, time = self.simulated_state(networks, batch)
        with torch.set_grad_enabled(with_gradient):
            return generator_step(self.generator_model(networks, with_gradient), self.transport, state, time,
                                  batch.labels)

    def matching_loss(self, x: Tensor, labels: Optional[Tensor], networks: Networks,
                      generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """DMD's distribution-matching loss on generator samples ``x`` (with gradient), times in
        ``matching_time_range``, fake score and teacher without gradient."""
        t = karras_index_times(self.transport.path, x.shape[0], self.matching_time_range, generator, x.dtype,
                               x.device)
        noise = draw_noise(x, None, generator)
        with torch.no_grad():
            samples = x.detach()
            x_t = self.transport.interpolate(samples, noise, t)
            real = self.real_score(x_t, t, labels)
            fake = fake_data_prediction(networks.module("fake_score"), self.transport, x_t, t, labels)
            gradient = distribution_matching_gradient(samples, real, fake)
        return distribution_matching_loss(x, gradient)

    def fake_score_terms(self, networks: Networks, batch: Batch) -> tuple[Tensor, dict]:
        """Per-sample fake-score loss on fresh generator samples (times in ``fake_time_range``) and stats."""
        samples = self.generate(networks, batch, with_gradient=False)
        t = karras_index_times(self.transport.path, samples.shape[0], self.fake_time_range, batch.generator,
                               samples.dtype, samples.device)
        noise = draw_noise(samples, None, batch.generator)
        return fake_score_loss(networks["fake_score"], self.transport, samples, t, noise, batch.labels), {}

    def generator_loss(self, networks: Networks, batch: Batch) -> ObjectiveOutput:
        raise NotImplementedError

    def loss(self, phase: str, networks: Networks, batch: Batch) -> ObjectiveOutput:
        self.teacher.bind(networks)
        if phase == "fake_score":
            per_sample, stats = self.fake_score_terms(networks, batch)
            return ObjectiveOutput(per_sample.mean(), per_sample.detach(), stats)
        if phase == "generator":
            return self.generator_loss(networks, batch)
        raise ValueError(f"{type(self).__name__} has no phase {phase!r}; phases: fake_score, generator")
