"""Discretisation schedules and time distributions of the consistency family, in EDM noise levels ``sigma`` (the
Karras grid itself is :func:`ucgm.timegrids.karras_sigmas`).

Every curriculum reads the training progress ``(step k, total steps K)`` given to the objective with
``objective.set_progress(k, K)``; nothing here keeps state.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from ...validation import check_choice, check_positive_int

ECT_MAPPINGS = ("sigmoid", "const")


def _fraction(step: int, total_steps: Optional[int]) -> float:
    """``k / K`` clamped to [0, 1]; 0 when ``K`` is unknown (the schedule stays at its start)."""
    return 0.0 if total_steps is None else min(max(step / total_steps, 0.0), 1.0)


def adaptive_num_scales(step: int, total_steps: Optional[int], initial: int = 2, final: int = 150) -> int:
    """CM's progressive discretisation (Song et al. 2023, "adaptive"):
    ``N(k) = ceil(sqrt(k / K ((s1 + 1)^2 - s0^2) + s0^2) - 1) + 1`` grid points, at least 2."""
    scales = math.ceil(math.sqrt(_fraction(step, total_steps) * ((final + 1) ** 2 - initial**2) + initial**2) - 1)
    return max(scales, 1) + 1


def adaptive_ema_decay(num_scales: int, initial_scales: int = 2, initial_decay: float = 0.9) -> float:
    """CM's target EMA decay for ``N`` grid points: ``mu(k) = exp(s0 ln(mu0) / (N(k) - 1))``."""
    return math.exp(initial_scales * math.log(initial_decay) / (num_scales - 1))


def doubling_num_scales(step: int, total_steps: Optional[int], initial: int = 10, final: int = 1280) -> int:
    """iCT's curriculum (Song & Dhariwal 2023): ``N(k) = min(s0 2^floor(k / K'), s1) + 1`` grid points with
    ``K' = floor(K / (log2 floor(s1 / s0) + 1))`` (at least 1)."""
    if total_steps is None:
        return initial + 1
    stage_length = max(math.floor(total_steps / (math.log2(math.floor(final / initial)) + 1)), 1)
    return min(initial * 2 ** (max(step, 0) // stage_length), final) + 1


def lognormal_pair_probabilities(sigmas: Tensor, p_mean: float = -1.1, p_std: float = 2.0) -> Tensor:
    """iCT's discretised lognormal over adjacent pairs ``(sigma_i, sigma_{i+1})`` of a decreasing grid:
    ``p(i) prop. erf((ln sigma_i - P_mean) / (sqrt 2 P_std)) - erf((ln sigma_{i+1} - P_mean) / (sqrt 2 P_std))``."""
    log_sigmas = torch.log(sigmas.to(torch.float64))
    cdf = torch.erf((log_sigmas - p_mean) / (math.sqrt(2) * p_std))
    mass = (cdf[:-1] - cdf[1:]).clamp_min(0)
    return mass / mass.sum()


def sample_truncated_lognormal(batch_size: int, p_mean: float, p_std: float, low: float, high: float,
                               generator: Optional[torch.Generator] = None) -> Tensor:
    """``sigma = exp(P_mean + P_std n)`` with ``n ~ N(0, 1)`` conditioned on ``low <= sigma <= high`` (inverse CDF,
    float64): ``n = Phi^-1(Phi(a) + u (Phi(b) - Phi(a)))``, ``a, b`` the standardised log bounds, ``u ~ U[0, 1)``."""
    normal = torch.distributions.Normal(torch.tensor(0.0, dtype=torch.float64), torch.tensor(1.0, dtype=torch.float64))
    bounds = torch.tensor([low, high], dtype=torch.float64).clamp_min(1e-300).log()
    cdf_low, cdf_high = normal.cdf((bounds - p_mean) / p_std)
    uniform = torch.rand(batch_size, generator=generator, dtype=torch.float64)
    probability = (cdf_low + uniform * (cdf_high - cdf_low)).clamp(1e-16, 1 - 1e-16)
    return torch.exp(p_mean + p_std * normal.icdf(probability)).clamp(low, high)


def ect_stage(step: int, total_steps: Optional[int], num_stages: int) -> int:
    """ECT's stage ``s = min(floor(num_stages k / K), num_stages - 1)`` (0 when ``K`` is unknown)."""
    return min(math.floor(num_stages * _fraction(step, total_steps)), num_stages - 1)


def ect_reference_sigma(sigma_t: Tensor, stage: int, q: float = 2.0, k: float = 8.0, b: float = 1.0,
                        mapping: str = "sigmoid") -> Tensor:
    """ECT's shrinking gap (Geng et al. 2024): ``r = t (1 - q^-(s+1) (1 + k sigmoid(-b t)))`` (``sigmoid``) or
    ``r = t (1 - q^-(s+1))`` (``const``), in noise levels, clamped at 0."""
    check_choice("mapping", mapping, ECT_MAPPINGS)
    shrink = q ** -(stage + 1)
    if mapping == "sigmoid":
        shrink = shrink * (1 + k * torch.sigmoid(-b * sigma_t))
    return (sigma_t * (1 - shrink)).clamp_min(0)
