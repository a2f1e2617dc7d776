"""The registry of samplers by name, each spending a requested number of network evaluations (NFE).

Every registered sampler has the signature ``(model, transport, noise, labels, nfe, generator,
return_trajectory=False, **settings) -> SampleResult``; :func:`get_sampler` binds the settings so that the result
has the uniform signature ``(model, transport, noise, labels, nfe, generator)``. The ODE samplers run on the
uniform grid ``uniform_grid(N, t_max)`` (setting ``t_max``, default 1), EDM on its Karras grid and UCGM-S on
``kumaraswamy_grid(N, time_warp, gaps)``. How each sampler spends its budget:

| name | sampler | intervals N for budget n | true NFE |
|---|---|---|---|
| ``ucgm`` | UCGM-S, order 1, ucgm's defaults (:data:`UCGM_DEFAULTS`) | N = n | n |
| ``ucgm-o2`` | UCGM-S, stable order 2 (data-prediction corrector, each corrector call reused), ucgm's defaults | N = n, all but the last corrected | n |
| ``ucgm-official`` | UCGM-S, order 1, the official defaults | N = n | n |
| ``ucgm-o2-official`` | UCGM-S, official order 2 (gap ``g1 > 0``) | N = floor((n + 1) / 2) | 2N - 1 |
| ``ucgm-o2-official`` | UCGM-S, official order 2 (gap ``g1 = 0``) | N = floor(n / 2) | 2N |
| ``euler``, ``dpm++2m`` | Euler, DPM-Solver++(2M) on a uniform grid | N = n | n |
| ``heun``, ``edm`` | Heun, EDM stochastic (last interval Euler) | N = floor((n + 1) / 2) | 2N - 1 |
| ``fm-euler`` | Meta ``flow_matching`` ``ODESolver``, Euler | N = n | n |
| ``fm-midpoint`` | Meta ``flow_matching`` ``ODESolver``, midpoint | N = floor(n / 2) | 2N |
| ``cm-multistep`` | CM's multistep sampler on Karras evaluation times | N = n | n |
| ``mcm`` | multistep consistency sampling over n segments | N = n | n |
| ``scm`` | sCM: jump to data, re-noise at the intermediate angles | N = n | n |
| ``caf`` | CAF: initial velocity, then N constant-acceleration steps | N = n - 1 (n >= 2) | N + 1 |
| ``dddm`` | DDDM: n refinements of the estimate at t = 1 | N = n | n |
| ``ddim`` | DDIM on a uniform grid (progressive / guided distillation) | N = n | n |
| ``ddim-stochastic`` | Meng et al.'s stochastic DDIM: 2-interval jump, 1-interval re-noise | N = n | n |
| ``cascade`` | a multi-resolution cascade: n split over the levels, each level its stage sampler | sum of levels | sum |
| ``flow-map`` | two-time flow map: n jumps on a uniform / Karras grid, CTM's gamma-sampling | N = n | n |
| ``shortcut`` | Shortcut: n jumps of step sizes 2^-k (dyadic grid), each conditioned on its step | N = n | n |
| ``generator`` | few-step generators (DMD, DMD2, MSD, SIM, CoSIM): jump to data, re-noise; a prefix of the trained times | N = n | n |

The true NFE is the largest one the sampler can reach without exceeding the budget (so an even budget for a
sampler of NFE 2N - 1 spends one call less); it is the ``nfe`` of the returned :class:`SampleResult`.
The ``fm-*`` samplers need the optional package ``flow_matching`` (``pip install flow_matching``).
"""

from __future__ import annotations

import functools
import importlib.util
import inspect
from typing import Callable, Mapping, Optional, Protocol, Sequence

import torch
from torch import Tensor

