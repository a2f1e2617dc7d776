"""AutoDiffusion (Li et al., ICCV 2023): a training-free evolutionary search of a trained model's N sampling
steps and, optionally, of the backbone blocks skipped at each step under a compute budget.

**Search space** (AutoDiffusion's, in ucgm's time): ``levels`` time levels ``t = k / levels``, ``k = 1 ..
levels`` (its 1000 DDPM indices); a candidate is ``N`` *distinct* levels (an unordered set, run as the grid
``t_(1) > ... > t_(N) > 0``, ``N`` the intervals of the sampler at the budget) and, with a skip budget, per step
the set of skipped blocks (:mod:`ucgm.models.skipping`) with ``sum_steps (B - skipped) <= skip_budget * N * B``
block evaluations (``B`` skippable blocks; AutoDiffusion's ``index_step``). ``levels`` is rounded up to a
multiple of ``N`` so that the uniform grid ``t_i = 1 - i / N`` is a candidate (the seed of the search, as
AutoDiffusion seeds with DDIM's uniform steps).

**Operators** (the two bugs of the released code fixed):

* mutation — each step's level is replaced, with probability ``mutation_probability``, by a level no step of
  the candidate uses (so the levels stay distinct); with skipping, each step's skip set is changed with the same
  probability (a block swapped for one it keeps, one block more, or one less). The released code's skip
  mutation assigns with ``==`` and so changes nothing; here a mutant always differs from its parent (when no
  gene mutated by chance, one is forced; an unchanged mutant would only be rejected as already evaluated);
* crossover — gene-wise from either parent (step ``i`` of the sorted parents, with its skip set). The released
  code can draw the same level from both parents, and ``set()`` then silently runs fewer than N steps; here a
  repeated level is replaced by the other parent's, then by an unused level of either parent, then by a random
  unused level: every candidate has exactly N distinct steps;
* random candidates — N distinct levels uniformly, random skip sets within the budget.

A candidate over the budget gets random extra skipped blocks until it fits (at most ``B - 1`` per step).

**Fitness**: the metric (lower is better) of the samples the candidate draws from the *search* set's noise; the
result is reported on a separate *evaluation* set (other noise, other reference), next to the uniform grid
(the search can only improve on it on the search set, since it starts there).
"""

from __future__ import annotations

import math
import random
from typing import Callable, Mapping, Optional

from torch import Tensor

from ..models.skipping import find_backbone, skippable_blocks
from ..sampling.registry import get_sampler
from ..sampling.result import SampleResult
from ..sampling.schedules import GRID_SAMPLERS, Schedule, grid_intervals
from ..sampling.seeded import fresh_noise_source
from ..validation import check_positive_int
from .evolution import EvolutionSettings, evolve
from .gridsearch import EvaluationSet, check_distinct_sets

#: AutoDiffusion's number of time levels (DDPM's 1000 steps).
DEFAULT_LEVELS = 1000
#: A step keeps at least one block.
MIN_KEPT_BLOCKS = 1

Gene = tuple  # (level, skipped blocks)
Candidate = tuple  # genes sorted by level, noisiest first


