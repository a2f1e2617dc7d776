"""ucgm transports of diffusers noise schedules (ucgm time: t = 0 data, t = 1 noise).

* Flow matching (``FlowMatch*`` schedulers, SD3-style models): linear path ``x_t = (1 - t) x + t z``, model
  output ``z - x``, model timestep ``t * num_train_timesteps`` (:func:`ucgm.conventions.diffusers_flow_transport`).
* Discrete variance preserving (DDPM, DDIM, Euler, DPM-Solver ... configs with a beta schedule): the model was
  trained at the indices ``i = 0 .. T-1`` on ``x_i = sqrt(abar_i) x + sqrt(1 - abar_i) z``. ucgm time ``t`` is
  index ``s = t (T - 1)``, which is also the timestep handed to the model; between indices ``log abar`` is
  interpolated linearly (:class:`DiscreteVPPath`), so the path is exact at every trained index.
  Its ``prediction_type`` sets the parameterisation: ``epsilon`` (``F = z``), ``v_prediction``
  (``F = sqrt(abar) z - sqrt(1 - abar) x``) or ``sample`` (``F = x``).

The beta schedule itself (``linear``, ``scaled_linear``, ``squaredcos_cap_v2`` ...) is computed by diffusers'
``DDPMScheduler`` from the config, so ``abar`` is bit-for-bit the one the model was trained with.
"""

from __future__ import annotations

import json
from pathlib import Path as FilePath
from typing import Any, Mapping

import torch
from torch import Tensor

from ..conventions import diffusers_flow_transport
from ..models.diffusers_wrapper import import_diffusers
from ..transports import Path, Transport
from ..validation import check_choice

#: ``beta_schedule`` values of diffusers' DDPM-family schedulers.
BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2", "laplace", "sigmoid")
#: diffusers ``prediction_type`` of a VP model -> ucgm parameterisation.
VP_PARAMETERISATIONS = {"epsilon": "epsilon", "v_prediction": "v", "sample": "data"}
#: every supported ``prediction_type``: ``flow`` (FM velocity ``z - x``) and the VP ones.
PREDICTION_TYPES = ("flow", *VP_PARAMETERISATIONS)
#: scheduler-config keys that define ``abar``.
BETA_CONFIG_KEYS = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas")


class DiscreteVPPath(Path):
    """VP path of a discrete schedule ``abar_0 > ... > abar_{T-1} > 0``: ``gamma = sqrt(abar)``,
    ``alpha = sqrt(1 - abar)`` at index ``s = t (T - 1)``, with ``log abar`` linear in ``s`` between indices
    (linear extrapolation outside [0, 1]). Computed in float64, returned in the dtype of ``t``."""

    name = "vp-discrete"

    def __init__(self, alphas_cumprod: Tensor):
        alphas_cumprod = torch.as_tensor(alphas_cumprod, dtype=torch.float64)
        if alphas_cumprod.ndim != 1 or alphas_cumprod.numel() < 2:
            raise ValueError(
                f"alphas_cumprod must be 1-D with at least 2 entries, got shape {tuple(alphas_cumprod.shape)}")
        if not ((alphas_cumprod > 0) & (alphas_cumprod <= 1)).all():
            raise ValueError(
                "alphas_cumprod must lie in (0, 1]; zero-terminal-SNR schedules (rescale_betas_zero_snr, "
                "abar_{T-1} = 0) are not supported"
            )
        if not (alphas_cumprod.diff() < 0).all():
            raise ValueError("alphas_cumprod must be strictly decreasing (index 0 = least noise)")
        self.log_alphas_cumprod = torch.log(alphas_cumprod)
        self.last_index = alphas_cumprod.numel() - 1

    def _log_abar_and_slope(self, t: Tensor) -> tuple[Tensor, Tensor]:
        """``log abar`` at ``t`` and its derivative ``d log abar / dt`` (piecewise constant), in float64."""
        table = self.log_alphas_cumprod.to(t.device)
        position = torch.as_tensor(t, dtype=torch.float64) * self.last_index
        lower_index = position.floor().clamp(0, self.last_index - 1)
        lower, upper = table[lower_index.long()], table[lower_index.long() + 1]
        return lower + (position - lower_index) * (upper - lower), (upper - lower) * self.last_index

    def gamma(self, t):
        log_abar, _ = self._log_abar_and_slope(t)
        return torch.exp(0.5 * log_abar).to(t.dtype)

    def alpha(self, t):
        log_abar, _ = self._log_abar_and_slope(t)
        return torch.sqrt(-torch.expm1(log_abar)).to(t.dtype)

    def gamma_dot(self, t):
        """``d sqrt(abar)/dt = sqrt(abar) (log abar)' / 2``."""
        log_abar, slope = self._log_abar_and_slope(t)
        return (0.5 * torch.exp(0.5 * log_abar) * slope).to(t.dtype)

    def alpha_dot(self, t):
        """``d sqrt(1 - abar)/dt = -abar (log abar)' / (2 sqrt(1 - abar))``."""
        log_abar, slope = self._log_abar_and_slope(t)
        return (-torch.exp(log_abar) * slope / (2 * torch.sqrt(-torch.expm1(log_abar)))).to(t.dtype)

    def time_for_ratio(self, ratio):
        """``alpha / gamma = ratio`` means ``log abar = -log(1 + ratio^2)``; invert the piecewise-linear table."""
        increasing = -self.log_alphas_cumprod.to(ratio.device)
        target = torch.log1p(torch.as_tensor(ratio, dtype=torch.float64) ** 2)
        lower_index = (torch.searchsorted(increasing, target).clamp(1, self.last_index) - 1).long()
        lower, upper = increasing[lower_index], increasing[lower_index + 1]
        position = lower_index + (target - lower) / (upper - lower)
        return (position / self.last_index).to(ratio.dtype)


