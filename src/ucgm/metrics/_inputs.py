"""Shared input handling for the metrics: samples become finite float64 ``(n, D)`` matrices."""

from __future__ import annotations

import torch
from torch import Tensor


def as_sample_matrix(name: str, samples, min_samples: int = 1) -> Tensor:
    """``samples`` ``(n,)`` (scalars), ``(n, D)`` or ``(n, *shape)`` (flattened) as a float64 ``(n, D)`` tensor.

    Raises ``ValueError`` for fewer than ``min_samples`` rows or NaN / Inf values.
    """
    matrix = torch.as_tensor(samples).detach()
    if matrix.ndim == 0:
        raise ValueError(f"{name} is a scalar; expected samples of shape (n,), (n, D) or (n, *shape)")
    matrix = matrix.reshape(matrix.shape[0], -1).to(torch.float64)
    if matrix.shape[0] < min_samples:
        raise ValueError(f"{name} has {matrix.shape[0]} samples; at least {min_samples} are needed")
    if not bool(torch.isfinite(matrix).all()):
        raise ValueError(f"{name} contains NaN or Inf values; all values must be finite")
    return matrix


def check_same_dimension(name_a: str, a: Tensor, name_b: str, b: Tensor) -> None:
    """Raise unless two sample matrices have the same number of features."""
    if a.shape[1] != b.shape[1]:
        raise ValueError(
            f"{name_a} has {a.shape[1]} features per sample but {name_b} has {b.shape[1]}; they must match"
        )


def pairwise_distances(a: Tensor, b: Tensor) -> Tensor:
    """``|a_i - b_j|`` ``(n, m)`` computed from differences, so that identical rows give exactly 0."""
    return torch.cdist(a, b, compute_mode="donot_use_mm_for_euclid_dist")
