"""A LowDiff-style cascade (Xu et al., arXiv 2509.15342) around any method: one network generates the lowest
resolution and refines every higher one conditioned on the lower one.

LowDiff's public text fixes only the idea (a cascade of increasing resolutions, one unified model, fewer
high-resolution steps, >50 % throughput at equal quality); everything below is ucgm's choice
(``docs/discrete_cascade_search.md``):

* **Pyramid.** ``levels`` resolutions, each half the previous one per spatial axis; level ``l`` of a sample
  ``x`` is ``downsample(x, 2^(levels - 1 - l))`` (block means, :mod:`ucgm.data.resolution`).
* **One network for every level.** The same backbone (it must run at every size: the UNet does) is trained at
  every level; level ``l > 0`` gets the condition ``low_res = upsample(x_{l-1})`` (nearest neighbour, the
  exact right inverse of the block mean, so the condition holds the lower level losslessly); level 0 gets no
  condition (zeros). The network tells the levels apart by that condition and by the input size.
* **Training.** Each training step picks one level for the whole batch, level ``l`` with probability
  ``level_weights[l] / sum(level_weights)`` (default equal), from the step's seeded generator, and runs the
  inner method's loss on the batch at that level: one forward and backward per step whatever the method. A
  step at level ``l`` costs about its pixel share of a full-resolution step, so a cascade step costs
  :func:`training_cost_fraction` of one (equal compute: ``steps / training_cost_fraction`` cascade steps).
* **Sampling** (:func:`ucgm.sampling.cascade_sampler.cascade_sample`, registry name ``cascade``): each level is
  sampled with the inner method's own sampler; a budget of ``n`` network calls is split over the levels by
  ``step_fractions`` (default :func:`~ucgm.sampling.cascade_sampler.default_step_fractions`: three quarters at
  the lower levels), level ``l > 0`` conditioned on the
  upsampled sample of level ``l - 1`` and started from fresh noise, or with ``refine_time`` ``t_r < 1`` from
  that upsampled sample noised to ``t_r`` (its calls then spent on ``[0, t_r]``).
"""

from __future__ import annotations

from typing import Callable, Mapping, Optional, Sequence

import torch
from torch import Tensor

from ...data.resolution import downsample, upsample
from ...models.fixed_conditions import accepts_condition, tile_rows
from ...transports import Transport
from ..base import Batch, Method, NetworkSpec, Networks, ObjectiveOutput
from .wrapper import MethodWrapper, TransportView, with_condition

CONDITION = "low_res"
CASCADE_OPTIONS = ("levels", "level_weights", "step_fractions", "refine_time")


def _check_weights(name: str, values: Sequence, levels: int) -> list[float]:
    if not isinstance(values, (list, tuple)) or len(values) != levels or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0 for v in values) or sum(values) <= 0:
        raise ValueError(f"cascade.{name}={values!r} must be {levels} non-negative numbers (one per level), not all 0")
    return [float(v) for v in values]


def check_refine_time(refine_time: float) -> float:
    """A cascade's refinement start time as a float in (0, 1]; ``ValueError`` otherwise."""
    if isinstance(refine_time, bool) or not isinstance(refine_time, (int, float)) or not 0 < refine_time <= 1:
        raise ValueError(f"refine_time={refine_time!r} must be a number in (0, 1] (1: refine from pure noise)")
    return float(refine_time)


class FixedConditionsTransport(TransportView):
    """The transport a cascade's inner method calls its networks through: the conditions in :attr:`fixed`
    (``low_res`` of the current level, or none) are added to every call of a network that accepts them, tiled
    to calls on concatenated copies of the batch."""

    def __init__(self, base: Transport):
        super().__init__(base)
        self.fixed: dict[str, Tensor] = {}

    def network_output(self, model: Callable, x_t: Tensor, t: Tensor, labels: Optional[Tensor] = None,
                       **conditions: Optional[Tensor]) -> Tensor:
        added = {name: tile_rows(value, x_t.shape[0]) for name, value in self.fixed.items()
                 if name not in conditions and accepts_condition(model, name)}
        return self.base.network_output(model, x_t, t, labels, **conditions, **added)


