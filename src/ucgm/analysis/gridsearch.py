"""Searches for better sampling grids at a fixed NFE, judged on held-out samples.

Two searches, both run by the seeded evolutionary search of :mod:`ucgm.analysis.evolution` (the engine of the
AutoDiffusion search of :mod:`ucgm.analysis.autodiffusion` too); the fitness is
a metric (lower is better) of the samples drawn from the *search* noise, and the answer is scored once more on
*held-out* noise (and, through its metric, held-out reference samples) next to the default; random candidates
(the refill of every generation) are drawn like the random seeds:

* :func:`evolve_time_grid` (AutoDiffusion-style, Li et al. 2023): the grid ``t_max = t_0 > t_1 > ... > t_{N-1} >
  t_N = 0`` of Euler, Heun or DPM-Solver++(2M) with its ``N - 1`` inner times free. Mutation changes one inner
  time ``t_i`` inside ``(t_{i+1}, t_{i-1})`` (kept a fraction ``MIN_GAP_FRACTION`` of that interval away from
  both ends): half of the time it is redrawn uniformly, otherwise moved by ``N(0, (mutation_scale * width)^2)``
  and clamped. Crossover takes each inner time from either parent and sorts the result (a child with a
  repeated time is replaced by the first parent). The uniform grid and random sorted grids seed the search.
* :func:`search_kumaraswamy`: UCGM-S's warp ``K(u) = (1 - (1 - u^a)^b)^c`` parameters ``(a, b, c)`` and, when
  asked, the extrapolation ``kappa``. Each parameter lives in a box, mapped to ``[0, 1]`` (``log`` scale for the
  warp); mutation adds ``N(0, mutation_scale^2)`` to every mapped coordinate and clamps, crossover takes each
  coordinate from either parent. The default settings and random points of the box seed the search.

Both return ``{"best", "times", "search_value", "default_search_value", "heldout_value",
"default_heldout_value", "gain", "relative_gain", "nfe", "actual_nfe"}`` with
``gain = default_heldout_value - heldout_value`` (positive: the searched grid is better on held-out samples)
and ``relative_gain = gain / default_heldout_value``.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Callable, Mapping, Optional, Sequence

import torch
from torch import Tensor

from ..sampling.result import SampleResult
from ..sampling.solvers import dpm_solver_pp_2m_sample, euler_sample, heun_sample
from ..timegrids import kumaraswamy_grid, uniform_grid
from ..transports import Transport
from ..validation import check_positive_int
from .evolution import Candidate, EvolutionSettings, evolve
from ..sampling.registry import (DEFAULT_GAPS, UCGM_SAMPLERS, get_sampler, two_call_intervals, ucgm_intervals,
                                 ucgm_settings)
from ..sampling.seeded import fresh_noise_source

#: The search settings used when none are given.
DEFAULT_EVOLUTION = EvolutionSettings()
#: Smallest distance of a mutated time from its neighbours, as a fraction of the interval between them.
MIN_GAP_FRACTION = 0.01


@dataclass(frozen=True)
class EvaluationSet:
    """The noise (and labels) to sample from and the metric of the samples (lower is better; it holds its own
    reference samples)."""

    noise: Tensor
    metric: Callable[[Tensor], float]
    labels: Optional[Tensor] = None

    def score(self, draw: Callable[[Tensor, Optional[Tensor]], SampleResult]) -> tuple[float, int]:
        """``(metric(sample), nfe)`` of ``draw(noise, labels)``, run without gradients."""
        with torch.no_grad():
            result = draw(self.noise, self.labels)
        return float(self.metric(result.sample)), result.nfe


def check_distinct_sets(search: EvaluationSet, heldout: EvaluationSet) -> None:
    """Raise when the held-out noise is the search noise (a search must not be judged on what it was tuned on)."""
    if search.noise.shape == heldout.noise.shape and torch.equal(search.noise, heldout.noise):
        raise ValueError("heldout.noise equals search.noise; draw the held-out noise with another seed")


def _report(best, times: Tensor, search_value: float, default_search: tuple[float, int],
            heldout: tuple[float, int], default_heldout: tuple[float, int], nfe: int) -> dict:
    gain = default_heldout[0] - heldout[0]
    return {
        "best": best, "times": times.tolist(), "search_value": search_value, "default_search_value": default_search[0],
        "heldout_value": heldout[0], "default_heldout_value": default_heldout[0], "gain": gain,
        "relative_gain": gain / default_heldout[0] if default_heldout[0] != 0 else math.inf,
        "nfe": nfe, "actual_nfe": heldout[1],
    }


# ------------------------------------------------------------------------------------------- time grids
#: Samplers whose time grid :func:`evolve_time_grid` searches: solver and intervals for a budget.
GRID_SAMPLERS: dict[str, tuple[Callable[..., SampleResult], Callable[[int], int]]] = {
    "euler": (euler_sample, lambda nfe: nfe),
    "heun": (heun_sample, two_call_intervals),
    "dpm++2m": (dpm_solver_pp_2m_sample, lambda nfe: nfe),
}


def _full_grid(inner: Candidate, t_max: float) -> Tensor:
    return torch.tensor((t_max, *inner, 0.0), dtype=torch.float64)


def _mutate_grid(inner: Candidate, rng: random.Random, t_max: float, mutation_scale: float) -> Candidate:
    """Redraw (probability 1/2) or perturb one inner time inside the open interval between its neighbours."""
    index = rng.randrange(len(inner))
    upper = t_max if index == 0 else inner[index - 1]
    lower = 0.0 if index == len(inner) - 1 else inner[index + 1]
    width = upper - lower
    low, high = lower + MIN_GAP_FRACTION * width, upper - MIN_GAP_FRACTION * width
    if rng.random() < 0.5:
        value = rng.uniform(low, high)
    else:
        value = min(max(inner[index] + rng.gauss(0.0, mutation_scale * width), low), high)
    return inner[:index] + (value,) + inner[index + 1:]


def _crossover_grids(first: Candidate, second: Candidate, rng: random.Random) -> Candidate:
    """Each inner time from either parent, sorted decreasingly; the first parent if a time repeats."""
    child = tuple(sorted((rng.choice(pair) for pair in zip(first, second)), reverse=True))
    return child if all(a > b for a, b in zip(child, child[1:])) else first


def evolve_time_grid(
    model: Callable,
    transport: Transport,
    sampler: str,
    nfe: int,
    search: EvaluationSet,
    heldout: EvaluationSet,
    settings: EvolutionSettings = DEFAULT_EVOLUTION,
    t_max: float = 1.0,
    mutation_scale: float = 0.25,
) -> dict:
    """Evolve the time grid of ``sampler`` (``"euler"``, ``"heun"`` or ``"dpm++2m"``) at budget ``nfe`` against
    the uniform grid from ``t_max`` to 0; ``"best"`` and ``"times"`` are the searched grid (both ends included)."""
    if sampler not in GRID_SAMPLERS:
        raise ValueError(f"sampler={sampler!r} has no searchable time grid; allowed: {', '.join(GRID_SAMPLERS)}")
    check_positive_int("nfe", nfe)
    if not 0.0 < t_max <= 1.0:
        raise ValueError(f"t_max={t_max!r} must lie in (0, 1]")
    if not mutation_scale > 0:
        raise ValueError(f"mutation_scale={mutation_scale!r} must be positive")
    check_distinct_sets(search, heldout)
    solver, intervals_for = GRID_SAMPLERS[sampler]
    intervals = intervals_for(nfe)
    if intervals < 2:
        raise ValueError(f"nfe={nfe} gives {intervals} interval for {sampler!r}: no inner time to search; "
                         "raise nfe")

    def draw_with(inner: Candidate) -> Callable[[Tensor, Optional[Tensor]], SampleResult]:
        return lambda noise, labels: solver(model, transport, noise, labels, times=_full_grid(inner, t_max))

    default = tuple(uniform_grid(intervals, t_max=t_max)[1:-1].tolist())

    def random_grid(rng: random.Random) -> Candidate:
        return tuple(sorted((rng.uniform(0.0, t_max) for _ in default), reverse=True))

    rng = random.Random(settings.seed)
    best, search_value, _, _ = evolve(
        [default, *(random_grid(rng) for _ in range(settings.population // 2 - 1))],
        lambda inner: search.score(draw_with(inner))[0],
        lambda inner, generator: _mutate_grid(inner, generator, t_max, mutation_scale),
        _crossover_grids,
        random_grid,
        settings,
    )
    times = _full_grid(best, t_max)
    return _report(times.tolist(), times, search_value, search.score(draw_with(default)),
                   heldout.score(draw_with(best)), heldout.score(draw_with(default)), nfe)


# ---------------------------------------------------------------------------------- Kumaraswamy warp
class _Box:
    """Maps parameters to ``[0, 1]``: ``log(p / lo) / log(hi / lo)`` for the warp, ``(p - lo) / (hi - lo)`` for
    kappa."""

    def __init__(self, warp_bounds: tuple[float, float], extrapolation_bounds: Optional[tuple[float, float]]):
        self.bounds = [warp_bounds] * 3 + ([extrapolation_bounds] if extrapolation_bounds else [])

    def to_unit(self, parameters: Candidate) -> list[float]:
        unit = [math.log(p / lo) / math.log(hi / lo) for p, (lo, hi) in zip(parameters[:3], self.bounds)]
        return unit + [(p - lo) / (hi - lo) for p, (lo, hi) in zip(parameters[3:], self.bounds[3:])]

    def from_unit(self, unit: Sequence[float]) -> Candidate:
        warp = [lo * (hi / lo) ** u for u, (lo, hi) in zip(unit[:3], self.bounds)]
        return tuple(warp + [lo + u * (hi - lo) for u, (lo, hi) in zip(unit[3:], self.bounds[3:])])

    def contains(self, parameters: Candidate) -> bool:
        return all(lo <= p <= hi for p, (lo, hi) in zip(parameters, self.bounds))


def search_kumaraswamy(
    model: Callable,
    transport: Transport,
    nfe: int,
    search: EvaluationSet,
    heldout: EvaluationSet,
    settings: EvolutionSettings = DEFAULT_EVOLUTION,
    sampler: str = "ucgm",
    base_settings: Optional[Mapping[str, object]] = None,
    search_extrapolation: bool = True,
    warp_bounds: tuple[float, float] = (0.25, 4.0),
    extrapolation_bounds: tuple[float, float] = (0.0, 1.0),
    mutation_scale: float = 0.15,
) -> dict:
    """Search UCGM-S's ``(a, b, c)`` (and ``kappa`` when ``search_extrapolation``) for budget ``nfe``.

    ``sampler`` is a UCGM-S registry name (:data:`~ucgm.sampling.registry.UCGM_SAMPLERS`); ``base_settings`` its
    other settings, whose ``time_warp`` and ``extrapolation`` (over the sampler's defaults) are the default the
    result is compared with; stochastic
    settings draw their noise from per-sample streams seeded with ``settings.seed`` at every evaluation.
    ``"best"`` is ``{"time_warp": (a, b, c), "extrapolation": kappa}``; ``"times"`` its UCGM-S grid.
    """
    if sampler not in UCGM_SAMPLERS:
        raise ValueError(f"sampler={sampler!r}; allowed: {', '.join(map(repr, UCGM_SAMPLERS))}")
    base = ucgm_settings(sampler, base_settings)
    if not 0 < warp_bounds[0] < warp_bounds[1]:
        raise ValueError(f"warp_bounds={tuple(warp_bounds)!r} must be (low, high) with 0 < low < high")
    if not 0 <= extrapolation_bounds[0] < extrapolation_bounds[1]:
        raise ValueError(f"extrapolation_bounds={tuple(extrapolation_bounds)!r} must be (low, high) with 0 <= low < high")
    if not mutation_scale > 0:
        raise ValueError(f"mutation_scale={mutation_scale!r} must be positive")
    check_distinct_sets(search, heldout)
    box = _Box(warp_bounds, extrapolation_bounds if search_extrapolation else None)
    default = tuple(float(p) for p in base.get("time_warp", (1.0, 1.0, 1.0)))
    if search_extrapolation:
        default += (float(base.get("extrapolation", 0.0)),)
    if len(default) != len(box.bounds) or not box.contains(default):
        raise ValueError(f"the default parameters {default} must lie inside the bounds {box.bounds}")
    intervals = ucgm_intervals(sampler, nfe, base)

    def as_settings(parameters: Candidate) -> dict:
        extra = {"extrapolation": parameters[3]} if search_extrapolation else {}
        return {**base, "time_warp": parameters[:3], **extra}

    def draw_with(parameters: Candidate) -> Callable[[Tensor, Optional[Tensor]], SampleResult]:
        bound = get_sampler(sampler, as_settings(parameters))

        def draw(noise: Tensor, labels: Optional[Tensor]) -> SampleResult:
            noise_source = fresh_noise_source(settings.seed, range(noise.shape[0]))
            return bound(model, transport, noise, labels, nfe, noise_source)

        return draw

    def mutate(parameters: Candidate, rng: random.Random) -> Candidate:
        unit = [min(max(u + rng.gauss(0.0, mutation_scale), 0.0), 1.0) for u in box.to_unit(parameters)]
        return box.from_unit(unit)

    def crossover(first: Candidate, second: Candidate, rng: random.Random) -> Candidate:
        return tuple(rng.choice(pair) for pair in zip(first, second))

    def random_point(rng: random.Random) -> Candidate:
        return box.from_unit([rng.random() for _ in box.bounds])

    rng = random.Random(settings.seed)
    random_points = [random_point(rng) for _ in range(settings.population // 2 - 1)]
    best, search_value, _, _ = evolve([default, *random_points], lambda p: search.score(draw_with(p))[0], mutate,
                                      crossover, random_point, settings)
    best_settings = as_settings(best)
    times = kumaraswamy_grid(intervals, best_settings["time_warp"], base.get("gaps", DEFAULT_GAPS))
    answer = {"time_warp": best[:3], "extrapolation": best_settings.get("extrapolation", 0.0)}
    return _report(answer, times, search_value, search.score(draw_with(default)),
                   heldout.score(draw_with(best)), heldout.score(draw_with(default)), nfe)
