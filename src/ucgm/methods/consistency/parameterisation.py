"""The consistency-model parameterisation (Song et al. 2023) on any ucgm path, and the time range it lives on.

With ``sigma(t) = alpha(t) / gamma(t)`` (the EDM noise level of ``x_t``; ``x_sigma = x_t / gamma = x + sigma z``)
and ``sigma_min = sigma(t_min)``, the consistency function of a backbone ``F_theta`` is

    ``f(x_t, t) = c_skip(sigma) x_t / gamma(t) + c_out(sigma) F_theta(x_t / n(t), tau(t), y)``,
    ``n = sqrt(alpha^2 + sigma_data^2 gamma^2)``,

    ``c_skip = sigma_data^2 / ((sigma - sigma_min)^2 + sigma_data^2)``,
    ``c_out = (sigma - sigma_min) sigma_data / sqrt(sigma^2 + sigma_data^2)``,

where the backbone input is EDM's ``c_in x_sigma`` (``c_in = 1 / sqrt(sigma^2 + sigma_data^2)``) and ``tau`` is the
transport's network time (ucgm time ``t`` by default). At ``t = t_min`` the offset ``sigma - sigma_min`` is exactly 0
(both are computed by the same operations in the dtype of ``t``), so ``c_skip = 1``, ``c_out = 0`` and
``f(x_t, t_min) = x_t / gamma(t_min)`` bitwise -- the data-scale point itself (``= x_t`` when ``gamma(t_min) = 1``).

The consistency function lives on ``t in [t_min, t_max]``, ``t_min = time_for_ratio(sigma_min)``,
``t_max = time_for_ratio(sigma_max)`` (CM's ``sigma_min = 0.002``, ``sigma_max = 80`` by default).
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import torch
from torch import Tensor, nn

from ...transports import EDM_SIGMA_DATA, EDM_SIGMA_MAX, EDM_SIGMA_MIN, Path, Transport, broadcast_time

CONSISTENCY_PARAMETERISATIONS = ("consistency", "transport")
"""How an objective reads its network as a consistency function:
``consistency``: the boundary-condition wrapper above around the raw backbone;
``transport``: the run transport's data prediction ``x_hat`` (for tuning a multi-step checkpoint, as ECT and UCGM do;
the boundary holds where the transport recovers ``x_hat = x_t`` at ``sigma = 0``, e.g. t = 0 on the linear path)."""


def time_for_sigma(path: Path, sigma: float) -> float:
    """The ucgm time at which ``alpha / gamma = sigma`` (``sigma = inf`` means t = 1); ``ValueError`` if it is not
    a finite time in [0, 1]."""
    time = float(path.time_for_sigma(float(sigma)))
    if not (math.isfinite(time) and 0.0 <= time <= 1.0):
        raise ValueError(f"sigma={sigma!r} maps to time {time!r} on the {path.name!r} path; allowed: sigmas whose "
                         f"time lies in [0, 1] (e.g. sigma_min > 0 on the edm path)")
    return time


class TimeRange:
    """``[t_min, t_max]`` of a consistency model, given as noise levels ``sigma_min < sigma_max`` on ``path``."""

    def __init__(self, path: Path, sigma_min: float = EDM_SIGMA_MIN, sigma_max: float = EDM_SIGMA_MAX):
        if not (isinstance(sigma_min, (int, float)) and isinstance(sigma_max, (int, float))
                and 0.0 <= sigma_min < sigma_max):
            raise ValueError(f"sigma_min={sigma_min!r}, sigma_max={sigma_max!r}: allowed 0 <= sigma_min < sigma_max")
        self.path = path
        self.sigma_min, self.sigma_max = float(sigma_min), float(sigma_max)
        self.t_min, self.t_max = time_for_sigma(path, sigma_min), time_for_sigma(path, sigma_max)

    def sigma(self, t: Tensor) -> Tensor:
        """``sigma(t) = alpha(t) / gamma(t)``."""
        return self.path.sigma(t)

    def times(self, sigmas: Tensor) -> Tensor:
        """The ucgm times of noise levels ``sigmas`` (float64, ``path.time_for_sigma``), with ``sigma_min`` /
        ``sigma_max`` mapped to exactly ``t_min`` / ``t_max``."""
        sigmas = torch.as_tensor(sigmas, dtype=torch.float64)
        times = self.path.time_for_sigma(sigmas)
        times = torch.where(sigmas == self.sigma_min, torch.full_like(times, self.t_min), times)
        return torch.where(sigmas == self.sigma_max, torch.full_like(times, self.t_max), times)


class ConsistencyParameterisation:
    """``f(x_t, t) = c_skip x_t / gamma + c_out F_theta(c_in x_sigma, tau(t), y)`` (module docstring) on ``path``."""

    def __init__(self, path: Path, sigma_min: float = EDM_SIGMA_MIN, sigma_data: float = EDM_SIGMA_DATA,
                 network_time: Optional[Callable[[Tensor], Tensor]] = None):
        if not (isinstance(sigma_data, (int, float)) and sigma_data > 0):
            raise ValueError(f"sigma_data={sigma_data!r} must be a positive number")
        self.path, self.sigma_data = path, float(sigma_data)
        self.sigma_min = float(sigma_min)
        self.t_min = time_for_sigma(path, sigma_min)
        self.network_time = network_time

    def coefficients(self, t: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``(c_skip, c_out, c_in / gamma)`` at time ``t`` (``c_in / gamma = 1 / sqrt(alpha^2 + sigma_data^2 gamma^2)``
        multiplies ``x_t`` into the backbone input)."""
        alpha, gamma = self.path.alpha(t), self.path.gamma(t)
        t_min = torch.full_like(t, self.t_min)
        sigma = alpha / gamma  # the same operations at t and t_min: the offset is exactly 0 at t_min
        offset = sigma - self.path.alpha(t_min) / self.path.gamma(t_min)
        sigma_data_sq = self.sigma_data**2
        skip = sigma_data_sq / (offset**2 + sigma_data_sq)
        out = offset * self.sigma_data / torch.sqrt(sigma**2 + sigma_data_sq)
        return skip, out, 1 / torch.sqrt(alpha**2 + sigma_data_sq * gamma**2)

    def __call__(self, backbone: Callable, x_t: Tensor, t: Tensor, labels: Optional[Tensor] = None) -> Tensor:
        """``f(x_t, t)``; ``t`` is a scalar or per-sample ``(B,)`` ucgm time in ``[t_min, t_max]``."""
        t = torch.as_tensor(t, dtype=x_t.dtype, device=x_t.device)
        t = t.expand(x_t.shape[0]) if t.ndim == 0 else t.reshape(x_t.shape[0])
        skip, out, scale_in = (broadcast_time(c, x_t) for c in self.coefficients(t))
        network_time = t if self.network_time is None else self.network_time(t)
        x_sigma = x_t / broadcast_time(self.path.gamma(t), x_t)
        return skip * x_sigma + out * backbone(x_t * scale_in, network_time, labels)


