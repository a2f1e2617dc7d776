"""Consistency-family benchmark: few-step quality against NFE and the cost of a training step.

Every model is trained by ucgm's own trainer (:func:`~ucgm.cli.train.run_training`) in a temporary directory
from the presets' per-objective defaults (``ucgm train gmm objective=NAME``, the ``objectives:`` section of the
preset), seed 0, the same number of steps for every method of a dataset:

* GMM: 8 Gaussians, **unconditional** (``data.conditional=false``; CD and MCM distil the exact unconditional
  mixture oracle). Rows: ``cd``, ``ct``, ``ict``, ``mcm``, ``scm`` (sCT on TrigFlow) from scratch; ``ect`` tuned
  from the flow-matching run; ``tcm`` stage 2 initialised from the ``ect`` run (its stage 1, a standard CM) with
  learning rate 3e-5 (the gmm preset's comment: higher rates drift away from the stage-1 model);
  ``ucgm (lambda=1)`` tuned from the flow-matching run with the preset's tuning recipe stated for the length nearest
  to the section's steps (:func:`~ucgm.cli.tune.recipe_for_steps`: ``tune_recipes.long`` at 3000 steps, ``tune:``
  at 300; no enhanced target, which needs labels); and the flow-matching run itself as the multi-step reference.
* digits (class-conditional 8x8 digits, UNet with 16 base channels, batch 64): ``ct`` and ``scm`` from scratch and
  the flow-matching reference.

Sampling: the EMA weights read as each method trained them (:func:`~ucgm.training.loading.load_checkpoint_model`,
the path of ``ucgm sample`` and ``ucgm evaluate``), each method's own sampler (``Method.sampler()``, the default of
``ucgm evaluate``) at NFE 1, 2, 4, 8, 16 from the same seeded noise (:func:`ucgm.analysis.reports.draw_samples`):
``cm-multistep`` (CM's multistep sampler, Karras times) for cd/ct/ict/ect/tcm; ``mcm`` (NFE jumps along equal
segments, DDIM; trained with 4 segments, so NFE 4 is its native budget) for mcm; ``scm`` for scm; UCGM-S with the
run's tuned settings for ucgm; Euler on a uniform grid for flow matching. Quality: sliced W2 (256 projections) of ``num_gmm`` samples against
``num_reference`` exact mixture samples (seed 12345), with the sample-noise floor of exact samples; digits FD of
``num_digits`` samples against the held-out split, with the floor of as many training digits.

``degrades_with_steps``: the NFE-16 value exceeds the best value over the NFEs by more than both
:data:`DEGRADATION_TOLERANCE` (relative) and twice the standard deviation of the floor over its draws (GMM; the
digits floor is a single value); ``ratio_16_over_1`` = value at NFE 16 / value at NFE 1.

Step cost: one training step of each method's config divided by one flow-matching step of the same dataset (same
model size and batch), the trainer's real ``train_step`` with the like-for-like settings of
:mod:`ucgm.bench.throughput` (no EMA / clipping / warm-up), one thread, blocks of steps interleaved
(:func:`~ucgm.bench.timing.interleaved_medians`); teachers, reference networks and tangents are part of the step.
"""

from __future__ import annotations

import json
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
from torch import Tensor

from ..data.mixtures import make_mixture
from ..analysis.reports import draw_samples, run_ucgm_settings
from ..metrics.suites import REFERENCE_SEED, SlicedW2Against
from ..sampling.registry import BudgetedSampler, get_sampler
from ..training.loading import LoadedCheckpoint
from ..cli.components import accepted_keys
from ..cli.config import read_yaml_mapping, resolve_config
from ..cli.train import CONFIG_FILE, run_training
from ..cli.sample import load_checkpoint_model
from ..cli.tune import recipe_for_steps, tune_config, tune_recipe
from .throughput import like_for_like, make_trainer, single_thread, trainer_block, training_setup
from .timing import interleaved_medians

NFES = (1, 2, 4, 8, 16)
#: Relative excess of the NFE-16 value over the best one that counts as degrading with more steps.
DEGRADATION_TOLERANCE = 0.05
FLOOR_SEED = 1000
FLOW_MATCHING = "flow_matching"


