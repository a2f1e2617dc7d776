"""Searching a trained run's sampling schedule and comparing it with the fixed ones, as ``ucgm search`` and the
``search`` benchmark do.

Sets: the *search* set is ``num_search`` samples from the initial noise of seed :data:`SEARCH_NOISE_SEED`
scored against the search reference of :func:`~ucgm.metrics.search_metrics.search_metrics`; the *evaluation*
set is ``num_evaluation`` samples from the noise of ``evaluation_seed`` (``ucgm evaluate``'s seeding: sample
``i`` from generator ``(seed, i)``, label ``i % num_classes``) against the evaluation reference.

Schedules compared on the evaluation set, all with the same sampler and NFE (records ``{schedule, nfe, metric,
value}``): ``uniform`` (the grid ``t_i = 1 - i / N``), ``<sampler>-default`` (the sampler's own grid with the
run's settings, e.g. UCGM-S's Kumaraswamy grid and gaps, read from the sampler itself so it follows its
defaults), ``kumaraswamy-search`` (UCGM-S's warp and kappa searched, :func:`~ucgm.analysis.gridsearch.
search_kumaraswamy`, on request) and ``autodiffusion`` (:func:`~ucgm.analysis.autodiffusion.search_steps`). The
searches share one engine and one evolution setting.
"""

from __future__ import annotations

from typing import Callable, Mapping, Optional, Sequence

import torch

from ..metrics.search_metrics import NUM_REFERENCE, search_metrics
from ..sampling.registry import UCGM_SAMPLERS, get_sampler
from ..sampling.schedules import grid_intervals
from ..sampling.seeded import fresh_noise_source, initial_noise, sample_labels
from ..timegrids import uniform_grid
from .autodiffusion import DEFAULT_LEVELS, search_steps
from .evolution import EvolutionSettings
from .gridsearch import EvaluationSet, search_kumaraswamy

SEARCH_NOISE_SEED = 97


def search_sets(config: dict, shape: Sequence[int], num_classes: int, num_search: int, num_evaluation: int,
                evaluation_seed: int = 0, device: torch.device | str = "cpu", num_reference: int = NUM_REFERENCE
                ) -> tuple[EvaluationSet, EvaluationSet, str]:
    """The search set, the evaluation set and the metric's name (module docstring); ``num_reference`` exact
    samples per mixture reference."""
    metrics = search_metrics(config, num_classes, num_evaluation, num_reference)
    device = torch.device(device)

    def evaluation_set(seed: int, count: int, metric: Callable) -> EvaluationSet:
        labels = sample_labels(count, num_classes)
        return EvaluationSet(initial_noise(seed, range(count), shape, device), metric,
                             None if labels is None else labels.to(device))

    return (evaluation_set(SEARCH_NOISE_SEED, num_search, metrics.search),
            evaluation_set(evaluation_seed, num_evaluation, metrics.evaluation), metrics.name)


def _score(evaluation: EvaluationSet, model: Callable, transport, sampler: str, settings: Mapping, nfe: int,
           seed: int) -> float:
    bound = get_sampler(sampler, dict(settings))
    indices = range(evaluation.noise.shape[0])
    return evaluation.score(lambda noise, labels: bound(model, transport, noise, labels, nfe,
                                                        fresh_noise_source(seed, indices)))[0]


def compare_schedules(model: Callable, transport, nfe: int, search: EvaluationSet, evaluation: EvaluationSet,
                      metric: str, sampler: str = "ucgm", base_settings: Optional[Mapping] = None,
                      settings: EvolutionSettings = EvolutionSettings(), levels: int = DEFAULT_LEVELS,
                      skip_budget: Optional[float] = None, kumaraswamy: bool = False, seed: int = 0) -> dict:
    """Search and compare (module docstring): ``{"records": [...], "autodiffusion": report, "kumaraswamy":
    report or None}``; every record holds ``schedule, nfe, metric, value`` (evaluation set) and the search
    set's value where there is one."""
    base = dict(base_settings or {})
    steps = grid_intervals(sampler, nfe, base)
    uniform = {**base, "times": uniform_grid(steps).tolist()}
    report = search_steps(model, transport, nfe, search, evaluation, settings, sampler, base, levels, skip_budget,
                          seed)
    records = [
        {"schedule": "uniform", "value": report["uniform_evaluation_value"],
         "search_value": report["uniform_search_value"], "settings": uniform},
        {"schedule": f"{sampler}-default", "value": _score(evaluation, model, transport, sampler, base, nfe, seed),
         "settings": base},
    ]
    found = None
    if kumaraswamy:
        if sampler not in UCGM_SAMPLERS:
            raise ValueError(f"the Kumaraswamy search needs UCGM-S; sampler={sampler!r}")
        found = search_kumaraswamy(model, transport, nfe, search, evaluation, settings, sampler, base)
        records.append({"schedule": "kumaraswamy-search", "value": found["heldout_value"],
                        "search_value": found["search_value"], "settings": {**base, **found["best"]}})
    records.append({"schedule": "autodiffusion", "value": report["evaluation_value"],
                    "search_value": report["search_value"], "settings": report["schedule"].sampler_settings()})
    for record in records:
        record.update(nfe=nfe, metric=metric, sampler=sampler)
    return {"records": records, "autodiffusion": report, "kumaraswamy": found}
