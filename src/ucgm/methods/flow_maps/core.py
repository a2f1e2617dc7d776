"""The flow-map core: one two-time model ``F(x_t, t, s)`` (the jump from time ``t`` to time ``s <= t``) for every
ucgm transport, shared by CTM, Shortcut, MeanFlow, IMM and Align Your Flow.

**The jump formula.** A network ``F_theta(x_t, t, <second time>)`` is read through the run's transport like any ucgm
network: its raw output ``F`` means ``alpha_hat(t) z_hat + gamma_hat(t) x_hat`` (the transport's parameterisation),
which fixes a data and a noise prediction ``(x_hat, z_hat)`` consistent with ``x_t = alpha(t) z_hat + gamma(t) x_hat``.
The jump is the DDIM step of that pair,

    ``x_s = alpha(s) z_hat + gamma(s) x_hat = x_t - (t - s) u``,
    ``u = D_alpha z_hat + D_gamma x_hat``,  ``D_alpha = (alpha(t) - alpha(s)) / (t - s)`` (``-> alpha'(t)`` as ``s -> t``),

``u`` being the *average velocity* over ``[s, t]``. Substituting ``(x_hat, z_hat)`` gives ``u = A x_t + B F`` with

    ``A = (D_alpha gamma_hat - D_gamma alpha_hat) / D``,  ``B = (D_gamma alpha - D_alpha gamma) / D``,
    ``D = alpha gamma_hat - gamma alpha_hat``

(:func:`jump_coefficients`, float64). On the linear transport with the velocity parameterisation ``A = 0``,
``B = 1``: the raw output *is* MeanFlow's / AYF's average velocity, and ``x_s = x_t - (t - s) F``; with the ``data``
parameterisation it is CTM's ``G = (s / t) x_t + (1 - s / t) g_theta`` (``g_theta = x_hat``); on TrigFlow with the
``v`` parameterisation ``x_s = cos(h(t - s)) x_t - sin(h(t - s)) F`` (IMM's ``simple_edm`` map). Shortcut's output
``s_theta = -u``. **Boundary:** ``F(x_t, t, t) = x_t`` exactly (``x_t - 0 * u``, bitwise), whatever the network.
At ``s = t`` the output is the instantaneous model (``u(x, t, t)`` = the ODE velocity), so a flow map also samples
with every ODE solver (called without ``s``).

**How the network receives the second time** (``second_time``, :data:`SECOND_TIMES`):

| value | model condition | network receives | used by |
|---|---|---|---|
| ``"s"`` | ``s`` | the target time ``s`` (converted by the transport like ``t``) | CTM, AYF, IMM ``identity`` temb |
| ``"gap"`` | ``step`` | ``h = t - s`` (formed inside, so ``dh/dt = 1`` under a JVP in ``t``) | MeanFlow, IMM ``stride`` |
| ``"log2_gap"`` | ``step`` | ``k = log2(1 / max(t - s, min_gap))`` (``d = 2^-k``) | Shortcut (``min_gap = 1/128``) |

The backbone must accept that condition: declare the network with
``NetworkSpec(conditions=parameterisation.conditions)`` (backbones take it through ``model.conditions``).

**API** (what a method uses)::

    from ucgm.methods.flow_maps.core import FlowMapParameterisation, FlowMapModel

    flow_map = FlowMapParameterisation(transport, second_time="gap")          # MeanFlow's (t, h) input
    spec = NetworkSpec(conditions=flow_map.conditions)
    output = flow_map.output(model, x_t, t, s, labels)        # raw F (any callable: DDP wrapper, module, EMA)
    u = flow_map.average_velocity(model, x_t, t, s, labels)  # A x_t + B F
    x_s = flow_map.jump(model, x_t, t, s, labels)           # x_t - (t - s) u;  jump(.., t, t, ..) == x_t
    u = average_velocity(transport, output, x_t, t, s)      # the same from a given output (e.g. a guided one)
    F = output_from_average_velocity(transport, u, x_t, t, s)  # the inverse (targets in output units)

    # sampling: Method.sampling_model returns (FlowMapModel(backbone, flow_map), its .transport); the registry
    # samplers "flow-map" (any grid, CTM's gamma-sampling) and "shortcut" (dyadic step sizes) call
    # ``transport.network_output(model, x, t, labels, s=s)`` and :func:`jump` (ucgm.sampling.flow_map_sampler).

``t``, ``s`` are per-sample ``(B,)`` ucgm times (or scalars), ``s <= t``; everything is differentiable in
``(x_t, t, s)`` (``torch.func.jvp`` works through it).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import Tensor, nn

from ...transports import LinearPath, Transport, broadcast_time
from ...validation import check_choice, check_range

#: How a flow-map network receives its second time (module docstring).
SECOND_TIMES = ("s", "gap", "log2_gap")
#: Below this gap ``|t - s|`` the divided differences ``D_alpha``, ``D_gamma`` are replaced by the derivative at
#: the midpoint (float64; both agree to ``O(gap^2)``).
DIVIDED_DIFFERENCE_GAP = 1e-6
#: Shortcut's finest step size ``1 / 128`` (``denoise_timesteps = 128``).
SHORTCUT_MIN_GAP = 1.0 / 128


def _divided_difference(function: Callable[[Tensor], Tensor], derivative: Callable[[Tensor], Tensor], t: Tensor,
                        s: Tensor) -> Tensor:
    """``(f(t) - f(s)) / (t - s)``, or ``f'((t + s) / 2)`` where ``|t - s| < DIVIDED_DIFFERENCE_GAP``."""
    gap = t - s
    close = gap.abs() < DIVIDED_DIFFERENCE_GAP
    safe_gap = torch.where(close, torch.ones_like(gap), gap)
    return torch.where(close, derivative((t + s) / 2), (function(t) - function(s)) / safe_gap)