class StepSpace:
    """The candidates of one search: ``steps`` distinct levels out of ``levels``, and skip sets of ``blocks``
    blocks within ``budget`` block evaluations (no skipping when ``budget`` is ``None``)."""

    def __init__(self, steps: int, levels: int, blocks: int = 0, budget: Optional[int] = None,
                 mutation_probability: float = 0.25):
        self.steps, self.levels, self.blocks, self.budget = steps, levels, blocks, budget
        self.mutation_probability = mutation_probability
        if steps > levels:
            raise ValueError(f"{steps} steps cannot be distinct among {levels} time levels")
        if budget is not None and budget < steps * MIN_KEPT_BLOCKS:
            raise ValueError(f"a budget of {budget} block evaluations cannot run {steps} steps")

    @property
    def skips(self) -> bool:
        return self.budget is not None

    # ------------------------------------------------------------------------------------------ pieces
    def canonical(self, genes) -> Candidate:
        return tuple(sorted(((int(level), tuple(sorted(set(skip)))) for level, skip in genes), reverse=True))

    def times(self, candidate: Candidate) -> list[float]:
        """The grid ``t_0 > ... > t_{N-1} > t_N = 0`` of a candidate."""
        return [level / self.levels for level, _ in candidate] + [0.0]

    def skip_blocks(self, candidate: Candidate) -> Optional[list[list[int]]]:
        return [list(skip) for _, skip in candidate] if self.skips else None

    def cost(self, candidate: Candidate) -> int:
        """Block evaluations of a candidate."""
        return sum(self.blocks - len(skip) for _, skip in candidate)

    def uniform(self) -> Candidate:
        """The uniform grid ``t_i = 1 - i / N`` with nothing skipped (levels is a multiple of N)."""
        stride = self.levels // self.steps
        return self.fit_budget([(self.levels - i * stride, ()) for i in range(self.steps)], random.Random(0))

    def unused_level(self, used: set, rng: random.Random) -> int:
        """A uniformly drawn level outside ``used`` (rejection, then a scan when levels are nearly all used)."""
        for _ in range(64):
            level = rng.randint(1, self.levels)
            if level not in used:
                return level
        return rng.choice([level for level in range(1, self.levels + 1) if level not in used])

    def random_skip(self, rng: random.Random) -> tuple:
        count = rng.randint(0, self.blocks - MIN_KEPT_BLOCKS)
        return tuple(rng.sample(range(self.blocks), count))

    def fit_budget(self, genes, rng: random.Random) -> Candidate:
        """Skip random extra blocks until the candidate costs at most the budget."""
        genes = [(level, set(skip)) for level, skip in genes]
        if self.skips:
            while sum(self.blocks - len(skip) for _, skip in genes) > self.budget:
                step = rng.choice([g for g in genes if self.blocks - len(g[1]) > MIN_KEPT_BLOCKS])
                step[1].add(rng.choice([block for block in range(self.blocks) if block not in step[1]]))
        return self.canonical(genes)

    def mutate_skip(self, skip: tuple, rng: random.Random) -> tuple:
        """Swap a skipped block for a kept one, or skip one block more or one less (always a change)."""
        skipped = set(skip)
        kept = [block for block in range(self.blocks) if block not in skipped]
        moves = []
        if skipped and kept:
            moves.append("swap")
        if len(kept) > MIN_KEPT_BLOCKS:
            moves.append("add")
        if skipped:
            moves.append("remove")
        move = rng.choice(moves)
        if move in ("swap", "remove"):
            skipped.discard(rng.choice(sorted(skipped)))
        if move in ("swap", "add"):
            skipped.add(rng.choice(kept))
        return tuple(sorted(skipped))

    # --------------------------------------------------------------------------------------- operators
    def random_candidate(self, rng: random.Random) -> Candidate:
        levels = rng.sample(range(1, self.levels + 1), self.steps)
        return self.fit_budget([(level, self.random_skip(rng) if self.skips else ()) for level in levels], rng)

    def mutate(self, candidate: Candidate, rng: random.Random, skips_only: bool = False) -> Candidate:
        """A mutant that differs from ``candidate`` (module docstring); ``skips_only`` mutates skip sets only."""
        genes = [list(gene) for gene in candidate]
        used = {level for level, _ in candidate}
        kinds = (["skip"] if skips_only else ["level"] + (["skip"] if self.skips else []))
        if skips_only and not self.skips:
            raise ValueError("this search does not skip blocks")
        changed = False
        for gene in genes:
            if "level" in kinds and rng.random() < self.mutation_probability:
                level = self.unused_level(used, rng)
                used.add(level)
                used.discard(gene[0])
                gene[0], changed = level, True
            if "skip" in kinds and rng.random() < self.mutation_probability:
                gene[1], changed = self.mutate_skip(gene[1], rng), True
        if not changed:
            gene = rng.choice(genes)
            if rng.choice(kinds) == "level":
                used.discard(gene[0])
                gene[0] = self.unused_level(used | {gene[0]}, rng)
            else:
                gene[1] = self.mutate_skip(gene[1], rng)
        return self.fit_budget(genes, rng)

    def crossover(self, first: Candidate, second: Candidate, rng: random.Random) -> Candidate:
        """Gene-wise crossover with exactly N distinct levels (module docstring)."""
        child, used = [], set()
        spare = [gene for gene in first + second]
        for own, other in zip(first, second):
            if rng.random() < 0.5:
                own, other = other, own
            for gene in (own, other, *spare):
                if gene[0] not in used:
                    break
            else:
                gene = (self.unused_level(used, rng), own[1])
            child.append(gene)
            used.add(gene[0])
        return self.fit_budget(child, rng)