from ..conventions import from_flow_matching_time, to_flow_matching_time, velocity_to_flow_matching
from .caf_sampler import caf_sample
from .cascade_sampler import cascade_sample, check_refine_time, default_step_fractions, split_budget
from .consistency_sampler import consistency_sample, multistep_consistency_sample
from .dddm_sampler import dddm_sample
from .flow_map_sampler import dyadic_grid, flow_map_grid, flow_map_sample
from .ddim_sampler import ddim_sample, stochastic_ddim_sample
from .result import SampleResult
from .generator_sampler import generator_sample
from .scm_sampler import scm_sample
from .solvers import dpm_solver_pp_2m_sample, edm_stochastic_sample, euler_sample, heun_sample
from .ucgm_sampler import ucgm_sample
from ..models.skipping import StepSkipping, find_backbone
from ..timegrids import checked_grid, kumaraswamy_grid, uniform_grid
from ..transports import Transport
from ..validation import check_positive_int


class BudgetedSampler(Protocol):
    """``(model, transport, noise, labels, nfe, generator) -> SampleResult`` with ``result.nfe <= nfe``; the
    states on the sampler's grid come back in ``result.trajectory`` when ``return_trajectory``."""

    def __call__(self, model: Callable, transport: Transport, noise: Tensor, labels: Optional[Tensor], nfe: int,
                 generator: Optional[torch.Generator], return_trajectory: bool = False) -> SampleResult: ...


UCGM_SETTINGS = ("stochasticity", "extrapolation", "time_warp", "gaps", "cfg_scale", "cfg_interval",
                 "time_difference", "times", "skip_blocks", "extrapolation_form", "corrector",
                 "reuse_corrector_call")
ODE_SETTINGS = ("t_max",)
#: Settings of a searched schedule (:mod:`ucgm.sampling.schedules`): an explicit grid, blocks skipped per step.
GRID_SETTINGS = ("times", "skip_blocks")
CASCADE_SETTINGS = ("levels", "step_fractions", "stage_sampler", "stage_settings", "refine_time")
EDM_SETTINGS = ("s_churn", "s_tmin", "s_tmax", "s_noise")
#: The official UCGM-S boundary gaps (g0, g1), read from :func:`~ucgm.sampling.ucgm_sampler.ucgm_sample`.
DEFAULT_GAPS = tuple(inspect.signature(ucgm_sample).parameters["gaps"].default)
#: ucgm's UCGM-S defaults, order 1 (``docs/ucgm_sampler.md`` has the measurements that chose them, on models other
#: than the benchmark's): the grid runs from t = 1 to t = 0 without end gaps (the official gap g1 = 0.001 spends
#: the last call at t ~ 0.001, where the prediction equals the state), warped toward the data end, and the data
#: prediction is extrapolated from the second step on (a multistep update at one call per step).
UCGM_DEFAULTS = {"gaps": (0.0, 0.0), "time_warp": (1.0, 1.7, 1.0), "extrapolation": 0.4, "extrapolation_form": "data"}
#: ucgm's stable order 2: the data-prediction corrector (never divides by gamma, which vanishes at t = 1) whose
#: call is the next step's prediction (n calls, n intervals, all but the last corrected), no end gaps, the
#: order-1 warp, the data-form extrapolation of the predictor.
UCGM_O2_DEFAULTS = {"gaps": (0.0, 0.0), "time_warp": (1.0, 1.7, 1.0), "corrector": "data",
                    "reuse_corrector_call": True, "extrapolation": 0.3, "extrapolation_form": "data"}
#: The UCGM-S registry names: (order, default settings); ``*-official`` are the official sampler (parity).
UCGM_SAMPLERS = {"ucgm": (1, UCGM_DEFAULTS), "ucgm-o2": (2, UCGM_O2_DEFAULTS), "ucgm-official": (1, {}),
                 "ucgm-o2-official": (2, {})}


#: The largest budget any sampler accepts (far beyond where more steps change a sample).
MAX_NFE = 10_000


