"""Quality benchmark: samplers at equal NFE on one flow-matching-trained model, and few-step vs multi-step.

Models are trained by ucgm's own trainer into a temporary directory (deterministic, seed 0):

* GMM: the ``gmm`` preset (8 Gaussians, unconditional) with ``objective=flow_matching`` (the multi-step model),
  and a few-step model tuned from it with the preset's ``tune:`` recipe (UCGM-T, consistency ratio 1; without the
  enhanced target, which needs class labels).
* digits: the ``digits`` preset with ``objective=flow_matching`` (class-conditional, 16 base channels).

Every sampler starts from the same seeded noise (seed 0, :func:`ucgm.evaluation.draw_samples`). GMM quality is the
sliced W2 (256 projections) of ``num_gmm`` samples against ``num_reference`` exact mixture samples (seed 12345);
the sample-noise floor is the same distance for ``num_gmm`` exact samples (seeds 1000, 1001, ...), mean and std
over ``floor_repeats`` draws. Digits quality is the digits FD of ``num_digits`` samples against the held-out split.

Samplers at NFE 4, 8, 16: UCGM-S with the official defaults (the registry's: rho = 0, kappa = 0, warp (1, 1, 1),
gaps (0.001, 0.001)); on the GMM also UCGM-S with *searched* settings: for each NFE, the boundary gaps from
{(0.001, 0.001), (0.001, 0)} and the Kumaraswamy warp and kappa found by :func:`~ucgm.analysis.search_kumaraswamy`
on separate search noise (seed 1) scored against separate exact samples (seed 777), reported on the evaluation
noise; Euler, Heun, DPM-Solver++(2M) on uniform grids, and Meta ``flow_matching``'s ``ODESolver`` (Euler,
midpoint) when that package is installed.

``few_vs_multi``: sliced W2 of the few-step model at NFE 2 (UCGM-S with its tuned sampling settings) divided by
that of the multi-step model at NFE 64 (UCGM-S, official defaults); target <= :data:`FEW_VS_MULTI_TARGET`.
"""

from __future__ import annotations

import json
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
import torch
from torch import Tensor

from ..analysis import EvaluationSet, EvolutionSettings, search_kumaraswamy
from ..data.mixtures import make_mixture
from ..evaluate import run_ucgm_settings
from ..evaluation import draw_samples
from ..metrics import sliced_wasserstein
from ..metrics.suites import NUM_PROJECTIONS, REFERENCE_SEED
from ..sampling.registry import available_sampler_names, get_sampler
from ..training.components import accepted_keys, sampling_network
from ..training.config import resolve_config
from ..training.generate import initial_noise
from ..training.run import run_training
from ..training.sampling_run import load_checkpoint_model
from ..training.tune import tune_config

QUALITY_NFES = (4, 8, 16)
FEW_STEP_NFE, MULTI_STEP_NFE = 2, 64
FEW_VS_MULTI_TARGET = 1.2
SEARCH_NOISE_SEED, SEARCH_REFERENCE_SEED, FLOOR_SEED = 1, 777, 1000
#: Boundary gaps the search may choose: the official default and g1 = 0 (no call spent at t ~ 0).
SEARCH_GAPS = ((0.001, 0.001), (0.001, 0.0))
MULTI_STEP, FEW_STEP = "multi-step (flow matching)", "few-step (UCGM-T tuned)"
UCGM_DEFAULTS, UCGM_SEARCHED, UCGM_TUNED = "ucgm (official defaults)", "ucgm (searched)", "ucgm (tuned settings)"
#: Baseline samplers by label: registry name (settings are the registry defaults).
BASELINE_SAMPLERS = {"euler": "euler", "heun": "heun", "dpm++2m": "dpm++2m", "fm-euler (Meta ODESolver)": "fm-euler",
                     "fm-midpoint (Meta ODESolver)": "fm-midpoint"}


@dataclass(frozen=True)
class QualitySizes:
    """Training steps, sample counts and search budget of one benchmark size."""

    gmm_steps: int
    tune_steps: int
    digits_steps: int
    num_gmm: int
    num_reference: int
    num_digits: int
    floor_repeats: int
    search_population: int
    search_generations: int


QUICK = QualitySizes(gmm_steps=1500, tune_steps=150, digits_steps=300, num_gmm=5000, num_reference=20000,
                     num_digits=300, floor_repeats=3, search_population=8, search_generations=3)
FULL = QualitySizes(gmm_steps=3000, tune_steps=300, digits_steps=2000, num_gmm=5000, num_reference=20000,
                    num_digits=1000, floor_repeats=5, search_population=16, search_generations=10)


def _objective_overrides(objective: dict) -> list[str]:
    """``objective=NAME`` then one ``objective.KEY=VALUE`` per option (values as JSON, which YAML reads)."""
    return [f"objective={objective['name']}"] + [f"objective.{key}={json.dumps(value)}"
                                                 for key, value in objective.items() if key != "name"]