@dataclass(frozen=True)
class ConsistencySizes:
    """Training steps, sample counts and timing budget of one benchmark size."""

    gmm_steps: int
    digits_steps: int
    num_gmm: int
    num_reference: int
    num_digits: int
    floor_repeats: int
    timing_block_steps: int
    timing_rounds: int


QUICK = ConsistencySizes(gmm_steps=300, digits_steps=60, num_gmm=2000, num_reference=10000, num_digits=200,
                         floor_repeats=3, timing_block_steps=3, timing_rounds=9)
FULL = ConsistencySizes(gmm_steps=3000, digits_steps=1500, num_gmm=5000, num_reference=20000, num_digits=1000,
                        floor_repeats=5, timing_block_steps=5, timing_rounds=15)


@dataclass(frozen=True)
class Method:
    """One table row: how its model is trained (``objective=NAME`` on the preset, or the preset's ``tune:`` recipe)
    and which sampler (a key of :data:`SAMPLERS`) draws from it."""

    label: str
    objective: str
    sampler: str
    start: Optional[str] = None
    overrides: tuple[str, ...] = ()
    tuned: bool = False

    @property
    def origin(self) -> str:
        """Where training starts: ``scratch``, ``init from RUN`` or ``ucgm tune of RUN``."""
        if self.start is None:
            return "scratch"
        return f"ucgm tune of {self.start}" if self.tuned else f"init from {self.start}"


GMM_METHODS = (
    Method(FLOW_MATCHING, FLOW_MATCHING, "euler"),
    Method("cd", "cd", "own"),
    Method("ct", "ct", "own"),
    Method("ict", "ict", "own"),
    Method("ect", "ect", "own", start=FLOW_MATCHING),
    Method("mcm", "mcm", "own"),
    Method("tcm", "tcm", "own", start="ect", overrides=("objective.stage=2", "optimizer.lr=3e-5")),
    Method("scm", "scm", "own"),
    Method("ucgm (lambda=1)", "ucgm", "ucgm-run", start=FLOW_MATCHING, tuned=True),
)
DIGITS_METHODS = (
    Method(FLOW_MATCHING, FLOW_MATCHING, "euler"),
    Method("ct", "ct", "own"),
    Method("scm", "scm", "own"),
)
GMM_OVERRIDES = ("data.conditional=false",)
#: Smaller UNet and batch than the digits preset, for CPU minutes (as the quality section).
DIGITS_OVERRIDES = ("model.base_channels=16", "training.batch_size=64", "training.sample_every=0")


# ------------------------------------------------------------------------------------------- samplers
#: Sampler key -> ``loaded checkpoint -> BudgetedSampler``: the method's own sampler (as ``ucgm sample`` and
#: ``ucgm evaluate`` use it by default), Euler, or UCGM-S with the run's tuned settings.
SAMPLERS: dict[str, Callable[[LoadedCheckpoint], BudgetedSampler]] = {
    "own": lambda loaded: get_sampler(*loaded.method.sampler()),
    "euler": lambda loaded: get_sampler("euler"),
    "ucgm-run": lambda loaded: get_sampler("ucgm", run_ucgm_settings(loaded.config)),
}
#: How the table names the samplers (the method's own sampler by its registry name).
OWN_SAMPLER_TEXT = {"cm-multistep": "CM multistep (Karras times)", "mcm": "MCM, NFE segments (DDIM)",
                    "scm": "sCM (s_mid = 1.1, ...)"}
SAMPLER_TEXT = {"euler": "Euler (uniform grid)", "ucgm-run": "UCGM-S, run's tuned settings"}


def sampler_text(key: str, loaded: LoadedCheckpoint) -> str:
    if key == "own":
        name = loaded.method.sampler()[0]
        return OWN_SAMPLER_TEXT.get(name, name)
    return SAMPLER_TEXT[key]


# ------------------------------------------------------------------------------------------- training
def _objective_overrides(objective: dict) -> list[str]:
    """``objective=NAME`` then one ``objective.KEY=VALUE`` per option (values as JSON, which YAML reads)."""
    return [f"objective={objective['name']}"] + [f"objective.{key}={json.dumps(value)}"
                                                 for key, value in objective.items() if key != "name"]