def _check_nfe(name: str, nfe: int, minimum: int = 1) -> None:
    check_positive_int("nfe", nfe)
    if nfe < minimum:
        raise ValueError(f"nfe={nfe} is below the smallest budget {minimum} of sampler {name!r}")
    if nfe > MAX_NFE:
        raise ValueError(f"nfe={nfe} is above the largest budget {MAX_NFE} of sampler {name!r}; allowed: "
                         f"{minimum} to {MAX_NFE} network evaluations per sample")


def two_call_intervals(nfe: int) -> int:
    """Intervals ``N = floor((n + 1) / 2)`` of a sampler with NFE ``2N - 1`` (Heun, EDM, UCGM-S order 2)."""
    return (nfe + 1) // 2


def ucgm_settings(name: str, settings: Optional[Mapping[str, object]] = None) -> dict:
    """The settings UCGM-S sampler ``name`` (a key of :data:`UCGM_SAMPLERS`) runs with: its defaults, then
    ``settings``."""
    if name not in UCGM_SAMPLERS:
        raise ValueError(f"{name!r} is not a UCGM-S sampler; allowed: {', '.join(UCGM_SAMPLERS)}")
    return {**UCGM_SAMPLERS[name][1], **(settings or {})}


def ucgm_intervals(name: str, nfe: int, settings: Optional[Mapping[str, object]] = None) -> int:
    """Intervals N of UCGM-S sampler ``name`` at budget ``nfe`` (``settings`` over its defaults): ``n`` at order 1;
    ``ucgm-o2``: ``n`` with ``reuse_corrector_call`` (all but the last corrected, each corrector call reused as
    the next step's), else ``floor(n / 2) + 1`` (the first ``n - N`` corrected, so every call is spent);
    ``ucgm-o2-official``: ``floor((n + 1) / 2)`` when the gap ``g1 > 0`` (NFE ``2N - 1``) and ``floor(n / 2)``
    when ``g1 = 0`` (NFE ``2N``)."""
    _check_nfe(name, nfe)
    order, _ = UCGM_SAMPLERS[name] if name in UCGM_SAMPLERS else (None, None)
    if order is None:
        raise ValueError(f"{name!r} is not a UCGM-S sampler; allowed: {', '.join(UCGM_SAMPLERS)}")
    if order == 1:
        return nfe
    if name == "ucgm-o2":
        return nfe if ucgm_settings(name, settings).get("reuse_corrector_call") else nfe // 2 + 1
    if float(ucgm_settings(name, settings).get("gaps", DEFAULT_GAPS)[1]) != 0.0:
        return two_call_intervals(nfe)
    if nfe < 2:
        raise ValueError(f"nfe={nfe} is below 2, the smallest budget of {name!r} with gap g1 = 0")
    return nfe // 2


def _ucgm(name: str, model, transport, noise, labels, nfe, generator, return_trajectory: bool = False,
          **settings) -> SampleResult:
    order = UCGM_SAMPLERS[name][0]
    settings = ucgm_settings(name, settings)
    intervals = ucgm_intervals(name, nfe, settings)
    reuse = bool(settings.get("reuse_corrector_call"))
    # ucgm_sample runs ceil(steps / 2) intervals at order 2, steps intervals when the corrector's call is reused
    steps = intervals if order == 1 or reuse else 2 * intervals
    if name == "ucgm-o2" and not reuse:
        settings["corrections"] = nfe - intervals
    return ucgm_sample(model, transport, noise, labels, steps=steps, order=order, generator=generator,
                       return_trajectory=return_trajectory, **settings)


def _grid(intervals: int, t_max: float, times: Optional[Sequence[float]]) -> Tensor:
    """The uniform grid of ``intervals`` from ``t_max``, or the explicit ``times`` (checked to have as many)."""
    return uniform_grid(intervals, t_max=t_max) if times is None else checked_grid(times, intervals)


