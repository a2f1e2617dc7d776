"""The seeded evolutionary search shared by every schedule search of ucgm (AutoDiffusion's time steps and skipped
layers, the time-grid search, UCGM-S's Kumaraswamy parameters).

The scheme is AutoDiffusion's (Li et al., ICCV 2023; ``EvolutionSearcher.search`` of lilijiangg/AutoDiffusion,
read to check it): generation 0 is the given seeds (deduplicated, at most ``population``) filled up with mutants
of them. Every generation then

1. keeps the ``elite`` best candidates evaluated so far (AutoDiffusion's cumulative top-k, ``select_num``);
2. breeds ``mutations`` children, each a mutant of an elite candidate drawn uniformly;
3. breeds ``crossovers`` children, each the crossover of two elite candidates drawn uniformly;
4. fills the population up with random candidates.

A child already evaluated (or already bred this generation) is rejected and bred again, at most ten tries per
child as in the official code, so **every candidate is evaluated exactly once** (fitness is cached). The answer
is the best candidate ever evaluated (ties: the first evaluated). All randomness comes from
``random.Random(seed)``: the same seed and fitness give the same answer. The operators belong to the search:
they must return valid candidates (e.g. exactly N distinct steps), which the engine does not repair.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Callable, Hashable, NamedTuple, Optional, Sequence

Candidate = Hashable
#: Tries per child before a generation gives up breeding more (the official code's ``max_iters = num * 10``).
TRIES_PER_CHILD = 10


@dataclass(frozen=True)
class EvolutionSettings:
    """Population size, generations, elite size (top-k), children bred by mutation and by crossover per generation
    (defaults: half and three tenths of the population, AutoDiffusion's 25 and 15 of 50), the per-gene mutation
    probability of operators that take one, and the seed."""

    population: int = 16
    generations: int = 10
    elite: int = 4
    mutations: Optional[int] = None
    crossovers: Optional[int] = None
    mutation_probability: float = 0.25
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("population", "generations", "elite"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r} must be an integer >= 1")
        if self.elite >= self.population:
            raise ValueError(f"elite={self.elite} must be smaller than population={self.population}")
        for name in ("mutations", "crossovers"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
                raise ValueError(f"{name}={value!r} must be null or an integer >= 0")
        if self.children()[0] + self.children()[1] > self.population:
            raise ValueError(f"mutations + crossovers = {sum(self.children())} exceed population={self.population}")
        if not 0.0 < self.mutation_probability <= 1.0:
            raise ValueError(f"mutation_probability={self.mutation_probability!r} must lie in (0, 1]")

    def children(self) -> tuple[int, int]:
        """``(mutations, crossovers)`` bred per generation."""
        mutations = self.population // 2 if self.mutations is None else self.mutations
        crossovers = 3 * self.population // 10 if self.crossovers is None else self.crossovers
        return mutations, crossovers


class EvolutionResult(NamedTuple):
    """The best candidate, its fitness, every evaluated candidate with its fitness (in evaluation order) and the
    best fitness after each generation (generation 0 first)."""

    best: Candidate
    value: float
    evaluated: dict
    history: list


def evolve(
    seeds: Sequence[Candidate],
    fitness: Callable[[Candidate], float],
    mutate: Callable[[Candidate, random.Random], Candidate],
    crossover: Callable[[Candidate, Candidate, random.Random], Candidate],
    random_candidate: Callable[[random.Random], Candidate],
    settings: EvolutionSettings,
) -> EvolutionResult:
    """Minimise ``fitness`` (module docstring)."""
    if len(seeds) == 0:
        raise ValueError("evolve needs at least one seed candidate")
    rng = random.Random(settings.seed)
    scores: dict = {}

    def score(candidate: Candidate) -> float:
        if candidate not in scores:
            scores[candidate] = float(fitness(candidate))
        return scores[candidate]

    def breed(count: int, make: Callable[[], Candidate], bred: list) -> None:
        target = len(bred) + count
        for _ in range(TRIES_PER_CHILD * count):
            if len(bred) >= target:
                return
            child = make()
            if child not in scores and child not in bred:
                bred.append(child)

    population = list(dict.fromkeys(seeds))[: settings.population]
    breed(settings.population - len(population), lambda: mutate(rng.choice(population[: len(seeds)]), rng),
          population)
    for candidate in population:
        score(candidate)
    history = [min(scores.values())]
    mutations, crossovers = settings.children()
    for _ in range(settings.generations):
        elite = sorted(scores, key=scores.__getitem__)[: settings.elite]
        children: list = []
        breed(mutations, lambda: mutate(rng.choice(elite), rng), children)
        breed(crossovers, lambda: crossover(rng.choice(elite), rng.choice(elite), rng), children)
        breed(settings.population - len(children), lambda: random_candidate(rng), children)
        for candidate in children:
            score(candidate)
        history.append(min(scores.values()))
    best = min(scores, key=scores.__getitem__)
    return EvolutionResult(best, scores[best], scores, history)