def _run_config(preset: str, base: tuple[str, ...], method: Method, steps: int, run_dirs: dict[str, Path]) -> dict:
    """The resolved training config of ``method``."""
    length = [f"training.steps={steps}", f"training.checkpoint_every={steps}", f"training.log_every={steps}"]
    if method.tuned:
        source = read_yaml_mapping(run_dirs[method.start] / CONFIG_FILE)
        name = recipe_for_steps(source, steps)
        recipe = {"name": method.objective, **tune_recipe(source, name)["objective"], "enhanced_ratio": 0.0}
        return tune_config(run_dirs[method.start], _objective_overrides(recipe) + length, name)
    start = [] if method.start is None else [f"init.checkpoint={run_dirs[method.start]}", "init.weights=ema"]
    overrides = list(base) + [f"objective={method.objective}", *method.overrides, *length, *start]
    return resolve_config(preset, overrides, accepted_keys)


def train_methods(preset: str, base: tuple[str, ...], methods: tuple[Method, ...], steps: int, workdir: Path
                  ) -> tuple[dict[str, Path], dict[str, float]]:
    """Train every method in order (starts before the runs they initialise); run directories and seconds."""
    run_dirs, seconds = {}, {}
    for method in methods:
        run_dir = workdir / f"{preset}-{method.objective}-{len(run_dirs)}"
        started = time.perf_counter()
        run_training(_run_config(preset, base, method, steps, run_dirs), run_dir, progress=False)
        seconds[method.label] = round(time.perf_counter() - started, 1)
        run_dirs[method.label] = run_dir
    return run_dirs, seconds


# -------------------------------------------------------------------------------------------- quality
def quality_curve(run_dir: Path, sampler: str, metric: Callable[[Tensor], float], num: int
                  ) -> tuple[dict[int, float], str]:
    """The metric of ``num`` samples of the run's EMA weights at every NFE of :data:`NFES`, and the sampler's
    table text."""
    loaded = load_checkpoint_model(run_dir)
    network, transport = loaded.model, loaded.transport
    budgeted = SAMPLERS[sampler](loaded)
    values = {}
    for nfe in NFES:
        drawn = draw_samples(network, transport, budgeted, nfe, loaded.info.data_shape, loaded.info.num_classes or 0,
                             num)
        if drawn.nfe != nfe:
            raise RuntimeError(f"sampler {sampler!r} spent {drawn.nfe} NFE for a budget of {nfe}")
        values[nfe] = metric(drawn.samples)
    return values, sampler_text(sampler, loaded)


def step_trend(values: dict[int, float], noise: float = 0.0) -> dict:
    """Whether quality degrades as the NFE grows: the NFE-16 / NFE-1 ratio, the best NFE and the verdict (the
    largest-NFE value exceeds the best by more than ``DEGRADATION_TOLERANCE`` relative and ``2 * noise``, the
    standard deviation of the metric's sample-noise floor)."""
    best_nfe = min(values, key=values.get)
    best, last = values[best_nfe], values[max(values)]
    margin = max(DEGRADATION_TOLERANCE * best, 2 * noise)
    return {"ratio_16_over_1": last / values[min(values)], "best_nfe": best_nfe,
            "degrades_with_steps": last > best + margin}


def gmm_metric(sizes: ConsistencySizes) -> tuple[Callable[[Tensor], float], dict]:
    """Sliced W2 against exact unconditional mixture samples, and the sample-noise floor."""
    mixture = make_mixture("8gaussians")
    metric = SlicedW2Against(mixture.sample(sizes.num_reference, torch.Generator().manual_seed(REFERENCE_SEED))[0])
    floors = [metric(mixture.sample(sizes.num_gmm, torch.Generator().manual_seed(FLOOR_SEED + repeat))[0])
              for repeat in range(sizes.floor_repeats)]
    return metric, {"metric": "sliced_w2", "mean": statistics.fmean(floors), "std": statistics.pstdev(floors),
                    "values": floors}


