"""Evaluation metrics: sample distances, feature-space metrics, mixture-aware metrics and ODE likelihoods."""

from .distances import energy_distance, mmd, sliced_wasserstein
from .features import frechet_distance, frechet_distance_from_features, prdc
from .likelihood import ode_log_likelihood
from .modes import mixture_log_likelihood, mode_coverage

__all__ = [
    "energy_distance",
    "frechet_distance",
    "frechet_distance_from_features",
    "mixture_log_likelihood",
    "mmd",
    "mode_coverage",
    "ode_log_likelihood",
    "prdc",
    "sliced_wasserstein",
]