def jump_coefficients(transport: Transport, t: Tensor, s: Tensor) -> tuple[Tensor, Tensor]:
    """``(A, B)`` of the average velocity ``u = A x_t + B F`` over ``[s, t]`` (module docstring), float64 ``(B,)``
    (or scalars) from float64 copies of ``t`` and ``s``."""
    t64, s64 = torch.as_tensor(t).to(torch.float64), torch.as_tensor(s).to(torch.float64)
    path = transport.path
    alpha, gamma, alpha_hat, gamma_hat = transport.coefficients(t64)
    determinant = alpha * gamma_hat - gamma * alpha_hat
    d_alpha = _divided_difference(path.alpha, path.alpha_dot, t64, s64)
    d_gamma = _divided_difference(path.gamma, path.gamma_dot, t64, s64)
    return (d_alpha * gamma_hat - d_gamma * alpha_hat) / determinant, (d_gamma * alpha - d_alpha * gamma) / determinant


def output_is_average_velocity(transport: Transport) -> bool:
    """Whether ``A = 0`` and ``B = 1`` at all times, i.e. ``u = F``: the linear path read with the ``velocity`` (or
    ``noise_minus_data``, the same target ``z - x``) parameterisation, MeanFlow's and AYF's own units. The
    functions below then return the output itself, so a derivative of ``u`` is one of the network alone."""
    return isinstance(transport.path, LinearPath) and transport.parameterisation in ("velocity", "noise_minus_data")


def average_velocity(transport: Transport, output: Tensor, x_t: Tensor, t: Tensor | float, s: Tensor | float
                     ) -> Tensor:
    """``u = A x_t + B F``: the average velocity over ``[s, t]`` that a raw network output ``F`` at ``(x_t, t)``
    means (``(x_t - x_s) / (t - s)``; the ODE velocity at ``s = t``)."""
    if output_is_average_velocity(transport):
        return output
    a, b = jump_coefficients(transport, _per_sample(t, x_t), _per_sample(s, x_t))
    return broadcast_time(a.to(x_t.dtype), x_t) * x_t + broadcast_time(b.to(x_t.dtype), x_t) * output


def output_from_average_velocity(transport: Transport, velocity: Tensor, x_t: Tensor, t: Tensor | float,
                                 s: Tensor | float) -> Tensor:
    """The inverse of :func:`average_velocity`: ``F = (u - A x_t) / B``."""
    if output_is_average_velocity(transport):
        return velocity
    a, b = jump_coefficients(transport, _per_sample(t, x_t), _per_sample(s, x_t))
    return (velocity - broadcast_time(a.to(x_t.dtype), x_t) * x_t) / broadcast_time(b.to(x_t.dtype), x_t)


def jump_from_velocity(velocity: Tensor, x_t: Tensor, t: Tensor | float, s: Tensor | float) -> Tensor:
    """``x_s = x_t - (t - s) u`` (``= x_t`` exactly where ``s = t``)."""
    gap = _per_sample(t, x_t) - _per_sample(s, x_t)
    return x_t - broadcast_time(gap, x_t) * velocity


def jump(transport: Transport, output: Tensor, x_t: Tensor, t: Tensor | float, s: Tensor | float) -> Tensor:
    """``F(x_t, t, s) = x_t - (t - s) u`` from a raw network output ``F`` at ``(x_t, t)`` with second time ``s``."""
    return jump_from_velocity(average_velocity(transport, output, x_t, t, s), x_t, t, s)


