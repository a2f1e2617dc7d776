"""Distribution-matching benchmark: one-/two-step quality of DMD, DMD2, MSD, SIM and CoSIM against flow matching,
and the cost of their training steps.

Every model is trained by ucgm's trainer (:func:`~ucgm.cli.train.run_training`) in a temporary directory from the
presets' per-objective defaults (``ucgm train gmm objective=NAME``), seed 0:

* ``gmm`` — 8 Gaussians, **unconditional** (``data.conditional=false``: mode collapse is possible, unlike with one
  class per mode), the exact mixture oracle as the teacher: ``dmd``, ``dmd2``, ``sim``, ``cosim`` and the
  two-time-scale check ``dmd2 (update_ratio=1)``; the reference ``flow_matching`` (Euler, NFE 64), trained first:
  both dmd2 runs start their generator from its EMA weights (``Run.init_from``).
* ``gmm-conditional`` — the same mixture with its class labels (MSD partitions the classes): ``msd`` (4 students of
  the preset's student size) and ``msd (1 student)`` (one student of about the same total parameter count,
  ``model.hidden`` :data:`ONE_STUDENT_HIDDEN`), and the conditional flow-matching reference.
* ``digits`` — a flow-matching teacher (16 base channels, batch 64), then ``dmd2`` distilling it
  (``objective.teacher=checkpoint:TEACHER``, generator from the teacher's EMA weights, fake score from its weights).

Sampling: EMA weights read as each method trained them (:func:`~ucgm.training.loading.load_checkpoint_model`, the
path of ``ucgm sample`` / ``ucgm evaluate``), each method's own sampler (``generator``) at NFE 1 and 2 from the same
seeded noise (:func:`ucgm.analysis.reports.draw_samples`). Metrics: ``sliced_w2`` (256 projections) against exact
mixture samples and ``mode_coverage``, the fraction of the 8 modes holding at least 5 % of the samples within 3 std
(:func:`~ucgm.metrics.modes.covered_mode_fraction`); ``digits_fd`` against the held-out digits.

Records (key ``distribution_matching``): ``{dataset, method, sampler, nfe, metric, value}``. Cost (key
``distribution_matching_cost``): ``{method: step time / flow-matching step time}``, one training step of each
method's config (all its phases: ``update_ratio`` fake-score updates and the generator update) against one
flow-matching step on the same data, model and batch, like-for-like trainer settings, interleaved
(:func:`~ucgm.bench.consistency.step_costs`).

**Other methods' rows** join through :data:`EXTRA_RECORDS`: a provider is a function ``(context) -> list of
records`` (build them with :func:`record`) that receives the :class:`BenchContext` (sizes, the working directory,
the trained digits flow-matching teacher, the metrics); append it in
``bench/report_distribution_matching.py`` next to the section's registration. Guided distillation's
``digits_fd`` rows (``bench/guided_distillation.py``) come in this way.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, NamedTuple, Optional

import torch
from torch import Tensor

from ..analysis.reports import draw_samples
from ..cli.components import accepted_keys
from ..cli.config import resolve_config
from ..cli.train import run_training
from ..data.mixtures import make_mixture
from ..metrics.modes import covered_mode_fraction
from ..models import count_parameters
from ..sampling.registry import get_sampler
from ..training.loading import load_checkpoint_model
from .consistency import FLOW_MATCHING, digits_metric, gmm_metric, step_costs

GENERATOR_NFES = (1, 2)
REFERENCE_NFE = 64
REFERENCE_SAMPLER = "euler"
#: One student with the parameter count of the msd preset's 4 students of hidden 64 (depth 3, 8 classes): 287,870
#: against 4 x 71,938.
ONE_STUDENT_HIDDEN = 138
UNCONDITIONAL = ("data.conditional=false",)
CONDITIONAL = ("data.conditional=true",)
DIGITS_OVERRIDES = ("model.base_channels=16", "training.batch_size=64", "training.sample_every=0")
#: The targets of the issue.
TARGET_RATIO = 1.5


@dataclass(frozen=True)
class DistributionMatchingSizes:
    """Training steps, sample counts and timing budget of one benchmark size."""

    gmm_steps: int
    flow_matching_steps: int
    digits_teacher_steps: int
    digits_steps: int
    num_gmm: int
    num_reference: int
    num_digits: int
    floor_repeats: int
    timing_block_steps: int
    timing_rounds: int


QUICK = DistributionMatchingSizes(gmm_steps=150, flow_matching_steps=600, digits_teacher_steps=300, digits_steps=40,
                                  num_gmm=2000, num_reference=10000, num_digits=200, floor_repeats=3,
                                  timing_block_steps=2, timing_rounds=7)
FULL = DistributionMatchingSizes(gmm_steps=2000, flow_matching_steps=3000, digits_teacher_steps=1500,
                                 digits_steps=300, num_gmm=5000, num_reference=20000, num_digits=1000,
                                 floor_repeats=5, timing_block_steps=3, timing_rounds=11)


class Run(NamedTuple):
    """One trained model: its table label, dataset, ``objective=NAME``, further overrides, and the label of an
    earlier run of the same group whose EMA weights start the generator (``init.checkpoint=RUN init.weights=ema``;
    ``None``: from scratch)."""

    label: str
    dataset: str
    objective: str
    overrides: tuple[str, ...] = ()
    init_from: Optional[str] = None


#: dmd2 starts its generator from the section's flow-matching run (DMD2 starts it from the teacher; the oracle
#: has no weights, so the flow-matching reference stands in), both update ratios alike.
GMM_RUNS = (
    Run(FLOW_MATCHING, "gmm", "flow_matching"),
    Run("dmd", "gmm", "dmd"),
    Run("dmd2", "gmm", "dmd2", init_from=FLOW_MATCHING),
    Run("dmd2 (update_ratio=1)", "gmm", "dmd2", ("objective.update_ratio=1",), init_from=FLOW_MATCHING),
    Run("sim", "gmm", "sim"),
    Run("cosim", "gmm", "cosim"),
)
CONDITIONAL_RUNS = (
    Run(FLOW_MATCHING, "gmm-conditional", "flow_matching"),
    Run("msd", "gmm-conditional", "msd"),
    Run("msd (1 student)", "gmm-conditional", "msd",
        ("objective.num_students=1", f"objective.student_model={{hidden: {ONE_STUDENT_HIDDEN}}}")),
)
#: Methods whose step cost the section reports (their gmm runs).
COST_METHODS = ("dmd", "dmd2", "msd", "sim", "cosim")


class BenchContext(NamedTuple):
    """What an :data:`EXTRA_RECORDS` provider receives: the sizes, a working directory (deleted afterwards), the
    digits flow-matching teacher run, the digits overrides, and the metrics (``gmm_metric(samples) -> sliced W2``,
    ``digits_metric(samples) -> digits FD``)."""

    sizes: DistributionMatchingSizes
    workdir: Path
    digits_teacher: Path
    digits_overrides: tuple[str, ...]
    gmm_metric: Callable[[Tensor], float]
    digits_metric: Callable[[Tensor], float]


RecordProvider = Callable[[BenchContext], list]
#: Providers of further records of the section (see the module docstring); filled in
#: ``bench/report_distribution_matching.py``.
EXTRA_RECORDS: list[RecordProvider] = []


def record(dataset: str, method: str, sampler: str, nfe: int, metric: str, value: float) -> dict:
    """One record of the section: ``{dataset, method, sampler, nfe, metric, value}``."""
    return {"dataset": dataset, "method": method, "sampler": sampler, "nfe": int(nfe), "metric": metric,
            "value": float(value)}


# ------------------------------------------------------------------------------------------- training
def train(preset: str, overrides: tuple[str, ...], steps: int, run_dir: Path) -> Path:
    """``ucgm train PRESET OVERRIDES`` for ``steps`` steps (one checkpoint at the end) into ``run_dir``."""
    length = (f"training.steps={steps}", f"training.checkpoint_every={steps}", f"training.log_every={steps}")
    run_training(resolve_config(preset, list(overrides + length), accepted_keys), run_dir, progress=False)
    return run_dir


def train_runs(runs: tuple[Run, ...], base: tuple[str, ...], sizes: DistributionMatchingSizes, workdir: Path
               ) -> dict[str, Path]:
    """Train ``runs`` in order on the gmm preset with the ``base`` overrides (a run's ``init_from`` names an earlier
    one); run directories by label."""
    run_dirs = {}
    for index, run in enumerate(runs):
        steps = sizes.flow_matching_steps if run.objective == FLOW_MATCHING else sizes.gmm_steps
        init = () if run.init_from is None else (f"init.checkpoint={run_dirs[run.init_from]}", "init.weights=ema")
        overrides = base + (f"objective={run.objective}",) + run.overrides + init
        run_dirs[run.label] = train("gmm", overrides, steps, workdir / f"{run.dataset}-{index}")
    return run_dirs


# -------------------------------------------------------------------------------------------- quality
def draw(run_dir: Path, sampler_name: Optional[str], nfe: int, num: int) -> tuple[Tensor, str]:
    """``num`` samples of a run's EMA weights at ``nfe`` with its own sampler (or ``sampler_name``)."""
    loaded = load_checkpoint_model(run_dir)
    name, settings = loaded.method.sampler() if sampler_name is None else (sampler_name, {})
    drawn = draw_samples(loaded.model, loaded.transport, get_sampler(name, settings), nfe, loaded.info.data_shape,
                         loaded.info.num_classes or 0, num)
    if drawn.nfe != nfe:
        raise RuntimeError(f"sampler {name!r} spent {drawn.nfe} NFE for a budget of {nfe}")
    return drawn.samples, name


