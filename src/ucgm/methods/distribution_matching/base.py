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

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence, Union

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


@dataclass(frozen=True)
class MatchingOptions:
    """The options every distribution-matching method takes (``objective.KEY``); a method's options class adds its
    own and sets its official defaults. ``fake_score_ema``: ``None`` (the official methods) reads the trained fake
    score in the generator's loss; a decay ``d`` keeps an EMA of the fake score (``ema <- d ema + (1 - d) theta``
    after every fake-score update) and reads that instead (a deviation, see ``docs/distribution_matching.md``).
    ``matching_noise_draws`` ``m``: noise draws of ``x_t`` per sample (at its one level) in the matching gradient,
    their normaliser pooled (1: the official methods; more: for data of few features, where one draw's normaliser is
    heavy-tailed)."""

    teacher: Any = None
    teacher_transport: Optional[Union[Transport, str]] = None
    real_guidance_scale: float = 1.0
    update_ratio: int = 1
    fake_score_init: str = "auto"
    fake_score_model: Optional[dict] = None
    matching_time_range: Sequence[float] = MATCHING_TIME_RANGE
    fake_time_range: Sequence[float] = FULL_TIME_RANGE
    null_label: Optional[int] = None
    fake_score_ema: Optional[float] = None
    matching_noise_draws: int = 1


@dataclass(frozen=True)
class GeneratorOptions(MatchingOptions):
    """The options of a few-step generator method: ``generator_steps`` (backward simulation, :mod:`.generator`)."""

    generator_steps: int = 1


def option_names(options_type: type) -> list[str]:
    """The config keys of an options dataclass."""
    return [field.name for field in dataclasses.fields(options_type)]


class DistributionMatchingMethod(Method):
    """The shared machinery; subclasses name their options class (:attr:`options_type`) and implement
    :meth:`generator_loss` (and may extend the fake-score loss). Constructed as ``Method(transport, **options)``."""

    family = "distribution_matching"
    default_sampler = "generator"
    sampling_role = "generator"
    #: Whether the fake score network carries a classifier head (DMD2's GAN).
    uses_classifier_head = False
    #: The options dataclass: its fields are the method's config keys (:func:`ucgm.methods.registry.method_options`).
    options_type: type = GeneratorOptions

    def __init__(self, transport: Transport | str = "linear", **options):
        unknown = sorted(set(options) - set(option_names(self.options_type)))
        if unknown:
            raise ValueError(f"unknown option(s) {unknown} for {type(self).__name__}; allowed: "
                             f"{', '.join(option_names(self.options_type))}")
        self.options = options = self.options_type(**options)
        self.transport = make_transport(transport) if isinstance(transport, str) else transport
        generator_steps = getattr(options, "generator_steps", 1)
        check_positive_int("generator_steps", generator_steps)
        check_positive_int("update_ratio", options.update_ratio)
        check_positive_int("matching_noise_draws", options.matching_noise_draws)
        check_choice("fake_score_init", options.fake_score_init, FAKE_SCORE_INITS)
        if options.fake_score_model is not None and not isinstance(options.fake_score_model, dict):
            raise ValueError(f"fake_score_model={options.fake_score_model!r} must be a mapping of model options or null")
        if options.fake_score_ema is not None and not (isinstance(options.fake_score_ema, float)
                                                       and 0.0 <= options.fake_score_ema < 1.0):
            raise ValueError(f"fake_score_ema={options.fake_score_ema!r} must be null or an EMA decay in [0, 1)")
        self.teacher = Teacher(options.teacher, options.teacher_transport, self.transport)
        if options.fake_score_init == "teacher" and self.teacher.checkpoint is None:
            raise ValueError("fake_score_init='teacher' needs a 'checkpoint:PATH' teacher (the oracle has no weights); "
                             "use 'scratch' or 'auto'")
        if options.fake_score_init == "teacher" and options.fake_score_model:
            raise ValueError("fake_score_model applies to a fake score built from scratch; with "
                             "fake_score_init='teacher' the fake score is the teacher's backbone")
        self.fake_score_init = ("teacher" if self.teacher.checkpoint else "scratch") \
            if options.fake_score_init == "auto" else options.fake_score_init
        self.real_score = RealScore(self.teacher, self.transport.path, options.real_guidance_scale,
                                    options.null_label)
        self.generator_steps = generator_steps
        self.times = generator_times(generator_steps)
        self.update_ratio = options.update_ratio
        self.fake_score_model = dict(options.fake_score_model or {})
        self.matching_time_range = check_fraction_range("matching_time_range", options.matching_time_range)
        self.fake_time_range = check_fraction_range("fake_time_range", options.fake_time_range)
        self.fake_score_ema = options.fake_score_ema
        self.matching_noise_draws = options.matching_noise_draws

    # ------------------------------------------------------------------------------------ declaration
    def fake_score_spec(self) -> NetworkSpec:
        head = {"classifier_head": True} if self.uses_classifier_head else {}
        ema = {"kind": "none"} if self.fake_score_ema is None else {"kind": "constant", "decay": self.fake_score_ema}
        if self.fake_score_init == "teacher":
            return NetworkSpec(init=self.teacher.checkpoint, model=head or None, ema=ema)
        return NetworkSpec(model={**self.fake_score_model, **head} or None, ema=ema)

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
    def matching_fake_score(self, networks: Networks) -> Callable:
        """The fake score the generator's loss reads: the trained network, or its EMA with ``fake_score_ema``."""
        if self.fake_score_ema is None:
            return networks.module("fake_score")
        ema = networks.ema("fake_score")
        if ema is None:
            raise ValueError("fake_score_ema is set but the fake score keeps no EMA: leave networks.fake_score.ema "
                             "unset (the method sets it)")
        return ema

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
        """DMD's distribution-matching loss on generator samples ``x`` (with gradient), one time per sample in
        ``matching_time_range`` and ``matching_noise_draws`` noise draws at it, fake score and teacher without
        gradient."""
        draws = self.matching_noise_draws
        t = karras_index_times(self.transport.path, x.shape[0], self.matching_time_range, generator, x.dtype,
                               x.device)
        with torch.no_grad():
            samples = x.detach()
            repeated = samples.repeat(draws, *([1] * (x.dim() - 1)))
            times = t.repeat(draws)
            noise = draw_noise(repeated, None, generator)
            x_t = self.transport.interpolate(repeated, noise, times)
            drawn_labels = None if labels is None else labels.repeat(draws)
            real = self.real_score(x_t, times, drawn_labels)
            fake = fake_data_prediction(self.matching_fake_score(networks), self.transport, x_t, times, drawn_labels)
            gradient = distribution_matching_gradient(samples, real.reshape(draws, *x.shape),
                                                      fake.reshape(draws, *x.shape))
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
