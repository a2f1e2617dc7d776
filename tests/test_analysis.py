"""Analysis tools on exact oracles: NFE sweeps, trajectory geometry against closed forms, grid searches."""

from __future__ import annotations

import math
import re

import pytest
import torch

from ucgm.analysis import (
    SOLVER_NAMES,
    EvaluationSet,
    EvolutionSettings,
    evolve_time_grid,
    get_sampler,
    integrate_trajectory,
    model_trajectory_geometry,
    nfe_sweep,
    search_kumaraswamy,
    trajectory_geometry,
)
from ucgm.sampling.registry import FLOW_MATCHING_SAMPLER_NAMES, SAMPLER_NAMES, flow_matching_available
from ucgm.data.mixtures import GaussianMixture, OracleModel, eight_gaussians
from ucgm.metrics import sliced_wasserstein
from ucgm.sampling.ucgm_sampler import ucgm_sample
from ucgm.timegrids import kumaraswamy_grid
from ucgm.transports import make_transport

MEAN = [1.0, -0.5]


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    """The oracle's small tensor operations run much faster on one thread of a loaded 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def oracle() -> OracleModel:
    return OracleModel(eight_gaussians(), make_transport("linear"))


def make_noise(batch: int, seed: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(batch, 2, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def w2_to_mixture(oracle: OracleModel, num_reference: int, seed: int, num_projections: int = 128):
    reference, _ = oracle.mixture.sample(num_reference, generator=torch.Generator().manual_seed(seed))

    def sliced_w2(samples: torch.Tensor) -> float:
        return sliced_wasserstein(samples, reference, num_projections=num_projections)

    return sliced_w2


def evaluation_set(oracle: OracleModel, seed: int, size: int = 1000) -> EvaluationSet:
    return EvaluationSet(make_noise(size, seed), w2_to_mixture(oracle, size, seed + 100, num_projections=64))


# ------------------------------------------------------------------------------------------------ sweeps
def expected_nfe(name: str, budget: int) -> int:
    two_call = 2 * ((budget + 1) // 2) - 1
    return {"ucgm": budget, "ucgm-o2": budget, "ucgm-official": budget, "ucgm-o2-official": two_call,
            "euler": budget, "heun": two_call, "dpm++2m": budget, "edm": two_call}[name]


def test_sweep_records_and_exact_nfe(oracle):
    budgets = [1, 2, 3, 4, 8]
    records = nfe_sweep(oracle, oracle.transport, make_noise(256, 0), None, {name: None for name in SOLVER_NAMES},
                        budgets, w2_to_mixture(oracle, 256, 1))
    assert [(r["sampler"], r["nfe"]) for r in records] == [(n, b) for n in SOLVER_NAMES for b in budgets]
    for record in records:
        assert set(record) == {"sampler", "nfe", "actual_nfe", "metric", "value", "settings"}
        assert record["actual_nfe"] == expected_nfe(record["sampler"], record["nfe"])
        assert record["metric"] == "sliced_w2" and math.isfinite(record["value"])


def test_ucgm_order_two_without_end_gap_spends_even_budgets(oracle):
    sampler = get_sampler("ucgm-o2-official", {"gaps": (0.001, 0.0)})
    assert [sampler(oracle, oracle.transport, make_noise(16, 0), None, n, None).nfe for n in (2, 4, 5)] == [2, 4, 4]
    with pytest.raises(ValueError, match="below 2"):
        sampler(oracle, oracle.transport, make_noise(16, 0), None, 1, None)


def test_euler_sliced_w2_decreases_with_nfe(oracle):
    records = nfe_sweep(oracle, oracle.transport, make_noise(2000, 0), None, {"euler": None}, [1, 2, 4, 8],
                        w2_to_mixture(oracle, 2000, 1))
    values = [record["value"] for record in records]
    assert all(later < earlier for earlier, later in zip(values, values[1:])), values


def test_tagged_keys_run_several_settings_of_one_sampler(oracle):
    samplers = {"ucgm": {}, "ucgm:kappa0.3": {"extrapolation": 0.3, "time_warp": (1.17, 0.8, 1.1)}}
    records = nfe_sweep(oracle, oracle.transport, make_noise(256, 0), None, samplers, [4],
                        w2_to_mixture(oracle, 256, 1), metric_name="sw2")
    assert [r["sampler"] for r in records] == ["ucgm", "ucgm:kappa0.3"]
    assert records[1]["settings"]["extrapolation"] == 0.3 and records[0]["metric"] == "sw2"
    assert records[0]["value"] != records[1]["value"]


def test_sweep_is_deterministic_for_stochastic_samplers(oracle):
    samplers = {"edm": None, "ucgm": {"stochasticity": 0.5}}
    noise, metric = make_noise(256, 0), w2_to_mixture(oracle, 256, 1)
    first = nfe_sweep(oracle, oracle.transport, noise, None, samplers, [3, 5], metric, generator_seed=7)
    second = nfe_sweep(oracle, oracle.transport, noise, None, samplers, [3, 5], metric, generator_seed=7)
    other = nfe_sweep(oracle, oracle.transport, noise, None, samplers, [3, 5], metric, generator_seed=8)
    assert first == second
    assert [r["value"] for r in first] != [r["value"] for r in other]


@pytest.mark.skipif(not flow_matching_available(), reason="Meta's flow_matching is not installed")
def test_flow_matching_ode_solver_matches_euler_and_counts_calls(oracle):
    noise = make_noise(128, 0, torch.float64)
    meta = get_sampler("fm-euler")(oracle, oracle.transport, noise, None, 6, None, return_trajectory=True)
    ours = get_sampler("euler")(oracle, oracle.transport, noise, None, 6, None, return_trajectory=True)
    assert meta.nfe == 6 and torch.allclose(meta.sample, ours.sample, atol=1e-10)
    assert torch.allclose(meta.trajectory, ours.trajectory, atol=1e-10)
    midpoint = get_sampler("fm-midpoint")
    assert [midpoint(oracle, oracle.transport, noise, None, n, None).nfe for n in (2, 5, 8)] == [2, 4, 8]
    with pytest.raises(ValueError, match="smallest budget 2"):
        midpoint(oracle, oracle.transport, noise, None, 1, None)


def test_unknown_sampler_setting_and_budget_are_rejected(oracle):
    allowed = ", ".join(SAMPLER_NAMES + FLOW_MATCHING_SAMPLER_NAMES)
    assert {"ucgm", "ucgm-official", "euler", "ddim"} <= set(SAMPLER_NAMES)
    with pytest.raises(ValueError, match=f"unknown sampler 'no-such-sampler'; allowed: {re.escape(allowed)} "):
        get_sampler("no-such-sampler")
    with pytest.raises(ValueError, match="allowed: \\['t_max', 'times', 'skip_blocks'\\]"):
        get_sampler("euler", {"extrapolation": 0.5})
    with pytest.raises(ValueError, match="nfe=0"):
        get_sampler("ucgm")(oracle, oracle.transport, make_noise(8, 0), None, 0, None)
    with pytest.raises(ValueError, match="nfe=0"):
        nfe_sweep(oracle, oracle.transport, make_noise(8, 0), None, {"euler": None}, [0], float)
    with pytest.raises(ValueError, match="non-empty"):
        nfe_sweep(oracle, oracle.transport, make_noise(8, 0), None, {}, [1], float)


# ------------------------------------------------------------------------------------------ trajectories
def test_point_like_data_gives_straight_linear_paths():
    """Data N(m, s^2 I) with s -> 0 on the linear path: x_t = (1 - t) m + t z, a straight line at constant speed."""
    oracle = OracleModel(GaussianMixture([MEAN], 1e-3), make_transport("linear"))
    geometry = model_trajectory_geometry(oracle, oracle.transport, make_noise(500, 0, torch.float64), steps=200)
    assert geometry.straightness < 1e-4 and geometry.curvature < 1e-3


def test_straightness_of_same_covariance_gaussian_matches_closed_form():
    """Data N(m, I) on the linear path: the PF-ODE keeps u = (x_t - (1 - t) m) / c(t) = z with
    c(t) = sqrt((1 - t)^2 + t^2), so v - (x_1 - x_0) = c'(t) z and S = E|z|^2 int_0^1 c'^2 dt = E|z|^2 (2 - pi / 2):
    an equal covariance does not make linear-interpolation paths straight."""
    noise = make_noise(500, 0, torch.float64)
    oracle = OracleModel(GaussianMixture([MEAN], 1.0), make_transport("linear"))
    geometry = model_trajectory_geometry(oracle, oracle.transport, noise, steps=400)
    exact = float((noise**2).sum(dim=1).mean()) * (2 - math.pi / 2)
    assert geometry.straightness == pytest.approx(exact, rel=0.01)
    assert geometry.total_turning == pytest.approx(math.pi / 2, abs=0.05)


def test_trig_paths_of_same_covariance_gaussian_are_lines_with_varying_speed():
    """On the TrigFlow path x_t = cos(h t) m + z (h = pi / 2): a line (curvature 0) whose speed h sin(h t) |m| varies,
    so S = |m|^2 int_0^1 (1 - h sin(h t))^2 dt = |m|^2 (pi^2 / 8 - 1)."""
    oracle = OracleModel(GaussianMixture([MEAN], 1.0), make_transport("trigflow"))
    geometry = model_trajectory_geometry(oracle, oracle.transport, make_noise(200, 0, torch.float64), steps=400)
    assert geometry.curvature < 1e-6
    assert geometry.straightness == pytest.approx(1.25 * (math.pi**2 / 8 - 1), rel=0.01)


def test_mixture_paths_are_curved(oracle):
    geometry = model_trajectory_geometry(oracle, oracle.transport, make_noise(500, 0), steps=100)
    assert geometry.straightness > 0.5 and geometry.curvature > 0


def test_geometry_of_a_sampler_trajectory(oracle):
    result = ucgm_sample(oracle, oracle.transport, make_noise(200, 0), steps=8, return_trajectory=True)
    times = kumaraswamy_grid(8, gaps=(0.001, 0.001))
    assert trajectory_geometry(result.trajectory, times).straightness > 0
    with pytest.raises(ValueError, match="one per state"):
        trajectory_geometry(result.trajectory, times[:-1])
    trajectory, grid = integrate_trajectory(oracle, oracle.transport, make_noise(4, 0), steps=5)
    with pytest.raises(ValueError, match="strictly decreasing"):
        trajectory_geometry(trajectory, grid.flip(0))


# ------------------------------------------------------------------------------------------ grid search
SMALL_SEARCH = EvolutionSettings(population=10, generations=6, elite=3, seed=0)


def test_time_grid_search_beats_uniform_grid_on_held_out_samples(oracle):
    search, heldout = evaluation_set(oracle, 0), evaluation_set(oracle, 1)
    result = evolve_time_grid(oracle, oracle.transport, "euler", 4, search, heldout, SMALL_SEARCH)
    print(f"\nEuler NFE 4 searched grid {[round(t, 3) for t in result['best']]}: held-out sliced W2 "
          f"{result['heldout_value']:.4f} vs uniform {result['default_heldout_value']:.4f} (gain {result['gain']:.4f})")
    times = result["best"]
    assert len(times) == 5 and times[0] == 1.0 and times[-1] == 0.0
    assert all(a > b for a, b in zip(times, times[1:]))
    assert result["actual_nfe"] == 4 and result["search_value"] <= result["default_search_value"]
    assert result["gain"] >= 0 and result["gain"] == pytest.approx(
        result["default_heldout_value"] - result["heldout_value"])
    assert evolve_time_grid(oracle, oracle.transport, "euler", 4, search, heldout, SMALL_SEARCH) == result


def test_kumaraswamy_search_beats_default_warp_on_held_out_samples(oracle):
    search, heldout = evaluation_set(oracle, 0), evaluation_set(oracle, 1)
    result = search_kumaraswamy(oracle, oracle.transport, 4, search, heldout, SMALL_SEARCH, sampler="ucgm-official")
    print(f"\nUCGM-S NFE 4 searched {result['best']}: held-out sliced W2 {result['heldout_value']:.4f} vs default "
          f"{result['default_heldout_value']:.4f} (gain {result['gain']:.4f})")
    assert set(result["best"]) == {"time_warp", "extrapolation"} and len(result["times"]) == 5
    assert result["gain"] >= 0 and result["actual_nfe"] == 4


def test_grid_search_rejects_bad_input(oracle):
    search = evaluation_set(oracle, 0, size=64)
    with pytest.raises(ValueError, match="another seed"):
        evolve_time_grid(oracle, oracle.transport, "euler", 4, search, search, SMALL_SEARCH)
    with pytest.raises(ValueError, match="allowed: euler, heun, dpm\\+\\+2m"):
        evolve_time_grid(oracle, oracle.transport, "ucgm", 4, search, evaluation_set(oracle, 1, 64))
    with pytest.raises(ValueError, match="no inner time"):
        evolve_time_grid(oracle, oracle.transport, "heun", 2, search, evaluation_set(oracle, 1, 64))
    with pytest.raises(ValueError, match="allowed: 'ucgm', 'ucgm-o2'"):
        search_kumaraswamy(oracle, oracle.transport, 4, search, evaluation_set(oracle, 1, 64), sampler="euler")
    with pytest.raises(ValueError, match="elite=4 must be smaller"):
        EvolutionSettings(population=4, elite=4)