def _per_sample(time: Tensor | float, like: Tensor) -> Tensor:
    """``time`` as a ``(B,)`` tensor in the dtype and on the device of ``like`` (a scalar is broadcast)."""
    time = torch.as_tensor(time, device=like.device, dtype=like.dtype)
    return time.expand(like.shape[0]) if time.ndim == 0 else time.reshape(like.shape[0])


@dataclass(frozen=True)
class FlowMapParameterisation:
    """A network read as a flow map ``F(x_t, t, s)`` on ``transport`` (module docstring).

    ``second_time``: :data:`SECOND_TIMES`; ``min_gap``: the smallest step size of ``"log2_gap"`` (Shortcut's
    ``1 / 128``; smaller gaps, ``s = t`` included, are given the finest level ``log2(1 / min_gap)``).
    """

    transport: Transport
    second_time: str = "s"
    min_gap: float = SHORTCUT_MIN_GAP

    def __post_init__(self) -> None:
        check_choice("second_time", self.second_time, SECOND_TIMES)
        check_range("min_gap", self.min_gap, 1e-12, 1.0)

    @property
    def conditions(self) -> tuple[str, ...]:
        """The model condition the backbone must accept: ``("s",)`` or ``("step",)``."""
        return ("s",) if self.second_time == "s" else ("step",)

    @property
    def finest_level(self) -> float:
        """``log2(1 / min_gap)``: the step condition of the finest level (``"log2_gap"``; 7 for Shortcut)."""
        return math.log2(1.0 / self.min_gap)

    def condition(self, t: Tensor, s: Tensor) -> dict[str, Tensor]:
        """The second time as the network's condition (``t``, ``s`` per sample ``(B,)``)."""
        if self.second_time == "s":
            return {"s": s}
        if self.second_time == "gap":
            return {"step": t - s}
        return {"step": -torch.log2(torch.clamp(t - s, min=self.min_gap))}

    def output(self, model: Callable, x_t: Tensor, t: Tensor | float, s: Tensor | float,
               labels: Optional[Tensor] = None) -> Tensor:
        """The raw output ``F`` of ``model`` at ``(x_t, t)`` with second time ``s``, through the transport."""
        t, s = _per_sample(t, x_t), _per_sample(s, x_t)
        return self.transport.network_output(model, x_t, t, labels, **self.condition(t, s))

    def average_velocity(self, model: Callable, x_t: Tensor, t: Tensor | float, s: Tensor | float,
                         labels: Optional[Tensor] = None) -> Tensor:
        """``u_theta(x_t, t, s) = A x_t + B F``."""
        return average_velocity(self.transport, self.output(model, x_t, t, s, labels), x_t, t, s)

    def jump(self, model: Callable, x_t: Tensor, t: Tensor | float, s: Tensor | float,
             labels: Optional[Tensor] = None) -> Tensor:
        """``F_theta(x_t, t, s) = x_t - (t - s) u_theta(x_t, t, s)``; ``= x_t`` exactly at ``s = t``."""
        return jump_from_velocity(self.average_velocity(model, x_t, t, s, labels), x_t, t, s)

    def sampling_transport(self) -> Transport:
        """The transport through which a :class:`FlowMapModel` is called: the same path and parameterisation,
        identity network time, no input scaling, sign +1 (the wrapper applies the run transport's own)."""
        transport = self.transport
        return Transport(transport.path, transport.parameterisation, sigma_data=transport.sigma_data,
                         name=f"flow-map-{transport.name}")


class FlowMapModel(nn.Module):
    """A trained flow-map backbone as ucgm samplers call it: ``forward(x_t, t, labels, s=None)`` is the raw output
    ``F`` read through :attr:`transport` (``s = None`` means ``s = t``: the instantaneous model, so ODE solvers
    work too); :meth:`jump` is ``F(x_t, t, s)``. ``num_classes`` is the backbone's (guidance wrappers use it)."""

    def __init__(self, backbone: nn.Module, parameterisation: FlowMapParameterisation):
        super().__init__()
        self.backbone, self.parameterisation = backbone, parameterisation
        self.num_classes = getattr(backbone, "num_classes", None)
        self.transport = parameterisation.sampling_transport()

    def forward(self, x_t: Tensor, t: Tensor, labels: Optional[Tensor] = None, s: Optional[Tensor] = None
                ) -> Tensor:
        return self.parameterisation.output(self.backbone, x_t, t, t if s is None else s, labels)

    def jump(self, x_t: Tensor, t: Tensor | float, s: Tensor | float, labels: Optional[Tensor] = None) -> Tensor:
        """``F(x_t, t, s)``."""
        return self.parameterisation.jump(self.backbone, x_t, t, s, labels)
