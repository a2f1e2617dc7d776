"""Guided-distillation rows of the ``distribution_matching`` bench section (a provider of
:data:`~ucgm.bench.distribution_matching.EXTRA_RECORDS`): Meng et al.'s claim that a few-step guidance-distilled
student matches the classifier-free-guided teacher at many steps, at the same ``w`` (:data:`GUIDANCE`).

Everything goes through the user path: each student is trained by :func:`~ucgm.cli.train.run_training` from the
presets' ``objectives:`` entry (``ucgm train PRESET objective=guided_distillation``) with ``student_steps=1`` and
one checkpoint at the end of every round
(:meth:`~ucgm.methods.distillation.guided.DistillationCurriculum.round_end_steps`), so one run gives the stage-1
student and the 4-, 2- and 1-step students; each is loaded like ``ucgm sample`` does (sampling model at
``w = GUIDANCE``) and drawn with :func:`~ucgm.analysis.reports.draw_samples` (the section's
:func:`~ucgm.bench.distribution_matching.draw`).

* ``gmm-conditional`` (8 Gaussians with their labels, the exact oracle teacher, the section's
  ``flow_matching_steps`` steps — the flow-matching reference's budget): ``guided_distillation`` with ``ddim`` at
  NFE 1, 2, 4 (the 1-, 2- and 4-step students) and with ``ddim-stochastic`` at NFE 2 and 4 (the 1- and 2-step
  students: the stochastic N-step sampler jumps ``2 / N``); ``guided_distillation_stage1`` (the
  guidance-conditioned stage-1 student) at NFE 64; ``cfg_teacher`` (``ClassifierFreeGuidance(oracle, 1 + w)``, one
  call on a doubled batch per step) with ``ddim`` at NFE 1, 2, 4 and 64. Metrics: the section's ``sliced_w2``
  (against exact mixture samples) and ``mode_coverage``; ``sliced_w2_to_teacher`` (against ``cfg_teacher`` at NFE
  64 drawn from other noise, so the teacher's own row is the sample-noise floor) and ``class_std`` (mean
  per-class, per-coordinate sample std; CFG narrows each class, the data's is 0.05).
* ``digits``: a flow-matching teacher trained with label dropout 0.1 (the section's digits teacher has none, so its
  null label means nothing), ``digits_teacher_steps`` steps; the student starts from it (``init.checkpoint``) and
  trains :data:`DIGITS_STEPS_PER_DMD2_STEP` times the section's ``digits_steps`` (raised to the next step count
  whose round ends align, :func:`aligned_curriculum`). ``digits_fd`` of
  ``guided_distillation`` (``ddim``, NFE 1, 2, 4) and of ``cfg_teacher`` (the teacher under
  ``ClassifierFreeGuidance(1 + w)``, ``ddim``, NFE 4 and 64).

``nfe`` counts sampler steps (student calls; a ``cfg_teacher`` step evaluates the conditional and unconditional
outputs in one doubled call).
"""

from __future__ import annotations

import math
import statistics
from pathlib import Path
from typing import Callable

from torch import Tensor

from ..analysis.reports import draw_samples
from ..cli.components import accepted_keys
from ..cli.config import resolve_config
from ..cli.sample import load_checkpoint_model
from ..cli.train import run_training
from ..data.mixtures import OracleModel, make_mixture
from ..methods.distillation.guided import DistillationCurriculum
from ..metrics.modes import covered_mode_fraction
from ..metrics.suites import SlicedW2Against
from ..sampling.guidance import ClassifierFreeGuidance
from ..sampling.registry import get_sampler
from ..sampling.seeded import sample_labels
from ..training.loading import method_from_config
from ..transports import make_transport
from .distribution_matching import CONDITIONAL, BenchContext, draw, find, record, train

METHOD = "guided_distillation"
STAGE1 = "guided_distillation_stage1"
TEACHER = "cfg_teacher"
GMM_DATASET = "gmm-conditional"
#: Meng's guidance strength of every row (ucgm cfg scale 1 + w).
GUIDANCE = 1.0
TEACHER_NFE = 64
STUDENT_NFES = (1, 2, 4)
#: The noise seed of the teacher samples that ``sliced_w2_to_teacher`` compares against (the rows use seed 0).
TEACHER_SEED = 1
#: The digits student trains about this many times the section's dmd2 ``digits_steps`` (1520 at the full size:
#: the rounds 64 -> 1 need some steps each).
DIGITS_STEPS_PER_DMD2_STEP = 5
#: A student run writes at most this many checkpoints (its step count is raised until the stage ends align).
MAX_CHECKPOINTS = 64


def class_std(samples: Tensor, labels: Tensor) -> float:
    """Mean over classes of the per-coordinate standard deviation of the samples of that class."""
    return statistics.fmean(float(samples[labels == label].std(dim=0).mean()) for label in labels.unique())


def aligned_curriculum(steps: int, stage1_fraction: float, teacher_steps: int, student_steps: int
                       ) -> DistillationCurriculum:
    """The curriculum of the first step count ``T >= steps`` whose stage ends are multiples of one checkpoint
    interval of at least ``T /`` :data:`MAX_CHECKPOINTS` (e.g. 1500 -> 1520 steps on the digits: ends 1292, 1330,
    ..., 1520, every 38; 3000 stays, every 75)."""
    total = steps
    while True:
        curriculum = DistillationCurriculum(total, stage1_fraction, teacher_steps, student_steps)
        if math.gcd(*curriculum.round_end_steps()) * MAX_CHECKPOINTS >= total:
            return curriculum
        total += 1