def search_steps(
    model: Callable,
    transport,
    nfe: int,
    search: EvaluationSet,
    evaluation: EvaluationSet,
    settings: EvolutionSettings = EvolutionSettings(),
    sampler: str = "ucgm",
    base_settings: Optional[Mapping[str, object]] = None,
    levels: int = DEFAULT_LEVELS,
    skip_budget: Optional[float] = None,
    generator_seed: int = 0,
) -> dict:
    """AutoDiffusion's search of ``sampler``'s steps at budget ``nfe`` (module docstring).

    ``base_settings`` are the sampler's other settings; ``skip_budget`` the fraction of block evaluations a
    candidate may spend (``None``: no skipping); stochastic samplers draw their noise from the per-sample streams
    of ``generator_seed`` (``ucgm evaluate``'s) at every evaluation. Returns ``{"schedule": Schedule, "search_value",
    "uniform_search_value", "evaluation_value", "uniform_evaluation_value", "gain", "candidates", "history",
    "levels", "steps"}``; ``candidates`` lists every evaluated candidate (times, skip_blocks, search value) and
    ``gain = uniform_evaluation_value - evaluation_value``.
    """
    if sampler not in GRID_SAMPLERS:
        raise ValueError(f"sampler={sampler!r} has no searchable steps; allowed: {', '.join(GRID_SAMPLERS)}")
    check_positive_int("nfe", nfe)
    check_positive_int("levels", levels, minimum=2)
    check_distinct_sets(search, evaluation)
    base = dict(base_settings or {})
    steps = grid_intervals(sampler, nfe, base)
    levels = steps * math.ceil(levels / steps)
    blocks, budget = 0, None
    if skip_budget is not None:
        if not 0 < skip_budget <= 1:
            raise ValueError(f"skip_budget={skip_budget!r} must lie in (0, 1] (the fraction of block evaluations)")
        blocks = len(skippable_blocks(find_backbone(model)))
        budget = int(skip_budget * steps * blocks)
    space = StepSpace(steps, levels, blocks, budget, settings.mutation_probability)

    def schedule_of(candidate: Candidate) -> Schedule:
        return Schedule(sampler, nfe, space.times(candidate), space.skip_blocks(candidate), base)

    def draw_with(candidate: Candidate) -> Callable[[Tensor, Optional[Tensor]], SampleResult]:
        bound = get_sampler(sampler, schedule_of(candidate).sampler_settings())

        def draw(noise: Tensor, labels: Optional[Tensor]) -> SampleResult:
            return bound(model, transport, noise, labels, nfe, fresh_noise_source(generator_seed,
                                                                                  range(noise.shape[0])))

        return draw

    uniform = space.uniform()
    rng = random.Random(settings.seed)
    seeds = [uniform, *(space.random_candidate(rng) for _ in range(settings.population // 2))]
    outcome = evolve(seeds, lambda candidate: search.score(draw_with(candidate))[0], space.mutate,
                     space.crossover, space.random_candidate, settings)
    evaluation_value = evaluation.score(draw_with(outcome.best))[0]
    uniform_evaluation = evaluation.score(draw_with(uniform))[0]
    schedule = schedule_of(outcome.best)
    schedule.search = {"method": "autodiffusion", "levels": levels, "skip_budget": skip_budget,
                       "block_evaluations": space.cost(outcome.best) if space.skips else None,
                       "blocks_per_step": blocks or None, "search_value": outcome.value,
                       "uniform_search_value": outcome.evaluated[uniform], "evaluation_value": evaluation_value,
                       "uniform_evaluation_value": uniform_evaluation, "settings": vars(settings)}
    candidates = [{"times": space.times(c), "skip_blocks": space.skip_blocks(c), "search_value": value}
                  for c, value in outcome.evaluated.items()]
    return {"schedule": schedule, "search_value": outcome.value, "uniform_search_value": outcome.evaluated[uniform],
            "evaluation_value": evaluation_value, "uniform_evaluation_value": uniform_evaluation,
            "gain": uniform_evaluation - evaluation_value, "candidates": candidates, "history": outcome.history,
            "levels": levels, "steps": steps}
