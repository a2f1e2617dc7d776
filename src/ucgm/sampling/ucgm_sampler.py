"""UCGM-S: the unified sampler (Sun, Jiang, Lin 2025), usable with any ucgm transport and any model.

Grid ``t_0 > t_1 > ... > t_N = 0`` (:func:`ucgm.timegrids.kumaraswamy_grid`). At step i, with
``(x_hat, z_hat)`` the network's data and noise predictions at ``(x_i, t_i)``:

* extrapolation (kappa), three forms: ``"official"`` (from the third step on, both predictions,
  ``p <- p + kappa (p - p_prev)`` with ``p_prev`` the previous step's raw prediction), ``"data"`` (from the
  second step on, the data prediction only, ``x_hat <- x_hat + kappa (x_hat - x_hat_prev)``, and the noise
  prediction it implies at the state, ``z_hat = (x_i - gamma(t_i) x_hat) / alpha(t_i)``: with rho = 0 the step is
  then the data-prediction multistep update ``x_{i+1} = alpha'/alpha x_i + (gamma' - alpha' gamma / alpha) x_hat``)
  and ``"log-snr"`` (the data form with kappa scaled by the log-SNR step ratio,
  ``x_hat <- x_hat + (kappa / r_i) (x_hat - x_hat_prev)``, ``r_i = h_{i-1} / h_i``, ``h_i = lambda(t_{i+1}) -
  lambda(t_i)``, ``lambda = log(gamma / alpha)``; no extrapolation where a step is infinite, i.e. from t = 1 where
  gamma = 0 or to t = 0 where alpha = 0: kappa = 0.5 with rho = 0 is DPM-Solver++(2M));
* step: ``x_{i+1} = gamma(t_{i+1}) x_hat + alpha(t_{i+1}) (sqrt(1 - rho) z_hat + sqrt(rho) eps)``,
  eps ~ N(0, I) (rho = 0: deterministic DDIM-type step; rho = 1: consistency-style "denoise, re-noise");
* order 2: a second call at ``(x_{i+1}, t_{i+1})`` gives ``(x_hat', z_hat')`` and the corrector, two forms:
  ``"official"`` (noise-prediction form, divides by ``gamma(t_i)``, which vanishes at t = 1 on the Linear path)
  ``x_{i+1} = gamma'/gamma x_i + (alpha' - gamma' alpha / gamma) (z_hat + z_hat') / 2`` and ``"data"``
  (data-prediction form, divides by ``alpha(t_i)``, which never vanishes where the sampler calls the network)
  ``x_{i+1} = alpha'/alpha x_i + (gamma' - alpha' gamma / alpha) (x_hat + x_hat') / 2``, primes at ``t_{i+1}``,
  with the raw (not extrapolated) ``x_hat``: the extrapolation moves only the predicted state.
  The official rule corrects every interval but the last (every one when the end gap is 0); ``corrections``
  corrects the first ``corrections`` intervals instead. ``reuse_corrector_call`` (data corrector only, UniPC's
  reuse): the corrector's call at ``(x_{i+1}^pred, t_{i+1})`` is also the next step's prediction (its noise the
  one implied at the corrected state), so ``steps`` calls run ``steps`` intervals, all but the last corrected.

The sample is the data prediction of the last first-order call. The state is kept in float64, the network is
called in the dtype of the initial noise; no state survives between calls. Every default is the official one
(``tests/test_parity.py``); ucgm's own defaults are those of the registry's ``ucgm`` and ``ucgm-o2``
(:mod:`ucgm.sampling.registry`, measured in ``docs/ucgm_sampler.md``).
"""

from __future__ import annotations

import math
from typing import Callable, Optional, Sequence

import torch
from torch import Tensor

from ..timegrids import asymmetric_targets, checked_grid, kumaraswamy_grid
from ..transports import Transport
from ..validation import check_batch, check_choice, check_finite, check_positive_int, check_range
from .noise import normal_noise
from .result import SampleResult

