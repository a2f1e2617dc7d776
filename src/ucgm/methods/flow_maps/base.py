"""What the two-time flow-map methods share (CTM, Shortcut, MeanFlow, AYF; IMM can use it too): one network
``model`` read as a flow map (:class:`~ucgm.methods.flow_maps.core.FlowMapParameterisation`), sampled by the
flow-map samplers through :class:`~ucgm.methods.flow_maps.core.FlowMapModel`, the time laws of the papers, and a
teacher's velocity on the student's transport (distillation: CTM, AYF).

A subclass sets ``self.transport`` and ``self.flow_map`` (and, for a teacher, ``self.teacher``) in its constructor
and implements :meth:`~ucgm.methods.base.Method.loss`; ``networks()``, ``sampling_model()`` and ``sampler()``
come from here.
"""

from __future__ import annotations

from typing import Callable, Mapping, Optional

import torch
from torch import Tensor, nn

from ...transports import Transport, TransportAdapter, make_transport
from ...validation import check_finite, check_positive_int, check_range
from ..base import Batch, Method, NetworkSpec, drop_labels, resolve_null_label
from ..teachers import Teacher
from .core import FlowMapModel, FlowMapParameterisation

#: The role of the trained flow map.
MODEL_ROLE = "model"


def as_transport(transport: Transport | str) -> Transport:
    """``transport`` itself, or the named one (:func:`~ucgm.transports.make_transport`)."""
    return make_transport(transport) if isinstance(transport, str) else transport


def logit_normal(batch_size: int, mean: float, std: float, generator: Optional[torch.Generator]) -> Tensor:
    """``sigmoid(mean + std n)``, ``n ~ N(0, 1)`` (float64 ``(B,)``): MeanFlow's time law, AYF's gap law."""
    return torch.sigmoid(mean + std * torch.randn(batch_size, generator=generator, dtype=torch.float64))


def check_number(name: str, value: float) -> None:
    """``ValueError`` unless ``value`` is a finite number."""
    check_range(name, value, -float("inf"), float("inf"))


class FlowMapMethod(Method):
    """One trainable flow map ``model`` (+ the networks a subclass adds), sampled with its own flow-map sampler."""

    family = "flow_maps"
    default_sampler = "flow-map"
    transport: Transport
    flow_map: FlowMapParameterisation
    teacher: Optional[Teacher] = None
    label_dropout: float = 0.0
    null_label: Optional[int] = None

    # ------------------------------------------------------------------------------------ declaration
    def model_spec(self) -> NetworkSpec:
        """The flow map's spec: a backbone that accepts the second-time condition."""
        return NetworkSpec(conditions=self.flow_map.conditions)

    def networks(self) -> dict[str, NetworkSpec]:
        specs = {MODEL_ROLE: self.model_spec()}
        if self.teacher is not None:
            specs.update(self.teacher.network_specs())
        return specs

    def set_progress(self, step: int, total_steps: Optional[int] = None) -> None:
        """The optimisation step (warm-ups read it)."""
        check_positive_int("step", step, minimum=0)
        self.step, self.total_steps = step, total_steps

    step: int = 0
    total_steps: Optional[int] = None

    def to(self, device: torch.device | str) -> "FlowMapMethod":
        if self.teacher is not None:
            self.teacher.to(device)
        return self

    # --------------------------------------------------------------------------------------- sampling
    def sampler(self) -> tuple[str, dict]:
        """The flow-map sampler: jumps on the uniform grid from t = 1 to 0."""
        return "flow-map", {}

    def sampling_model(self, modules: Mapping[str, nn.Module]) -> tuple[Callable, Transport]:
        """``(FlowMapModel(backbone), its transport)``: ``forward(x, t, labels, s=...)`` is the raw output, so the
        flow-map samplers jump with it and ODE solvers (without ``s``) use its instantaneous velocity."""
        backbone = modules[MODEL_ROLE] if isinstance(modules, Mapping) else modules
        wrapped = FlowMapModel(backbone, self.flow_map)
        return wrapped, wrapped.transport

    # ------------------------------------------------------------------------------------------ pieces
    def prepared_labels(self, model: Callable, batch: Batch) -> Optional[Tensor]:
        """The batch labels after label dropout (``label_dropout``; null label = the model's ``num_classes``)."""
        return drop_labels(batch.labels, self.label_dropout, resolve_null_label(model, self.null_label),
                           batch.generator)

    def noise_like(self, data: Tensor, generator: Optional[torch.Generator]) -> Tensor:
        """``N(0, I)`` noise shaped like ``data``, drawn from the batch generator."""
        check_finite("data", data)
        return torch.randn(data.shape, generator=generator, dtype=data.dtype).to(data.device)


class TeacherVelocity:
    """A teacher's probability-flow velocity ``dx_t/dt`` on the student's ``transport`` (the teacher may live on
    any path and parameterisation; :class:`~ucgm.transports.TransportAdapter` maps it), optionally autoguided by a
    weaker ``guide``: ``v = v_guide + scale (v_teacher - v_guide)`` (Karras et al. 2024; ``scale = 1`` is the
    teacher alone)."""

    def __init__(self, teacher: Teacher, transport: Transport, guide: Optional[Teacher] = None,
                 scale: float = 1.0):
        check_number("autoguidance_scale", scale)
        self.teacher, self.transport, self.guide, self.scale = teacher, transport, guide, float(scale)
        self._adapters: dict[int, TransportAdapter] = {}

    def _velocity(self, teacher: Teacher, x_t: Tensor, t: Tensor, labels: Optional[Tensor]) -> Tensor:
        model, native = teacher.resolved()
        adapter = self._adapters.get(id(teacher))
        if adapter is None or adapter.model is not model:
            adapter = TransportAdapter(model, native, self.transport)
            self._adapters[id(teacher)] = adapter
        output = adapter(x_t, t, labels).to(x_t.dtype)
        data, noise = self.transport.recover(output, x_t, t)
        return self.transport.velocity(data, noise, t)

    @torch.no_grad()
    def __call__(self, x_t: Tensor, t: Tensor, labels: Optional[Tensor] = None) -> Tensor:
        """``v(x_t, t)`` (``t`` per sample ``(B,)``)."""
        velocity = self._velocity(self.teacher, x_t, t, labels)
        if self.guide is None or self.scale == 1.0:
            return velocity
        return torch.lerp(self._velocity(self.guide, x_t, t, labels), velocity, self.scale)


class GuideTeacher(Teacher):
    """The weaker model of an autoguided teacher: a checkpoint guide is the frozen network role ``guide``."""

    ROLE = "guide"
