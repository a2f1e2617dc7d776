"""Analysis tools: NFE sweeps across samplers, trajectory straightness and curvature, time-grid searches."""

from .evolution import EvolutionSettings
from .gridsearch import EvaluationSet, evolve_time_grid, search_kumaraswamy
from ..sampling.registry import (
    FLOW_MATCHING_SAMPLER_NAMES,
    SAMPLER_NAMES,
    SOLVER_NAMES,
    available_sampler_names,
    get_sampler,
)
from .sweeps import nfe_sweep
from .trajectories import (
    TrajectoryGeometry,
    curvature,
    integrate_trajectory,
    model_trajectory_geometry,
    segment_velocities,
    straightness,
    total_turning,
    trajectory_geometry,
    turning_angles,
)

__all__ = [
    "FLOW_MATCHING_SAMPLER_NAMES",
    "SAMPLER_NAMES",
    "SOLVER_NAMES",
    "EvaluationSet",
    "EvolutionSettings",
    "TrajectoryGeometry",
    "available_sampler_names",
    "curvature",
    "evolve_time_grid",
    "get_sampler",
    "integrate_trajectory",
    "model_trajectory_geometry",
    "nfe_sweep",
    "search_kumaraswamy",
    "segment_velocities",
    "straightness",
    "total_turning",
    "trajectory_geometry",
    "turning_angles",
]