STOCHASTICITY_SCHEDULES = ("sde", "auto")
#: Extrapolation forms: the official one (both predictions, from the third step), ucgm's data-prediction one and
#: the data-prediction one scaled by the log-SNR step ratio (kappa = 0.5: DPM-Solver++(2M)).
EXTRAPOLATION_FORMS = ("official", "data", "log-snr")
#: Order-2 corrector forms: the official noise-prediction one and ucgm's data-prediction one.
CORRECTORS = ("official", "data")

#: Official UCGM sampler argument names and their ucgm equivalents.
OFFICIAL_SAMPLER_NAMES = {
    "sampling_steps": "steps", "stochast_ratio": "stochasticity", "extrapol_ratio": "extrapolation",
    "sampling_order": "order", "time_dist_ctrl": "time_warp", "rfba_gap_steps": "gaps",
    "cfg_scale": "cfg_scale", "cfg_interval": "cfg_interval",
}


def sampler_kwargs_from_official(official: dict) -> dict:
    """Translate official ``uni_sample`` arguments into :func:`ucgm_sample` keyword arguments."""
    unknown = sorted(set(official) - set(OFFICIAL_SAMPLER_NAMES))
    if unknown:
        raise ValueError(f"unknown official sampler arguments {unknown}; allowed: {sorted(OFFICIAL_SAMPLER_NAMES)}")
    return {OFFICIAL_SAMPLER_NAMES[key]: value for key, value in official.items()}


def first_step_sde_ratio(transport: Transport, t_cur: Tensor, t_next: Tensor) -> Tensor:
    """``rho = clamp(|t' - t| * 2 alpha(t) / alpha(t')^2, 0, 1)``: the SDE-matching ratio of the first interval
    (reused for every later step, as the official sampler does)."""
    return torch.clamp((t_next - t_cur).abs() * 2 * transport.alpha(t_cur) / transport.alpha(t_next) ** 2, 0, 1)


def check_sampler_settings(stochasticity: float | str, extrapolation: float, time_warp: Sequence[float],
                           gaps: Sequence[float]) -> None:
    """Validate UCGM-S's rho, kappa, Kumaraswamy warp and boundary gaps (shared with the diffusers scheduler)."""
    if isinstance(stochasticity, str):
        check_choice("stochasticity", stochasticity.lower(), STOCHASTICITY_SCHEDULES)
    else:
        check_range("stochasticity", stochasticity, 0.0, 1.0)
    check_range("extrapolation", extrapolation, 0.0, math.inf)
    if len(time_warp) != 3 or min(time_warp) <= 0:
        raise ValueError(f"time_warp={tuple(time_warp)!r} must be three positive numbers (a, b, c)")
    if len(gaps) != 2 or not (0 <= gaps[0] < 1 and 0 <= gaps[1] < 1 and gaps[0] + gaps[1] < 1):
        raise ValueError(f"gaps={tuple(gaps)!r} must be (g0, g1) with 0 <= g0, g1 and g0 + g1 < 1")


def official_corrections(intervals: int, gaps: Sequence[float]) -> int:
    """The intervals the official order-2 loop corrects: all but the last, or all when the end gap is 0 (it
    treats the appended 0 as a grid point; that last correction does not change the sample)."""
    return intervals if float(gaps[1]) == 0.0 else intervals - 1


def data_prediction_step(transport: Transport, state: Tensor, data_hat: Tensor, t_cur: Tensor, t_next: Tensor
                         ) -> Tensor:
    """``x' = alpha(t') / alpha(t) x + (gamma(t') - alpha(t') gamma(t) / alpha(t)) x_hat``: the deterministic
    step that keeps the noise ``(x - gamma x_hat) / alpha`` implied at the state (``alpha(t) > 0``)."""
    ratio = transport.alpha(t_next) / transport.alpha(t_cur)
    return ratio * state + (transport.gamma(t_next) - ratio * transport.gamma(t_cur)) * data_hat