def gmm_records(run: Run, run_dir: Path, metric: Callable[[Tensor], float], num: int) -> list[dict]:
    """Sliced W2 and mode coverage at NFE 1 and 2 (the reference: Euler at NFE 64)."""
    mixture = make_mixture("8gaussians")
    reference = run.objective == FLOW_MATCHING
    rows = []
    for nfe in (REFERENCE_NFE,) if reference else GENERATOR_NFES:
        samples, sampler = draw(run_dir, REFERENCE_SAMPLER if reference else None, nfe, num)
        rows.append(record(run.dataset, run.label, sampler, nfe, "sliced_w2", metric(samples)))
        rows.append(record(run.dataset, run.label, sampler, nfe, "mode_coverage",
                           covered_mode_fraction(samples, mixture)))
    return rows


def digits_records(teacher: Path, sizes: DistributionMatchingSizes, metric: Callable[[Tensor], float],
                   workdir: Path) -> list[dict]:
    """dmd2 distilling the digits teacher (generator and fake score start from it): digits FD at NFE 1 and 2, and
    the teacher at NFE 64."""
    student = train("digits", DIGITS_OVERRIDES + ("objective=dmd2", f"objective.teacher=checkpoint:{teacher}",
                                                  f"init.checkpoint={teacher}", "init.weights=ema"),
                    sizes.digits_steps, workdir / "digits-dmd2")
    rows = []
    for nfe in GENERATOR_NFES:
        samples, sampler = draw(student, None, nfe, sizes.num_digits)
        rows.append(record("digits", "dmd2", sampler, nfe, "digits_fd", metric(samples)))
    samples, sampler = draw(teacher, REFERENCE_SAMPLER, REFERENCE_NFE, sizes.num_digits)
    rows.append(record("digits", FLOW_MATCHING, sampler, REFERENCE_NFE, "digits_fd", metric(samples)))
    return rows


