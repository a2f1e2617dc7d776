"""Transports: interpolation paths, network parameterisations and their inverses.

One time convention holds across ucgm: ``t`` in [0, 1], ``t = 0`` is data and ``t = 1`` is noise.

* A *path* gives the noisy point ``x_t = alpha(t) * z + gamma(t) * x`` with ``z ~ N(0, I)``.
* A *parameterisation* says what the network output means:
  ``F = alpha_hat(t) * z + gamma_hat(t) * x``.
* A :class:`Transport` joins both with the time the network receives and the sign of its output.

Since ``x_t`` and ``F`` are affine in ``(z, x)``, the data and noise predictions are recovered by solving a
2x2 system with determinant ``D = alpha * gamma_hat - gamma * alpha_hat``:
``x_hat = (alpha * F - alpha_hat * x_t) / D`` and ``z_hat = (gamma_hat * x_t - gamma * F) / D``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, NamedTuple, Optional

import torch
from torch import Tensor

#: The official UCGM code writes every pi/2 as this rounded constant; parity with it needs the same value.
OFFICIAL_HALF_PI = 1.57
#: EDM's noise range and data standard deviation (Karras et al. 2022; CM's defaults), in noise levels
#: ``sigma = alpha(t) / gamma(t)``.
EDM_SIGMA_MIN = 0.002
EDM_SIGMA_MAX = 80.0
EDM_SIGMA_DATA = 0.5
#: Model conditions that are times (a flow map's target time ``s``): transports convert them like ``t``.
TIME_CONDITIONS = ("s",)


def broadcast_time(t: Tensor | float, like: Tensor) -> Tensor:
    """Reshape a scalar or per-sample time ``(B,)`` so that it broadcasts against ``like`` ``(B, ...)``."""
    t = torch.as_tensor(t, device=like.device)
    if not t.is_floating_point() and t.dtype != torch.bool:
        t = t.to(like.dtype)
    if t.ndim == 0:
        return t
    return t.reshape(t.shape[0], *([1] * (like.ndim - 1)))


# --------------------------------------------------------------------------------------------- paths
class Path:
    """Interpolation ``x_t = alpha(t) z + gamma(t) x`` and its time derivatives."""

    name = "path"

    def alpha(self, t: Tensor) -> Tensor:
        raise NotImplementedError

    def gamma(self, t: Tensor) -> Tensor:
        raise NotImplementedError

    def alpha_dot(self, t: Tensor) -> Tensor:
        raise NotImplementedError

    def gamma_dot(self, t: Tensor) -> Tensor:
        raise NotImplementedError

    def time_for_ratio(self, ratio: Tensor) -> Tensor:
        """The time at which the noise-to-signal ratio ``alpha(t) / gamma(t)`` equals ``ratio``."""
        raise NotImplementedError

    def sigma(self, t: Tensor) -> Tensor:
        """The EDM noise level ``sigma(t) = alpha(t) / gamma(t)`` of ``x_t`` (``x_t / gamma = x + sigma z``)."""
        return self.alpha(t) / self.gamma(t)

    def time_for_sigma(self, sigma: Tensor) -> Tensor:
        """The inverse of :meth:`sigma` in float64: ``time_for_ratio(sigma)``, with ``sigma = inf`` at ``t = 1`` (the
        one noise-level-to-time conversion of ucgm; a path may map a sigma outside its range to a time outside
        [0, 1])."""
        sigma = torch.as_tensor(sigma, dtype=torch.float64)
        infinite = torch.isinf(sigma)
        times = self.time_for_ratio(torch.where(infinite, torch.zeros_like(sigma), sigma))
        return torch.where(infinite, torch.ones_like(times), times)


class LinearPath(Path):
    """Rectified-flow path: ``alpha = t``, ``gamma = 1 - t``."""

    name = "linear"

    def alpha(self, t):
        return t

    def gamma(self, t):
        return 1 - t

    def alpha_dot(self, t):
        return torch.ones_like(t)

    def gamma_dot(self, t):
        return -torch.ones_like(t)

    def time_for_ratio(self, ratio):
        return ratio / (1 + ratio)


class TrigPath(Path):
    """Trigonometric (TrigFlow) path: ``alpha = sin(h t)``, ``gamma = cos(h t)``, ``h = pi / 2``.

    ``half_pi`` is exposed because the official code uses 1.57 (:data:`OFFICIAL_HALF_PI`).
    """

    name = "trig"

    def __init__(self, half_pi: float = math.pi / 2):
        self.half_pi = half_pi

    def alpha(self, t):
        return torch.sin(self.half_pi * t)

    def gamma(self, t):
        return torch.cos(self.half_pi * t)

    def alpha_dot(self, t):
        return self.half_pi * torch.cos(self.half_pi * t)

    def gamma_dot(self, t):
        return -self.half_pi * torch.sin(self.half_pi * t)

    def time_for_ratio(self, ratio):
        return torch.atan(ratio) / self.half_pi


class EDMPath(Path):
    """EDM/EDM2 path in preconditioned form: ``x_t = c_in(sigma) * (x + sigma z)``.

    ``sigma(t) = exp(4 (slope t - offset))`` so that EDM's ``c_noise = ln(sigma) / 4 = slope t - offset``;
    ``alpha = sigma / sqrt(sigma^2 + sigma_data^2)``, ``gamma = 1 / sqrt(sigma^2 + sigma_data^2)``.
    """

    name = "edm"

    def __init__(self, sigma_data: float = EDM_SIGMA_DATA, slope: float = 2.68, offset: float = 1.59):
        self.sigma_data, self.slope, self.offset = sigma_data, slope, offset

    def sigma(self, t: Tensor) -> Tensor:
        return torch.exp(4 * (self.slope * t - self.offset))

    def _norm(self, t: Tensor) -> Tensor:
        """``sqrt(sigma^2 + sigma_data^2)``."""
        return torch.sqrt(self.sigma(t) ** 2 + self.sigma_data**2)

    def alpha(self, t):
        return self.sigma(t) / self._norm(t)

    def gamma(self, t):
        return 1 / self._norm(t)

    def alpha_dot(self, t):
        sigma_dot = 4 * self.slope * self.sigma(t)
        return sigma_dot * self.sigma_data**2 / self._norm(t) ** 3

    def gamma_dot(self, t):
        sigma = self.sigma(t)
        return -sigma * 4 * self.slope * sigma / self._norm(t) ** 3

    def time_for_ratio(self, ratio):
        return (torch.log(ratio) / 4 + self.offset) / self.slope


class VPCosinePath(Path):
    """Variance-preserving cosine schedule (Nichol & Dhariwal): ``gamma = sqrt(abar)``, ``alpha = sqrt(1 - abar)``.

    ``abar(t) = f(t) / f(0)`` with ``f(t) = cos^2(phi(t))``, ``phi(t) = (t + s) / (1 + s) * pi / 2``.
    """

    name = "vp"

    def __init__(self, offset: float = 0.008):
        self.offset = offset

    def _phi(self, t):
        return (t + self.offset) / (1 + self.offset) * (math.pi / 2)

    def _phi_dot(self):
        return math.pi / (2 * (1 + self.offset))

    def _cos_phi0(self):
        return math.cos(self.offset / (1 + self.offset) * math.pi / 2)

    def gamma(self, t):
        return torch.cos(self._phi(t)) / self._cos_phi0()

    def alpha(self, t):
        return torch.sqrt(torch.clamp(1 - self.gamma(t) ** 2, min=0))

    def gamma_dot(self, t):
        return -torch.sin(self._phi(t)) * self._phi_dot() / self._cos_phi0()

    def alpha_dot(self, t):
        return -self.gamma(t) * self.gamma_dot(t) / self.alpha(t)

    def time_for_ratio(self, ratio):
        cos_phi = self._cos_phi0() / torch.sqrt(1 + ratio**2)
        return torch.acos(cos_phi) / self._phi_dot() - self.offset


PATHS: dict[str, Callable[..., Path]] = {
    "linear": LinearPath,
    "trig": TrigPath,
    "edm": EDMPath,
    "vp": VPCosinePath,
}


# ----------------------------------------------------------------------------------- parameterisations
class Coefficients(NamedTuple):
    alpha: Tensor
    gamma: Tensor
    alpha_hat: Tensor
    gamma_hat: Tensor


def _target_coefficients(parameterisation: str, path: Path, t: Tensor, sigma_data: float) -> tuple[Tensor, Tensor]:
    """``(alpha_hat, gamma_hat)`` of the network target ``F = alpha_hat z + gamma_hat x`` for each parameterisation.

    * ``velocity``: the ODE velocity ``dx_t/dt`` (``alpha_hat = alpha'``, ``gamma_hat = gamma'``).
    * ``noise_minus_data``: ``z - x`` whatever the path (flow matching's target on non-linear paths).
    * ``epsilon``: the noise ``z``.   ``data``: the clean sample ``x`` (x0-prediction, EDM denoiser).
    * ``v``: Salimans-Ho v-prediction ``gamma z - alpha x`` (equals TrigFlow's ``F``).
    * ``edm``: EDM's preconditioned network output ``(x - c_skip x_sigma) / c_out`` with ``sigma = alpha / gamma``:
      ``alpha_hat = -sigma_data gamma / n``, ``gamma_hat = alpha / (sigma_data n)``, ``n = sqrt(alpha^2 + sigma_data^2 gamma^2)``.
    """
    if parameterisation == "velocity":
        return path.alpha_dot(t), path.gamma_dot(t)
    if parameterisation == "noise_minus_data":
        return torch.ones_like(t), -torch.ones_like(t)
    if parameterisation == "epsilon":
        return torch.ones_like(t), torch.zeros_like(t)
    if parameterisation == "data":
        return torch.zeros_like(t), torch.ones_like(t)
    if parameterisation == "v":
        return path.gamma(t), -path.alpha(t)
    if parameterisation == "edm" and isinstance(path, EDMPath):
        norm = path._norm(t)  # on the EDM path alpha^2 + sigma_data^2 gamma^2 = 1: the direct form is exact
        return -sigma_data / norm, path.sigma(t) / sigma_data / norm
    if parameterisation == "edm":
        alpha, gamma = path.alpha(t), path.gamma(t)
        norm = torch.sqrt(alpha**2 + (sigma_data * gamma) ** 2)
        return -sigma_data * gamma / norm, alpha / (sigma_data * norm)
    raise ValueError(f"unknown parameterisation {parameterisation!r}; allowed: {', '.join(PARAMETERISATIONS)}")


PARAMETERISATIONS = ("velocity", "noise_minus_data", "epsilon", "data", "v", "edm")


class Prediction(NamedTuple):
    """Raw network output ``F`` and the data / noise predictions recovered from it."""

    output: Tensor
    data: Tensor
    noise: Tensor


def _identity(t: Tensor) -> Tensor:
    return t


@dataclass
class Transport:
    """A path, a parameterisation and how the network sees time, in ucgm's convention (t = 0 data).

    ``network_time(t)`` is the time value handed to the network; ``output_sign`` multiplies its raw output;
    ``input_scale(t)``, when given, multiplies ``x_t`` before the network (e.g. ``1 / gamma`` for an EDM
    denoiser that expects ``x + sigma z``).
    """

    path: Path
    parameterisation: str = "velocity"
    network_time: Callable[[Tensor], Tensor] = _identity
    output_sign: float = 1.0
    input_scale: Optional[Callable[[Tensor], Tensor]] = None
    sigma_data: float = EDM_SIGMA_DATA
    name: str = "custom"

    def __post_init__(self):
        if self.parameterisation not in PARAMETERISATIONS:
            raise ValueError(
                f"unknown parameterisation {self.parameterisation!r}; allowed: {', '.join(PARAMETERISATIONS)}"
            )

    # coefficients ---------------------------------------------------------------------------------
    def alpha(self, t: Tensor) -> Tensor:
        return self.path.alpha(t)

    def gamma(self, t: Tensor) -> Tensor:
        return self.path.gamma(t)

    def alpha_dot(self, t: Tensor) -> Tensor:
        return self.path.alpha_dot(t)

    def gamma_dot(self, t: Tensor) -> Tensor:
        return self.path.gamma_dot(t)

    def alpha_hat(self, t: Tensor) -> Tensor:
        return _target_coefficients(self.parameterisation, self.path, t, self.sigma_data)[0]

    def gamma_hat(self, t: Tensor) -> Tensor:
        return _target_coefficients(self.parameterisation, self.path, t, self.sigma_data)[1]

    def coefficients(self, t: Tensor) -> Coefficients:
        alpha_hat, gamma_hat = _target_coefficients(self.parameterisation, self.path, t, self.sigma_data)
        return Coefficients(self.path.alpha(t), self.path.gamma(t), alpha_hat, gamma_hat)

    def denominator(self, t: Tensor) -> Tensor:
        """``D(t) = alpha * gamma_hat - gamma * alpha_hat`` (the determinant of the (z, x) -> (x_t, F) map)."""
        a, g, ah, gh = self.coefficients(t)
        return a * gh - g * ah

    # maps between (x, z), x_t and F --------------------------------------------------------------
    def interpolate(self, data: Tensor, noise: Tensor, t: Tensor | float) -> Tensor:
        """``x_t = alpha(t) z + gamma(t) x``."""
        tb = broadcast_time(t, data)
        return self.path.alpha(tb) * noise + self.path.gamma(tb) * data

    def target(self, data: Tensor, noise: Tensor, t: Tensor | float) -> Tensor:
        """The regression target ``F = alpha_hat(t) z + gamma_hat(t) x``."""
        tb = broadcast_time(t, data)
        alpha_hat, gamma_hat = _target_coefficients(self.parameterisation, self.path, tb, self.sigma_data)
        return alpha_hat * noise + gamma_hat * data

    def recover(self, output: Tensor, x_t: Tensor, t: Tensor | float) -> tuple[Tensor, Tensor]:
        """``x_hat = (alpha F - alpha_hat x_t) / D`` and ``z_hat = (gamma_hat x_t - gamma F) / D``."""
        a, g, ah, gh = self.coefficients(broadcast_time(t, x_t))
        det = a * gh - g * ah
        return (a * output - ah * x_t) / det, (gh * x_t - g * output) / det

    def output_from_predictions(self, data: Tensor, noise: Tensor, t: Tensor | float) -> Tensor:
        """Inverse of :meth:`recover` for ``F``: ``F = alpha_hat z_hat + gamma_hat x_hat``."""
        return self.target(data, noise, t)

    def velocity(self, data: Tensor, noise: Tensor, t: Tensor | float) -> Tensor:
        """ODE velocity ``dx_t/dt = alpha'(t) z_hat + gamma'(t) x_hat``."""
        tb = broadcast_time(t, data)
        return self.path.alpha_dot(tb) * noise + self.path.gamma_dot(tb) * data

    # network calls --------------------------------------------------------------------------------
    def per_sample_time(self, t: Tensor | float, like: Tensor) -> Tensor:
        """``t`` as a ``(B,)`` tensor in the dtype and on the device of ``like`` (a scalar is broadcast)."""
        t = torch.as_tensor(t, device=like.device, dtype=like.dtype)
        return t.expand(like.shape[0]) if t.ndim == 0 else t.reshape(like.shape[0])

    def network_output(self, model: Callable, x_t: Tensor, t: Tensor, labels: Optional[Tensor] = None,
                       **conditions: Optional[Tensor]) -> Tensor:
        """The raw ``F``: ``sign * model(input_scale(t) x_t, network_time(t), labels, **conditions)``; ``t`` is
        per-sample ``(B,)``, and time conditions (:data:`TIME_CONDITIONS`, e.g. a flow map's ``s``) are handed to
        the network as ``network_time(s)``."""
        t = self.per_sample_time(t, x_t)
        for name in TIME_CONDITIONS:
            if conditions.get(name) is not None:
                conditions[name] = self.network_time(self.per_sample_time(conditions[name], x_t))
        model_input = x_t if self.input_scale is None else x_t * broadcast_time(self.input_scale(t), x_t)
        output = model(model_input, self.network_time(t), labels, **conditions)
        return output if self.output_sign == 1 else self.output_sign * output

    def predict(self, model: Callable, x_t: Tensor, t: Tensor, labels: Optional[Tensor] = None,
                **conditions: Optional[Tensor]) -> Prediction:
        """Call the model at ``(x_t, t)`` (with ``conditions``) and recover the data and noise predictions."""
        output = self.network_output(model, x_t, t, labels, **conditions)
        data, noise = self.recover(output, x_t, t)
        return Prediction(output, data, noise)


# ------------------------------------------------------------------------------------------ presets
def _reverse_time(t: Tensor) -> Tensor:
    return 1 - t


TRANSPORT_NAMES = ("linear", "relinear", "trigflow", "triglinear", "edm", "vp")


def make_transport(
    name: str,
    parameterisation: Optional[str] = None,
    half_pi: float = math.pi / 2,
    sigma_data: float = EDM_SIGMA_DATA,
) -> Transport:
    """Build a named transport (case-insensitive; the official spellings ``Linear``, ``TrigFlow`` ... work).

    | name | path | network output F | network time |
    |---|---|---|---|
    | linear | alpha = t, gamma = 1 - t | z - x | t |
    | relinear | same | z - x, the network natively predicts x - z | 1 - t |
    | trigflow | sin / cos (h t) | cos(ht) z - sin(ht) x (v-prediction) | t |
    | triglinear | sin / cos (h t) | z - x | t |
    | edm | EDM2 preconditioning | (x - c_skip x_sigma) / c_out | t (c_noise = 2.68 t - 1.59 in the net) |
    | vp | cosine VP schedule | v-prediction (``parameterisation`` overrides, e.g. ``epsilon``) | t |

    ``half_pi`` is pi / 2 by default; pass :data:`OFFICIAL_HALF_PI` to reproduce the official numbers.
    """
    key = str(name).lower()
    defaults = {
        "linear": (LinearPath(), "velocity"),
        "relinear": (LinearPath(), "velocity"),
        "trigflow": (TrigPath(half_pi), "v"),
        "triglinear": (TrigPath(half_pi), "noise_minus_data"),
        "edm": (EDMPath(sigma_data), "edm"),
        "vp": (VPCosinePath(), "v"),
    }
    if key not in defaults:
        raise ValueError(f"unknown transport {name!r}; allowed: {', '.join(TRANSPORT_NAMES)}")
    path, default_parameterisation = defaults[key]
    transport = Transport(path, parameterisation or default_parameterisation, sigma_data=sigma_data, name=key)
    if key == "relinear":
        transport.network_time = _reverse_time
        transport.output_sign = -1.0
    return transport


def edm_denoiser_transport(sigma_data: float = EDM_SIGMA_DATA) -> Transport:
    """A transport for a raw EDM denoiser ``D(x + sigma z; sigma) -> x``: the network receives ``x_t / gamma``
    and ``sigma(t)``, and its output is the data prediction."""
    path = EDMPath(sigma_data)
    return Transport(
        path,
        "data",
        network_time=path.sigma,
        input_scale=lambda t: 1 / path.gamma(t),
        sigma_data=sigma_data,
        name="edm-denoiser",
    )


class TransportAdapter(torch.nn.Module):
    """Use a model trained on one transport (``native``) as a model of another (``target``).

    Both describe the same noisy point when their noise-to-signal ratios match: at internal time ``t`` of
    ``target``, the native time is ``t' = native.path.time_for_ratio(alpha/gamma)`` and the native input is
    ``x_t * gamma'(t') / gamma(t)``. The data and noise predictions are path-independent, so the adapter
    returns ``F_target = alpha_hat_target z_hat + gamma_hat_target x_hat``. Call it through
    :attr:`transport` (the target path and parameterisation, network time = internal time).
    """

    def __init__(self, model: torch.nn.Module, native: Transport, target: Transport):
        super().__init__()
        self.model, self.native = model, native
        self.transport = Transport(target.path, target.parameterisation, sigma_data=target.sigma_data,
                                   name=f"{native.name}->{target.name}")

    def forward(self, x_t: Tensor, t: Tensor, labels: Optional[Tensor] = None, **conditions: Optional[Tensor]
                ) -> Tensor:
        target_path = self.transport.path
        native_time = lambda time: self.native.path.time_for_ratio(target_path.alpha(time) / target_path.gamma(time))  # noqa: E731
        native_t = native_time(t)
        for name in TIME_CONDITIONS:
            if conditions.get(name) is not None:
                conditions[name] = native_time(conditions[name])
        scale = self.native.path.gamma(native_t) / target_path.gamma(t)
        prediction = self.native.predict(self.model, x_t * broadcast_time(scale, x_t), native_t, labels,
                                         **conditions)
        return self.transport.output_from_predictions(prediction.data, prediction.noise, t)
