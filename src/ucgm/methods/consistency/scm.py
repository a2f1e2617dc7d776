"""sCM: continuous-time consistency training (sCT) and distillation (sCD) on TrigFlow (Lu & Song 2024).

**sCM in its own units.** Data ``x_0`` of std ``sigma_d``, ``x_s = cos(s) x_0 + sin(s) sigma_d eps``,
``eps ~ N(0, I)``, ``s`` in [0, pi/2]; consistency function
``f(x_s, s) = cos(s) x_s - sin(s) sigma_d F(x_s / sigma_d, s)``; PF-ODE ``dx_s/ds = sigma_d F``. Tangent
``g = -cos^2(s) (sigma_d F^- - dx_s/ds) - r cos(s) sin(s) (x_s + sigma_d dF^-/ds)`` (``F^-``: the online network
without gradient; ``dF^-/ds`` its total derivative along ``(dx_s/ds, 1)``), loss
``exp(-w(s)) / D ||F - F^- - g / (||g|| + c)||^2 + w(s)``, ``s = arctan(e^tau / sigma_d)``,
``tau ~ N(P_mean, P_std^2)``.

**The same model in ucgm's TrigFlow transport** (``make_transport("trigflow")``: ``x_t = sin(h t) z + cos(h t) x``,
``z ~ N(0, I)``, ``F = cos(h t) z - sin(h t) x``, ``h = pi/2``, or the transport's ``half_pi`` such as 1.57)
under the identification

| sCM | ucgm |
|---|---|
| angle ``s`` | ``h t`` (the network receives ``t = s / h``) |
| ``x_0 / sigma_d`` | data ``x`` (std ~1 after the data pipeline's normalisation) |
| ``eps`` | noise ``z`` |
| ``x_s / sigma_d`` | ``x_t`` |
| ``F(x_s / sigma_d, s)`` | ``F(x_t, t)`` (v-prediction, the transport's target ``cos z - sin x``) |
| ``f(x_s, s) / sigma_d`` | data prediction ``x_hat = cos(s) x_t - sin(s) F`` |
| ``dx_s/ds / sigma_d`` | ``v = dx_t/ds``: ``cos(s) z - sin(s) x`` (sCT) or the teacher's ``F`` (sCD) |
| ``g`` | ``sigma_d [-cos^2(s) (F^- - v) - r cos(s) sin(s) (x_t + dF^-/ds)]`` |

so ``sigma_d`` survives only in the time law and as the tangent's scale, and ``g / (||g|| + c)`` equals the
ucgm-unit tangent normalised with ``c / sigma_d``. Samples come out in ucgm units (no ``sigma_d`` factor).

**Relation to UCGM-T** (``consistency_ratio = 1`` on TrigFlow). Its target is ``F^- + 4 clamp(Delta, -1, 1)`` with
``Delta = d x_hat/dt = h d x_hat/ds`` (``-(alpha / D) 4 / sin(h t) = 4`` on TrigFlow), while sCM's is ``F^- + N(g)``
with ``g = sigma_d cos(s) d x_hat/ds`` at ``r = 1``. Both pull ``F`` against the time derivative of the data
prediction; they differ in (1) the tangent's scale, ``4 h`` against ``sigma_d cos(s)`` (a per-sample factor
``4 h / (sigma_d cos s)``, i.e. UCGM's weight ``4 / sin`` would have to be ``sigma_d cot(s) / h``); (2) an element-wise
clamp of ``h d x_hat/ds`` before the factor 4 against sCM's normalisation of ``g``; (3) no warm-up (``r = 1``);
(4) UCGM differences ``x_hat`` at ``t +- 0.005``, sCM ``F`` at ``s (1 +- 1e-3)`` or uses a JVP (the two agree to
second order; with exact derivatives they coincide); (5) the per-sample loss ``sqrt(mean (F - T)^2 + c^2) - c``
against ``exp(-w) mean (F - T)^2 + w`` (for ``c = 0`` UCGM's gradient is the squared error's times the detached
weight ``1 / (2 RMSE)``); (6) the time law (scaled Beta against arctan-lognormal). ``tests/test_scm.py`` checks
the shared part: with exact derivatives, UCGM-T's loss and gradient are reproduced from sCM's tangent ``g``.
"""

from __future__ import annotations

import functools
import math
import warnings
from typing import Callable, Optional

import torch
from torch import Tensor, nn