def train_gmm_models(workdir: Path, sizes: QualitySizes) -> tuple[Path, Path]:
    """The flow-matching GMM run and the few-step run tuned from it (UCGM-T with the preset's tune recipe)."""
    multi_dir, few_dir = workdir / "gmm-multi-step", workdir / "gmm-few-step"
    config = resolve_config("gmm", ["objective=flow_matching", "data.conditional=false",
                                    f"training.steps={sizes.gmm_steps}", f"training.checkpoint_every={sizes.gmm_steps}",
                                    "training.log_every=100"], accepted_keys)
    run_training(config, multi_dir, progress=False)
    tune_objective = {"name": "ucgm", **config["tune"]["objective"], "enhanced_ratio": 0.0}  # unconditional data
    run_training(tune_config(multi_dir, _objective_overrides(tune_objective) + [
        f"training.steps={sizes.tune_steps}", f"training.checkpoint_every={sizes.tune_steps}"]), few_dir, progress=False)
    return multi_dir, few_dir


def train_digits_model(workdir: Path, sizes: QualitySizes) -> Path:
    """The flow-matching digits run (small UNet; a faster EMA when the run is short)."""
    run_dir = workdir / "digits-multi-step"
    decay = 0.999 if sizes.digits_steps >= 1500 else 0.99
    config = resolve_config("digits", [
        "objective=flow_matching", "model.base_channels=16", f"training.steps={sizes.digits_steps}",
        "training.batch_size=64", f"training.checkpoint_every={sizes.digits_steps}", "training.sample_every=0",
        "training.log_every=100", f"training.ema.decay={decay}"], accepted_keys)
    run_training(config, run_dir, progress=False)
    return run_dir


class _Model:
    """A checkpoint ready to sample: network, transport, data shape, classes and the run's UCGM-S settings."""

    def __init__(self, run_dir: Path):
        loaded = load_checkpoint_model(run_dir)
        self.network, self.transport = sampling_network(loaded.model, loaded.transport, loaded.config)
        self.shape = loaded.info.data_shape
        self.num_classes = loaded.info.num_classes or 0
        self.run_settings = run_ucgm_settings(loaded.config)

    def sample(self, name: str, settings: dict, nfe: int, num: int, seed: int = 0) -> tuple[Tensor, int]:
        drawn = draw_samples(self.network, self.transport, get_sampler(name, settings), nfe, self.shape,
                             self.num_classes, num, seed)
        return drawn.samples, drawn.nfe


def comparison_samplers() -> dict[str, tuple[str, dict]]:
    """UCGM-S with official defaults and the baselines available here, by label: ``(registry name, settings)``."""
    available = set(available_sampler_names())
    samplers = {UCGM_DEFAULTS: ("ucgm", {})}
    samplers.update({label: (name, {}) for label, name in BASELINE_SAMPLERS.items() if name in available})
    return samplers


def _record(dataset: str, model: str, sampler: str, nfe: int, budget: int, metric: str, value: float,
            settings: dict) -> dict:
    return {"dataset": dataset, "model": model, "sampler": sampler, "nfe": nfe, "metric": metric, "value": value,
            "budget": budget, "settings": {key: list(v) if isinstance(v, tuple) else v for key, v in settings.items()}}