def digits_metric(sizes: ConsistencySizes) -> tuple[Callable[[Tensor], float], dict]:
    """Digits FD against the held-out split, and the floor of as many training digits."""
    from ..data.digits import DIGITS_NORMALISATION, load_digits_split
    from ..metrics.digits_fd import digits_frechet_distance

    def metric(samples: Tensor) -> float:
        return digits_frechet_distance(samples)["value"]

    train_digits = DIGITS_NORMALISATION.normalise(load_digits_split("train")[0])[:sizes.num_digits]
    return metric, {"metric": "digits_fd", "mean": metric(train_digits), "std": 0.0}


# ----------------------------------------------------------------------------------------------- cost
def step_costs(run_dirs: dict[str, Path], sizes: ConsistencySizes) -> tuple[dict[str, float], float]:
    """Median step time of every run's like-for-like config / that of the flow-matching run; and the latter."""
    blocks = {}
    for label, run_dir in run_dirs.items():
        setup = training_setup(like_for_like(read_yaml_mapping(run_dir / CONFIG_FILE)))
        blocks[label] = trainer_block(make_trainer(setup.config, setup.model, setup.batches), sizes.timing_block_steps)
    with single_thread():
        medians = interleaved_medians(blocks, repeats=sizes.timing_rounds, warmup=1)
    reference = medians[FLOW_MATCHING]
    return {label: value / reference for label, value in medians.items()}, reference / sizes.timing_block_steps


# -------------------------------------------------------------------------------------------- dataset
def benchmark_dataset(dataset: str, preset: str, base: tuple[str, ...], methods: tuple[Method, ...], steps: int,
                      metric: Callable[[Tensor], float], noise: float, num: int, sizes: ConsistencySizes,
                      workdir: Path) -> tuple[list[dict], dict]:
    """Train, time and sample every method of one dataset (``noise``: the metric's sample-noise std); rows and the
    dataset's details."""
    run_dirs, train_seconds = train_methods(preset, base, methods, steps, workdir)
    costs, fm_step_seconds = step_costs(run_dirs, sizes)
    rows = []
    for method in methods:
        values, text = quality_curve(run_dirs[method.label], method.sampler, metric, num)
        objective = read_yaml_mapping(run_dirs[method.label] / CONFIG_FILE)["objective"]
        rows.append({"dataset": dataset, "method": method.label, "objective": objective, "origin": method.origin,
                     "overrides": list(method.overrides),
                     "sampler": text, "steps": steps,
                     "values": {str(nfe): value for nfe, value in values.items()}, **step_trend(values, noise),
                     "step_cost_vs_fm": costs[method.label], "train_seconds": train_seconds[method.label]})
    return rows, {"flow_matching_step_seconds": fm_step_seconds, "steps": steps, "num_samples": num}


def run_consistency(sizes: ConsistencySizes) -> dict:
    """Train (in a temporary directory), time and sample; returns the ``consistency`` and ``consistency_details``
    keys."""
    started = time.perf_counter()
    gmm_score, gmm_floor = gmm_metric(sizes)
    digits_score, digits_floor = digits_metric(sizes)
    with tempfile.TemporaryDirectory(prefix="ucgm-bench-consistency-") as temporary:
        gmm_rows, gmm_details = benchmark_dataset("gmm", "gmm", GMM_OVERRIDES, GMM_METHODS, sizes.gmm_steps,
                                                  gmm_score, gmm_floor["std"], sizes.num_gmm, sizes, Path(temporary))
        digits_overrides = DIGITS_OVERRIDES + (f"training.ema.decay={0.999 if sizes.digits_steps >= 1500 else 0.99}",)
        digits_rows, digits_details = benchmark_dataset("digits", "digits", digits_overrides, DIGITS_METHODS,
                                                        sizes.digits_steps, digits_score, digits_floor["std"],
                                                        sizes.num_digits, sizes, Path(temporary))
    details = {"sizes": asdict(sizes), "nfes": list(NFES), "degradation_tolerance": DEGRADATION_TOLERANCE,
               "gmm": {**gmm_details, "floor": gmm_floor, "conditional": False, "overrides": list(GMM_OVERRIDES)},
               "digits": {**digits_details, "floor": digits_floor, "conditional": True,
                          "overrides": list(digits_overrides)},
               "seconds": round(time.perf_counter() - started, 1)}
    return {"consistency": gmm_rows + digits_rows, "consistency_details": details}
