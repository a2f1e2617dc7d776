"""sCM's tangent on ucgm's TrigFlow transport: the output derivative ``dF/ds`` (JVP or finite difference), the
tangent ``g``, its warm-up and its normalisation (Lu & Song 2024, "Simplifying, stabilizing and scaling
continuous-time consistency models").

Units are ucgm's (the map to sCM's is in :mod:`ucgm.methods.consistency.scm`): ``x_t = sin(s) z + cos(s) x`` with the
angle ``s = h t`` (``h`` = the transport's ``half_pi``), ``F(x_t, t)`` the network output (v-prediction) and
``v = dx_t/ds`` the velocity of the trajectory the derivative follows.
"""

from __future__ import annotations

from typing import Callable, ContextManager, Optional

import torch
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel

from ...transports import Transport, broadcast_time
from ...validation import check_choice

TANGENT_METHODS = ("auto", "jvp", "finite_difference")
TANGENT_NORMALISATIONS = ("norm", "clamp", "none")


#: A zero-argument context manager under which a network pass sees the online pass's dropout masks
#: (``functools.partial(ucgm.methods.base.shared_randomness, seed, device)``).
SameDropout = Callable[[], ContextManager]


# ------------------------------------------------------------------------------------- output derivative
def output_derivative_jvp(
    model: Callable,
    transport: Transport,
    x_t: Tensor,
    t: Tensor,
    velocity: Tensor,
    labels: Optional[Tensor],
    same_dropout: SameDropout,
) -> Tensor:
    """Exact ``dF/ds = (dF/dx_t) v + dF/ds|_x`` by forward-mode AD: ``torch.func.jvp`` of ``(x_t, t) -> F`` along
    the tangent ``(v, 1 / h)`` (``t = s / h``), with math attention (fused CPU / GPU attention kernels have no
    forward derivative)."""

    def network_output(x: Tensor, time: Tensor) -> Tensor:
        return transport.network_output(model, x, time, labels)

    time_tangent = torch.full_like(t, 1 / transport.path.half_pi)
    with same_dropout(), sdpa_kernel([SDPBackend.MATH]):
        return torch.func.jvp(network_output, (x_t, t), (velocity, time_tangent))[1]


def output_derivative_finite_difference(
    model: Callable,
    transport: Transport,
    point_at: Callable[[Tensor], Tensor],
    angle: Tensor,
    step: Tensor,
    labels: Optional[Tensor],
    same_dropout: SameDropout,
    dtype: torch.dtype,
) -> Tensor:
    """Central difference ``(F(x_{s+d}, s+d) - F(x_{s-d}, s-d)) / (2 d)``, formed in float64.

    ``angle`` ``s`` and ``step`` ``d`` are per-sample float64 ``(B,)``; ``point_at(offset)`` returns the float64
    trajectory point at angle ``s + offset``. Points and times are cast to ``dtype`` (the model's input dtype)
    for the two network calls, whose outputs are subtracted in float64; both calls run under ``same_dropout`` so
    they share the online pass's dropout masks.
    """
    half_pi = transport.path.half_pi
    outputs = []
    for offset in (step, -step):
        point, time = point_at(offset).to(dtype), ((angle + offset) / half_pi).to(dtype)
        with same_dropout():
            outputs.append(transport.network_output(model, point, time, labels).to(torch.float64))
    return (outputs[0] - outputs[1]) / (2 * broadcast_time(step, outputs[0]))


# ------------------------------------------------------------------------------------------ tangent
def tangent_warmup_ratio(step: int, warmup_steps: int) -> float:
    """``r = min(1, step / H)`` (``H = warmup_steps``; ``H = 0`` means no warm-up, ``r = 1``)."""
    return 1.0 if warmup_steps == 0 else min(1.0, step / warmup_steps)


def scm_tangent(
    output: Tensor,
    velocity: Tensor,
    x_t: Tensor,
    output_derivative: Tensor,
    angle: Tensor,
    warmup_ratio: float,
    sigma_data: float,
) -> Tensor:
    """sCM's tangent ``g = sigma_d [-cos^2(s) (F^- - v) - r cos(s) sin(s) (x_t + dF^-/ds)]``.

    In ucgm units this is ``sigma_d cos(s) d x_hat/ds`` (for ``r = 1``) with ``x_hat = cos(s) x_t - sin(s) F``
    the data prediction; ``sigma_d`` converts it to sCM's units, where ``x_s = sigma_d x_t``.
    """
    cosine, sine = torch.cos(broadcast_time(angle, x_t)), torch.sin(broadcast_time(angle, x_t))
    drift = -cosine**2 * (output - velocity)
    return sigma_data * (drift - warmup_ratio * cosine * sine * (x_t + output_derivative))


def normalise_tangent(tangent: Tensor, normalisation: str, constant: float = 0.1) -> Tensor:
    """``norm``: ``g / (||g|| + c)`` with the per-sample L2 norm; ``clamp``: ``clamp(g, -1, 1)``; ``none``: ``g``."""
    check_choice("normalisation", normalisation, TANGENT_NORMALISATIONS)
    if normalisation == "norm":
        norms = tangent.flatten(1).norm(dim=1)
        return tangent / broadcast_time(norms + constant, tangent)
    if normalisation == "clamp":
        return torch.clamp(tangent, -1.0, 1.0)
    return tangent
