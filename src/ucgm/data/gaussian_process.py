"""Gaussian-process signals and the exact cascade oracle: the test instrument of multi-resolution cascades.

Signals are ``(1, L)`` draws of a zero-mean Gaussian process on ``L`` equispaced points with the squared-
exponential covariance ``K_ij = exp(-(i - j)^2 / (2 l^2)) + jitter * [i = j]``. Every pyramid level is Gaussian
too: level ``l`` of a signal is ``D_l x`` (block means, :func:`~ucgm.data.resolution.downsample`), with
covariance ``C_l = D_l K D_l^T``.

:class:`CascadeOracle` is the exact network of a cascade on these signals under a transport: at the length of a
level, without ``low_res``, the data prediction of ``x ~ N(0, C_l)``; with ``low_res = upsample(y)``
(``y = P x`` the level below, ``P`` the block mean of pairs), that of ``x | y ~ N(m, S)`` with
``m = C P^T (P C P^T)^{-1} y`` and ``S = C - C P^T (P C P^T)^{-1} P C``. For ``x ~ N(m, S)`` and
``x_t = gamma x + alpha z``: ``E[x | x_t] = m + gamma S (gamma^2 S + alpha^2 I)^{-1} (x_t - gamma m)``.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from ..transports import Transport, broadcast_time
from ..validation import check_positive_int
from .base import AffineNormalisation, Dataset
from .resolution import downsample


def squared_exponential(length: int, lengthscale: float, jitter: float = 1e-4) -> Tensor:
    """``K_ij = exp(-(i - j)^2 / (2 lengthscale^2)) + jitter [i = j]`` (float64)."""
    positions = torch.arange(length, dtype=torch.float64)
    squared = (positions[:, None] - positions[None, :]) ** 2
    return torch.exp(-squared / (2 * lengthscale**2)) + jitter * torch.eye(length, dtype=torch.float64)


def block_mean_matrix(length: int, factor: int) -> Tensor:
    """The ``(length / factor, length)`` matrix of :func:`~ucgm.data.resolution.downsample` on signals."""
    rows = torch.arange(length, dtype=torch.long) // factor
    matrix = torch.zeros(length // factor, length, dtype=torch.float64)
    matrix[rows, torch.arange(length)] = 1.0 / factor
    return matrix


class GaussianProcessSignals(Dataset):
    """``(1, length)`` signals of the squared-exponential process, unconditional, drawn afresh."""

    def __init__(self, length: int = 16, lengthscale: float = 2.0, jitter: float = 1e-4):
        check_positive_int("length", length, minimum=2)
        self.covariance = squared_exponential(length, lengthscale, jitter)
        self.cholesky = torch.linalg.cholesky(self.covariance)
        self.shape, self.num_classes = (1, length), 0
        self.normaliser = AffineNormalisation(1.0, 0.0)

    def sample_batch(self, batch_size: int, generator: torch.Generator) -> tuple[Tensor, Optional[Tensor]]:
        check_positive_int("batch_size", batch_size)
        white = torch.randn(batch_size, self.shape[1], generator=generator, dtype=torch.float64)
        return (white @ self.cholesky.T).unsqueeze(1).to(torch.float32), None

    def level_covariance(self, length: int) -> Tensor:
        """``C = D K D^T`` at a pyramid level of ``length`` points."""
        reduce = block_mean_matrix(self.shape[1], self.shape[1] // length)
        return reduce @ self.covariance @ reduce.T


class CascadeOracle(nn.Module):
    """The exact cascade network of :class:`GaussianProcessSignals` under ``transport`` (module docstring);
    ``forward(x, t, labels, low_res=None)`` reads ``t`` as ucgm internal time (call it through :attr:`transport`)."""

    def __init__(self, signals: GaussianProcessSignals, transport: Transport):
        super().__init__()
        self.signals = signals
        self.transport = Transport(transport.path, transport.parameterisation, sigma_data=transport.sigma_data,
                                   name=f"oracle-{transport.name}")
        self.num_classes = None

    def prior(self, length: int, low_res: Optional[Tensor]) -> tuple[Tensor, Tensor]:
        """Mean ``(B, L)`` (or ``(1, L)``) and covariance ``(L, L)`` of the level's signal given its condition."""
        covariance = self.signals.level_covariance(length)
        if low_res is None:
            return torch.zeros(1, length, dtype=torch.float64), covariance
        below = downsample(low_res.to(torch.float64), 2).flatten(1)               # y = P x, (B, L / 2)
        pool = block_mean_matrix(length, 2)
        cross = covariance @ pool.T                                               # C P^T
        gain = torch.linalg.solve(pool @ cross, cross.T).T                        # C P^T (P C P^T)^{-1}
        return below @ gain.T, covariance - gain @ cross.T

    def forward(self, x: Tensor, t: Tensor, labels: Optional[Tensor] = None, low_res: Optional[Tensor] = None
                ) -> Tensor:
        length = x.shape[-1]
        mean, covariance = self.prior(length, low_res)
        time = self.transport.per_sample_time(t, x).to(torch.float64)
        alpha, gamma = self.transport.alpha(time), self.transport.gamma(time)         # (B,)
        eye = torch.eye(length, dtype=torch.float64)
        precision_term = gamma[:, None, None] ** 2 * covariance + alpha[:, None, None] ** 2 * eye
        residual = x.flatten(1).to(torch.float64) - gamma[:, None] * mean
        data = mean + gamma[:, None] * torch.linalg.solve(precision_term, residual.unsqueeze(-1)).squeeze(-1) @ covariance
        data = data.reshape(x.shape)
        noise = (x.to(torch.float64) - broadcast_time(gamma, x) * data) / broadcast_time(alpha, x)
        return self.transport.output_from_predictions(data, noise, time).to(x.dtype)
