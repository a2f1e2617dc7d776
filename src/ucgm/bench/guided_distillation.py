"""Guided-distillation rows of the ``distribution_matching`` bench section (Meng et al.'s claim: a few-step
guidance-distilled student matches the classifier-free-guided teacher at many steps, at the same ``w``).

Everything goes through the user path: each model is trained by :func:`~ucgm.cli.train.run_training` from the
presets' ``objectives:`` entries (``ucgm train gmm objective=guided_distillation``) with ``student_steps=1``, one
checkpoint at the end of every round (:meth:`~ucgm.methods.distillation.guided.DistillationCurriculum.round_end_steps`),
so one run gives the 4-, 2- and 1-step students; each is loaded like ``ucgm sample`` does
(:func:`~ucgm.cli.sample.load_checkpoint_model`, sampling model at ``w = GUIDANCE``) and drawn with
:func:`~ucgm.analysis.reports.draw_samples`.

* **gmm** (8 Gaussians, class-conditional, the exact oracle teacher): ``guided_distillation`` with ``ddim`` at NFE
  1, 2, 4 (the 1-, 2- and 4-step students) and with ``ddim-stochastic`` at NFE 2 and 4 (the 1- and 2-step
  students: the stochastic N-step sampler jumps ``2 / N``); ``guided_distillation_stage1`` (the
  guidance-conditioned stage-1 student) at NFE 64; ``cfg_teacher`` (``ClassifierFreeGuidance(oracle, 1 + w)``,
  one call on a doubled batch per step) with ``ddim`` at NFE 1, 2, 4 and 64. Metrics: ``sliced_w2`` against exact
  mixture samples, ``mode_coverage`` (fraction of the 8 modes with a sample within 3 std), ``sliced_w2_to_teacher``
  (against ``cfg_teacher`` at NFE 64 from other noise: how well the guided distribution is reproduced) and
  ``class_std`` (mean per-class, per-coordinate sample std: CFG narrows each class; the data's is 0.05).
  ``reference data`` rows (``nfe = 0``): the same metrics of exact mixture samples and, for the teacher metric, of
  a second teacher draw (the sample-noise floors).
* **digits** (class-conditional UNet): the teacher is a flow-matching run with label dropout 0.1; the student
  starts from it (``init.checkpoint``). ``digits_fd`` of ``guided_distillation`` (``ddim``, NFE 1, 2, 4) and of the
  ``cfg_teacher`` (the flow-matching checkpoint under ``ClassifierFreeGuidance(1 + w)``, ``ddim``, NFE 4 and 64);
  floor: as many training digits.

Records: ``{dataset, method, sampler, nfe, metric, value}``; ``nfe`` counts sampler steps (network calls of the
student; a ``cfg_teacher`` step evaluates conditional and unconditional outputs in one doubled call).
"""

from __future__ import annotations

import math
import statistics
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
from torch import Tensor

from ..analysis.reports import draw_samples
from ..cli.components import accepted_keys
from ..cli.config import resolve_config
from ..cli.sample import load_checkpoint_model
from ..cli.train import run_training
from ..data.mixtures import OracleModel, make_mixture
from ..methods.distillation.guided import DistillationCurriculum
from ..metrics.modes import mode_coverage
from ..metrics.suites import REFERENCE_SEED, SlicedW2Against
from ..sampling.guidance import ClassifierFreeGuidance
from ..sampling.registry import get_sampler
from ..training.loading import method_from_config
from ..transports import make_transport
from .consistency import DIGITS_OVERRIDES

METHOD = "guided_distillation"
STAGE1 = "guided_distillation_stage1"
TEACHER = "cfg_teacher"
REFERENCE = "reference data"
#: Meng's guidance strength of every row (ucgm cfg scale 1 + w).
GUIDANCE = 1.0
TEACHER_NFE = 64
STUDENT_NFES = (1, 2, 4)
TEACHER_SEED, BASELINE_SEED = 1, 54321


@dataclass(frozen=True)
class GuidedSizes:
    gmm_steps: int
    digits_teacher_steps: int
    digits_steps: int
    num_gmm: int
    num_reference: int
    num_digits: int


