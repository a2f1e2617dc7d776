"""Feature-space metrics: Fréchet distance (FID-style) and precision / recall / density / coverage (PRDC)."""

from __future__ import annotations

import torch
from torch import Tensor

from ..validation import check_positive_int
from ._inputs import as_sample_matrix, check_same_dimension, pairwise_distances

_ROW_BLOCK = 1024


def _finite_float64(name: str, value) -> Tensor:
    tensor = torch.as_tensor(value).detach().to(torch.float64)
    if not bool(torch.isfinite(tensor).all()):
        raise ValueError(f"{name} contains NaN or Inf values; all values must be finite")
    return tensor


def _psd_sqrt(matrix: Tensor) -> Tensor:
    """Square root of a symmetric positive semi-definite matrix by eigendecomposition (negative rounding clipped)."""
    eigenvalues, eigenvectors = torch.linalg.eigh((matrix + matrix.T) / 2)
    return (eigenvectors * eigenvalues.clamp(min=0).sqrt()) @ eigenvectors.T


def frechet_distance(mu1, cov1, mu2, cov2) -> float:
    """``|mu1 - mu2|^2 + tr(C1 + C2 - 2 (C1^{1/2} C2 C1^{1/2})^{1/2})``, the squared W2 distance between
    ``N(mu1, C1)`` and ``N(mu2, C2)`` (the FID formula; ``tr (C1 C2)^{1/2}`` is taken in the symmetric form)."""
    mu1, mu2 = _finite_float64("mu1", mu1), _finite_float64("mu2", mu2)
    cov1, cov2 = _finite_float64("cov1", cov1), _finite_float64("cov2", cov2)
    if mu1.ndim != 1 or mu1.shape != mu2.shape:
        raise ValueError(f"mu1 {tuple(mu1.shape)} and mu2 {tuple(mu2.shape)} must be vectors of the same length")
    dim = mu1.shape[0]
    for name, cov in (("cov1", cov1), ("cov2", cov2)):
        if cov.shape != (dim, dim):
            raise ValueError(f"{name} has shape {tuple(cov.shape)}; expected ({dim}, {dim}) to match the means")
    root1 = _psd_sqrt(cov1)
    cross_eigenvalues = torch.linalg.eigvalsh(root1 @ ((cov2 + cov2.T) / 2) @ root1)
    trace_cross = cross_eigenvalues.clamp(min=0).sqrt().sum()
    return float(((mu1 - mu2) ** 2).sum() + torch.trace(cov1) + torch.trace(cov2) - 2 * trace_cross)


def frechet_distance_from_features(feats_a, feats_b) -> float:
    """:func:`frechet_distance` between Gaussians fitted to two feature sets ``(n, D)`` (mean and unbiased
    covariance ``sum (f - mean)(f - mean)^T / (n - 1)``; needs ``n >= 2``)."""
    feats_a = as_sample_matrix("feats_a", feats_a, min_samples=2)
    feats_b = as_sample_matrix("feats_b", feats_b, min_samples=2)
    check_same_dimension("feats_a", feats_a, "feats_b", feats_b)
    return frechet_distance(feats_a.mean(0), torch.cov(feats_a.T).reshape(feats_a.shape[1], -1),
                            feats_b.mean(0), torch.cov(feats_b.T).reshape(feats_b.shape[1], -1))


def _kth_neighbour_distances(features: Tensor, k: int) -> Tensor:
    """Distance from each row to its ``k``-th nearest other row (the row itself, at distance 0, is skipped)."""
    radii = []
    for start in range(0, features.shape[0], _ROW_BLOCK):
        distances = pairwise_distances(features[start : start + _ROW_BLOCK], features)
        radii.append(torch.topk(distances, k + 1, largest=False).values[:, k])
    return torch.cat(radii)


def prdc(real_feats, fake_feats, k: int = 5) -> dict[str, float]:
    """Precision, recall, density and coverage (Naeem et al. 2020) with k-NN balls ``B(r_i, rad_k(r_i))``:

    * precision ``= mean_j 1[exists i: |f_j - r_i| <= rad_k(r_i)]``,
    * recall ``= mean_i 1[exists j: |r_i - f_j| <= rad_k(f_j)]``,
    * density ``= (1 / (k M)) sum_j sum_i 1[|f_j - r_i| <= rad_k(r_i)]``,
    * coverage ``= mean_i 1[min_j |r_i - f_j| <= rad_k(r_i)]``,

    where ``rad_k`` is the distance to the ``k``-th nearest neighbour within the same set. Identical sets give
    precision = recall = coverage = 1 and density = (k + 1) / k (each point also lies in its own ball).
    """
    real = as_sample_matrix("real_feats", real_feats)
    fake = as_sample_matrix("fake_feats", fake_feats)
    check_same_dimension("real_feats", real, "fake_feats", fake)
    check_positive_int("k", k)
    smallest = min(real.shape[0], fake.shape[0])
    if k >= smallest:
        raise ValueError(f"k={k} must be smaller than the number of samples in each set (here {smallest})")
    real_radii, fake_radii = _kth_neighbour_distances(real, k), _kth_neighbour_distances(fake, k)
    fake_in_real_ball = torch.zeros(fake.shape[0], dtype=torch.bool)
    real_in_fake_ball = torch.zeros(real.shape[0], dtype=torch.bool)
    nearest_fake = torch.full((real.shape[0],), torch.inf, dtype=torch.float64)
    ball_count = 0
    for start in range(0, fake.shape[0], _ROW_BLOCK):
        distances = pairwise_distances(fake[start : start + _ROW_BLOCK], real)  # (block of fakes, reals)
        inside_real = distances <= real_radii[None, :]
        fake_in_real_ball[start : start + _ROW_BLOCK] = inside_real.any(dim=1)
        ball_count += int(inside_real.sum())
        real_in_fake_ball |= (distances <= fake_radii[start : start + _ROW_BLOCK, None]).any(dim=0)
        nearest_fake = torch.minimum(nearest_fake, distances.min(dim=0).values)
    return {
        "precision": float(fake_in_real_ball.double().mean()),
        "recall": float(real_in_fake_ball.double().mean()),
        "density": ball_count / (k * fake.shape[0]),
        "coverage": float((nearest_fake <= real_radii).double().mean()),
    }