def find(records: list[dict], dataset: str, method: str, nfe: int, metric: str, sampler: Optional[str] = None
         ) -> Optional[float]:
    """The value of the first record of ``(dataset, method, nfe, metric)`` (and ``sampler`` if given), or None."""
    for row in records:
        if (row["dataset"], row["method"], row["nfe"], row["metric"]) == (dataset, method, nfe, metric) and \
                sampler in (None, row["sampler"]):
            return row["value"]
    return None


def targets(records: list[dict], parameters: dict[str, int]) -> dict:
    """The issue's targets: dmd2 at NFE 1 within 1.5x of flow matching at NFE 64 with all modes covered; dmd2 with
    the official update ratio against 1:1; msd with 4 students against 1 of about the same total size."""
    def values(dataset: str, method: str) -> dict:
        return {f"nfe{nfe}": {metric: find(records, dataset, method, nfe, metric)
                              for metric in ("sliced_w2", "mode_coverage")} for nfe in GENERATOR_NFES}

    dmd2 = find(records, "gmm", "dmd2", 1, "sliced_w2")
    reference = find(records, "gmm", FLOW_MATCHING, REFERENCE_NFE, "sliced_w2")
    coverage = find(records, "gmm", "dmd2", 1, "mode_coverage")
    ratio = dmd2 / reference if dmd2 is not None and reference else None
    return {
        "dmd2_vs_flow_matching": {"ratio": ratio, "target": TARGET_RATIO, "mode_coverage": coverage,
                                  "met": ratio is not None and ratio <= TARGET_RATIO and coverage == 1.0},
        "two_time_scale": {"official_ratio": values("gmm", "dmd2"), "one_to_one": values("gmm", "dmd2 (update_ratio=1)")},
        "students": {"four": values("gmm-conditional", "msd"), "one": values("gmm-conditional", "msd (1 student)"),
                     "parameters": parameters},
    }


