"""Sampling a trained network with the configured sampler, with per-sample seeded initial noise.

The initial noise of sample ``i`` comes from a generator seeded by ``(seed, i)`` and its label is
``labels[i % len(labels)]`` (``i % num_classes`` by default), so deterministic samplers give the same samples
whatever the batch size or the split over processes. Stochastic samplers (UCGM-S with stochasticity > 0, EDM)
draw their fresh noise from one generator per batch, seeded by ``(seed, index of the batch's first sample)``.
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Optional, Sequence

import torch
from torch import Tensor, nn

from ..sampling.guidance import ClassifierFreeGuidance
from ..sampling.solvers import dpm_solver_pp_2m_sample, edm_stochastic_sample, euler_sample, heun_sample
from ..sampling.ucgm_sampler import ucgm_sample
from ..transports import Transport
from .schema import SamplingConfig
from .seeding import SAMPLE_STREAM, derive_seed, seeded_generator

#: Solver functions by ``sampling.sampler`` name (UCGM-S takes the extra UCGM settings).
SOLVERS: dict[str, Callable] = {
    "euler": euler_sample,
    "heun": heun_sample,
    "dpm++2m": dpm_solver_pp_2m_sample,
    "edm": edm_stochastic_sample,
}
_FRESH_NOISE = 1


class Samples(NamedTuple):
    """Samples in model space ``(N, *shape)``, their labels ``(N,)`` or ``None``, and network calls per batch."""

    samples: Tensor
    labels: Optional[Tensor]
    nfe: int


def steps_for_nfe(sampler: str, nfe: int, order: int = 1) -> int:
    """The ``steps`` setting that spends about ``nfe`` network calls per sample (never more).

    UCGM-S order 1, Euler and DPM-Solver++(2M) make one call per step; Heun and EDM make ``2 steps - 1``;
    UCGM-S order 2 with ``steps`` makes ``2 ceil(steps / 2) - 1`` (with a non-zero end gap).
    """
    if nfe < 1:
        raise ValueError(f"nfe={nfe} must be >= 1")
    if sampler in ("heun", "edm"):
        return (nfe + 1) // 2
    if sampler == "ucgm" and order == 2:
        return nfe if nfe % 2 else max(1, nfe - 1)
    return nfe


def initial_noise(seed: int, indices: range, shape: Sequence[int], device: torch.device) -> Tensor:
    """``(len(indices), *shape)`` standard normal noise; row ``k`` is drawn from generator ``(seed, indices[k])``."""
    rows = [torch.randn(tuple(shape), generator=seeded_generator(seed, SAMPLE_STREAM, index))
            for index in indices]
    return torch.stack(rows).to(device)


def sample_labels(num: int, num_classes: int, labels: Optional[Sequence[int]] = None) -> Optional[Tensor]:
    """Labels of samples ``0 .. num - 1``: ``labels`` cycled, or ``i % num_classes``; ``None`` if unconditional."""
    if not num_classes:
        if labels:
            raise ValueError("labels were given but the model is unconditional (num_classes = 0)")
        return None
    chosen = list(labels) if labels else list(range(num_classes))
    bad = [label for label in chosen if not 0 <= label <= num_classes]
    if bad:
        raise ValueError(f"labels {bad} are outside [0, {num_classes}] ({num_classes} = unconditional)")
    return torch.tensor([chosen[i % len(chosen)] for i in range(num)], dtype=torch.long)


def _sampler_call(settings: SamplingConfig, model: Callable, transport: Transport, noise: Tensor,
                  labels: Optional[Tensor], generator: torch.Generator):
    if settings.sampler == "ucgm":
        return ucgm_sample(model, transport, noise, labels, steps=settings.steps,
                           stochasticity=settings.stochasticity, extrapolation=settings.extrapolation,
                           order=settings.order, time_warp=tuple(settings.time_warp), gaps=tuple(settings.gaps),
                           generator=generator)
    solver = SOLVERS[settings.sampler]
    if settings.sampler == "edm":
        return solver(model, transport, noise, labels, steps=settings.steps, generator=generator)
    return solver(model, transport, noise, labels, steps=settings.steps)


@torch.no_grad()
def generate_samples(model: nn.Module, transport: Transport, settings: SamplingConfig, shape: Sequence[int],
                     num_classes: int, device: torch.device) -> Samples:
    """Draw ``settings.num`` samples in batches of ``settings.batch_size``.

    Classifier-free guidance wraps the model when ``settings.cfg_scale`` is set and the model is conditional.
    """
    indices = range(settings.num)
    all_labels = sample_labels(settings.num, num_classes, settings.labels)
    network: Callable = model
    if settings.cfg_scale is not None and num_classes:
        network = ClassifierFreeGuidance(model, settings.cfg_scale, settings.cfg_interval)
    outputs, nfe = [], 0
    for start in range(indices.start, indices.stop, settings.batch_size):
        batch = range(start, min(start + settings.batch_size, indices.stop))
        noise = initial_noise(settings.seed, batch, shape, device)
        labels = None if all_labels is None else all_labels[batch.start:batch.stop].to(device)
        generator = seeded_generator(derive_seed(settings.seed, _FRESH_NOISE), SAMPLE_STREAM, start)
        result = _sampler_call(settings, network, transport, noise, labels, generator)
        outputs.append(result.sample.float().cpu())
        nfe = result.nfe
    return Samples(torch.cat(outputs), all_labels, nfe)
