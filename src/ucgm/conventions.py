"""Converters between ucgm's time convention (t = 0 data, t = 1 noise, ``x_t = t z + (1 - t) x`` on the linear
path, velocity ``dx_t/dt = z - x``) and those of popular libraries.

| library | its time | its path | ucgm time | velocity |
|---|---|---|---|---|
| Meta ``flow_matching`` (``CondOTScheduler``) | ``t_m``, 0 = noise | ``t_m x + (1 - t_m) z`` | ``1 - t_m`` | ``v_m = x - z = -v`` |
| diffusers ``FlowMatchEulerDiscreteScheduler`` | ``sigma`` 1 -> 0, ``timestep = 1000 sigma`` | ``(1 - sigma) x + sigma z`` | ``sigma`` | same (``z - x``) |

A model trained in Meta's convention is used in ucgm through ``make_transport("relinear")`` (network time
``1 - t``, output negated); a diffusers flow-matching transformer through :func:`diffusers_flow_transport`.
"""

from __future__ import annotations

from torch import Tensor

from .transports import LinearPath, Transport


def from_flow_matching_time(t_flow_matching: Tensor | float) -> Tensor | float:
    """ucgm time of a Meta ``flow_matching`` time: ``t = 1 - t_m``."""
    return 1 - t_flow_matching


def to_flow_matching_time(t: Tensor | float) -> Tensor | float:
    """Meta ``flow_matching`` time of a ucgm time: ``t_m = 1 - t``."""
    return 1 - t


def velocity_from_flow_matching(velocity_flow_matching: Tensor) -> Tensor:
    """ucgm velocity ``dx_t/dt`` of a Meta velocity ``dx/dt_m``: the time reversal flips the sign."""
    return -velocity_flow_matching


def velocity_to_flow_matching(velocity: Tensor) -> Tensor:
    """Meta velocity of a ucgm velocity (sign flip)."""
    return -velocity


def from_diffusers_sigma(sigma: Tensor | float) -> Tensor | float:
    """ucgm time of a diffusers flow-matching ``sigma`` (the same number)."""
    return sigma


def to_diffusers_timestep(t: Tensor | float, num_train_timesteps: int = 1000) -> Tensor | float:
    """diffusers' ``timestep = sigma * num_train_timesteps`` (a float, not an index)."""
    return t * num_train_timesteps


def shift_sigma(sigma: Tensor | float, shift: float) -> Tensor | float:
    """diffusers / SD3 resolution shift ``sigma' = s sigma / (1 + (s - 1) sigma)``."""
    return shift * sigma / (1 + (shift - 1) * sigma)


def diffusers_flow_transport(num_train_timesteps: int = 1000) -> Transport:
    """Transport of a diffusers flow-matching model: linear path, output ``z - x``, network time ``1000 t``."""
    return Transport(
        LinearPath(),
        "velocity",
        network_time=lambda t: to_diffusers_timestep(t, num_train_timesteps),
        name="diffusers-flow",
    )