def search_ucgm(model: _Model, nfe: int, search: EvaluationSet, heldout: EvaluationSet,
                sizes: QualitySizes) -> dict:
    """The searched UCGM-S settings at ``nfe``: for each gap choice a Kumaraswamy-warp and kappa search on the
    search set; the gaps whose search value is lower win. Returns the winner's settings and every search report."""
    evolution = EvolutionSettings(population=sizes.search_population, generations=sizes.search_generations,
                                  elite=max(1, sizes.search_population // 4))
    reports = {}
    for gaps in SEARCH_GAPS:
        report = search_kumaraswamy(model.network, model.transport, nfe, search, heldout, evolution,
                                    base_settings={"gaps": gaps})
        reports[str(list(gaps))] = {key: report[key] for key in ("best", "search_value", "default_search_value",
                                                                 "heldout_value", "default_heldout_value")}
        reports[str(list(gaps))]["gaps"] = list(gaps)
    chosen = min(reports.values(), key=lambda report: report["search_value"])
    best = chosen["best"]
    settings = {"time_warp": tuple(best["time_warp"]), "extrapolation": best["extrapolation"],
                "gaps": tuple(chosen["gaps"])}
    return {"settings": settings, "searches": reports}


def gmm_quality(multi_dir: Path, few_dir: Path, sizes: QualitySizes) -> tuple[list[dict], dict, dict]:
    """GMM records, the few-vs-multi ratio and the details (floor, searches)."""
    mixture = make_mixture("8gaussians")
    reference, _ = mixture.sample(sizes.num_reference, torch.Generator().manual_seed(REFERENCE_SEED))
    search_reference, _ = mixture.sample(sizes.num_reference, torch.Generator().manual_seed(SEARCH_REFERENCE_SEED))

    def metric(samples: Tensor) -> float:
        return sliced_wasserstein(samples, reference, NUM_PROJECTIONS, seed=0)

    floors = [metric(mixture.sample(sizes.num_gmm, torch.Generator().manual_seed(FLOOR_SEED + repeat))[0])
              for repeat in range(sizes.floor_repeats)]
    multi, few = _Model(multi_dir), _Model(few_dir)
    records = []
    for label, (name, settings) in comparison_samplers().items():
        for nfe in QUALITY_NFES:
            samples, spent = multi.sample(name, settings, nfe, sizes.num_gmm)
            records.append(_record("gmm", MULTI_STEP, label, spent, nfe, "sliced_w2", metric(samples), settings))
    shape = tuple(multi.shape)
    search = EvaluationSet(initial_noise(SEARCH_NOISE_SEED, range(sizes.num_gmm), shape, torch.device("cpu")),
                           lambda samples: sliced_wasserstein(samples, search_reference, NUM_PROJECTIONS, seed=0))
    heldout = EvaluationSet(initial_noise(0, range(sizes.num_gmm), shape, torch.device("cpu")), metric)
    searches = {}
    for nfe in QUALITY_NFES:
        found = search_ucgm(multi, nfe, search, heldout, sizes)
        searches[nfe] = {"settings": {k: list(v) if isinstance(v, tuple) else v for k, v in found["settings"].items()},
                         "searches": found["searches"]}
        samples, spent = multi.sample("ucgm", found["settings"], nfe, sizes.num_gmm)
        records.append(_record("gmm", MULTI_STEP, UCGM_SEARCHED, spent, nfe, "sliced_w2", metric(samples),
                               found["settings"]))
    few_samples, few_nfe = few.sample("ucgm", few.run_settings, FEW_STEP_NFE, sizes.num_gmm)
    multi_samples, multi_nfe = multi.sample("ucgm", {}, MULTI_STEP_NFE, sizes.num_gmm)
    few_record = _record("gmm", FEW_STEP, UCGM_TUNED, few_nfe, FEW_STEP_NFE, "sliced_w2", metric(few_samples),
                         few.run_settings)
    multi_record = _record("gmm", MULTI_STEP, UCGM_DEFAULTS, multi_nfe, MULTI_STEP_NFE, "sliced_w2",
                           metric(multi_samples), {})
    records += [few_record, multi_record]
    ratio = few_record["value"] / multi_record["value"]
    few_vs_multi = {"ratio": ratio, "few_step": few_record["value"], "multi_step": multi_record["value"],
                    "few_step_nfe": FEW_STEP_NFE, "multi_step_nfe": MULTI_STEP_NFE, "target": FEW_VS_MULTI_TARGET,
                    "met": ratio <= FEW_VS_MULTI_TARGET, "few_step_settings": few_record["settings"]}
    details = {"floor": {"mean": statistics.fmean(floors), "std": statistics.stdev(floors) if len(floors) > 1 else 0.0,
                         "values": floors},
               "searches": searches}
    return records, few_vs_multi, details


def digits_quality(run_dir: Path, sizes: QualitySizes) -> tuple[list[dict], dict]:
    """Digits FD records of the comparison samplers, and the floor (training-split digits vs held-out)."""
    from ..data.digits import DIGITS_NORMALISATION, load_digits_split
    from ..metrics.digits_fd import digits_frechet_distance

    model = _Model(run_dir)
    records = []
    for label, (name, settings) in comparison_samplers().items():
        for nfe in QUALITY_NFES:
            samples, spent = model.sample(name, settings, nfe, sizes.num_digits)
            records.append(_record("digits", MULTI_STEP, label, spent, nfe, "digits_fd",
                                   digits_frechet_distance(samples)["value"], settings))
    train_digits = DIGITS_NORMALISATION.normalise(load_digits_split("train")[0])[:sizes.num_digits]
    floor = digits_frechet_distance(train_digits)
    return records, {"floor": floor["value"], "protocol": floor["protocol"]}


def run_quality(sizes: QualitySizes) -> dict:
    """Train (in a temporary directory), sample and measure; returns the ``quality``, ``few_vs_multi`` and
    ``quality_details`` keys."""
    with tempfile.TemporaryDirectory(prefix="ucgm-bench-quality-") as temporary:
        started = time.perf_counter()
        multi_dir, few_dir = train_gmm_models(Path(temporary), sizes)
        digits_dir = train_digits_model(Path(temporary), sizes)
        trained = time.perf_counter()
        gmm_records, few_vs_multi, gmm_details = gmm_quality(multi_dir, few_dir, sizes)
        digits_records, digits_details = digits_quality(digits_dir, sizes)
    details = {"sizes": asdict(sizes), "gmm": gmm_details, "digits": digits_details,
               "training_seconds": round(trained - started, 1),
               "evaluation_seconds": round(time.perf_counter() - trained, 1)}
    return {"quality": gmm_records + digits_records, "few_vs_multi": few_vs_multi, "quality_details": details}
