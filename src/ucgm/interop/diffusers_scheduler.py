"""UCGM-S as a diffusers scheduler: :class:`UCGMScheduler` drops into a standard diffusers denoising loop::

    scheduler.set_timesteps(num_inference_steps)
    x = noise * scheduler.init_noise_sigma
    for timestep in scheduler.timesteps:
        model_output = model(scheduler.scale_model_input(x, timestep), timestep)
        x = scheduler.step(model_output, timestep, x, generator=generator).prev_sample

Grid: ``t_0 > ... > t_{N-1} > t_N = 0`` is UCGM-S's Kumaraswamy grid (``time_warp``, ``gaps``, see
:func:`ucgm.timegrids.kumaraswamy_grid`) followed by diffusers' resolution shift ``t' = s t / (1 + (s - 1) t)``.
``sigmas`` are these times (for ``prediction_type="flow"`` they are diffusers' flow-matching sigmas) and
``timesteps`` what the model receives: ``t * num_train_timesteps`` for ``flow``, the float index ``t (T - 1)``
for the VP prediction types (see :mod:`ucgm.interop.diffusers_transports`).

Step ``i`` (order 1, exactly the step of :func:`ucgm.sampling.ucgm_sampler.ucgm_sample`): recover the data and
noise predictions ``(x_hat, z_hat)`` from the model output at ``(x_i, t_i)``; from the third step on extrapolate
both, ``p <- p + kappa (p - p_prev)`` with the previous raw prediction; then
``x_{i+1} = gamma(t_{i+1}) x_hat + alpha(t_{i+1}) (sqrt(1 - rho) z_hat + sqrt(rho) eps)``, eps ~ N(0, I).
The last step returns the raw data prediction ``x_hat`` (UCGM-S's sample), so the loop ends on the same sample as
``ucgm_sample``. The state is computed in float64 and returned in the dtype of ``sample``.

Only order 1 fits the one-model-call-per-step API: UCGM-S's order 2 needs a second model call inside each step;
use :func:`ucgm.sampling.ucgm_sampler.ucgm_sample` with ``order=2`` (or :func:`ucgm.interop.diffusers_models.
sample_diffusers_model`) for it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from torch import Tensor

from ..conventions import shift_sigma
from ..models.diffusers_wrapper import import_diffusers
from ..sampling.ucgm_sampler import check_sampler_settings, first_step_sde_ratio
from ..timegrids import kumaraswamy_grid
from ..validation import check_choice, check_positive_int
from .diffusers_transports import BETA_SCHEDULES, PREDICTION_TYPES, transport_from_scheduler_config

_diffusers = import_diffusers()
_register_to_config = _diffusers.configuration_utils.register_to_config


@dataclass
class UCGMSchedulerOutput(_diffusers.utils.BaseOutput):
    """``prev_sample``: the state at the next grid time (the data prediction after the last step);
    ``pred_original_sample``: the raw (not extrapolated) data prediction ``x_hat`` of this step."""

    prev_sample: Tensor
    pred_original_sample: Tensor


def _check_sampler_settings(
    shift: float, stochasticity: float | str, extrapolation: float, time_warp: Sequence[float], gaps: Sequence[float]
) -> None:
    """Raise a ``ValueError`` naming the first UCGM-S setting outside its allowed values."""
    if isinstance(shift, bool) or not isinstance(shift, (int, float)) or not (0 < shift < math.inf):
        raise ValueError(f"shift={shift!r} must be a positive finite number (1: no shift)")
    check_sampler_settings(stochasticity, extrapolation, time_warp, gaps)


class UCGMScheduler(_diffusers.SchedulerMixin, _diffusers.ConfigMixin):
    """UCGM-S (order 1) for diffusers denoising loops.

    Config: ``num_train_timesteps`` (the model's timestep scale); ``shift`` (diffusers resolution shift of the
    grid); ``stochasticity`` rho in [0, 1] or ``"sde"`` (the first interval's SDE-matching ratio, then kept);
    ``extrapolation`` kappa >= 0; ``time_warp`` the Kumaraswamy ``(a, b, c)``; ``gaps`` ``(g0, g1)``;
    ``prediction_type``: ``"flow"`` (diffusers flow-matching velocity ``z - x`` on the linear path), or
    ``"epsilon"`` / ``"v_prediction"`` / ``"sample"`` on the discrete VP path of ``beta_start``, ``beta_end``,
    ``beta_schedule`` or ``trained_betas`` (diffusers' DDPM defaults; ``rescale_betas_zero_snr=True`` is rejected).
    The sampler defaults equal ``ucgm_sample``'s.

    ``UCGMScheduler.from_config(pipeline.scheduler.config, **overrides)`` takes over the model's
    ``num_train_timesteps``, ``shift``, ``prediction_type`` and beta schedule from the pipeline's diffusers
    scheduler (flow matching when its config has no ``prediction_type``).

    ``gaps=(0, 1 / num_train_timesteps)`` with the identity warp gives the grid of diffusers'
    ``FlowMatchEulerDiscreteScheduler`` (``sigma`` from 1 to ``1 / num_train_timesteps``, then 0); with
    ``rho = kappa = 0`` on ``flow`` each step is then its Euler step ``x + (t_{i+1} - t_i) v``.
    """

    config_name = "scheduler_config.json"
    order = 1
    init_noise_sigma = 1.0

    @_register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        shift: float = 1.0,
        stochasticity: float | str = 0.0,
        extrapolation: float = 0.0,
        time_warp: Sequence[float] = (1.0, 1.0, 1.0),
        gaps: Sequence[float] = (0.001, 0.001),
        prediction_type: str = "flow",
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        beta_schedule: str = "linear",
        trained_betas: Optional[Sequence[float]] = None,
        rescale_betas_zero_snr: bool = False,
    ):
        check_positive_int("num_train_timesteps", num_train_timesteps, minimum=2)
        check_choice("prediction_type", prediction_type, PREDICTION_TYPES)
        check_choice("beta_schedule", beta_schedule, BETA_SCHEDULES)
        _check_sampler_settings(shift, stochasticity, extrapolation, time_warp, gaps)
        self.transport = transport_from_scheduler_config(self.config)
        self.num_inference_steps: Optional[int] = None
        self.timesteps: Optional[Tensor] = None
        self.sigmas: Optional[Tensor] = None
        self._reset_state()

    def _reset_state(self) -> None:
        """Forget the step counter, the previous prediction (extrapolation) and the SDE ratio."""
        self._step_index: Optional[int] = None
        self._previous_prediction: Optional[tuple[Tensor, Tensor]] = None
        stochasticity = self.config.stochasticity
        self._stochasticity_ratio: Optional[Tensor | float] = (
            None if isinstance(stochasticity, str) else float(stochasticity))

    @property
    def step_index(self) -> Optional[int]:
        """Index of the next step in :attr:`timesteps` (``None`` before the first step)."""
        return self._step_index

    def __len__(self) -> int:
        return self.config.num_train_timesteps

    def set_timesteps(self, num_inference_steps: int, device: Optional[str | torch.device] = None) -> None:
        """Build the grid of ``num_inference_steps`` intervals (float32, like diffusers' and like ``ucgm_sample``
        with float32 noise) and reset the sampler state."""
        check_positive_int("num_inference_steps", num_inference_steps)
        times = kumaraswamy_grid(num_inference_steps, self.config.time_warp, self.config.gaps, dtype=torch.float32)
        if self.config.shift != 1:
            times = shift_sigma(times, self.config.shift)
        self.num_inference_steps = num_inference_steps
        self.sigmas = times.to(device)
        self.timesteps = self.transport.network_time(times[:-1]).to(device)
        self._reset_state()

    def scale_model_input(self, sample: Tensor, timestep: Optional[float | Tensor] = None) -> Tensor:
        """The model sees ``x_t`` unscaled (identity)."""
        return sample

    def _check_timestep(self, timestep: float | Tensor) -> int:
        """Index of the step that ``timestep`` belongs to; the first call locates it on the grid."""
        if self.timesteps is None:
            raise ValueError("call set_timesteps(num_inference_steps) before step()")
        value = torch.as_tensor(timestep, dtype=torch.float32).to(self.timesteps.device)
        if value.numel() != 1:
            raise ValueError(f"timestep must be a single value, got shape {tuple(value.shape)}")
        matches = torch.isclose(self.timesteps, value.reshape(()), rtol=1e-6, atol=1e-5).nonzero()
        if self._step_index is None:
            if matches.numel() == 0:
                raise ValueError(
                    f"timestep {value.item()} is not one of the scheduler's timesteps {self.timesteps.tolist()}")
            return int(matches[0, 0])
        if self._step_index >= self.num_inference_steps:
            raise ValueError(
                f"all {self.num_inference_steps} steps were taken; call set_timesteps before a new sampling loop"
            )
        if self._step_index not in matches.flatten().tolist():
            expected = self.timesteps[self._step_index].item()
            raise ValueError(f"timestep {value.item()} does not match step {self._step_index}'s timestep {expected}")
        return self._step_index

    def step(
        self,
        model_output: Tensor,
        timestep: float | Tensor,
        sample: Tensor,
        generator: Optional[torch.Generator] = None,
        return_dict: bool = True,
    ) -> UCGMSchedulerOutput | tuple[Tensor, Tensor]:
        """One UCGM-S step from ``sample`` at ``timestep`` given the model's raw output there (module docstring).

        ``generator`` draws the fresh noise when rho > 0 (float64 on the CPU, as ``ucgm_sample`` draws it).
        Returns :class:`UCGMSchedulerOutput`, or ``(prev_sample, pred_original_sample)`` if not ``return_dict``.
        """
        index = self._check_timestep(timestep)
        transport = self.transport
        t_cur, t_next = self.sigmas[index], self.sigmas[index + 1]
        output = model_output if transport.output_sign == 1 else transport.output_sign * model_output
        data_raw, noise_raw = transport.recover(output, sample, t_cur.to(sample.dtype).expand(sample.shape[0]))
        data_hat, noise_hat = data_raw.to(torch.float64), noise_raw.to(torch.float64)
        if self.config.extrapolation > 0:
            previous, self._previous_prediction = self._previous_prediction, (data_hat, noise_hat)
            if index >= 2 and previous is not None:
                data_hat = data_hat + self.config.extrapolation * (data_hat - previous[0])
                noise_hat = noise_hat + self.config.extrapolation * (noise_hat - previous[1])
        if self._stochasticity_ratio is None:
            self._stochasticity_ratio = first_step_sde_ratio(transport, t_cur, t_next)
        ratio = self._stochasticity_ratio
        fresh = 0.0
        if not (isinstance(ratio, float) and ratio == 0.0):
            fresh = torch.randn(sample.shape, generator=generator, dtype=torch.float64).to(sample.device)
        next_state = transport.gamma(t_next) * data_hat + transport.alpha(t_next) * (
            noise_hat * (1 - ratio) ** 0.5 + fresh * ratio**0.5)
        self._step_index = index + 1
        prev_sample = data_raw if self._step_index == self.num_inference_steps else next_state.to(sample.dtype)
        if not return_dict:
            return prev_sample, data_raw
        return UCGMSchedulerOutput(prev_sample=prev_sample, pred_original_sample=data_raw)
