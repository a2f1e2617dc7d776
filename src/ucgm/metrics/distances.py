"""Sample-based distances between two distributions: sliced Wasserstein-2, multi-bandwidth MMD, energy distance.

Every function takes two sample sets ``a`` ``(n, ...)`` and ``b`` ``(m, ...)`` (flattened to ``(n, D)``),
computes in float64 and returns a Python float.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import Tensor

from ..validation import check_positive_int
from ._inputs import as_sample_matrix, check_same_dimension, pairwise_distances

_ROW_BLOCK = 2048


def _empirical_w2_squared(sorted_a: Tensor, sorted_b: Tensor) -> Tensor:
    """``W2^2 = int_0^1 (F_a^{-1}(u) - F_b^{-1}(u))^2 du`` between 1-D empirical measures, per column.

    Both quantile functions are step functions (``F_a^{-1}(u) = a_(ceil(n u))``); the integral is an exact sum
    over the merged break points ``{i/n} U {j/m}``. For ``n = m`` it is ``mean_i (a_(i) - b_(i))^2``.
    """
    n, m = sorted_a.shape[0], sorted_b.shape[0]
    fractions_a = torch.arange(n + 1, dtype=torch.float64) / n
    fractions_b = torch.arange(m + 1, dtype=torch.float64) / m
    breaks = torch.unique(torch.cat([fractions_a, fractions_b]))
    lengths = breaks[1:] - breaks[:-1]
    midpoints = (breaks[1:] + breaks[:-1]) / 2
    index_a = torch.clamp((midpoints * n).long(), max=n - 1)
    index_b = torch.clamp((midpoints * m).long(), max=m - 1)
    return (lengths[:, None] * (sorted_a[index_a] - sorted_b[index_b]) ** 2).sum(dim=0)


def sliced_wasserstein(a, b, num_projections: int = 128, seed: int = 0) -> float:
    """Sliced Wasserstein-2 ``SW2 = sqrt(mean_theta W2^2(theta . a, theta . b))`` over ``num_projections`` random
    unit directions ``theta`` (drawn from a generator seeded with ``seed``, so deterministic).

    The 1-D ``W2^2`` matches quantiles exactly, so ``a`` and ``b`` may have different sizes.
    """
    check_positive_int("num_projections", num_projections)
    a, b = as_sample_matrix("a", a), as_sample_matrix("b", b)
    check_same_dimension("a", a, "b", b)
    generator = torch.Generator().manual_seed(seed)
    directions = torch.randn(a.shape[1], num_projections, generator=generator, dtype=torch.float64)
    directions = directions / directions.norm(dim=0, keepdim=True)
    sorted_a = torch.sort(a @ directions, dim=0).values
    sorted_b = torch.sort(b @ directions, dim=0).values
    return float(_empirical_w2_squared(sorted_a, sorted_b).mean().sqrt())


def _mean_pairwise(x: Tensor, y: Tensor, function: Callable[[Tensor], Tensor], same_set: bool) -> Tensor:
    """``mean_{i, j} f(|x_i - y_j|)``; with ``same_set`` (``y is x``) the diagonal ``i = j`` is left out."""
    total = torch.zeros((), dtype=torch.float64)
    for start in range(0, x.shape[0], _ROW_BLOCK):
        total += function(pairwise_distances(x[start : start + _ROW_BLOCK], y)).sum()
    if not same_set:
        return total / (x.shape[0] * y.shape[0])
    diagonal = function(torch.zeros((), dtype=torch.float64)) * x.shape[0]
    return (total - diagonal) / (x.shape[0] * (x.shape[0] - 1))


def mmd(a, b, bandwidths: Sequence[float] = (0.1, 0.2, 0.5, 1.0, 2.0)) -> float:
    """Unbiased squared MMD ``E k(a, a') + E k(b, b') - 2 E k(a, b)`` (U-statistics, ``i != j`` within a set) with
    the multi-bandwidth RBF kernel ``k(x, y) = mean_h exp(-|x - y|^2 / (2 h^2))``. Can be slightly negative."""
    if len(bandwidths) == 0 or any(not h > 0 for h in bandwidths):
        raise ValueError(f"bandwidths={tuple(bandwidths)!r}; expected a non-empty sequence of positive length scales")
    a, b = as_sample_matrix("a", a, min_samples=2), as_sample_matrix("b", b, min_samples=2)
    check_same_dimension("a", a, "b", b)

    def kernel(distances: Tensor) -> Tensor:
        squared = distances**2
        return sum(torch.exp(-squared / (2.0 * h**2)) for h in bandwidths) / len(bandwidths)

    within_a = _mean_pairwise(a, a, kernel, same_set=True)
    within_b = _mean_pairwise(b, b, kernel, same_set=True)
    return float(within_a + within_b - 2 * _mean_pairwise(a, b, kernel, same_set=False))


def energy_distance(a, b) -> float:
    """Székely's (squared) energy distance ``2 E|a - b| - E|a - a'| - E|b - b'|``, unbiased (``i != j`` within a
    set); zero in expectation iff the distributions agree, so it can be slightly negative. Not square-rooted."""
    a, b = as_sample_matrix("a", a, min_samples=2), as_sample_matrix("b", b, min_samples=2)
    check_same_dimension("a", a, "b", b)

    def identity(distances: Tensor) -> Tensor:
        return distances

    cross = _mean_pairwise(a, b, identity, same_set=False)
    within = _mean_pairwise(a, a, identity, same_set=True) + _mean_pairwise(b, b, identity, same_set=True)
    return float(2 * cross - within)