def _one_call_ode(solver: Callable, name: str, model, transport, noise, labels, nfe, generator,
                  return_trajectory: bool = False, t_max: float = 1.0,
                  times: Optional[Sequence[float]] = None) -> SampleResult:
    _check_nfe(name, nfe)
    return solver(model, transport, noise, labels, times=_grid(nfe, t_max, times),
                  return_trajectory=return_trajectory)


def _heun(model, transport, noise, labels, nfe, generator, return_trajectory: bool = False,
          t_max: float = 1.0, times: Optional[Sequence[float]] = None) -> SampleResult:
    _check_nfe("heun", nfe)
    return heun_sample(model, transport, noise, labels, times=_grid(two_call_intervals(nfe), t_max, times),
                       return_trajectory=return_trajectory)


def _edm(model, transport, noise, labels, nfe, generator, return_trajectory: bool = False,
         **settings) -> SampleResult:
    _check_nfe("edm", nfe)
    return edm_stochastic_sample(model, transport, noise, labels, steps=two_call_intervals(nfe),
                                 generator=generator, return_trajectory=return_trajectory, **settings)


def flow_matching_available() -> bool:
    """Whether Meta's optional ``flow_matching`` package can be imported."""
    return importlib.util.find_spec("flow_matching") is not None


def _flow_matching_ode(method: str, model, transport, noise, labels, nfe, generator,
                       return_trajectory: bool = False, t_max: float = 1.0) -> SampleResult:
    """Meta's ``ODESolver`` on the probability-flow ODE, in Meta's time ``t_m = 1 - t`` (0 = noise) with the
    velocity ``v_m(x, t_m) = -v(x, 1 - t_m)``, from ``x = alpha(t_max) z`` at ``t_m = 1 - t_max`` to ``t_m = 1``;
    the sample is the end state divided by ``gamma(0)``."""
    name = f"fm-{method}"
    calls_per_step = 2 if method == "midpoint" else 1
    _check_nfe(name, nfe, minimum=calls_per_step)
    from flow_matching.solver import ODESolver

    calls = 0

    def meta_velocity(x: Tensor, t: Tensor) -> Tensor:
        nonlocal calls
        calls += 1
        time = torch.as_tensor(from_flow_matching_time(t), dtype=x.dtype, device=x.device).expand(x.shape[0])
        prediction = transport.predict(model, x, time, labels)
        return velocity_to_flow_matching(transport.velocity(prediction.data, prediction.noise, time))

    ucgm_grid = uniform_grid(nfe // calls_per_step, t_max=t_max)
    meta_grid = to_flow_matching_time(ucgm_grid).to(dtype=noise.dtype, device=noise.device)
    initial = transport.alpha(ucgm_grid[0]).to(noise.dtype) * noise
    states = ODESolver(meta_velocity).sample(initial, step_size=None, method=method, time_grid=meta_grid,
                                            return_intermediates=True)
    sample = states[-1] / transport.gamma(ucgm_grid[-1]).to(noise.dtype)
    trajectory = torch.cat([states[:-1], sample[None]]) if return_trajectory else None
    return SampleResult(sample, trajectory, calls)


def _cm_multistep(model, transport, noise, labels, nfe, generator, return_trajectory: bool = False,
                  **settings) -> SampleResult:
    _check_nfe("cm-multistep", nfe)
    return consistency_sample(model, transport, noise, labels, steps=nfe, generator=generator,
                              return_trajectory=return_trajectory, **settings)


def _mcm(model, transport, noise, labels, nfe, generator, return_trajectory: bool = False,
         **settings) -> SampleResult:
    _check_nfe("mcm", nfe)
    return multistep_consistency_sample(model, transport, noise, labels, segments=nfe,
                                        return_trajectory=return_trajectory, **settings)


def _scm(model, transport, noise, labels, nfe, generator, return_trajectory: bool = False,
         **settings) -> SampleResult:
    _check_nfe("scm", nfe)
    return scm_sample(model, transport, noise, labels, steps=nfe, generator=generator,
                      return_trajectory=return_trajectory, **settings)


def _ddim(stochastic: bool, model, transport, noise, labels, nfe, generator, return_trajectory: bool = False
          ) -> SampleResult:
    _check_nfe("ddim-stochastic" if stochastic else "ddim", nfe)
    if stochastic:
        return stochastic_ddim_sample(model, transport, noise, labels, steps=nfe, generator=generator,
                                      return_trajectory=return_trajectory)
    return ddim_sample(model, transport, noise, labels, steps=nfe, return_trajectory=return_trajectory)


def _caf(model, transport, noise, labels, nfe, generator, return_trajectory: bool = False,
         **settings) -> SampleResult:
    _check_nfe("caf", nfe, minimum=2)
    return caf_sample(model, transport, noise, labels, steps=nfe - 1, return_trajectory=return_trajectory,
                      **settings)


def _dddm(model, transport, noise, labels, nfe, generator, return_trajectory: bool = False,
          **settings) -> SampleResult:
    _check_nfe("dddm", nfe)
    return dddm_sample(model, transport, noise, labels, steps=nfe, generator=generator,
                       return_trajectory=return_trajectory, **settings)


#: Stage samplers a cascade can start at a refinement time (they run an explicit grid, ``times``).
REFINE_STAGE_SAMPLERS = ("ucgm", "ucgm-o2", "euler", "heun", "dpm++2m")


def stage_grid(name: str, nfe: int, settings: Optional[Mapping[str, object]] = None) -> Tensor:
    """The grid from t = 1 that stage sampler ``name`` runs at budget ``nfe``: UCGM-S its warped grid
    (:func:`~ucgm.timegrids.kumaraswamy_grid` with its settings' warp and gaps), the ODE solvers the uniform one."""
    if name not in REFINE_STAGE_SAMPLERS:
        raise ValueError(f"a cascade refinement from refine_time < 1 needs a stage sampler with a time grid; "
                         f"{name!r} has none; allowed: {', '.join(REFINE_STAGE_SAMPLERS)}")
    if name in UCGM_SAMPLERS:
        full = ucgm_settings(name, settings)
        return kumaraswamy_grid(ucgm_intervals(name, nfe, full), full.get("time_warp", (1.0, 1.0, 1.0)),
                                full.get("gaps", DEFAULT_GAPS))
    return uniform_grid(two_call_intervals(nfe) if name == "heun" else nfe)


def _cascade(model, transport, noise, labels, nfe, generator, return_trajectory: bool = False, levels: int = 2,
             step_fractions: Optional[Sequence[float]] = None, stage_sampler: str = "ucgm",
             stage_settings: Optional[Mapping[str, object]] = None, refine_time: float = 1.0) -> SampleResult:
    """A cascade (:mod:`~ucgm.sampling.cascade_sampler`): budget ``nfe`` split over ``levels`` by
    ``step_fractions``, every level sampled by ``stage_sampler`` with ``stage_settings``; ``refine_time < 1``:
    the levels above 0 start from the upsampled lower level noised to that time and run the stage's own grid
    scaled by it (:func:`stage_grid`)."""
    if return_trajectory:
        raise ValueError("the cascade sampler returns no trajectory (its levels have different shapes)")
    fractions = list(step_fractions or default_step_fractions(levels))
    if len(fractions) != levels:
        raise ValueError(f"step_fractions={fractions} must list one fraction per level ({levels})")
    refine_time = check_refine_time(refine_time)
    stage = get_sampler(stage_sampler, stage_settings)

    def refine_stage(budget: int) -> BudgetedSampler:
        times = (refine_time * stage_grid(stage_sampler, budget, stage_settings)).tolist()
        return get_sampler(stage_sampler, {**(stage_settings or {}), "times": times})

    return cascade_sample(model, transport, noise, labels, split_budget(nfe, fractions), stage, generator,
                          refine_time, refine_stage if refine_time < 1 else None)


def _flow_map(model, transport, noise, labels, nfe, generator, return_trajectory: bool = False,
              grid: str = "uniform", t_max: float = 1.0, t_min: float = 0.0, sigma_min: float = 0.002,
              sigma_max: float = 80.0, rho: float = 7.0, times: Optional[Sequence[float]] = None,
              gamma: float = 0.0, clip: Optional[float] = None, karras_points: Optional[int] = None
              ) -> SampleResult:
    """``nfe`` flow-map jumps on :func:`~ucgm.sampling.flow_map_sampler.flow_map_grid` with CTM's ``gamma``."""
    _check_nfe("flow-map", nfe)
    grid_times = flow_map_grid(transport.path, nfe, grid, t_max, t_min, sigma_min, sigma_max, rho, times,
                               karras_points)
    return flow_map_sample(model, transport, noise, labels, times=grid_times, gamma=gamma, clip=clip,
                           generator=generator, return_trajectory=return_trajectory)


def _shortcut(model, transport, noise, labels, nfe, generator, return_trajectory: bool = False,
              clip: Optional[float] = None) -> SampleResult:
    """``nfe`` shortcut jumps of step sizes ``2^-k`` (:func:`~ucgm.sampling.flow_map_sampler.dyadic_grid`)."""
    _check_nfe("shortcut", nfe)
    return flow_map_sample(model, transport, noise, labels, times=dyadic_grid(nfe), clip=clip,
                           generator=generator, return_trajectory=return_trajectory)


def _generator(model, transport, noise, labels, nfe, generator, return_trajectory: bool = False,
               times: Optional[Sequence[float]] = None) -> SampleResult:
    _check_nfe("generator", nfe)
    return generator_sample(model, transport, noise, labels, steps=nfe, times=times, generator=generator,
                            return_trajectory=return_trajectory)


#: Samplers of any model of the probability-flow ODE / SDE.
SOLVER_NAMES = ("ucgm", "ucgm-o2", "ucgm-official", "ucgm-o2-official", "euler", "heun", "dpm++2m", "edm")
#: Samplers of models trained by a particular method (each method names its own, :meth:`Method.sampler`).
METHOD_SAMPLER_NAMES = ("cm-multistep", "mcm", "scm", "caf", "dddm", "ddim", "ddim-stochastic", "cascade",
                        "flow-map", "shortcut", "generator")
SAMPLER_NAMES = SOLVER_NAMES + METHOD_SAMPLER_NAMES
FLOW_MATCHING_SAMPLER_NAMES = ("fm-euler", "fm-midpoint")

SAMPLERS: dict[str, Callable[..., SampleResult]] = {
    **{name: functools.partial(_ucgm, name) for name in UCGM_SAMPLERS},
    "euler": functools.partial(_one_call_ode, euler_sample, "euler"),
    "heun": _heun,
    "dpm++2m": functools.partial(_one_call_ode, dpm_solver_pp_2m_sample, "dpm++2m"),
    "edm": _edm,
    "fm-euler": functools.partial(_flow_matching_ode, "euler"),
    "fm-midpoint": functools.partial(_flow_matching_ode, "midpoint"),
    "cm-multistep": _cm_multistep,
    "mcm": _mcm,
    "scm": _scm,
    "caf": _caf,
    "dddm": _dddm,
    "ddim": functools.partial(_ddim, False),
    "ddim-stochastic": functools.partial(_ddim, True),
    "cascade": _cascade,
    "flow-map": _flow_map,
    "shortcut": _shortcut,
    "generator": _generator,
}

ALLOWED_SETTINGS: dict[str, tuple[str, ...]] = {
    **{name: UCGM_SETTINGS for name in UCGM_SAMPLERS}, "euler": ODE_SETTINGS + GRID_SETTINGS,
    "heun": ODE_SETTINGS + GRID_SETTINGS,
    "dpm++2m": ODE_SETTINGS + GRID_SETTINGS, "edm": EDM_SETTINGS, "fm-euler": ODE_SETTINGS, "fm-midpoint": ODE_SETTINGS,
    "cm-multistep": ("sigma_min", "sigma_max", "rho"), "mcm": ("sigma_min", "sigma_max", "sigma_data", "eta"),
    "scm": ("intermediate_angles",),
    "caf": ("clip",),
    "dddm": ("t_max", "clip"),
    "ddim": (), "ddim-stochastic": (),
    "cascade": CASCADE_SETTINGS,
    "flow-map": ("grid", "t_max", "t_min", "sigma_min", "sigma_max", "rho", "times", "gamma", "clip",
                 "karras_points"),
    "shortcut": ("clip",),
    "generator": ("times",),
}


def available_sampler_names() -> tuple[str, ...]:
    """The core names, plus ``fm-euler`` and ``fm-midpoint`` when ``flow_matching`` is installed."""
    return SAMPLER_NAMES + (FLOW_MATCHING_SAMPLER_NAMES if flow_matching_available() else ())


def registry_name(key: str) -> str:
    """The registry name of a sweep key ``"name"`` or ``"name:tag"`` (e.g. ``"ucgm:kappa0.3"``)."""
    return key.split(":", 1)[0]


def get_sampler(name: str, settings: Optional[Mapping[str, object]] = None) -> BudgetedSampler:
    """The sampler ``name`` (or ``"name:tag"``) with ``settings`` bound: ``(model, transport, noise, labels, nfe,
    generator) -> SampleResult``. Unknown names or settings raise ``ValueError`` listing the allowed ones; an
    ``fm-*`` name without ``flow_matching`` installed raises ``ImportError``."""
    base = registry_name(name)
    if base not in SAMPLERS:
        raise ValueError(
            f"unknown sampler {name!r}; allowed: {', '.join(SAMPLER_NAMES + FLOW_MATCHING_SAMPLER_NAMES)} "
            f"(the fm-* ones need flow_matching), optionally followed by ':tag'"
        )
    if base in FLOW_MATCHING_SAMPLER_NAMES and not flow_matching_available():
        raise ImportError(f"sampler {base!r} needs Meta's flow_matching package: pip install flow_matching")
    settings = dict(settings or {})
    unknown = sorted(set(settings) - set(ALLOWED_SETTINGS[base]))
    if unknown:
        raise ValueError(f"unknown settings {unknown} for sampler {base!r}; allowed: {list(ALLOWED_SETTINGS[base])}")
    skip_blocks = settings.pop("skip_blocks", None)
    if skip_blocks is not None and settings.get("times") is None:
        raise ValueError(f"sampler {base!r}: skip_blocks needs the schedule's times (the steps it refers to)")
    return _trajectories(functools.partial(SAMPLERS[base], **settings), settings.get("times"), skip_blocks)


def _trajectories(bound: Callable[..., SampleResult], times: Optional[Sequence[float]],
                  skip_blocks: Optional[Sequence[Sequence[int]]]) -> BudgetedSampler:
    """``bound`` run as one trajectory per call: a transport that carries state along a trajectory (e.g.
    self-conditioning's previous estimate) is told it starts (``transport.begin_sampling()``), and with
    ``skip_blocks`` the backbone skips ``skip_blocks[i]`` at step ``i`` of ``times``
    (:class:`~ucgm.models.skipping.StepSkipping`)."""

    def run(model, transport, noise, labels, nfe, generator, return_trajectory: bool = False) -> SampleResult:
        begin = getattr(transport, "begin_sampling", None)
        if begin is not None:
            begin()
        if skip_blocks is not None:
            network_times = transport.network_time(checked_grid(times)[:-1])
            model = StepSkipping(model, find_backbone(model), network_times, skip_blocks)
        return bound(model, transport, noise, labels, nfe, generator, return_trajectory=return_trajectory)

    return run