def diffusers_vp_transport(alphas_cumprod: Tensor, prediction_type: str = "epsilon") -> Transport:
    """Transport of a discrete-VP diffusers model: :class:`DiscreteVPPath`, the parameterisation of
    ``prediction_type`` and model timestep ``t (T - 1)`` (a float index)."""
    check_choice("prediction_type", prediction_type, VP_PARAMETERISATIONS)
    path = DiscreteVPPath(alphas_cumprod)
    last_index = path.last_index
    return Transport(
        path,
        VP_PARAMETERISATIONS[prediction_type],
        network_time=lambda t: t * last_index,
        name=f"diffusers-vp-{prediction_type}",
    )


def alphas_cumprod_from_config(config: Mapping) -> Tensor:
    """``abar_i`` of a DDPM-family scheduler config (its :data:`BETA_CONFIG_KEYS`), computed by ``DDPMScheduler``."""
    if config.get("trained_betas") is None and "beta_schedule" in config:
        check_choice("beta_schedule", config["beta_schedule"], BETA_SCHEDULES)
    if config.get("rescale_betas_zero_snr"):
        raise ValueError("rescale_betas_zero_snr=True is not supported (pure noise at t = 1 has no data prediction)")
    beta_settings = {key: config[key] for key in BETA_CONFIG_KEYS if key in config}
    return import_diffusers().DDPMScheduler(**beta_settings).alphas_cumprod


def scheduler_config(scheduler: str | FilePath | Mapping | Any) -> Mapping:
    """Config of a scheduler given as a mapping, a local directory (its ``scheduler_config.json``) or a diffusers
    scheduler object (its ``config`` with ``_class_name`` set to the object's class)."""
    if isinstance(scheduler, Mapping):
        return scheduler
    if isinstance(scheduler, (str, FilePath)):
        config_file = FilePath(scheduler) / "scheduler_config.json"
        if not config_file.is_file():
            raise FileNotFoundError(f"{config_file} does not exist; save the scheduler there with `save_config`")
        return json.loads(config_file.read_text())
    config = getattr(scheduler, "config", None)
    if not isinstance(config, Mapping):
        raise ValueError(
            f"scheduler of type {type(scheduler).__name__} has no config; pass a config mapping, "
            "a local scheduler directory or a diffusers scheduler"
        )
    return {**config, "_class_name": type(scheduler).__name__}


def transport_from_scheduler_config(scheduler: str | FilePath | Mapping | Any) -> Transport:
    """The ucgm transport of a model trained with a diffusers scheduler (see :func:`scheduler_config` for the
    accepted forms).

    ``FlowMatch*`` configs and ``prediction_type="flow"`` give the flow-matching transport; configs with a
    ``beta_schedule`` or ``trained_betas`` give the discrete VP transport of their ``prediction_type``
    (``epsilon`` when absent). Only the model's training setup is read: grid settings (``shift``,
    ``timestep_spacing``, ...) do not matter to UCGM-S, which uses its own grid.
    """
    config = scheduler_config(scheduler)
    class_name = str(config.get("_class_name", ""))
    num_train_timesteps = int(config.get("num_train_timesteps", 1000))
    if class_name.startswith("FlowMatch"):
        return diffusers_flow_transport(num_train_timesteps)
    prediction_type = config.get("prediction_type", "epsilon")
    check_choice("prediction_type", prediction_type, PREDICTION_TYPES)
    if prediction_type == "flow":
        return diffusers_flow_transport(num_train_timesteps)
    if "beta_schedule" not in config and "trained_betas" not in config:
        raise ValueError(
            f"scheduler config {class_name or '(no _class_name)'} defines neither a flow-matching schedule nor a "
            "beta schedule; supported: FlowMatch* schedulers (pass the scheduler or a saved config, which name "
            "their class) and DDPM-family schedulers (beta_schedule or trained_betas)"
        )
    return diffusers_vp_transport(alphas_cumprod_from_config(config), prediction_type)