def student_parameters(run_dirs: dict[str, Path]) -> dict[str, int]:
    """Total generator parameters of the msd runs."""
    counts = {}
    for label in ("msd", "msd (1 student)"):
        loaded = load_checkpoint_model(run_dirs[label])
        counts[label] = sum(count_parameters(network) for network in loaded.networks.values())
    return counts


def run_distribution_matching(sizes: DistributionMatchingSizes) -> dict:
    """Train (in a temporary directory), sample and time; the ``distribution_matching``,
    ``distribution_matching_cost`` and ``distribution_matching_details`` keys."""
    started = time.perf_counter()
    gmm_score, gmm_floor = gmm_metric(sizes)
    digits_score, digits_floor = digits_metric(sizes)
    with tempfile.TemporaryDirectory(prefix="ucgm-bench-distribution-matching-") as temporary:
        workdir = Path(temporary)
        gmm_dirs = train_runs(GMM_RUNS, UNCONDITIONAL, sizes, workdir)
        conditional_dirs = train_runs(CONDITIONAL_RUNS, CONDITIONAL, sizes, workdir)
        records = []
        for runs, run_dirs in ((GMM_RUNS, gmm_dirs), (CONDITIONAL_RUNS, conditional_dirs)):
            for run in runs:
                records += gmm_records(run, run_dirs[run.label], gmm_score, sizes.num_gmm)
        teacher = train("digits", DIGITS_OVERRIDES + ("objective=flow_matching",), sizes.digits_teacher_steps,
                        workdir / "digits-teacher")
        records += digits_records(teacher, sizes, digits_score, workdir)
        context = BenchContext(sizes, workdir, teacher, DIGITS_OVERRIDES, gmm_score, digits_score)
        for provider in EXTRA_RECORDS:
            records += provider(context)
        cost_dirs = {FLOW_MATCHING: gmm_dirs[FLOW_MATCHING], "msd": conditional_dirs["msd"],
                     **{label: gmm_dirs[label] for label in COST_METHODS if label in gmm_dirs}}
        costs, flow_matching_seconds = step_costs(cost_dirs, sizes)
        parameters = student_parameters(conditional_dirs)
    details = {"sizes": asdict(sizes), "floors": {"gmm": gmm_floor, "digits": digits_floor},
               "targets": targets(records, parameters), "flow_matching_step_seconds": flow_matching_seconds,
               "mode_coverage": "fraction of the 8 modes holding >= 5 % of the samples within 3 std",
               "seconds": round(time.perf_counter() - started, 1)}
    return {"distribution_matching": records,
            "distribution_matching_cost": {label: costs[label] for label in COST_METHODS},
            "distribution_matching_details": details}