QUICK = GuidedSizes(gmm_steps=1000, digits_teacher_steps=100, digits_steps=100, num_gmm=2000, num_reference=10000,
                    num_digits=200)
FULL = GuidedSizes(gmm_steps=4000, digits_teacher_steps=1500, digits_steps=1500, num_gmm=5000,
                   num_reference=20000, num_digits=1000)


def record(dataset: str, method: str, sampler: str, nfe: int, metric: str, value: float) -> dict:
    return {"dataset": dataset, "method": method, "sampler": sampler, "nfe": nfe, "metric": metric,
            "value": float(value)}


def class_std(samples: Tensor, labels: Tensor) -> float:
    """Mean over classes of the per-coordinate standard deviation of the samples of that class."""
    return statistics.fmean(float(samples[labels == label].std(dim=0).mean()) for label in labels.unique())


def train_students(preset: str, overrides: list[str], steps: int, run_dir: Path) -> dict[int, Path]:
    """A ``student_steps=1`` run with a checkpoint at every round end: ``{student steps: checkpoint}`` (64 for the
    stage-1 student)."""
    config = resolve_config(preset, [f"objective={METHOD}", "objective.student_steps=1", *overrides,
                                     f"training.steps={steps}", f"training.log_every={steps}"], accepted_keys)
    method = method_from_config(config)
    curriculum = DistillationCurriculum(steps, method.stage1_fraction, method.teacher_steps, method.student_steps)
    ends = curriculum.round_end_steps()
    every = math.gcd(*ends)
    config["training"].update(checkpoint_every=every, keep_last=steps // every)
    run_training(config, run_dir, progress=False)
    return {curriculum.stage_at(end - 1).student_steps: run_dir / "checkpoints" / f"step_{end:07d}"
            for end in ends}


class GMMMetrics:
    """The four GMM metrics of one sample set (module docstring)."""

    def __init__(self, sizes: GuidedSizes, teacher_samples: Tensor):
        self.mixture = make_mixture("8gaussians")
        reference = self.mixture.sample(sizes.num_reference, torch.Generator().manual_seed(REFERENCE_SEED))[0]
        self.to_data, self.to_teacher = SlicedW2Against(reference), SlicedW2Against(teacher_samples)

    def __call__(self, samples: Tensor, labels: Tensor) -> dict[str, float]:
        coverage = mode_coverage(samples, self.mixture)["missing_modes"]
        return {"sliced_w2": self.to_data(samples), "mode_coverage": 1 - coverage / self.mixture.num_components,
                "sliced_w2_to_teacher": self.to_teacher(samples), "class_std": class_std(samples, labels)}


def _rows(dataset: str, method: str, sampler: str, nfe: int, values: dict[str, float]) -> list[dict]:
    return [record(dataset, method, sampler, nfe, metric, value) for metric, value in values.items()]


def _draw(model: Callable, transport, sampler: str, nfe: int, shape, num_classes: int, num: int, seed: int = 0):
    drawn = draw_samples(model, transport, get_sampler(sampler), nfe, shape, num_classes, num, seed)
    if drawn.nfe != nfe:
        raise RuntimeError(f"sampler {sampler!r} spent {drawn.nfe} NFE for a budget of {nfe}")
    return drawn


def gmm_records(sizes: GuidedSizes, workdir: Path) -> list[dict]:
    transport = make_transport("linear")
    oracle = OracleModel(make_mixture("8gaussians"), transport)
    teacher = ClassifierFreeGuidance(oracle, 1 + GUIDANCE)
    teacher_reference = _draw(teacher, oracle.transport, "ddim", TEACHER_NFE, (2,), 8, sizes.num_gmm, TEACHER_SEED)
    metrics = GMMMetrics(sizes, teacher_reference.samples)
    exact, exact_labels = metrics.mixture.sample(sizes.num_gmm, torch.Generator().manual_seed(BASELINE_SEED))
    floor = metrics(exact, exact_labels)
    floor["sliced_w2_to_teacher"] = metrics.to_teacher(
        _draw(teacher, oracle.transport, "ddim", TEACHER_NFE, (2,), 8, sizes.num_gmm, BASELINE_SEED).samples)
    rows = _rows("gmm", REFERENCE, "exact samples", 0, floor)
    for nfe in STUDENT_NFES + (TEACHER_NFE,):
        drawn = _draw(teacher, oracle.transport, "ddim", nfe, (2,), 8, sizes.num_gmm)
        rows += _rows("gmm", TEACHER, "ddim", nfe, metrics(drawn.samples, drawn.labels))
    students = train_students("gmm", [f"objective.sample_guidance={GUIDANCE}"], sizes.gmm_steps, workdir / "gmm")
    plan = [(STAGE1, 64, "ddim", TEACHER_NFE)] + [(METHOD, n, "ddim", n) for n in STUDENT_NFES] + \
        [(METHOD, n, "ddim-stochastic", 2 * n) for n in (1, 2)]
    for method, student_steps, sampler, nfe in plan:
        loaded = load_checkpoint_model(students[student_steps])
        drawn = _draw(loaded.model, loaded.transport, sampler, nfe, (2,), 8, sizes.num_gmm)
        rows += _rows("gmm", method, sampler, nfe, metrics(drawn.samples, drawn.labels))
    return rows


def digits_records(sizes: GuidedSizes, workdir: Path) -> list[dict]:
    from ..data.digits import DIGITS_NORMALISATION, load_digits_split
    from ..metrics.digits_fd import digits_frechet_distance

    def fd(samples: Tensor) -> float:
        return digits_frechet_distance(samples)["value"]

    teacher_dir = workdir / "digits-teacher"
    steps = sizes.digits_teacher_steps
    ema = f"training.ema.decay={0.999 if steps >= 1500 else 0.99}"
    run_training(resolve_config("digits", [*DIGITS_OVERRIDES, "objective=flow_matching", "objective.label_dropout=0.1",
                                           ema, f"training.steps={steps}", f"training.checkpoint_every={steps}",
                                           f"training.log_every={steps}"], accepted_keys), teacher_dir,
                 progress=False)
    loaded_teacher = load_checkpoint_model(teacher_dir)
    shape, num_classes = loaded_teacher.info.data_shape, loaded_teacher.info.num_classes
    guided_teacher = ClassifierFreeGuidance(loaded_teacher.model, 1 + GUIDANCE)
    floor = fd(DIGITS_NORMALISATION.normalise(load_digits_split("train")[0])[:sizes.num_digits])
    rows = [record("digits", REFERENCE, "training digits", 0, "digits_fd", floor)]
    for nfe in (4, TEACHER_NFE):
        drawn = _draw(guided_teacher, loaded_teacher.transport, "ddim", nfe, shape, num_classes, sizes.num_digits)
        rows.append(record("digits", TEACHER, "ddim", nfe, "digits_fd", fd(drawn.samples)))
    students = train_students("digits", [*DIGITS_OVERRIDES, f"objective.teacher=checkpoint:{teacher_dir}",
                                         f"init.checkpoint={teacher_dir}", f"objective.sample_guidance={GUIDANCE}"],
                              sizes.digits_steps, workdir / "digits")
    for nfe in STUDENT_NFES:
        loaded = load_checkpoint_model(students[nfe])
        drawn = _draw(loaded.model, loaded.transport, "ddim", nfe, shape, num_classes, sizes.num_digits)
        rows.append(record("digits", METHOD, "ddim", nfe, "digits_fd", fd(drawn.samples)))
    return rows


def guided_distillation_records(quick: bool, workdir: Optional[Path] = None) -> list[dict]:
    """Every guided-distillation record (module docstring), trained in ``workdir`` (default: a temporary one)."""
    sizes = QUICK if quick else FULL
    if workdir is not None:
        return gmm_records(sizes, Path(workdir)) + digits_records(sizes, Path(workdir))
    with tempfile.TemporaryDirectory(prefix="ucgm-bench-guided-") as temporary:
        return guided_distillation_records(quick, Path(temporary))
