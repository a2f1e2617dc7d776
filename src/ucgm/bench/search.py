"""Schedule-search benchmark: UCGM-S at NFE 4 and 8 on a trained GMM and digits model with four schedules —
``uniform`` (``t_i = 1 - i / N``), ``ucgm-default`` (UCGM-S's own grid and gaps, read from the sampler so it
follows its defaults), ``kumaraswamy-search`` (UCGM-S's warp and kappa searched) and ``autodiffusion`` (the N
steps searched) — the searches sharing one evolution engine and setting, scored on the evaluation set.

Models: the ``gmm`` preset (8 Gaussians, conditional) and the ``digits`` preset (UNet with 16 base channels, batch
64) trained by :func:`~ucgm.cli.train.run_training`, seed 0, EMA weights through the user path. Sets and metrics:
:mod:`ucgm.analysis.schedule_search` (search set: its own noise and reference — exact mixture samples of another
seed, the digits training split; evaluation set: ``ucgm evaluate``'s noise of seed 0 against its references).

Records: ``{dataset, schedule, nfe, metric, value, search_value, sampler, settings}``.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from ..analysis.evolution import EvolutionSettings
from ..analysis.reports import run_ucgm_settings
from ..analysis.schedule_search import compare_schedules, search_sets
from ..cli.sample import load_checkpoint_model
from .discrete import train_run

NFES = (4, 8)
DATASETS = {"gmm": ("gmm", []), "digits": ("digits", ["model.base_channels=16", "training.batch_size=64"])}


@dataclass(frozen=True)
class SearchSizes:
    gmm_steps: int
    digits_steps: int
    num_search: dict
    num_evaluation: dict
    population: int
    generations: int
    elite: int
    num_reference: int = 20000


QUICK = SearchSizes(gmm_steps=300, digits_steps=60, num_search={"gmm": 256, "digits": 128},
                    num_evaluation={"gmm": 512, "digits": 256}, population=6, generations=2, elite=2)
FULL = SearchSizes(gmm_steps=3000, digits_steps=1500, num_search={"gmm": 1000, "digits": 500},
                   num_evaluation={"gmm": 4000, "digits": 1000}, population=16, generations=10, elite=4)


def run_search_bench(sizes: SearchSizes) -> dict:
    """Train both models and compare the schedules; the ``search`` records and ``search_details``."""
    started = time.perf_counter()
    settings = EvolutionSettings(population=sizes.population, generations=sizes.generations, elite=sizes.elite)
    records, details = [], {}
    with tempfile.TemporaryDirectory(prefix="ucgm-bench-search-") as temporary:
        for dataset, (preset, overrides) in DATASETS.items():
            steps = sizes.gmm_steps if dataset == "gmm" else sizes.digits_steps
            run_dir = Path(temporary) / dataset
            seconds = train_run(preset, list(overrides), steps, run_dir)
            loaded = load_checkpoint_model(run_dir)
            info = loaded.info
            search, evaluation, metric = search_sets(loaded.config, info.data_shape, info.num_classes or 0,
                                                     sizes.num_search[dataset], sizes.num_evaluation[dataset],
                                                     num_reference=sizes.num_reference)
            searches = {}
            for nfe in NFES:
                result = compare_schedules(loaded.model, loaded.transport, nfe, search, evaluation, metric, "ucgm",
                                           run_ucgm_settings(loaded.config), settings, kumaraswamy=True)
                records += [{"dataset": dataset, **record} for record in result["records"]]
                report = result["autodiffusion"]
                searches[str(nfe)] = {"times": report["schedule"].times, "history": report["history"],
                                      "candidates": len(report["candidates"]),
                                      "kumaraswamy": result["kumaraswamy"]["best"]}
            details[dataset] = {"steps": steps, "train_seconds": seconds, "searches": searches}
    wins = {dataset: next(r["value"] for r in records if (r["dataset"], r["nfe"], r["schedule"]) ==
                          (dataset, 4, "autodiffusion")) <
            next(r["value"] for r in records if (r["dataset"], r["nfe"], r["schedule"]) == (dataset, 4, "uniform"))
            for dataset in DATASETS}
    return {"search": records, "search_details": {"sizes": asdict(sizes), "evolution": asdict(settings), **details,
                                                  "nfe4_beats_uniform": wins,
                                                  "seconds": round(time.perf_counter() - started, 1)}}
