"""Quality benchmark: samplers at equal NFE on flow-matching-trained models, few-step vs multi-step, UCGM-S vs
Euler at 250 NFE, and classifier-free guidance vs autoguidance.

Models are trained by ucgm's own trainer into a temporary directory (deterministic, seed 0):

* GMM: the ``gmm`` preset (8 Gaussians, unconditional) with ``objective=flow_matching`` (the multi-step model),
  and a few-step model tuned from it with the preset's tuning recipe stated for the length nearest to
  ``tune_steps`` (:func:`~ucgm.cli.tune.recipe_for_steps`; the ``tune:`` section at 300; UCGM-T, consistency ratio
  1; without the enhanced target, which needs class labels).
* digits: the ``digits`` preset with ``objective=flow_matching`` (class-conditional, 16 base channels, label
  dropout 0.1 so that classifier-free guidance has a null label).
* guidance (:mod:`ucgm.bench.guidance`): the class-conditional GMM (flow matching, label dropout 0.1) and, as
  autoguidance's guides, smaller models trained for fewer steps (GMM: MLP width 32; digits: 8 base channels).

Every sampler starts from the same seeded noise (seed 0, :func:`ucgm.analysis.reports.draw_samples`). GMM quality
is the sliced W2 (256 projections) of ``num_gmm`` samples against ``num_reference`` exact mixture samples (seed
12345); the sample-noise floor is the same distance for ``num_gmm`` exact samples (seeds 1000, 1001, ...), mean and
std over ``floor_repeats`` draws. Digits quality is the digits FD of ``num_digits`` samples against the held-out
split (floor: as many training-split digits).

Samplers at NFE 4, 8, 16, labelled by registry name: ``ucgm`` (ucgm's defaults, no per-model search), ``ucgm-o2``
(ucgm's stable order 2), ``ucgm-official`` and ``ucgm-o2-official`` (the official defaults: rho = 0, kappa = 0,
warp (1, 1, 1), gaps (0.001, 0.001)), the baselines Euler, Heun, DPM-Solver++(2M) on uniform grids and Meta
``flow_matching``'s ``ODESolver`` (Euler, midpoint) when installed; on the GMM also UCGM-S with *searched*
settings: for each NFE, the boundary gaps from :data:`SEARCH_GAPS` and the Kumaraswamy warp and kappa found by
:func:`~ucgm.analysis.search_kumaraswamy` (official sampler) on separate search noise (seed 1, ``num_search``
samples) scored by sliced W2 with 64 other projections against separate exact samples (seed 777); the table
reports them on the evaluation noise. The NFE-8 comparison of UCGM-S with Euler is repeated on
``paired_repeats`` further noise seeds (100, 101, ...): the mean and std of the paired differences say whether a
gap is larger than the sampling noise.

``few_vs_multi``: sliced W2 of the few-step model at NFE 2 divided by that of the multi-step model at NFE 64
(``ucgm``); target <= :data:`FEW_VS_MULTI_TARGET`. The few-step model samples with its run's tuned settings whose
stochasticity and end gap are chosen from :data:`FEW_STEP_GRID` on the search set (the ratio with the run's
settings unchanged is reported too).

``ucgm_vs_euler_250``: per dataset, the smallest NFE of :data:`MATCH_NFES` at which ``ucgm`` is at least as good
as Euler at 250 NFE on the multi-step model (:func:`~ucgm.analysis.nfe_match.smallest_matching_nfe`).
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
from ..analysis.nfe_match import match_reference
from ..data.mixtures import make_mixture
from ..analysis.reports import draw_samples, jsonable_settings, run_ucgm_settings
from ..metrics.suites import REFERENCE_SEED, SlicedW2Against
from ..sampling.registry import UCGM_SAMPLERS, available_sampler_names, get_sampler, ucgm_settings
from ..cli.components import accepted_keys
from ..cli.config import resolve_config
from ..sampling.seeded import fresh_noise_source, initial_noise
from ..cli.train import run_training
from ..cli.sample import load_checkpoint_model
from ..cli.tune import recipe_for_steps, tune_config, tune_recipe
from .guidance import class_metrics, digits_class_accuracy, guidance_records, mixture_coverage

QUALITY_NFES = (4, 8, 16)
COMPARISON_NFE = 8
FEW_STEP_NFE, MULTI_STEP_NFE = 2, 64
FEW_VS_MULTI_TARGET = 1.2
SEARCH_NOISE_SEED, SEARCH_REFERENCE_SEED, FLOOR_SEED, PAIRED_SEED = 1, 777, 1000, 100
#: Projections of the search's sliced W2 (its own directions, seed 1); the reported values use 256.
SEARCH_PROJECTIONS = 64
#: Boundary gaps the search may choose: the official default and g1 = 0 (no call spent at t ~ 0).
SEARCH_GAPS = ((0.001, 0.001), (0.001, 0.0))
#: Few-step UCGM-S (stochasticity, end gap g1) pairs searched at NFE 2.
FEW_STEP_GRID = tuple((rho, gap) for rho in (0.0, 0.5, 1.0) for gap in (0.1, 0.2, 0.3, 0.5))
MULTI_STEP, FEW_STEP = "multi-step (flow matching)", "few-step (UCGM-T tuned)"
UCGM_DEFAULTS, UCGM_OFFICIAL, UCGM_SEARCHED = "ucgm", "ucgm-official", "ucgm (searched)"
UCGM_TUNED, UCGM_TUNED_SEARCHED = "ucgm (run's tuned settings)", "ucgm (searched rho, g1)"
#: Samplers of the equal-NFE tables by label: registry name (settings are the registry defaults).
COMPARED_SAMPLERS = {"ucgm": "ucgm", "ucgm-o2": "ucgm-o2", "ucgm-official": "ucgm-official",
                     "ucgm-o2-official": "ucgm-o2-official", "euler": "euler", "heun": "heun", "dpm++2m": "dpm++2m",
                     "fm-euler (Meta ODESolver)": "fm-euler", "fm-midpoint (Meta ODESolver)": "fm-midpoint"}
#: Budgets scanned for the smallest NFE at which ``ucgm`` matches Euler at 250.
MATCH_NFES = (2, 3, 4, 5, 6, 8, 10, 12, 16, 24, 32, 48, 64, 128, 250)
#: The guide of autoguidance: a smaller model than the guided one (GMM MLP width, digits base channels).
GMM_GUIDE_WIDTH, DIGITS_GUIDE_CHANNELS = 32, 8


@dataclass(frozen=True)
class QualitySizes:
    """Training steps, sample counts, repeats and search budget of one benchmark size."""

    gmm_steps: int
    tune_steps: int
    digits_steps: int
    num_gmm: int
    num_reference: int
    num_search: int
    num_digits: int
    floor_repeats: int
    paired_repeats: int
    search_population: int
    search_generations: int
    guide_gmm_steps: int
    guide_digits_steps: int
    num_guidance: int


QUICK = QualitySizes(gmm_steps=1500, tune_steps=150, digits_steps=300, num_gmm=5000, num_reference=20000,
                     num_search=2000, num_digits=300, floor_repeats=3, paired_repeats=3, search_population=8,
                     search_generations=3, guide_gmm_steps=250, guide_digits_steps=60, num_guidance=2000)
FULL = QualitySizes(gmm_steps=3000, tune_steps=300, digits_steps=2000, num_gmm=20000, num_reference=100000,
                    num_search=10000, num_digits=1000, floor_repeats=5, paired_repeats=5, search_population=12,
                    search_generations=6, guide_gmm_steps=500, guide_digits_steps=300, num_guidance=8000)


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
    recipe = recipe_for_steps(config, sizes.tune_steps)
    tune_objective = {"name": "ucgm", **tune_recipe(config, recipe)["objective"],
                      "enhanced_ratio": 0.0}  # unconditional data
    run_training(tune_config(multi_dir, _objective_overrides(tune_objective) + [
        f"training.steps={sizes.tune_steps}", f"training.checkpoint_every={sizes.tune_steps}"], recipe), few_dir,
        progress=False)
    return multi_dir, few_dir


def _digits_run(run_dir: Path, steps: int, channels: int) -> Path:
    """A conditional flow-matching digits run with label dropout 0.1 (small UNet; a faster EMA when short)."""
    decay = 0.999 if steps >= 1500 else 0.99
    config = resolve_config("digits", [
        "objective=flow_matching", "objective.label_dropout=0.1", f"model.base_channels={channels}",
        f"training.steps={steps}", "training.batch_size=64", f"training.checkpoint_every={steps}",
        "training.sample_every=0", "training.log_every=100", f"training.ema.decay={decay}"], accepted_keys)
    run_training(config, run_dir, progress=False)
    return run_dir


def train_digits_model(workdir: Path, sizes: QualitySizes) -> Path:
    """The flow-matching digits run (16 base channels)."""
    return _digits_run(workdir / "digits-multi-step", sizes.digits_steps, 16)


def train_guidance_models(workdir: Path, sizes: QualitySizes) -> dict[str, tuple[Path, Path]]:
    """Per dataset, the guided model's run and its guide's (smaller, fewer steps): the class-conditional GMM
    (flow matching, label dropout 0.1) and the digits (the multi-step run is the guided model)."""
    runs = {}
    for name, steps, width in (("gmm-conditional", sizes.gmm_steps, 128),
                               ("gmm-guide", sizes.guide_gmm_steps, GMM_GUIDE_WIDTH)):
        config = resolve_config("gmm", ["objective=flow_matching", "objective.label_dropout=0.1",
                                        f"model.hidden={width}", f"training.steps={steps}",
                                        f"training.checkpoint_every={steps}", "training.log_every=100"], accepted_keys)
        run_training(config, workdir / name, progress=False)
        runs[name] = workdir / name
    digits_guide = _digits_run(workdir / "digits-guide", sizes.guide_digits_steps, DIGITS_GUIDE_CHANNELS)
    return {"gmm": (runs["gmm-conditional"], runs["gmm-guide"]), "digits": (workdir / "digits-multi-step",
                                                                           digits_guide)}


class _Model:
    """A checkpoint ready to sample: network, transport, data shape, classes, the run's UCGM-S settings and the
    number of samples ``num`` it is measured with."""

    def __init__(self, run_dir: Path, num: int):
        loaded = load_checkpoint_model(run_dir)
        self.num = num
        self.network, self.transport = loaded.model, loaded.transport
        self.shape = loaded.info.data_shape
        self.num_classes = loaded.info.num_classes or 0
        self.run_settings = run_ucgm_settings(loaded.config)

    def sample(self, name: str, settings: dict, nfe: int, num: int, seed: int = 0) -> tuple[Tensor, int]:
        drawn = draw_samples(self.network, self.transport, get_sampler(name, settings), nfe, self.shape,
                             self.num_classes, num, seed, batch_size=num)
        return drawn.samples, drawn.nfe


def comparison_samplers() -> dict[str, tuple[str, dict]]:
    """The UCGM-S samplers and the baselines available here, by label: ``(registry name, settings)``."""
    available = set(available_sampler_names())
    return {label: (name, {}) for label, name in COMPARED_SAMPLERS.items() if name in available}


def _record(dataset: str, model: str, sampler: str, nfe: int, budget: int, metric: str, value: float,
            settings: dict, name: str = "") -> dict:
    """A record; UCGM-S records (registry ``name``) hold the settings they ran with, the defaults included."""
    effective = ucgm_settings(name, settings) if name in UCGM_SAMPLERS else settings
    return {"dataset": dataset, "model": model, "sampler": sampler, "nfe": nfe, "metric": metric, "value": value,
            "budget": budget, "settings": jsonable_settings(effective)}


def search_ucgm(model: _Model, nfe: int, search: EvaluationSet, heldout: EvaluationSet,
                sizes: QualitySizes) -> dict:
    """The searched settings of the official UCGM-S at ``nfe``: for each gap choice a Kumaraswamy-warp and kappa
    search on the search set; the gaps whose search value is lower win. Returns the winner's settings and every
    search report."""
    evolution = EvolutionSettings(population=sizes.search_population, generations=sizes.search_generations,
                                  elite=max(1, sizes.search_population // 4))
    reports = {}
    for gaps in SEARCH_GAPS:
        report = search_kumaraswamy(model.network, model.transport, nfe, search, heldout, evolution,
                                    sampler=UCGM_OFFICIAL, base_settings={"gaps": gaps})
        reports[str(list(gaps))] = {key: report[key] for key in ("best", "search_value", "default_search_value",
                                                                 "heldout_value", "default_heldout_value")}
        reports[str(list(gaps))]["gaps"] = list(gaps)
    chosen = min(reports.values(), key=lambda report: report["search_value"])
    best = chosen["best"]
    settings = {"time_warp": tuple(best["time_warp"]), "extrapolation": best["extrapolation"],
                "gaps": tuple(chosen["gaps"])}
    return {"settings": settings, "searches": reports}


class _GmmSetting:
    """The GMM protocol: the mixture, the reported metric, and the search / evaluation sets of the searches."""

    def __init__(self, sizes: QualitySizes, shape: tuple):
        self.sizes = sizes
        self.mixture = make_mixture("8gaussians")
        self.metric = SlicedW2Against(self._exact(sizes.num_reference, REFERENCE_SEED))
        search_metric = SlicedW2Against(self._exact(sizes.num_reference, SEARCH_REFERENCE_SEED), SEARCH_PROJECTIONS,
                                        seed=SEARCH_NOISE_SEED)
        cpu = torch.device("cpu")
        self.search = EvaluationSet(initial_noise(SEARCH_NOISE_SEED, range(sizes.num_search), shape, cpu),
                                    search_metric)
        self.heldout = EvaluationSet(initial_noise(0, range(sizes.num_gmm), shape, cpu), self.metric)

    def _exact(self, count: int, seed: int) -> Tensor:
        return self.mixture.sample(count, torch.Generator().manual_seed(seed))[0]

    def floor(self) -> dict:
        """Sliced W2 of ``num_gmm`` exact samples (seeds 1000, 1001, ...): mean, std and the values."""
        values = [self.metric(self._exact(self.sizes.num_gmm, FLOOR_SEED + repeat))
                  for repeat in range(self.sizes.floor_repeats)]
        return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
                "values": values}


def _mean_std(values: list[float]) -> dict:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0}


def paired_comparison(model: _Model, samplers: dict[str, dict], metric: SlicedW2Against, sizes: QualitySizes) -> dict:
    """UCGM-S settings vs Euler at NFE 8 on ``paired_repeats`` further noise seeds (100, 101, ...; ``num_gmm``
    samples each): per seed, the sliced W2 of each; the mean and std over seeds of each difference to Euler."""
    seeds = [PAIRED_SEED + repeat for repeat in range(sizes.paired_repeats)]
    values = {label: [metric(model.sample(name, settings, COMPARISON_NFE, sizes.num_gmm, seed)[0]) for seed in seeds]
              for label, (name, settings) in samplers.items()}
    differences = {label: _mean_std([mine - euler for mine, euler in zip(values[label], values["euler"])])
                   for label in values if label != "euler"}
    return {"nfe": COMPARISON_NFE, "seeds": seeds, "values": values, "difference_to_euler": differences}


def search_few_step_settings(model: _Model, search: EvaluationSet) -> dict:
    """The few-step model's UCGM-S settings at NFE 2: the run's own, with stochasticity and end gap from
    :data:`FEW_STEP_GRID` chosen on the search set."""
    scores = {}
    for stochasticity, end_gap in FEW_STEP_GRID:
        settings = {**model.run_settings, "stochasticity": stochasticity, "gaps": (0.001, end_gap)}
        sampler = get_sampler("ucgm", settings)
        scores[(stochasticity, end_gap)] = search.score(
            lambda noise, labels: sampler(model.network, model.transport, noise, labels, FEW_STEP_NFE,
                                          fresh_noise_source(0, range(noise.shape[0]))))[0]
    stochasticity, end_gap = min(scores, key=scores.get)
    return {**model.run_settings, "stochasticity": stochasticity, "gaps": (0.001, end_gap)}


def match_euler(model: _Model, score, higher_is_better: bool = False) -> dict:
    """The smallest NFE of :data:`MATCH_NFES` at which ``ucgm`` is at least as good as Euler at 250 NFE."""
    return match_reference(lambda name, nfe: score(model.sample(name, {}, nfe, model.num)[0]), "ucgm", MATCH_NFES,
                           higher_is_better)


def _table_records(dataset: str, model: _Model, metric_name: str, score) -> list[dict]:
    """Every comparison sampler at every NFE of :data:`QUALITY_NFES` on the multi-step model."""
    records = []
    for label, (name, settings) in comparison_samplers().items():
        for nfe in QUALITY_NFES:
            samples, spent = model.sample(name, settings, nfe, model.num)
            records.append(_record(dataset, MULTI_STEP, label, spent, nfe, metric_name, score(samples), settings,
                                   name))
    return records


def gmm_quality(multi_dir: Path, few_dir: Path, sizes: QualitySizes) -> tuple[list[dict], dict, dict]:
    """GMM records, the few-vs-multi ratio and the details (floor, searches, paired NFE-8 comparison, the NFE at
    which ``ucgm`` matches Euler at 250)."""
    multi, few = _Model(multi_dir, sizes.num_gmm), _Model(few_dir, sizes.num_gmm)
    setting = _GmmSetting(sizes, tuple(multi.shape))
    metric = setting.metric
    records = _table_records("gmm", multi, "sliced_w2", metric)
    searches = {}
    for nfe in QUALITY_NFES:
        found = search_ucgm(multi, nfe, setting.search, setting.heldout, sizes)
        searches[nfe] = {**found, "settings": jsonable_settings(found["settings"])}
        samples, spent = multi.sample(UCGM_OFFICIAL, found["settings"], nfe, sizes.num_gmm)
        records.append(_record("gmm", MULTI_STEP, UCGM_SEARCHED, spent, nfe, "sliced_w2", metric(samples),
                               found["settings"], UCGM_OFFICIAL))
    paired = paired_comparison(multi, {UCGM_SEARCHED: (UCGM_OFFICIAL, searches[COMPARISON_NFE]["settings"]),
                                       UCGM_DEFAULTS: ("ucgm", {}), UCGM_OFFICIAL: (UCGM_OFFICIAL, {}),
                                       "euler": ("euler", {})}, metric, sizes)
    few_records = {}
    for label, settings in ((UCGM_TUNED, few.run_settings),
                            (UCGM_TUNED_SEARCHED, search_few_step_settings(few, setting.search))):
        samples, spent = few.sample("ucgm", settings, FEW_STEP_NFE, sizes.num_gmm)
        few_records[label] = _record("gmm", FEW_STEP, label, spent, FEW_STEP_NFE, "sliced_w2", metric(samples),
                                     settings, "ucgm")
    samples, spent = multi.sample("ucgm", {}, MULTI_STEP_NFE, sizes.num_gmm)
    multi_record = _record("gmm", MULTI_STEP, UCGM_DEFAULTS, spent, MULTI_STEP_NFE, "sliced_w2", metric(samples), {},
                           "ucgm")
    records += [*few_records.values(), multi_record]
    few_record = few_records[UCGM_TUNED_SEARCHED]
    ratio = few_record["value"] / multi_record["value"]
    few_vs_multi = {"ratio": ratio, "few_step": few_record["value"], "multi_step": multi_record["value"],
                    "few_step_nfe": FEW_STEP_NFE, "multi_step_nfe": MULTI_STEP_NFE, "target": FEW_VS_MULTI_TARGET,
                    "met": ratio <= FEW_VS_MULTI_TARGET, "few_step_settings": few_record["settings"],
                    "ratio_with_run_settings": few_records[UCGM_TUNED]["value"] / multi_record["value"],
                    "run_settings": few_records[UCGM_TUNED]["settings"]}
    details = {"floor": setting.floor(), "searches": searches, "paired_nfe8": paired,
               "match_euler": match_euler(multi, metric)}
    return records, few_vs_multi, details


def digits_quality(run_dir: Path, sizes: QualitySizes) -> tuple[list[dict], dict]:
    """Digits FD records of the comparison samplers, the floor (training-split digits vs held-out) and the NFE at
    which ``ucgm`` matches Euler at 250."""
    from ..data.digits import DIGITS_NORMALISATION, load_digits_split
    from ..metrics.digits_fd import digits_frechet_distance

    def score(samples: Tensor) -> float:
        return digits_frechet_distance(samples)["value"]

    model = _Model(run_dir, sizes.num_digits)
    records = _table_records("digits", model, "digits_fd", score)
    train_digits = DIGITS_NORMALISATION.normalise(load_digits_split("train")[0])[:sizes.num_digits]
    floor = digits_frechet_distance(train_digits)
    return records, {"floor": floor["value"], "protocol": floor["protocol"], "match_euler": match_euler(model, score)}


def guidance_quality(runs: dict[str, tuple[Path, Path]], sizes: QualitySizes) -> list[dict]:
    """CFG and autoguidance records on the conditional GMM and the digits (:mod:`ucgm.bench.guidance`)."""
    from ..data.digits import DIGITS_NORMALISATION, load_digits_split

    mixture = make_mixture("8gaussians")
    reference, reference_labels = mixture.sample(sizes.num_reference, torch.Generator().manual_seed(REFERENCE_SEED))
    digits, digit_labels = load_digits_split("all")
    measures = {"gmm": class_metrics(reference, reference_labels, mixture_coverage(mixture)),
                "digits": class_metrics(DIGITS_NORMALISATION.normalise(digits).reshape(digits.shape[0], -1),
                                        digit_labels, digits_class_accuracy)}
    counts = {"gmm": sizes.num_guidance, "digits": sizes.num_digits}
    records = []
    for dataset, (model_dir, guide_dir) in runs.items():
        model, guide = _Model(model_dir, counts[dataset]), _Model(guide_dir, counts[dataset])
        records += guidance_records(dataset, model.network, guide.network, model.transport, tuple(model.shape),
                                    model.num_classes, counts[dataset], measures[dataset])
    return records


def run_quality(sizes: QualitySizes) -> dict:
    """Train (in a temporary directory), sample and measure; returns the ``quality``, ``few_vs_multi``,
    ``few_vs_multi_details``, ``ucgm_vs_euler_250``, ``guidance`` and ``quality_details`` keys."""
    with tempfile.TemporaryDirectory(prefix="ucgm-bench-quality-") as temporary:
        started = time.perf_counter()
        multi_dir, few_dir = train_gmm_models(Path(temporary), sizes)
        digits_dir = train_digits_model(Path(temporary), sizes)
        guidance_runs = train_guidance_models(Path(temporary), sizes)
        trained = time.perf_counter()
        gmm_records, few_vs_multi, gmm_details = gmm_quality(multi_dir, few_dir, sizes)
        digits_records, digits_details = digits_quality(digits_dir, sizes)
        guidance = guidance_quality(guidance_runs, sizes)
    details = {"sizes": asdict(sizes), "gmm": gmm_details, "digits": digits_details,
               "training_seconds": round(trained - started, 1),
               "evaluation_seconds": round(time.perf_counter() - trained, 1)}
    match = {dataset: details[dataset]["match_euler"]["smallest_nfe"] for dataset in ("gmm", "digits")}
    return {"quality": gmm_records + digits_records, "few_vs_multi": few_vs_multi["ratio"],
            "few_vs_multi_details": few_vs_multi, "ucgm_vs_euler_250": match, "guidance": guidance,
            "quality_details": details}
