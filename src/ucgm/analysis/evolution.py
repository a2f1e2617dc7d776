"""A small seeded evolutionary minimiser shared by the time-grid and Kumaraswamy searches.

Candidates are tuples of floats. Generation 0 is the given seeds (deduplicated, at most ``population``) filled up
with mutants of them. Each generation keeps the ``elite`` best distinct candidates and breeds the rest: two
parents drawn uniformly from the elite, a crossover with probability ``crossover_probability`` (else a copy of
the first parent), then one mutation. Fitness is cached per candidate, so every candidate is evaluated once;
the answer is the best candidate ever evaluated (ties: the first evaluated). All randomness comes from
``random.Random(seed)``: the same seed and fitness give the same answer.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Callable, Sequence

Candidate = tuple[float, ...]


@dataclass(frozen=True)
class EvolutionSettings:
    """Population size, generations, elite size, crossover probability and the seed of the search."""

    population: int = 16
    generations: int = 10
    elite: int = 4
    crossover_probability: float = 0.5
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("population", "generations", "elite"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r} must be an integer >= 1")
        if self.elite >= self.population:
            raise ValueError(f"elite={self.elite} must be smaller than population={self.population}")
        if not 0.0 <= self.crossover_probability <= 1.0:
            raise ValueError(f"crossover_probability={self.crossover_probability!r} must lie in [0, 1]")


def evolve(
    seeds: Sequence[Candidate],
    fitness: Callable[[Candidate], float],
    mutate: Callable[[Candidate, random.Random], Candidate],
    crossover: Callable[[Candidate, Candidate, random.Random], Candidate],
    settings: EvolutionSettings,
) -> tuple[Candidate, float]:
    """Minimise ``fitness``; returns ``(best candidate, its fitness)``."""
    if len(seeds) == 0:
        raise ValueError("evolve needs at least one seed candidate")
    rng = random.Random(settings.seed)
    scores: dict[Candidate, float] = {}

    def score(candidate: Candidate) -> float:
        if candidate not in scores:
            scores[candidate] = float(fitness(candidate))
        return scores[candidate]

    population = list(dict.fromkeys(seeds))[: settings.population]
    while len(population) < settings.population:
        population.append(mutate(rng.choice(population), rng))
    for _ in range(settings.generations):
        ranked = sorted(dict.fromkeys(population), key=score)
        elite = ranked[: settings.elite]
        population = list(elite)
        while len(population) < settings.population:
            first, second = rng.choice(elite), rng.choice(elite)
            child = crossover(first, second, rng) if rng.random() < settings.crossover_probability else first
            population.append(mutate(child, rng))
    for candidate in population:
        score(candidate)
    best = min(scores, key=scores.__getitem__)
    return best, scores[best]