def train_students(preset: str, overrides: list[str], steps: int, run_dir: Path) -> dict[int, Path]:
    """A ``student_steps=1`` run of about ``steps`` steps (:func:`aligned_curriculum`) with a checkpoint at every
    round end: ``{student steps: checkpoint}`` (the stage-1 student under its ``teacher_steps``)."""
    config = resolve_config(preset, [f"objective={METHOD}", "objective.student_steps=1", *overrides], accepted_keys)
    method = method_from_config(config)
    curriculum = aligned_curriculum(steps, method.stage1_fraction, method.teacher_steps, method.student_steps)
    ends, steps = curriculum.round_end_steps(), curriculum.total_steps
    every = math.gcd(*ends)
    config["training"].update(steps=steps, log_every=steps, checkpoint_every=every, keep_last=steps // every)
    run_training(config, run_dir, progress=False)
    return {curriculum.stage_at(end - 1).student_steps: run_dir / "checkpoints" / f"step_{end:07d}"
            for end in ends}


def _teacher_samples(model: Callable, transport, nfe: int, shape, num_classes: int, num: int, seed: int = 0
                     ) -> Tensor:
    drawn = draw_samples(model, transport, get_sampler("ddim"), nfe, shape, num_classes, num, seed)
    if drawn.nfe != nfe:
        raise RuntimeError(f"ddim spent {drawn.nfe} NFE for a budget of {nfe}")
    return drawn.samples


def gmm_records(context: BenchContext) -> list[dict]:
    sizes, num = context.sizes, context.sizes.num_gmm
    mixture = make_mixture("8gaussians")
    oracle = OracleModel(mixture, make_transport("linear"))
    teacher = ClassifierFreeGuidance(oracle, 1 + GUIDANCE)
    to_teacher = SlicedW2Against(_teacher_samples(teacher, oracle.transport, TEACHER_NFE, (2,), 8, num,
                                                  TEACHER_SEED))
    labels = sample_labels(num, mixture.num_classes)

    def rows(method: str, sampler: str, nfe: int, samples: Tensor) -> list[dict]:
        values = {"sliced_w2": context.gmm_metric(samples), "mode_coverage": covered_mode_fraction(samples, mixture),
                  "sliced_w2_to_teacher": to_teacher(samples), "class_std": class_std(samples, labels)}
        return [record(GMM_DATASET, method, sampler, nfe, metric, value) for metric, value in values.items()]

    records = []
    for nfe in STUDENT_NFES + (TEACHER_NFE,):
        records += rows(TEACHER, "ddim", nfe, _teacher_samples(teacher, oracle.transport, nfe, (2,), 8, num))
    students = train_students("gmm", [*CONDITIONAL, f"objective.sample_guidance={GUIDANCE}"],
                              sizes.flow_matching_steps, context.workdir / "guided-gmm")
    plan = [(STAGE1, max(students), "ddim", TEACHER_NFE)] + [(METHOD, n, "ddim", n) for n in STUDENT_NFES] + \
        [(METHOD, n, "ddim-stochastic", 2 * n) for n in (1, 2)]
    for method, student_steps, sampler, nfe in plan:
        records += rows(method, sampler, nfe, draw(students[student_steps], sampler, nfe, num)[0])
    return records


def digits_records(context: BenchContext) -> list[dict]:
    sizes = context.sizes
    steps = sizes.digits_teacher_steps
    ema = f"training.ema.decay={0.999 if steps >= 1500 else 0.99}"
    teacher_dir = train("digits", context.digits_overrides + ("objective=flow_matching", "objective.label_dropout=0.1",
                                                              ema), steps, context.workdir / "guided-digits-teacher")
    loaded = load_checkpoint_model(teacher_dir)
    guided = ClassifierFreeGuidance(loaded.model, 1 + GUIDANCE)
    shape, num_classes = loaded.info.data_shape, loaded.info.num_classes
    records = [record("digits", TEACHER, "ddim", nfe, "digits_fd", context.digits_metric(
        _teacher_samples(guided, loaded.transport, nfe, shape, num_classes, sizes.num_digits)))
        for nfe in (4, TEACHER_NFE)]
    students = train_students("digits", [*context.digits_overrides, f"objective.teacher=checkpoint:{teacher_dir}",
                                         f"init.checkpoint={teacher_dir}", f"objective.sample_guidance={GUIDANCE}"],
                              DIGITS_STEPS_PER_DMD2_STEP * sizes.digits_steps, context.workdir / "guided-digits")
    for nfe in STUDENT_NFES:
        samples, sampler = draw(students[nfe], None, nfe, sizes.num_digits)
        records.append(record("digits", METHOD, sampler, nfe, "digits_fd", context.digits_metric(samples)))
    return records


def guided_distillation_records(context: BenchContext) -> list[dict]:
    """Every guided-distillation record of the section (module docstring)."""
    return gmm_records(context) + digits_records(context)


def claim_lines(records: list[dict]) -> list[str]:
    """Meng et al.'s claim as the section's markdown states it: the 1-, 2- and 4-step students against the CFG
    teacher at :data:`TEACHER_NFE` steps, same ``w`` (ratio = student / teacher, sliced W2 to the data and digits
    FD); no lines without the rows."""
    lines = []
    for dataset, metric in ((GMM_DATASET, "sliced_w2"), ("digits", "digits_fd")):
        teacher = find(records, dataset, TEACHER, TEACHER_NFE, metric, "ddim")
        students = {nfe: find(records, dataset, METHOD, nfe, metric, "ddim") for nfe in STUDENT_NFES}
        if teacher is None or None in students.values():
            continue
        cells = ", ".join(f"NFE {nfe} {value:.4g} ({value / teacher:.2f}x)" for nfe, value in students.items())
        lines.append(f"- guided distillation vs the CFG teacher at {TEACHER_NFE} steps, w = {GUIDANCE:g} "
                     f"({dataset} {metric}): teacher {teacher:.4g}; student {cells}.")
    return lines