def log_snr_step(transport: Transport, t_cur: Tensor, t_next: Tensor) -> Tensor:
    """``h = lambda(t') - lambda(t)``, ``lambda = log(gamma / alpha)`` (float64; ``inf`` from a time where
    gamma = 0 or to one where alpha = 0)."""
    times = torch.stack([t_cur, t_next]).to(torch.float64)
    log_snr = torch.log(transport.gamma(times)) - torch.log(transport.alpha(times))
    return log_snr[1] - log_snr[0]


def log_snr_extrapolation(kappa: float, step: Tensor, previous_step: Tensor) -> Tensor | float:
    """The log-SNR form's weight ``kappa / r = kappa h_i / h_{i-1}``; 0 when either step is infinite (a first-order
    step from t = 1 or to t = 0, DPM-Solver++(2M)'s convention)."""
    if not (torch.isfinite(step) and torch.isfinite(previous_step)):
        return 0.0
    return kappa * step / previous_step


def ucgm_sample(
    model: Callable,
    transport: Transport,
    noise: Tensor,
    labels: Optional[Tensor] = None,
    steps: int = 40,
    stochasticity: float | str = 0.0,
    extrapolation: float = 0.0,
    order: int = 1,
    time_warp: Sequence[float] = (1.0, 1.0, 1.0),
    gaps: Sequence[float] = (0.001, 0.001),
    cfg_scale: Optional[float] = None,
    cfg_interval: Optional[Sequence[float]] = None,
    generator: Optional[torch.Generator] = None,
    return_trajectory: bool = False,
    times: Optional[Sequence[float] | Tensor] = None,
    time_difference: float = 0.0,
    extrapolation_form: str = "official",
    corrector: str = "official",
    corrections: Optional[int] = None,
    reuse_corrector_call: bool = False,
) -> SampleResult:
    """Sample with UCGM-S.

    ``steps``: sampling steps (order 2 uses ``ceil(steps / 2)`` intervals); ``stochasticity`` rho in [0, 1] or
    ``"sde"``; ``extrapolation`` kappa >= 0 in ``extrapolation_form`` (:data:`EXTRAPOLATION_FORMS`);
    ``time_warp`` the Kumaraswamy ``(a, b, c)``; ``gaps`` the boundary gaps ``(g0, g1)``; ``cfg_scale`` /
    ``cfg_interval`` classifier-free guidance on the network time; ``corrector`` the order-2 form
    (:data:`CORRECTORS`) and ``corrections`` how many of the first intervals it corrects (``None``: the official
    rule, :func:`official_corrections`); ``reuse_corrector_call`` (order 2, ``corrector="data"``): each corrector
    call is the next step's call, ``steps`` intervals at ``steps`` calls (``corrections`` defaults to all but the
    last interval).
    ``times``: an explicit grid ``t_0 > ... > t_N = 0`` (a searched schedule) instead of the warped one, with
    ``N`` the intervals of ``steps``; ``time_difference``: Analog Bits' asymmetric time intervals (each step
    moves its state to :func:`~ucgm.timegrids.asymmetric_targets`, pix2seq's ``td``; 0 by default).
    Returns the sample, the states at the grid times (with the sample last) when ``return_trajectory``, and
    the number of network calls.
    """
    check_positive_int("steps", steps)
    check_choice("order", order, (1, 2))
    check_choice("extrapolation_form", extrapolation_form, EXTRAPOLATION_FORMS)
    check_choice("corrector", corrector, CORRECTORS)
    check_finite("noise", noise)
    check_batch("labels", labels, noise.shape[0])
    check_sampler_settings(stochasticity, extrapolation, time_warp, gaps)
    if reuse_corrector_call and (order != 2 or corrector != "data"):
        raise ValueError(f"reuse_corrector_call=True needs order=2 and corrector='data' (got order={order}, "
                         f"corrector={corrector!r}): the reused call is a data prediction at the predicted state")
    if cfg_scale is not None:
        from .guidance import ClassifierFreeGuidance

        model = ClassifierFreeGuidance(model, cfg_scale, cfg_interval)

    intervals = (steps + 1) // 2 if order == 2 and not reuse_corrector_call else steps
    if times is None:
        times = kumaraswamy_grid(intervals, time_warp, gaps, dtype=noise.dtype).to(noise.device)
    else:
        times = checked_grid(times, intervals, noise.dtype).to(noise.device)
    if corrections is None:
        corrections = intervals - 1 if reuse_corrector_call else official_corrections(intervals, gaps)
    elif isinstance(corrections, bool) or not isinstance(corrections, int) or not 0 <= corrections <= intervals:
        raise ValueError(f"corrections={corrections!r} must be an integer from 0 to the {intervals} intervals")
    corrected_intervals = corrections if order == 2 else 0
    targets = asymmetric_targets(times, time_difference)
    extrapolation_start = 2 if extrapolation_form == "official" else 1
    network_dtype = noise.dtype
    state = noise.to(torch.float64)
    trajectory = [noise] if return_trajectory else None
    previous_data = previous_noise = previous_step = sample = reused = None
    ratio: Tensor | float = stochasticity
    nfe = 0

    def predict(x: Tensor, t: Tensor):
        nonlocal nfe
        nfe += 1
        t_network = t.to(network_dtype).expand(x.shape[0])
        prediction = transport.predict(model, x.to(network_dtype), t_network, labels)
        return prediction.data.to(torch.float64), prediction.noise.to(torch.float64), prediction.data

    for i in range(intervals):
        t_cur, t_next = times[i], targets[i]
        if reused is None:
            data_hat, noise_hat, sample = predict(state, t_cur)
        else:
            data_hat, sample = reused
            noise_hat = (state - transport.gamma(t_cur) * data_hat) / transport.alpha(t_cur)
        raw_data, reused = data_hat, None
        if extrapolation > 0:
            raw_noise = noise_hat
            step = log_snr_step(transport, t_cur, t_next) if extrapolation_form == "log-snr" else None
            if i >= extrapolation_start:
                weight = (extrapolation if step is None
                          else log_snr_extrapolation(extrapolation, step, previous_step))
                data_hat = data_hat + weight * (data_hat - previous_data)
                if extrapolation_form == "official":
                    noise_hat = noise_hat + extrapolation * (noise_hat - previous_noise)
                else:
                    noise_hat = (state - transport.gamma(t_cur) * data_hat) / transport.alpha(t_cur)
            previous_data, previous_noise, previous_step = raw_data, raw_noise, step
        if isinstance(ratio, str):
            ratio = first_step_sde_ratio(transport, t_cur, t_next)
        fresh = 0.0
        if not (isinstance(ratio, float) and ratio == 0.0):
            fresh = normal_noise(state.shape, generator, torch.float64, state.device)
        next_state = transport.gamma(t_next) * data_hat + transport.alpha(t_next) * (
            noise_hat * (1 - ratio) ** 0.5 + fresh * ratio**0.5)
        if i < corrected_intervals:
            corrector_data, corrector_noise, corrector_sample = predict(next_state, t_next)
            if reuse_corrector_call:
                reused = corrector_data, corrector_sample
            if corrector == "data":
                next_state = data_prediction_step(transport, state, 0.5 * raw_data + 0.5 * corrector_data,
                                                  t_cur, t_next)
            else:
                gamma_cur, gamma_next = transport.gamma(t_cur), transport.gamma(t_next)
                noise_weight = transport.alpha(t_next) - gamma_next * transport.alpha(t_cur) / gamma_cur
                next_state = state * gamma_next / gamma_cur + noise_weight * (0.5 * noise_hat + 0.5 * corrector_noise)
        state = next_state
        if trajectory is not None:
            trajectory.append(state.to(network_dtype) if i < intervals - 1 else sample)
    stacked = torch.stack(trajectory) if trajectory is not None else None
    return SampleResult(sample, stacked, nfe)