class Cascade(MethodWrapper):
    """Any method as a multi-resolution cascade (module docstring), built by
    :func:`ucgm.methods.discrete.wrapped_method`."""

    def __init__(self, inner: Method, conditioning: FixedConditionsTransport, levels: int = 2,
                 level_weights: Optional[Sequence[float]] = None, step_fractions: Optional[Sequence[float]] = None,
                 refine_time: float = 1.0):
        super().__init__(inner)
        if isinstance(levels, bool) or not isinstance(levels, int) or levels < 2:
            raise ValueError(f"cascade.levels={levels!r} must be an integer >= 2")
        self.conditioning = conditioning
        self.levels = levels
        self.level_weights = _check_weights("level_weights", level_weights or [1.0] * levels, levels)
        self.step_fractions = None if step_fractions is None else _check_weights("step_fractions", step_fractions,
                                                                                  levels)
        self.refine_time = check_refine_time(refine_time)

    def networks(self) -> dict[str, NetworkSpec]:
        return with_condition(self.inner.networks(), CONDITION)

    def choose_level(self, generator: torch.Generator) -> int:
        """The level of a training step, drawn from the step's generator."""
        weights = torch.tensor(self.level_weights, dtype=torch.float64)
        return int(torch.multinomial(weights / weights.sum(), 1, generator=generator))

    def level_batch(self, batch: Batch, level: int) -> tuple[Batch, Optional[Tensor]]:
        """The batch at ``level`` and its ``low_res`` condition (``None`` at level 0)."""
        data = batch.data
        if data.ndim not in (3, 4):
            raise ValueError(f"a cascade needs signals (C, L) or images (C, H, W); the data has shape "
                             f"{tuple(data.shape[1:])}")
        at_level = downsample(data, 2 ** (self.levels - 1 - level))
        condition = None if level == 0 else upsample(downsample(at_level, 2), 2)
        return batch._replace(data=at_level), condition

    def loss(self, phase: str, networks: Networks, batch: Batch) -> ObjectiveOutput:
        level = self.choose_level(batch.generator)
        level_batch, condition = self.level_batch(batch, level)
        self.conditioning.fixed = {} if condition is None else {CONDITION: condition}
        try:
            output = self.inner.loss(phase, networks, level_batch)
        finally:
            self.conditioning.fixed = {}
        return output._replace(stats={**output.stats, "cascade_level": float(level)})

    def sampler(self) -> tuple[str, dict]:
        name, settings = self.inner.sampler()
        fractions = {} if self.step_fractions is None else {"step_fractions": list(self.step_fractions)}
        refine = {} if self.refine_time == 1 else {"refine_time": self.refine_time}
        return "cascade", {"levels": self.levels, **fractions, "stage_sampler": name, "stage_settings": dict(settings),
                           **refine}


def training_cost_fraction(level_weights: Sequence[float], spatial_axes: int = 2,
                           level_costs: Optional[Sequence[float]] = None) -> float:
    """The expected cost of one cascade training step relative to one step at the full resolution,
    ``sum_l p_l c_l`` with ``p_l = w_l / sum(w)`` the odds of level ``l`` (:meth:`Cascade.choose_level`) and
    ``c_l`` its cost relative to the top level: given as ``level_costs`` (e.g. measured seconds per step, the top
    level last), else its pixel count ``c_l = 2^(-spatial_axes (L - 1 - l))`` (a convolutional network's compute
    scales with the pixels). ``steps / training_cost_fraction(...)`` cascade steps cost what ``steps``
    full-resolution steps cost."""
    levels = len(level_weights)
    weights = _check_weights("level_weights", level_weights, levels)
    if level_costs is None:
        if isinstance(spatial_axes, bool) or spatial_axes not in (1, 2):
            raise ValueError(f"spatial_axes={spatial_axes!r} must be 1 (signals) or 2 (images)")
        costs = [2.0 ** (-spatial_axes * (levels - 1 - level)) for level in range(levels)]
    else:
        costs = _check_weights("level_costs", level_costs, levels)
    return sum(weight * cost for weight, cost in zip(weights, costs)) / sum(weights)


def check_cascade_options(options: Mapping) -> dict:
    """The ``cascade`` option ``{levels, level_weights, step_fractions, refine_time}`` as keyword arguments of
    :class:`Cascade` (clear errors for anything else)."""
    if not isinstance(options, Mapping):
        raise ValueError(f"cascade={options!r} must be a mapping such as {{levels: 2}}")
    unknown = sorted(set(options) - set(CASCADE_OPTIONS))
    if unknown:
        raise ValueError(f"unknown cascade option(s) {unknown}; allowed: {', '.join(CASCADE_OPTIONS)}")
    return dict(options)