from ...transports import EDM_SIGMA_DATA, Transport, TransportAdapter, TrigPath, broadcast_time, make_transport
from ...validation import check_batch, check_choice, check_finite, check_positive_int, check_range
from .adaptive_weighting import AdaptiveWeighting
from ..base import (
    NetworkSpec,
    Objective,
    ObjectiveOutput,
    Phase,
    draw_noise,
    drop_labels,
    dropout_seed,
    resolve_null_label,
    shared_randomness,
    unwrap,
)
from ..teachers import Teacher
from .scm_tangent import (
    TANGENT_METHODS,
    TANGENT_NORMALISATIONS,
    normalise_tangent,
    output_derivative_finite_difference,
    output_derivative_jvp,
    scm_tangent,
    tangent_warmup_ratio,
)

#: ``teacher="reference"`` distils from the trainer's frozen copy of the model the run started from.
REFERENCE_TEACHER = "reference"

#: Words of the errors with which PyTorch reports that forward-mode AD is not implemented for an operation.
_JVP_UNSUPPORTED_WORDS = ("forward ad", "forward-mode", "forward mode", "jvp", "not implemented", "not supported",
                          "does not support")


def jvp_unsupported(error: BaseException) -> bool:
    """Whether ``error`` says that forward-mode AD is not available for the model (a missing ``jvp`` /
    forward-derivative formula), as opposed to any other failure such as running out of memory."""
    if isinstance(error, torch.OutOfMemoryError):
        return False
    if isinstance(error, NotImplementedError):
        return True
    message = str(error).lower()
    return isinstance(error, RuntimeError) and any(word in message for word in _JVP_UNSUPPORTED_WORDS)


