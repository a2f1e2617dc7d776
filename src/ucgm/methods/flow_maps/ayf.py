"""AYF: Align Your Flow (Sabour, Fidler, Kreis 2025; no official code). The Eulerian loss's form is checked against
NVlabs/FastGen ``fastgen/methods/consistency_model/mean_flow.py`` (``loss_type='opt_grad'``, which cites AYF); the
parameterisation, times and the Lagrangian loss follow the DSL-Lab write-up (2025-08-18) and a third-party
re-implementation (flow_maps.md section 5).

**Map.** ``f_theta(x_t, t, s) = x_t + (s - t) F_theta(x_t, t, s)``: the flow-map core's jump
(:mod:`ucgm.methods.flow_maps.core`, ``second_time="s"``) with ``F`` the average velocity ``u`` (the raw output on
the linear transport). Distilled from a teacher's velocity ``v_T`` (``teacher``: an exact mixture oracle, a
checkpoint or a model; with ``guide_teacher`` an **autoguided** teacher ``v_T = v_guide + autoguidance_scale
(v_teacher - v_guide)``, the guide a weaker model of the same task).

**Eulerian map distillation** (``loss_type="eulerian"``, EMD): ``g = u^- - v_T + w_r (t - s) du^-/dt`` with ``u^-``
the online network without gradient and ``du^-/dt`` its derivative along ``(v_T, 1)`` on ``(x_t, t)`` (``s``
fixed), ``w_r = min(1, step / tangent_warmup_steps)`` (warm-up); loss ``||u_theta - sg(u^- - g / (||g|| + c))||^2``
(tangent normalisation, ``c = normalisation_constant``): per sample its gradient is ``2 (du/dtheta)^T g / (||g||
+ c)``, parallel to MeanFlow's (flow_maps.md section 0). **Lagrangian map distillation** (``"lagrangian"``,
LMD): the residual ``r = df^-/ds - v_T(f^-(x_t, t, s), s)`` (``df/ds`` a derivative in ``s`` alone, the teacher at the
map's output) moves ``f`` along ``r``: loss ``||f_theta - sg(f^- + r / (||r|| + c))||^2``, whose gradient is
``sign(s - t) (df/dtheta)^T r`` normalised (the write-up's form). Both vanish at the exact map.

Without a teacher (``teacher=None``, Eulerian loss only) ``v_T`` is the conditional velocity ``z - x`` of the
sample (``dx_t/dt`` of the transport): training instead of distillation, as MeanFlow trains (not in the paper).

**Times.** Gap ``d = sigmoid(N(gap_mean, gap_std^2))``, ``s ~ U(0, 1 - d)``, ``t = s + d``. **Sampler**: the
deterministic chain ``x <- f(x, t_i, t_{i+1})`` on the uniform grid (``flow-map``; CTM's gamma optional there).

**Defaults** (third-party; no official settings verified): ``gap_mean = -0.8``, ``gap_std = 1.0``, warm-up
``H = 10000``, ``c = 0.1``. **Deviations.** (1) The derivative is taken without gradient on the plain module and
the gradient comes from a separate pass (FastGen's scheme; DDP-safe); ``u^-`` is that pass's output detached.
(2) ``tangent_method="auto"`` falls back to central differences for models without forward-mode AD. (3) No
adversarial fine-tune and no guidance-conditioned student (the re-implementation's ``lambda ~ U[1, 3]``): the
autoguidance scale is fixed.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ...transports import Transport, broadcast_time
from ...validation import check_choice, check_positive_int, check_range
from ..base import Batch, Networks, ObjectiveOutput, unwrap
from ..teachers import Teacher
from .base import MODEL_ROLE, FlowMapMethod, GuideTeacher, TeacherVelocity, as_transport, check_number, logit_normal
from .core import FlowMapParameterisation
from .tangent import TangentEstimator

AYF_LOSSES = ("eulerian", "lagrangian")


def normalised(direction: Tensor, constant: float) -> Tensor:
    """``direction / (||direction|| + c)`` with the per-sample L2 norm."""
    return direction / broadcast_time(direction.flatten(1).norm(dim=1) + constant, direction)


class AlignYourFlow(FlowMapMethod):
    """Align Your Flow distillation (module docstring)."""

    def __init__(self, transport: Transport | str = "linear", teacher=None,
                 teacher_transport: Optional[Transport | str] = None, guide_teacher=None,
                 guide_transport: Optional[Transport | str] = None, autoguidance_scale: float = 1.0,
                 loss_type: str = "eulerian", gap_mean: float = -0.8, gap_std: float = 1.0,
                 tangent_warmup_steps: int = 10000, normalisation_constant: float = 0.1,
                 tangent_method: str = "auto", finite_difference_step: float = 1e-3, label_dropout: float = 0.0,
                 null_label: Optional[int] = None):
        check_choice("loss_type", loss_type, AYF_LOSSES)
        if teacher is None and (loss_type == "lagrangian" or guide_teacher is not None):
            raise ValueError("ayf's lagrangian loss and autoguidance need a teacher: a model, 'oracle:<mixture>' "
                             "(e.g. 'oracle:8gaussians') or 'checkpoint:<path>'")
        check_number("gap_mean", gap_mean)
        check_range("gap_std", gap_std, 0.0, float("inf"))
        check_positive_int("tangent_warmup_steps", tangent_warmup_steps, minimum=0)
        check_range("normalisation_constant", normalisation_constant, 1e-12, float("inf"))
        check_range("label_dropout", label_dropout, 0.0, 1.0)
        self.transport = as_transport(transport)
        self.flow_map = FlowMapParameterisation(self.transport, "s")
        self.teacher = None if teacher is None else Teacher(teacher, teacher_transport, self.transport)
        self.guide = None if guide_teacher is None else GuideTeacher(guide_teacher, guide_transport, self.transport)
        self.teacher_velocity = None if teacher is None else \
            TeacherVelocity(self.teacher, self.transport, self.guide, autoguidance_scale)
        self.loss_type, self.gap_mean, self.gap_std = loss_type, float(gap_mean), float(gap_std)
        self.tangent_warmup_steps, self.normalisation_constant = tangent_warmup_steps, float(normalisation_constant)
        self.tangent = TangentEstimator(tangent_method, finite_difference_step, "AYF")
        self.label_dropout, self.null_label = float(label_dropout), null_label

    def networks(self):
        specs = super().networks()
        if self.guide is not None:
            specs.update(self.guide.network_specs())
        return specs

    def to(self, device):
        super().to(device)
        if self.guide is not None:
            self.guide.to(device)
        return self

    def state_dict(self) -> dict:
        return self.tangent.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.tangent.load_state_dict(state)

    @property
    def warmup_ratio(self) -> float:
        """``w_r = min(1, step / H)`` (``H = 0``: 1)."""
        return 1.0 if self.tangent_warmup_steps == 0 else min(1.0, self.step / self.tangent_warmup_steps)

    def sample_times(self, batch_size: int, generator: Optional[torch.Generator]) -> tuple[Tensor, Tensor]:
        """Float64 ``(t, s)``: gap ``d = sigmoid(N(gap_mean, gap_std^2))``, ``s ~ U(0, 1 - d)``, ``t = s + d``."""
        gap = logit_normal(batch_size, self.gap_mean, self.gap_std, generator)
        s = (1 - gap) * torch.rand(batch_size, generator=generator, dtype=torch.float64)
        return s + gap, s

    # -------------------------------------------------------------------------------------------- loss
    def loss(self, phase: str, networks: Networks, batch: Batch) -> ObjectiveOutput:
        if self.teacher is not None:
            self.teacher.bind(networks)
        if self.guide is not None:
            self.guide.bind(networks)
        data, generator = batch.data, batch.generator
        t64, s64 = self.sample_times(data.shape[0], generator)
        t, s = t64.to(data.device, data.dtype), s64.to(data.device, data.dtype)
        noise = self.noise_like(data, generator)
        model = networks[MODEL_ROLE]
        labels = self.prepared_labels(model, batch)
        x_t = self.transport.interpolate(data, noise, t)
        if self.loss_type == "lagrangian":
            return self._lagrangian(model, x_t, t, s, labels)
        velocity = self.transport.velocity(data, noise, t) if self.teacher_velocity is None \
            else self.teacher_velocity(x_t, t, labels)
        return self._eulerian(model, x_t, t, s, labels, velocity)

    def _eulerian(self, model, x_t: Tensor, t: Tensor, s: Tensor, labels: Optional[Tensor], velocity: Tensor
                  ) -> ObjectiveOutput:
        plain = unwrap(model)
        derivative = self.tangent(
            lambda network, point, time: self.flow_map.average_velocity(network, point, time, s, labels), plain,
            (x_t, t), (velocity, torch.ones_like(t)))
        average = self.flow_map.average_velocity(model, x_t, t, s, labels)
        frozen = average.detach()
        tangent = frozen - velocity + self.warmup_ratio * broadcast_time(t - s, x_t) * derivative
        target = frozen - normalised(tangent, self.normalisation_constant)
        per_sample = ((average - target) ** 2).flatten(1).sum(dim=1)
        stats = {"tangent_norm": tangent.flatten(1).norm(dim=1).mean(), "warmup_ratio": self.warmup_ratio}
        return ObjectiveOutput(per_sample.mean(), per_sample.detach(), stats)

    def _lagrangian(self, model, x_t: Tensor, t: Tensor, s: Tensor, labels: Optional[Tensor]) -> ObjectiveOutput:
        plain = unwrap(model)
        derivative = self.tangent(lambda network, time: self.flow_map.jump(network, x_t, t, time, labels), plain,
                                  (s,), (torch.ones_like(s),))
        mapped = self.flow_map.jump(model, x_t, t, s, labels)
        frozen = mapped.detach()
        residual = derivative - self.teacher_velocity(frozen, s, labels)
        target = frozen + normalised(residual, self.normalisation_constant)
        per_sample = ((mapped - target) ** 2).flatten(1).sum(dim=1)
        stats = {"residual_norm": residual.flatten(1).norm(dim=1).mean()}
        return ObjectiveOutput(per_sample.mean(), per_sample.detach(), stats)
