"""DMD2 (Yin, Gharbi, Park, Zhang, Shechtman, Durand, Freeman; NeurIPS 2024): distribution matching with a
two-time-scale update rule, a diffusion GAN on the fake score's bottleneck, and multi-step generators trained by
backward simulation. Verified against ``tianweiy/DMD2`` (8d8fa55), ``main/edm/edm_guidance.py`` and
``train_edm.py``; see ``docs/distribution_matching.md``.

Per training step (``update_ratio`` r):

1. r times, the **guidance update** (networks ``fake_score``, which carries the GAN's classifier head): on fresh
   generator samples ``x`` (no gradient) ``L = L_fake + gan_discriminator_weight * mean(softplus(l(x_t)) +
   softplus(-l(data_t)))`` — the fake-score loss at levels ``i ~ U{0..999}`` of the Karras grid
   (``fake_time_range`` (0, 1)) and the discriminator loss on noised data and samples (``gan_time_range`` (0, 1));
   fake-score loss and both logits come from one pass of the fake network;
2. once, the **generator update**: ``L = L_DM(x) + gan_generator_weight * mean(softplus(-l(x_t)))`` with the
   distribution-matching loss at ``i ~ U{20..980}`` (``matching_time_range`` (0.02, 0.98)).

Official defaults (ImageNet-64, the smallest official setting): r = 5 (``dfake_gen_update_ratio``), GAN weights
3e-3 (generator) and 1e-2 (discriminator), AdamW lr 2e-6 for both, betas (0.9, 0.999), weight decay 0.01, gradient
clipping at norm 10, no real-score guidance (``real_guidance_scale`` 1; SD1.5 1.75, SDXL 8), one step (SDXL: 4 with
backward simulation). Deviations: the fake-score phases run before the generator phase (official: generator first
in each cycle of r iterations, which only moves the first generator update); the fake network's encoder pass of the
GAN is a full forward pass; the classifier head is ucgm's size-agnostic head (:mod:`ucgm.models.bottleneck`); the
fake-score loss is the run transport's regression (:mod:`.scores`); one-step generation starts at ``t = 1``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from torch import Tensor

from ...transports import Transport
from ...validation import check_range
from ..base import Batch, Networks, ObjectiveOutput, draw_noise
from .base import FULL_TIME_RANGE, DistributionMatchingMethod, GeneratorOptions
from .gan import concatenate_labels, discriminator_loss, generator_gan_loss, network_output_and_logits
from .scores import per_sample_mean
from .times import check_fraction_range, karras_index_times

DMD2_UPDATE_RATIO = 5
DMD2_GAN_GENERATOR_WEIGHT = 3e-3
DMD2_GAN_DISCRIMINATOR_WEIGHT = 1e-2


@dataclass(frozen=True)
class DMD2Options(GeneratorOptions):
    """DMD2's options: the shared ones (:class:`~.base.MatchingOptions`) with DMD2's update ratio, and the GAN."""

    update_ratio: int = DMD2_UPDATE_RATIO
    gan: bool = True
    gan_generator_weight: float = DMD2_GAN_GENERATOR_WEIGHT
    gan_discriminator_weight: float = DMD2_GAN_DISCRIMINATOR_WEIGHT
    gan_time_range: Sequence[float] = FULL_TIME_RANGE


class DMD2(DistributionMatchingMethod):
    """DMD2; ``gan=False`` drops the classifier head and both GAN terms (DMD2's "w/o GAN" rows)."""

    options_type = DMD2Options

    def __init__(self, transport: Transport | str = "linear", **options):
        super().__init__(transport, **options)
        gan = self.options.gan
        if not isinstance(gan, bool):
            raise ValueError(f"gan={gan!r} must be true or false")
        check_range("gan_generator_weight", self.options.gan_generator_weight, 0.0, float("inf"))
        check_range("gan_discriminator_weight", self.options.gan_discriminator_weight, 0.0, float("inf"))
        self.uses_classifier_head = gan
        self.gan_generator_weight = float(self.options.gan_generator_weight)
        self.gan_discriminator_weight = float(self.options.gan_discriminator_weight)
        self.gan_time_range = check_fraction_range("gan_time_range", self.options.gan_time_range)

    def _noised(self, samples: Tensor, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """``(x_t, t)`` of samples noised at a GAN level with independent noise."""
        t = karras_index_times(self.transport.path, samples.shape[0], self.gan_time_range, generator, samples.dtype,
                               samples.device)
        return self.transport.interpolate(samples, draw_noise(samples, None, generator), t), t

    def fake_score_terms(self, networks: Networks, batch: Batch) -> tuple[Tensor, dict]:
        if not self.uses_classifier_head:
            return super().fake_score_terms(networks, batch)
        samples = self.generate(networks, batch, with_gradient=False)
        size = samples.shape[0]
        t = karras_index_times(self.transport.path, size, self.fake_time_range, batch.generator, samples.dtype,
                               samples.device)
        noise = draw_noise(samples, None, batch.generator)
        real_t, real_times = self._noised(batch.data, batch.generator)
        fake_t, fake_times = self._noised(samples, batch.generator)
        inputs = torch.cat([self.transport.interpolate(samples, noise, t), real_t, fake_t])
        times = torch.cat([t, real_times, fake_times])
        labels = concatenate_labels(batch.labels, batch.labels, batch.labels)
        output, logits = network_output_and_logits(networks["fake_score"], networks.module("fake_score"),
                                                   self.transport, inputs, times, labels)
        target = self.transport.target(samples, noise, t)
        fake_loss = per_sample_mean((output[:size] - target) ** 2)
        real_logits, fake_logits = logits[size:2 * size], logits[2 * size:]
        per_sample = fake_loss + self.gan_discriminator_weight * discriminator_loss(real_logits, fake_logits)
        stats = {"gan_real_logit": real_logits.detach().mean(), "gan_fake_logit": fake_logits.detach().mean()}
        return per_sample, stats

    def gan_generator_term(self, x: Tensor, labels: Optional[Tensor], networks: Networks,
                           generator: torch.Generator) -> Tensor:
        """Per-sample ``softplus(-l(x_t))`` through the frozen fake network (0 without the GAN)."""
        if not self.uses_classifier_head:
            return torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)
        fake_t, times = self._noised(x, generator)
        fake = networks.module("fake_score")
        return generator_gan_loss(network_output_and_logits(fake, fake, self.transport, fake_t, times, labels)[1])

    def generator_loss(self, networks: Networks, batch: Batch) -> ObjectiveOutput:
        x = self.generate(networks, batch, with_gradient=True)
        return self.dmd2_generator_output(x, batch.labels, networks, batch.generator)

    def dmd2_generator_output(self, x: Tensor, labels: Optional[Tensor], networks: Networks,
                              generator: torch.Generator) -> ObjectiveOutput:
        """``L_DM + gan_generator_weight * L_GAN`` on generator samples ``x``."""
        matching, matching_per_sample = self.matching_loss(x, labels, networks, generator)
        gan = self.gan_generator_term(x, labels, networks, generator)
        loss = matching + self.gan_generator_weight * gan.mean()
        return ObjectiveOutput(loss, matching_per_sample + self.gan_generator_weight * gan.detach(),
                               {"gan_generator_loss": gan.detach().mean()})