def agreed_by_every_rank(supported: bool, device: torch.device) -> bool:
    """``supported`` on every process of the job (a collective in a ``torch.distributed`` job; the value itself
    otherwise)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return supported
    flag = torch.tensor([1.0 if supported else 0.0], device=device)
    torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN)
    return bool(flag.item() == 1.0)


def sample_trigflow_time(
    batch_size: int,
    log_sigma_mean: float = -1.0,
    log_sigma_std: float = 1.4,
    sigma_data: float = EDM_SIGMA_DATA,
    half_pi: float = math.pi / 2,
    generator: Optional[torch.Generator] = None,
) -> Tensor:
    """ucgm times ``t = min(s / h, 1)`` of sCM's angles ``s = arctan(e^tau / sigma_d)``, ``tau ~ N(mean, std^2)``
    (float64, reproducible from ``generator``)."""
    check_positive_int("batch_size", batch_size)
    _check_positive("sigma_data", sigma_data)
    log_sigma = log_sigma_mean + log_sigma_std * torch.randn(batch_size, generator=generator, dtype=torch.float64)
    angle = torch.atan(torch.exp(log_sigma) / sigma_data)
    return torch.clamp(angle / half_pi, max=1.0)


def _check_finite_number(name: str, value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name}={value!r} must be a finite number")


def _check_positive(name: str, value: float) -> None:
    _check_finite_number(name, value)
    if value <= 0:
        raise ValueError(f"{name}={value!r} must be > 0")


def _check_trigflow(name: str, transport: Transport) -> None:
    if not isinstance(transport.path, TrigPath) or transport.parameterisation != "v":
        raise ValueError(f"{name} must be the TrigFlow transport (trig path, 'v' parameterisation), e.g. "
                         f"make_transport('trigflow'); got path {transport.path.name!r} with "
                         f"parameterisation {transport.parameterisation!r}")


class SCMObjective(Objective):
    """sCT (``teacher=None``) or sCD (any other ``teacher``, see below) on ucgm's TrigFlow transport.

    Options and sCM's names: ``log_sigma_mean`` / ``log_sigma_std`` = ``P_mean`` / ``P_std``; ``tangent_method``
    ``"jvp"`` (``torch.func.jvp``), ``"finite_difference"`` (central, ``d = finite_difference_step * s``, float64) or
    ``"auto"``: the first loss tries the JVP; when forward-mode AD is not supported by the model (not on any other
    error, e.g. out of memory, which is raised) on any process of the job, every process switches to finite
    differences with a warning. The choice is the method's state (checkpointed: a resumed run keeps it);
    ``tangent_normalisation`` ``"norm"`` (``g / (||g|| + normalisation_constant)``), ``"clamp"`` or ``"none"``;
    ``tangent_warmup_steps`` = ``H`` of ``r = min(1, step / H)`` (progress from :meth:`set_progress`);
    ``adaptive_weighting`` learns ``w(s)`` (:class:`AdaptiveWeighting`, optimised through :meth:`parameters`).

    ``teacher``: a model, ``"oracle:<mixture>"`` or ``"checkpoint:<path>"`` (resolved as for CD by
    :func:`~ucgm.methods.teachers.resolve_teacher`; a model is read through ``teacher_transport``, default its
    ``transport`` attribute as on :class:`~ucgm.data.mixtures.OracleModel`, else this objective's), mapped onto
    the TrigFlow path so it may use any path and parameterisation; or ``"reference"``: the trainer's frozen
    reference model (the checkpoint the run started from) on this objective's transport. Labels are dropped to
    the null label with probability ``label_dropout``.
    """

    family = "consistency"
    default_sampler = "scm"

    def __init__(
        self,
        transport: Transport | str = "trigflow",
        sigma_data: float = EDM_SIGMA_DATA,
        log_sigma_mean: float = -1.0,
        log_sigma_std: float = 1.4,
        tangent_method: str = "auto",
        finite_difference_step: float = 1e-3,
        tangent_normalisation: str = "norm",
        normalisation_constant: float = 0.1,
        tangent_warmup_steps: int = 10000,
        adaptive_weighting: bool = True,
        teacher: Optional[Callable | str] = None,
        teacher_transport: Optional[Transport | str] = None,
        label_dropout: float = 0.0,
        null_label: Optional[int] = None,
    ):
        self.transport = make_transport(transport) if isinstance(transport, str) else transport
        _check_trigflow("transport", self.transport)
        _check_positive("sigma_data", sigma_data)
        _check_finite_number("log_sigma_mean", log_sigma_mean)
        _check_positive("log_sigma_std", log_sigma_std)
        check_choice("tangent_method", tangent_method, TANGENT_METHODS)
        check_range("finite_difference_step", finite_difference_step, 1e-8, 0.1)
        check_choice("tangent_normalisation", tangent_normalisation, TANGENT_NORMALISATIONS)
        _check_positive("normalisation_constant", normalisation_constant)
        check_positive_int("tangent_warmup_steps", tangent_warmup_steps, minimum=0)
        check_range("label_dropout", label_dropout, 0.0, 1.0)
        reference_teacher = isinstance(teacher, str) and teacher == REFERENCE_TEACHER
        if teacher_transport is not None and (teacher is None or reference_teacher):
            raise ValueError("teacher_transport is only used with a model, 'oracle:...' or 'checkpoint:...' teacher")
        self.sigma_data = float(sigma_data)
        self.log_sigma_mean, self.log_sigma_std = float(log_sigma_mean), float(log_sigma_std)
        self.tangent_method = tangent_method
        self.finite_difference_step = float(finite_difference_step)
        self.tangent_normalisation = tangent_normalisation
        self.normalisation_constant = float(normalisation_constant)
        self.tangent_warmup_steps = tangent_warmup_steps
        self.label_dropout = float(label_dropout)
        self.null_label = null_label
        self.reference_teacher = reference_teacher
        self.teacher = None if teacher is None or reference_teacher else Teacher(teacher, teacher_transport,
                                                                                 self.transport)
        self._teacher_adapter: Optional[TransportAdapter] = None
        self.weighting: Optional[AdaptiveWeighting] = AdaptiveWeighting() if adaptive_weighting else None
        #: The weighting head as the loss calls it (the trainer's training wrapper while training).
        self._weighting_call: Optional[Callable] = None
        self.reference_mode = "frozen" if reference_teacher else None
        self.step = 0
        #: The derivative method in use: ``tangent_method``; for ``"auto"``, ``"jvp"`` or ``"finite_difference"``
        #: once the first loss has decided.
        self.method_in_use = tangent_method

    @property
    def teacher_adapter(self) -> Optional[TransportAdapter]:
        """``F`` of the TrigFlow path (= ``dx_t/ds``) from the teacher on its own transport (``None`` for sCT and
        for the reference teacher)."""
        if self.teacher is None:
            return None
        model, native = self.teacher.resolved()
        if self._teacher_adapter is None or self._teacher_adapter.model is not model:
            self._teacher_adapter = TransportAdapter(model, native, self.transport)
        return self._teacher_adapter

    def networks(self) -> dict[str, NetworkSpec]:
        """The model, a frozen reference (``teacher="reference"``), a checkpoint teacher, and the adaptive
        weighting head ``weighting`` (built by the method, trained with the model)."""
        specs = super().networks()
        if self.teacher is not None:
            specs.update(self.teacher.network_specs())
        if self.weighting is not None:
            specs["weighting"] = NetworkSpec(init="method", ema={"kind": "none"})
        return specs

    def schedule(self) -> list[Phase]:
        return [Phase("train", ("model", "weighting") if self.weighting is not None else ("model",))]

    def sampler(self) -> tuple[str, dict]:
        """sCM's sampler: one jump to data per call, re-noised at the intermediate angles."""
        return "scm", {}

    def build_network(self, role: str) -> nn.Module:
        if role != "weighting" or self.weighting is None:
            return super().build_network(role)
        return self.weighting

    def loss(self, phase, networks, batch):
        if self.teacher is not None:
            self.teacher.bind(networks)
        self._weighting_call = networks.get("weighting")
        try:
            return super().loss(phase, networks, batch)
        finally:
            self._weighting_call = None

    # ------------------------------------------------------------------------- trainer interface
    def set_progress(self, step: int, total_steps: Optional[int] = None) -> None:
        """Tell the objective the optimisation step ``k`` (drives the tangent warm-up ``r = min(1, k / H)``;
        ``total_steps`` is accepted for the trainer's uniform call and not needed)."""
        check_positive_int("step", step, minimum=0)
        if total_steps is not None:
            check_positive_int("total_steps", total_steps)
        self.step = step

    def state_dict(self) -> dict:
        """The tangent method in use (the ``auto`` decision)."""
        return {"tangent_method_in_use": self.method_in_use}

    def load_state_dict(self, state: dict) -> None:
        if not state:  # a checkpoint written before the decision was kept: decide again
            return
        method = state.get("tangent_method_in_use")
        check_choice("tangent_method_in_use", method, TANGENT_METHODS)
        if self.tangent_method != "auto" and method != self.tangent_method:
            raise ValueError(f"the checkpoint used tangent_method={method!r}; this run sets {self.tangent_method!r}")
        self.method_in_use = method

    @property
    def warmup_ratio(self) -> float:
        """The current ``r = min(1, step / H)``."""
        return tangent_warmup_ratio(self.step, self.tangent_warmup_steps)

    def to(self, device: torch.device | str) -> "SCMObjective":
        """Move the weighting head (and a module teacher) to ``device``."""
        for module in (self.weighting, self.teacher_adapter):
            if module is not None:
                module.to(device)
        return self

    # ------------------------------------------------------------------------------------ inputs
    def _times(self, time: Optional[Tensor], data: Tensor, generator: Optional[torch.Generator]) -> Tensor:
        if time is None:
            time = sample_trigflow_time(data.shape[0], self.log_sigma_mean, self.log_sigma_std, self.sigma_data,
                                        self.transport.path.half_pi, generator)
            return time.to(device=data.device, dtype=data.dtype)
        time = torch.as_tensor(time, dtype=data.dtype, device=data.device).reshape(-1)
        check_batch("time", time, data.shape[0])
        check_finite("time", time)
        if not bool(((time > 0) & (time <= 1)).all()):
            raise ValueError("time must lie in (0, 1] (t = 0 is data; the finite-difference step is relative to t)")
        return time

    # -------------------------------------------------------------------------------------- step
    def __call__(
        self,
        model: Callable,
        data: Tensor,
        labels: Optional[Tensor] = None,
        *,
        reference_model: Optional[Callable] = None,
        generator: Optional[torch.Generator] = None,
        time: Optional[Tensor] = None,
        noise: Optional[Tensor] = None,
    ) -> ObjectiveOutput:
        """One sCM loss. ``time`` (B,) in (0, 1] (angle ``s = h t``) and ``noise`` may be given to make the step
        exactly reproducible; otherwise they are drawn from ``generator``."""
        check_finite("data", data)
        check_batch("labels", labels, data.shape[0])
        if self.reference_teacher and reference_model is None:
            raise ValueError("teacher='reference' needs the trainer's reference_model (reference_mode 'frozen')")
        time = self._times(time, data, generator)
        noise = draw_noise(data, noise, generator)
        labels = drop_labels(labels, self.label_dropout, resolve_null_label(model, self.null_label), generator)
        same_dropout = functools.partial(shared_randomness, dropout_seed(generator), data.device)
        transport = self.transport
        x_t = transport.interpolate(data, noise, time)
        with same_dropout():
            output = transport.network_output(model, x_t, time, labels)
        angle = transport.path.half_pi * time
        with torch.no_grad():
            velocity = self._velocity(reference_model, data, noise, x_t, time, labels)
            derivative = self._output_derivative(unwrap(model), data, noise, x_t, time, velocity, labels,
                                                 same_dropout)
            tangent = scm_tangent(output.detach(), velocity, x_t, derivative, angle, self.warmup_ratio,
                                  self.sigma_data)
            target = output.detach() + normalise_tangent(tangent, self.tangent_normalisation,
                                                         self.normalisation_constant)
        error = ((output - target) ** 2).flatten(1).mean(dim=1)
        stats = {"tangent_norm": tangent.flatten(1).norm(dim=1).mean(), "warmup_ratio": self.warmup_ratio,
                 "squared_error": error.detach().mean()}
        if self.weighting is None:
            per_sample = error
        else:
            if self.weighting.bias.device != data.device:
                raise ValueError(f"the weighting head is on {self.weighting.bias.device} but the data on "
                                 f"{data.device}; call objective.to(device) before training")
            weighting = self._weighting_call or self.weighting
            log_variance = weighting(angle).to(error.dtype)
            per_sample = torch.exp(-log_variance) * error + log_variance
            stats["log_variance"] = log_variance.detach().mean()
        return ObjectiveOutput(per_sample.mean(), per_sample.detach(), stats)

    def _velocity(self, reference_model, data, noise, x_t, time, labels) -> Tensor:
        """``v = dx_t/ds``: ``cos(s) z - sin(s) x`` (sCT; the transport's target) or the teacher's TrigFlow ``F``."""
        if self.teacher_adapter is not None:
            return self.teacher_adapter(x_t, time, labels).to(x_t.dtype)
        if self.reference_teacher:
            return self.transport.network_output(unwrap(reference_model), x_t, time, labels)
        return self.transport.target(data, noise, time)

    def _output_derivative(self, model, data, noise, x_t, time, velocity, labels, same_dropout) -> Tensor:
        """``dF^-/ds`` along ``(v, 1)`` by the method in use (``auto``: decided here, see the class docstring)."""
        if self.method_in_use == "auto":
            derivative = self._decide_tangent(model, x_t, time, velocity, labels, same_dropout)
            if derivative is not None:
                return derivative
        if self.method_in_use == "jvp":
            return output_derivative_jvp(model, self.transport, x_t, time, velocity, labels, same_dropout)
        angle = self.transport.path.half_pi * time.to(torch.float64)
        point_at = self._trajectory_points(data, noise, x_t, velocity, angle)
        derivative = output_derivative_finite_difference(model, self.transport, point_at, angle,
                                                         self.finite_difference_step * angle, labels, same_dropout,
                                                         x_t.dtype)
        return derivative.to(x_t.dtype)

    def _decide_tangent(self, model, x_t, time, velocity, labels, same_dropout) -> Optional[Tensor]:
        """The ``auto`` decision: the JVP derivative when every process supports forward-mode AD (``None``
        otherwise, after switching to finite differences with a warning); other errors are raised."""
        derivative, failure = None, None
        try:
            derivative = output_derivative_jvp(model, self.transport, x_t, time, velocity, labels, same_dropout)
        except (RuntimeError, NotImplementedError) as error:
            if not jvp_unsupported(error):
                raise
            failure = error
        supported = agreed_by_every_rank(failure is None, x_t.device)
        self.method_in_use = "jvp" if supported else "finite_difference"
        if supported:
            return derivative
        reason = "on another process" if failure is None else \
            f"{type(failure).__name__}: {str(failure).splitlines()[0] if str(failure) else ''}"
        warnings.warn(f"sCM: forward-mode AD is not supported by this model ({reason}); using the finite-difference "
                      f"tangent for the rest of the run", RuntimeWarning, stacklevel=4)
        return None

    def _trajectory_points(self, data, noise, x_t, velocity, angle) -> Callable[[Tensor], Tensor]:
        """``offset -> x`` at angle ``s + offset`` in float64: sCT on the same ``(x, z)`` pair,
        ``sin(s + d) z + cos(s + d) x``; sCD along the teacher's velocity, ``x_t + d v``."""
        if self.teacher_adapter is None and not self.reference_teacher:
            data64, noise64, half_pi = data.to(torch.float64), noise.to(torch.float64), self.transport.path.half_pi
            return lambda offset: self.transport.interpolate(data64, noise64, (angle + offset) / half_pi)
        x64, velocity64 = x_t.to(torch.float64), velocity.to(torch.float64)
        return lambda offset: x64 + broadcast_time(offset, x64) * velocity64
