"""Sampling a multi-resolution cascade (:mod:`ucgm.methods.discrete.cascade`): one network, lowest resolution
first, each higher level conditioned on the upsampled level below.

Level ``l = 0 .. L - 1`` has the sample shape of the full-resolution noise with every spatial axis divided by
``2^(L - 1 - l)`` (:func:`~ucgm.data.resolution.level_shape`). Level ``l`` runs ``stage(model_l, transport,
noise_l, labels, steps[l], generator)`` — any budgeted sampler, the method's own by default — with
``model_l = model`` at level 0 and ``model_l = model(..., low_res=upsample(sample_{l-1}))`` above. The top level
starts from the given ``noise`` (so sample ``i`` keeps the initial noise ``ucgm sample`` seeds for it); the lower
levels start from noise drawn with ``generator`` (:func:`~ucgm.sampling.noise.normal_noise`; per-sample streams
in ``ucgm sample`` / ``ucgm evaluate``), lowest level first.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

from torch import Tensor

from ..data.resolution import check_pyramid_shape, level_shape, upsample
from ..models.fixed_conditions import WithConditions
from ..transports import Transport
from .noise import NoiseSource, normal_noise
from .result import SampleResult

Stage = Callable[..., SampleResult]


def default_step_fractions(levels: int) -> list[float]:
    """Three quarters of the budget spread evenly over the lower levels, a quarter at the full resolution."""
    if levels == 1:
        return [1.0]
    return [0.75 / (levels - 1)] * (levels - 1) + [0.25]


def split_budget(nfe: int, fractions: Sequence[float]) -> list[int]:
    """``nfe`` calls split over the levels in proportion to ``fractions`` (largest remainders), at least one
    each; ``ValueError`` when ``nfe`` is smaller than the number of levels."""
    levels = len(fractions)
    if nfe < levels:
        raise ValueError(f"nfe={nfe} is below {levels}, one network call per cascade level")
    total = float(sum(fractions))
    spare = nfe - levels
    shares = [spare * fraction / total for fraction in fractions]
    steps = [1 + int(share) for share in shares]
    order = sorted(range(levels), key=lambda level: shares[level] - int(shares[level]), reverse=True)
    for level in order[: nfe - sum(steps)]:
        steps[level] += 1
    return steps


def cascade_levels(model: Callable, transport: Transport, noise: Tensor, labels: Optional[Tensor],
                   steps: Sequence[int], stage: Stage, generator: NoiseSource = None) -> list[SampleResult]:
    """The sample of every level, lowest first (module docstring); ``steps[l]`` is level ``l``'s budget."""
    levels = len(steps)
    check_pyramid_shape(tuple(noise.shape[1:]), levels)
    results, below = [], None
    for level, budget in enumerate(steps):
        shape = level_shape(tuple(noise.shape[1:]), level, levels)
        start = noise if level == levels - 1 else normal_noise((noise.shape[0], *shape), generator, noise.dtype,
                                                               noise.device)
        network = model if below is None else WithConditions(model, low_res=upsample(below, 2).to(noise.dtype))
        result = stage(network, transport, start, labels, budget, generator)
        results.append(result)
        below = result.sample
    return results


def cascade_sample(model: Callable, transport: Transport, noise: Tensor, labels: Optional[Tensor],
                   steps: Sequence[int], stage: Stage, generator: NoiseSource = None) -> SampleResult:
    """The top level's sample; ``nfe`` counts the calls of every level (a low-resolution call is cheaper)."""
    results = cascade_levels(model, transport, noise, labels, steps, stage, generator)
    return SampleResult(results[-1].sample, None, sum(result.nfe for result in results))
