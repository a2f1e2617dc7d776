"""Class-conditional metrics: quality and variation per class, averaged over the classes (guidance studies).

For samples ``x`` with labels ``y`` and reference data ``r`` with labels ``y_r``:

* ``per_class_sliced_w2``: ``mean_c SW2(x[y = c], r[y_r = c])`` (:func:`~ucgm.metrics.distances.sliced_wasserstein`);
* ``within_class_spread``: ``mean_c s(x[y = c]) / s(r[y_r = c])`` with ``s(A) = sqrt(mean_i |a_i - mean(A)|^2)``,
  the root-mean-square distance to the class mean: 1 for samples as varied as the data, below 1 when guidance
  collapses a class toward its mean (the variation classifier-free guidance is known to remove);
* ``class_mode_coverage`` (:func:`class_mode_coverage`): the share of each class's components of a Gaussian
  mixture that its samples cover, averaged over the classes.

Classes with fewer than two samples or reference points are an error (the statistics need two).
"""

from __future__ import annotations

import statistics
from typing import TYPE_CHECKING, Callable

import torch
from torch import Tensor

from ._inputs import as_sample_matrix
from .distances import sliced_wasserstein

if TYPE_CHECKING:
    from ..data.mixtures import GaussianMixture


def _class_rows(samples, labels: Tensor, name: str) -> dict[int, Tensor]:
    points = as_sample_matrix(name, samples).to(torch.float64)
    labels = torch.as_tensor(labels).reshape(-1).cpu()
    if labels.shape[0] != points.shape[0]:
        raise ValueError(f"{name} has {points.shape[0]} rows but {labels.shape[0]} labels")
    return {int(label): points[labels == label] for label in torch.unique(labels).tolist()}


def _per_class(samples, labels, reference, reference_labels, statistic: Callable[[Tensor, Tensor], float]) -> float:
    drawn = _class_rows(samples, labels, "samples")
    exact = _class_rows(reference, reference_labels, "reference")
    missing = sorted(set(drawn) - set(exact))
    if missing:
        raise ValueError(f"classes {missing} of the samples have no reference rows")
    small = sorted(label for label in drawn if min(drawn[label].shape[0], exact[label].shape[0]) < 2)
    if small:
        raise ValueError(f"classes {small} have fewer than 2 samples or reference rows")
    return statistics.fmean(statistic(drawn[label], exact[label]) for label in sorted(drawn))


def rms_spread(points: Tensor) -> float:
    """``sqrt(mean_i |x_i - mean(x)|^2)``: the root-mean-square distance of the rows to their mean."""
    return float(((points - points.mean(dim=0)) ** 2).sum(dim=1).mean().sqrt())


def per_class_sliced_w2(samples, labels, reference, reference_labels, num_projections: int = 128,
                        seed: int = 0) -> float:
    """``mean_c SW2(samples of class c, reference of class c)`` over the classes present in ``labels``."""
    return _per_class(samples, labels, reference, reference_labels,
                      lambda drawn, exact: sliced_wasserstein(drawn, exact, num_projections, seed))


def within_class_spread(samples, labels, reference, reference_labels) -> float:
    """``mean_c rms_spread(samples of class c) / rms_spread(reference of class c)`` (1: as varied as the data)."""
    return _per_class(samples, labels, reference, reference_labels,
                      lambda drawn, exact: rms_spread(drawn) / rms_spread(exact))


def class_mode_coverage(samples, labels, mixture: "GaussianMixture", min_share: float = 0.05,
                        num_std: float = 3.0) -> float:
    """Mean over the classes in ``labels`` of the share of the class's components that are covered: at least
    ``min_share`` of the class's samples lie within ``num_std`` standard deviations of the component mean."""
    if not 0 < min_share <= 1:
        raise ValueError(f"min_share={min_share!r} must lie in (0, 1]")
    drawn = _class_rows(samples, labels, "samples")
    shares = []
    for label, points in sorted(drawn.items()):
        components = (mixture.component_labels == label).nonzero().reshape(-1)
        if components.numel() == 0:
            raise ValueError(f"class {label} has no component in the mixture")
        distances = torch.cdist(points, mixture.means[components].to(torch.float64))
        near = distances < num_std * mixture.stds[components].to(torch.float64)
        covered = near.double().mean(dim=0) >= min_share
        shares.append(float(covered.double().mean()))
    return statistics.fmean(shares)
