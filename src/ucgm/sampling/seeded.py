"""Sampling a trained network with the configured sampler, with per-sample seeded initial noise.

The initial noise of sample ``i`` comes from a generator seeded by ``(seed, i)`` and its label is
``labels[i % len(labels)]`` (``i % num_classes`` by default), so samplers give the same samples whatever
the batch size or the split over processes: the fresh noise of stochastic samplers (UCGM-S with stochasticity > 0,
EDM churn, consistency re-noising) comes from a per-sample stream too (:class:`~ucgm.sampling.noise.PerSampleNoise`
seeded by ``(seed, i)``, independent of the initial noise).

Samples that hold NaN or Inf are never returned: :class:`NonFiniteSamples` names the sampler and its settings.
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Optional, Sequence

import torch
from torch import Tensor, nn

from .guidance import ClassifierFreeGuidance
from .noise import PerSampleNoise
from .registry import get_sampler
from .schedules import read_schedule
from ..transports import Transport
from .settings import SamplingConfig
from ..seeding import SAMPLE_STREAM, derive_seed, seeded_generator
from ..validation import nonfinite_rows

_FRESH_NOISE = 1


class Samples(NamedTuple):
    """Samples in model space ``(N, *shape)``, their labels ``(N,)`` or ``None``, and network calls per batch."""

    samples: Tensor
    labels: Optional[Tensor]
    nfe: int


class NonFiniteSamples(ValueError):
    """A sampler produced NaN or Inf values."""


def check_finite_samples(samples: Tensor, sampler: str, offset: int = 0) -> None:
    """Raise :class:`NonFiniteSamples` naming ``sampler`` (its name and settings) and the first bad sample
    (``offset`` is the index of ``samples[0]``)."""
    if samples.is_floating_point() and not torch.isfinite(samples).all():
        rows = nonfinite_rows(samples)
        raise NonFiniteSamples(
            f"{sampler} produced NaN or Inf values in {rows.numel()} of {samples.shape[0]} samples (first: sample "
            f"{offset + int(rows[0])}); nothing was written. Sample with the run's own sampler (the default), other "
            f"settings (e.g. an ODE grid starting below t = 1: t_max=0.999) or a smaller cfg_scale")


def describe_sampler(name: str, options: dict, nfe: int, cfg_scale: Optional[float] = None) -> str:
    """``sampler 'euler' (nfe=4, t_max=1.0)``: a sampler and its settings, for messages."""
    settings = {"nfe": nfe, **options, **({"cfg_scale": cfg_scale} if cfg_scale is not None else {})}
    return f"sampler {name!r} ({', '.join(f'{key}={value!r}' for key, value in settings.items())})"


def initial_noise(seed: int, indices: range, shape: Sequence[int], device: torch.device) -> Tensor:
    """``(len(indices), *shape)`` standard normal noise; row ``k`` is drawn from generator ``(seed, indices[k])``."""
    rows = [torch.randn(tuple(shape), generator=seeded_generator(seed, SAMPLE_STREAM, index))
            for index in indices]
    return torch.stack(rows).to(device)


def fresh_noise_source(seed: int, indices: range) -> PerSampleNoise:
    """The per-sample streams of the noise a stochastic sampler draws for samples ``indices`` (independent of
    their initial noise)."""
    return PerSampleNoise(derive_seed(seed, _FRESH_NOISE), indices, SAMPLE_STREAM)


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


#: The sampling-config settings each registered sampler takes (guidance is applied by wrapping the model).
UCGM_SAMPLING_SETTINGS = ("stochasticity", "extrapolation", "time_warp", "gaps", "time_difference")
UCGM_FAMILY = ("ucgm", "ucgm-o2", "ucgm-official", "ucgm-o2-official")


def resolve_sampler(settings: SamplingConfig, method_sampler: tuple[str, dict] = ("ucgm", {})) -> tuple[str, dict]:
    """The registry sampler and its settings: ``settings.sampler``, or the method's own (``method_sampler``,
    from :meth:`ucgm.methods.base.Method.sampler`) when it is ``None``; the method's settings apply whenever its
    sampler is chosen, and UCGM-S also takes the section's stochasticity, extrapolation, warp, gaps and
    time_difference (those left ``None`` keep the sampler's own defaults). A
    ``settings.schedule`` file (:mod:`ucgm.sampling.schedules`) names the sampler and all its settings instead."""
    if settings.schedule is not None:
        schedule = read_schedule(settings.schedule)
        return schedule.sampler, schedule.sampler_settings()
    method_name, method_options = method_sampler
    name = settings.sampler or method_name
    options = dict(method_options) if name == method_name else {}
    if name in UCGM_FAMILY:
        chosen = {key: getattr(settings, key) for key in UCGM_SAMPLING_SETTINGS}
        options.update({key: tuple(value) if isinstance(value, list) else value for key, value in chosen.items()
                        if value is not None})
    return name, options


@torch.no_grad()
def generate_samples(model: nn.Module, transport: Transport, settings: SamplingConfig, shape: Sequence[int],
                     num_classes: int, device: torch.device, method_sampler: tuple[str, dict] = ("ucgm", {}),
                     on_batch: Optional[Callable[[int], None]] = None) -> Samples:
    """Draw ``settings.num`` samples in batches of ``settings.batch_size`` with :func:`resolve_sampler`'s sampler;
    ``on_batch(count)`` is called after each batch of ``count`` samples (progress).

    Classifier-free guidance wraps the model when ``settings.cfg_scale`` is set and the model is conditional.
    """
    indices = range(settings.num)
    all_labels = sample_labels(settings.num, num_classes, settings.labels)
    network: Callable = model
    guided = settings.cfg_scale is not None and bool(num_classes)
    if guided:
        network = ClassifierFreeGuidance(model, settings.cfg_scale, settings.cfg_interval)
    name, options = resolve_sampler(settings, method_sampler)
    sampler = get_sampler(name, options)
    description = describe_sampler(name, options, settings.nfe, settings.cfg_scale if guided else None)
    outputs, nfe = [], 0
    for start in range(indices.start, indices.stop, settings.batch_size):
        batch = range(start, min(start + settings.batch_size, indices.stop))
        noise = initial_noise(settings.seed, batch, shape, device)
        labels = None if all_labels is None else all_labels[batch.start:batch.stop].to(device)
        result = sampler(network, transport, noise, labels, settings.nfe, fresh_noise_source(settings.seed, batch))
        check_finite_samples(result.sample, description, batch.start)
        outputs.append(result.sample.float().cpu())
        nfe = result.nfe
        if on_batch is not None:
            on_batch(len(batch))
    return Samples(torch.cat(outputs), all_labels, nfe)
