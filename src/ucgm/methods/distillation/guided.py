"""Guided-model distillation (Meng, Rombach, Gao, Kingma, Ermon, Ho, Salimans, CVPR 2023) in ucgm's convention.

**Stage 1** folds classifier-free guidance into one guidance-conditioned student ``x_hat_eta(x_t, t, c, w)`` (the
model condition ``guidance``, :mod:`ucgm.models.conditions`): with ``w ~ U[w_min, w_max]`` per sample, ``t ~ U(0, 1]``
and ``x_t = alpha(t) z + gamma(t) x`` from a data pair ``(x, c)``, it regresses the guided teacher

    ``x_hat_w = (1 + w) x_hat(x_t, c) - w x_hat(x_t, null)``  (and ``z_hat_w`` likewise),

two teacher passes without gradient. Meng's ``w`` is ucgm's classifier-free guidance scale minus one:
:class:`~ucgm.sampling.guidance.ClassifierFreeGuidance` computes ``F_u + s (F_c - F_u)``, so ``s = 1 + w``.

**Stage 2** is progressive distillation (Salimans & Ho 2022; ``google-research/diffusion_distillation``,
``dpm.py::Model.training_losses``): a student of ``N`` steps on the grid ``t_i = i / N`` draws ``i ~ U{0..N-1}``,
``t = (i + 1) / N``, ``s = t - 1 / N``; its teacher (the previous round's student, same ``w``) takes two DDIM steps
``t -> t - 1 / (2N) -> s`` from ``x_t``, landing on ``x_s^T``; the student's target is the data prediction whose
*one* DDIM step lands there:

    ``x_hat* = (x_s^T - (alpha_s / alpha_t) x_t) / (gamma_s - (alpha_s / alpha_t) gamma_t)``

(the code's ``(z_T - (sigma_s / sigma_t) z_t) / (alpha_s - (sigma_s / sigma_t) alpha_t)`` with its ``alpha, sigma``
= our ``gamma, alpha``), which is the teacher's second data prediction when ``s = 0``. Each round halves ``N``,
from ``teacher_steps / 2`` down to ``student_steps``. Both stages minimise the truncated-SNR loss
``max(||x_hat - x_hat*||^2, ||z_hat - z_hat*||^2)`` (``snr_trunc``: ``max(SNR, 1)`` times the data error).

**One run** holds the whole curriculum (stage 1, then every halving round); see :class:`DistillationCurriculum`.
The round teacher is the network ``round_teacher``, a copy that tracks the student with decay 1 (frozen) except on
the first step of a round, where the decay is 0 (it becomes the student), so the trainer checkpoints it with
everything else and a run resumes exactly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Mapping, NamedTuple, Optional, Sequence

import torch
from torch import Tensor, nn

from ...transports import Path, Prediction, Transport, broadcast_time, make_transport
from ...validation import check_batch, check_positive_int, check_range
from ..base import Method, NetworkSpec, ObjectiveOutput, Phase, draw_noise, resolve_null_label
from ..consistency.mcm import ddim_step
from ..teachers import Teacher

#: The model condition that carries Meng's guidance strength ``w``.
GUIDANCE = "guidance"
STUDENT, ROUND_TEACHER = "student", "round_teacher"


def guided_prediction(model: Callable, transport: Transport, x_t: Tensor, t: Tensor, labels: Tensor,
                      null_label: int, guidance: Tensor) -> Prediction:
    """Classifier-free guidance with a per-sample strength ``w`` (Meng's convention):
    ``F_w = (1 + w) F(x_t, c) - w F(x_t, null)``, one call on the doubled batch ``[x_t; x_t]`` with labels
    ``[c; null]``. Every parameterisation is affine in ``F`` at fixed ``(x_t, t)``, so the data and noise
    predictions are combined alike; it equals ``ClassifierFreeGuidance(model, scale=1 + w)``."""
    null = torch.full_like(labels, null_label)
    both = transport.network_output(model, torch.cat([x_t, x_t]), torch.cat([t, t]), torch.cat([labels, null]))
    conditional, unconditional = both.chunk(2)
    output = torch.lerp(unconditional, conditional, broadcast_time(1 + guidance, x_t))
    data, noise = transport.recover(output, x_t, t)
    return Prediction(output, data, noise)


def two_step_target(teacher_data: Callable[[Tensor, Tensor], Tensor], path: Path, x_t: Tensor, t: Tensor,
                    step: Tensor) -> tuple[Tensor, Tensor]:
    """``(x_hat*, x_s^T)``: two teacher DDIM steps ``t -> t - step / 2 -> s = t - step`` from ``x_t`` (``teacher_data``
    maps ``(x, time)`` to the teacher's data prediction) and the data prediction ``x_hat*`` whose one DDIM step
    ``t -> s`` lands on the teacher's point ``x_s^T``: ``x_hat* = (x_s^T - (alpha_s / alpha_t) x_t) /
    (gamma_s - (alpha_s / alpha_t) gamma_t)``."""
    middle, end = t - step / 2, t - step
    x_middle = ddim_step(path, x_t, teacher_data(x_t, t), t, middle)
    x_end = ddim_step(path, x_middle, teacher_data(x_middle, middle), middle, end)
    ratio = broadcast_time(path.alpha(end) / path.alpha(t), x_t)
    denominator = broadcast_time(path.gamma(end), x_t) - ratio * broadcast_time(path.gamma(t), x_t)
    return (x_end - ratio * x_t) / denominator, x_end


def truncated_snr_loss(prediction: Prediction, data_target: Tensor, noise_target: Tensor) -> Tensor:
    """Per-sample ``max(mean (x_hat - x_hat*)^2, mean (z_hat - z_hat*)^2)`` (``snr_trunc`` of the official code)."""
    data_error = ((prediction.data - data_target) ** 2).flatten(1).mean(dim=1)
    noise_error = ((prediction.noise - noise_target) ** 2).flatten(1).mean(dim=1)
    return torch.maximum(data_error, noise_error)


def same_path(first: Path, second: Path) -> bool:
    return type(first) is type(second) and vars(first) == vars(second)


class CurriculumStage(NamedTuple):
    """Where a step is: ``round`` 0 is stage 1 (guidance distillation), ``round`` r >= 1 the r-th halving, whose
    student takes ``student_steps`` DDIM steps (``teacher_steps`` of the stage-1 model in round 0)."""

    round: int
    student_steps: int


@dataclass(frozen=True)
class DistillationCurriculum:
    """Stage 1 for the first ``floor(stage1_fraction * T)`` steps of ``T`` (all of them without rounds), then
    ``R = log2(teacher_steps / student_steps)`` rounds of equal length: round ``r`` (1-based) starts at
    ``S1 + floor((r - 1) (T - S1) / R)`` and trains a student of ``teacher_steps / 2^r`` steps. Steps past ``T``
    stay in the last round."""

    total_steps: int
    stage1_fraction: float
    teacher_steps: int
    student_steps: int

    @property
    def rounds(self) -> int:
        return round(math.log2(self.teacher_steps // self.student_steps))

    @property
    def stage1_steps(self) -> int:
        return self.total_steps if self.rounds == 0 else math.floor(self.stage1_fraction * self.total_steps)

    def round_start(self, round_index: int) -> int:
        """The first step of round ``round_index`` (1-based)."""
        return self.stage1_steps + (round_index - 1) * (self.total_steps - self.stage1_steps) // self.rounds

    def round_end_steps(self) -> list[int]:
        """The step count after which each stage ends: stage 1, then rounds 1..R (a checkpoint there holds that
        round's final student)."""
        return [self.round_start(r) for r in range(1, self.rounds + 1)] + [self.total_steps]

    def stage_at(self, step: int) -> CurriculumStage:
        round_index = 0
        for candidate in range(1, self.rounds + 1):
            if step >= self.round_start(candidate):
                round_index = candidate
        return CurriculumStage(round_index, self.teacher_steps // 2 ** round_index)


class GuidanceConditioned(nn.Module):
    """A guidance-conditioned student read as an ordinary model ``model(x, t, labels)``: it adds the condition
    ``guidance = w`` (``sample_guidance``) unless the call passes one."""

    def __init__(self, student: nn.Module, guidance: float):
        super().__init__()
        self.student, self.guidance = student, float(guidance)
        self.num_classes = getattr(student, "num_classes", None)

    def forward(self, x: Tensor, t: Tensor, labels: Optional[Tensor] = None, **conditions: Optional[Tensor]
                ) -> Tensor:
        if conditions.get(GUIDANCE) is None:
            conditions[GUIDANCE] = torch.full((x.shape[0],), self.guidance, dtype=x.dtype, device=x.device)
        return self.student(x, t, labels, **conditions)


def _check_guidance_range(guidance_range: Sequence[float]) -> tuple[float, float]:
    bounds = tuple(guidance_range) if isinstance(guidance_range, (list, tuple)) else ()
    if len(bounds) != 2 or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
                                   for v in bounds) or bounds[0] > bounds[1]:
        raise ValueError(f"guidance_range={guidance_range!r} must be [w_min, w_max] with finite w_min <= w_max "
                         f"(Meng's w; ucgm's cfg scale is 1 + w)")
    return float(bounds[0]), float(bounds[1])


class GuidedDistillation(Method):
    """Meng et al.'s two-stage guided distillation (module docstring) as one ucgm run.

    ``teacher``: ``"oracle:<mixture>"`` (the exact class-conditional posterior; its null label is the whole
    mixture), ``"checkpoint:<path>"`` (e.g. a flow-matching run trained with label dropout; read as its method
    samples it) or a model, on the student's path (``teacher_transport`` may change its parameterisation).
    ``null_label`` defaults to the teacher's ``num_classes``. ``guidance_range`` = ``[w_min, w_max]`` of the
    training strengths; ``sample_guidance`` the ``w`` the sampling model uses (``ucgm sample R
    objective.sample_guidance=2``). ``stage1_fraction``, ``teacher_steps`` (DDIM steps of the stage-1 model that
    the first round distils) and ``student_steps`` (the last round's) define the :class:`DistillationCurriculum`
    over the run's ``training.steps`` at its start. ``stage1_fraction = 0`` starts at round 1 from the
    guidance-conditioned student of ``init.checkpoint``.

    Defaults: ``w ~ U[0, 4]`` (Meng's pixel-space range, unverified), 64 -> 4 steps, half the steps for stage 1
    (a ucgm choice), the student without an evaluation EMA (the official distillation configs use none).
    """

    family = "distillation"
    default_sampler = "ddim"
    sampling_role = STUDENT

    def __init__(self, transport: Transport | str = "linear", teacher=None,
                 teacher_transport: Optional[Transport | str] = None, guidance_range: Sequence[float] = (0.0, 4.0),
                 sample_guidance: float = 1.0, stage1_fraction: float = 0.5, teacher_steps: int = 64,
                 student_steps: int = 4, null_label: Optional[int] = None):
        self.transport = make_transport(transport) if isinstance(transport, str) else transport
        self.guidance_range = _check_guidance_range(guidance_range)
        if isinstance(sample_guidance, bool) or not isinstance(sample_guidance, (int, float)) \
                or not math.isfinite(sample_guidance):
            raise ValueError(f"sample_guidance={sample_guidance!r} must be a finite number (Meng's w)")
        check_range("stage1_fraction", stage1_fraction, 0.0, 1.0 - 1e-12)
        check_positive_int("teacher_steps", teacher_steps)
        check_positive_int("student_steps", student_steps)
        ratio = teacher_steps // student_steps
        if teacher_steps % student_steps or ratio & (ratio - 1):
            raise ValueError(f"teacher_steps={teacher_steps} must be student_steps={student_steps} times a power "
                             f"of 2 (each round halves the steps), e.g. 64 and 4")
        self.sample_guidance = float(sample_guidance)
        self.stage1_fraction = float(stage1_fraction)
        self.teacher_steps, self.student_steps = teacher_steps, student_steps
        self.null_label = null_label
        self.teacher = Teacher(teacher, teacher_transport, self.transport)
        self.step = 0
        self.curriculum: Optional[DistillationCurriculum] = None

    # ------------------------------------------------------------------------------------ declaration
    def networks(self) -> dict[str, NetworkSpec]:
        """The guidance-conditioned ``student`` (no evaluation EMA), the frozen ``round_teacher`` that becomes the
        student at every round start, and a checkpoint ``teacher``."""
        return {
            STUDENT: NetworkSpec(conditions=(GUIDANCE,), ema={"kind": "none"}),
            ROUND_TEACHER: NetworkSpec(init=f"copy:{STUDENT}", trainable=False, ema={"kind": "none"},
                                       tracks=STUDENT, requires_pretrained=self.stage1_fraction == 0),
            **self.teacher.network_specs(),
        }

    def schedule(self) -> list[Phase]:
        return [Phase("distill", (STUDENT,))]

    def tracking_decay(self, role: str, step: int) -> float:
        """0 (copy the student) on the first step of a halving round, 1 (stay frozen) otherwise."""
        if role != ROUND_TEACHER:
            return super().tracking_decay(role, step)
        current = self._curriculum().stage_at(step).round
        previous = self._curriculum().stage_at(step - 1).round if step > 0 else 0
        return 0.0 if current >= 1 and current != previous else 1.0

    # --------------------------------------------------------------------------------------- training
    def set_progress(self, step: int, total_steps: Optional[int] = None) -> None:
        """The curriculum is laid over ``total_steps`` the first time (and kept in the method state)."""
        check_positive_int("step", step, minimum=0)
        if self.curriculum is None:
            if total_steps is None:
                raise ValueError("guided_distillation needs the run's total steps to lay out its curriculum")
            self.curriculum = DistillationCurriculum(total_steps, self.stage1_fraction, self.teacher_steps,
                                                     self.student_steps)
        self.step = step

    def _curriculum(self) -> DistillationCurriculum:
        if self.curriculum is None:
            raise ValueError("guided_distillation: set_progress(step, total_steps) must come before training")
        return self.curriculum

    def state_dict(self) -> dict:
        return {"curriculum_steps": None if self.curriculum is None else self.curriculum.total_steps}

    def load_state_dict(self, state: dict) -> None:
        total = state.get("curriculum_steps")
        self.curriculum = None if total is None else DistillationCurriculum(
            int(total), self.stage1_fraction, self.teacher_steps, self.student_steps)

    def to(self, device: torch.device | str) -> "GuidedDistillation":
        self.teacher.to(device)
        return self

    def draw_guidance(self, batch_size: int, generator: Optional[torch.Generator]) -> Tensor:
        """``w ~ U[w_min, w_max]`` per sample (float64)."""
        low, high = self.guidance_range
        return low + (high - low) * torch.rand(batch_size, generator=generator, dtype=torch.float64)

    def stage1_targets(self, x_t: Tensor, t: Tensor, labels: Tensor, guidance: Tensor) -> Prediction:
        """The guided teacher ``x_hat_w = (1 + w) x_hat(x_t, c) - w x_hat(x_t, null)`` on the student's path."""
        model, transport = self.teacher.resolved()
        if not same_path(transport.path, self.transport.path):
            raise ValueError(f"the teacher's path {transport.path.name!r} differs from the student's "
                             f"{self.transport.path.name!r}; train the student on the teacher's transport")
        null_label = resolve_null_label(model, self.null_label)
        if null_label is None:
            raise ValueError("the teacher has no num_classes (its null label); pass objective.null_label")
        return guided_prediction(model, transport, x_t, t, labels, null_label, guidance)

    def stage2_targets(self, round_teacher: Callable, x_t: Tensor, t: Tensor, labels: Tensor, guidance: Tensor,
                       student_steps: int) -> tuple[Tensor, Tensor]:
        """``(x_hat*, z_hat*)`` of :func:`two_step_target` with the round teacher at the same ``w``."""
        path = self.transport.path

        def teacher_data(x: Tensor, time: Tensor) -> Tensor:
            return self.transport.predict(round_teacher, x, time, labels, guidance=guidance).data

        data_target, _ = two_step_target(teacher_data, path, x_t, t, torch.full_like(t, 1.0 / student_steps))
        noise_target = (x_t - broadcast_time(path.gamma(t), x_t) * data_target) / broadcast_time(path.alpha(t), x_t)
        return data_target, noise_target

    def loss(self, phase, networks, batch) -> ObjectiveOutput:
        self.teacher.bind(networks)
        data, labels, generator = batch.data, batch.labels, batch.generator
        if labels is None:
            raise ValueError("guided_distillation needs class labels (data.conditional=true): guidance combines the "
                             "conditional and unconditional teacher")
        check_batch("labels", labels, data.shape[0])
        size = data.shape[0]
        stage = self._curriculum().stage_at(self.step)
        guidance = self.draw_guidance(size, generator).to(data.device, data.dtype)
        noise = draw_noise(data, None, generator)
        if stage.round == 0:
            time = (1 - torch.rand(size, generator=generator, dtype=torch.float64)).to(data.device, data.dtype)
        else:
            index = torch.randint(0, stage.student_steps, (size,), generator=generator)
            time = ((index + 1).double() / stage.student_steps).to(data.device, data.dtype)
        x_t = self.transport.interpolate(data, noise, time)
        with torch.no_grad():
            if stage.round == 0:
                target = self.stage1_targets(x_t, time, labels, guidance)
                data_target, noise_target = target.data, target.noise
            else:
                round_teacher = networks.module(ROUND_TEACHER).eval()  # the official teacher runs train=False
                data_target, noise_target = self.stage2_targets(round_teacher, x_t, time, labels, guidance,
                                                                stage.student_steps)
        prediction = self.transport.predict(networks[STUDENT], x_t, time, labels, guidance=guidance)
        per_sample = truncated_snr_loss(prediction, data_target, noise_target)
        stats = {"distillation_round": float(stage.round), "student_steps": float(stage.student_steps)}
        return ObjectiveOutput(per_sample.mean(), per_sample.detach(), stats)

    # --------------------------------------------------------------------------------------- sampling
    def sampler(self) -> tuple[str, dict]:
        """DDIM on the uniform grid of ``sampling.nfe`` steps (the student's own grid when ``nfe = student_steps``)."""
        return "ddim", {}

    def sampling_model(self, modules: Mapping[str, nn.Module]) -> tuple[Callable, Transport]:
        """The student at ``w = sample_guidance``."""
        return GuidanceConditioned(modules[STUDENT], self.sample_guidance), self.transport