class ConsistencyModel(nn.Module):
    """A backbone read as a consistency function: ``forward(x_t, t, labels) = f(x_t, t)`` (a data prediction).

    :attr:`transport` (the path with the ``data`` parameterisation) lets every ucgm sampler and the editors use
    it: ``transport.predict(model, x_t, t).data`` recovers ``f`` (as ``alpha f / alpha``, exact up to rounding
    wherever ``alpha > 0``). ``num_classes`` is the backbone's.
    """

    def __init__(self, backbone: nn.Module, parameterisation: ConsistencyParameterisation, t_max: float = 1.0):
        super().__init__()
        self.backbone, self.parameterisation = backbone, parameterisation
        self.num_classes = getattr(backbone, "num_classes", None)
        self.t_min, self.t_max = parameterisation.t_min, float(t_max)
        self.transport = Transport(parameterisation.path, "data", name="consistency")

    def forward(self, x_t: Tensor, t: Tensor, labels: Optional[Tensor] = None) -> Tensor:
        check_trained_range(t, self.t_max)
        return self.parameterisation(self.backbone, x_t, t, labels)


def check_trained_range(t: Tensor | float, t_max: float, tolerance: float = 1e-6) -> None:
    """Raise ``ValueError`` when a time exceeds ``t_max``, the largest time a consistency model was trained at
    (its ``sigma_max``); beyond it ``f`` is undefined (e.g. ``x_t / gamma`` at ``gamma = 0``)."""
    largest = float(torch.as_tensor(t).max())
    if largest > t_max + tolerance:
        raise ValueError(f"time {largest:.6g} lies outside the trained range of this consistency model (t <= "
                         f"{t_max:.6g}, its sigma_max); sample it with its own sampler ('cm-multistep') or a "
                         f"sampler setting t_max <= {t_max:.6g}")
