"""Sampling a multi-resolution cascade (:mod:`ucgm.methods.discrete.cascade`): one network, lowest resolution
first, each higher level conditioned on the upsampled level below.

Level ``l = 0 .. L - 1`` has the sample shape of the full-resolution noise with every spatial axis divided by
``2^(L - 1 - l)`` (:func:`~ucgm.data.resolution.level_shape`). Level ``l`` runs ``stage(model_l, transport,
noise_l, labels, steps[l], generator)`` — any budgeted sampler, the method's own by default — with
``model_l = model`` at level 0 and ``model_l = model(..., low_res=upsample(sample_{l-1}))`` above. The top level
starts from the given ``noise`` (so sample ``i`` keeps the initial noise ``ucgm sample`` seeds for it); the lower
levels start from noise drawn with ``generator`` (:func:`~ucgm.sampling.noise.normal_noise`; per-sample streams
in ``ucgm sample`` / ``ucgm evaluate``), lowest level first.

With a refinement start time ``t_r < 1`` every level above 0 starts from the upsampled lower level noised to
``t_r``, ``x_{t_r} = gamma(t_r) upsample(sample_{l-1}) + alpha(t_r) z`` (SDEdit-style), and runs
``refine_stage(budget)``, a stage whose grid starts at ``t_r``: the refinement spends its calls on the detail
the lower level does not fix instead of re-deriving it from pure noise. It is not the exact conditional marginal
at ``t_r`` (that would also hold ``gamma(t_r)`` times the missing detail), so the detail comes out with less
variance; with an exact denoiser the block means of level ``l`` still equal level ``l - 1``.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch
from torch import Tensor

from ..data.resolution import check_pyramid_shape, level_shape, upsample
from ..methods.discrete.cascade import check_refine_time
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
                   steps: Sequence[int], stage: Stage, generator: NoiseSource = None, refine_time: float = 1.0,
                   refine_stage: Optional[Callable[[int], Stage]] = None) -> list[SampleResult]:
    """The sample of every level, lowest first (module docstring); ``steps[l]`` is level ``l``'s budget; with
    ``refine_time < 1`` the levels above 0 start at that time and run ``refine_stage(steps[l])``."""
    levels = len(steps)
    check_pyramid_shape(tuple(noise.shape[1:]), levels)
    refine_time = check_refine_time(refine_time)
    if refine_time < 1 and refine_stage is None:
        raise ValueError(f"refine_time={refine_time} needs a refine_stage whose grid starts at that time")
    time = torch.tensor(refine_time, dtype=torch.float64)
    results, below = [], None
    for level, budget in enumerate(steps):
        shape = level_shape(tuple(noise.shape[1:]), level, levels)
        start = noise if level == levels - 1 else normal_noise((noise.shape[0], *shape), generator, noise.dtype,
                                                               noise.device)
        if below is None:
            result = stage(model, transport, start, labels, budget, generator)
        else:
            condition = upsample(below, 2).to(noise.dtype)
            network = WithConditions(model, low_res=condition)
            if refine_time < 1:
                start = (transport.gamma(time) * condition + transport.alpha(time) * start).to(noise.dtype)
                result = refine_stage(budget)(network, transport, start, labels, budget, generator)
            else:
                result = stage(network, transport, start, labels, budget, generator)
        results.append(result)
        below = result.sample
    return results


def cascade_sample(model: Callable, transport: Transport, noise: Tensor, labels: Optional[Tensor],
                   steps: Sequence[int], stage: Stage, generator: NoiseSource = None, refine_time: float = 1.0,
                   refine_stage: Optional[Callable[[int], Stage]] = None) -> SampleResult:
    """The top level's sample; ``nfe`` counts the calls of every level (a low-resolution call is cheaper)."""
    results = cascade_levels(model, transport, noise, labels, steps, stage, generator, refine_time, refine_stage)
    return SampleResult(results[-1].sample, None, sum(result.nfe for result in results))
