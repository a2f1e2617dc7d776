"""ucgm's UCGM-S defaults and stable order 2 next to the official sampler: registry names, exact equivalences,
budgets, convergence on a closed-form ODE, no division by a vanishing gamma, config defaults."""

import pytest
import torch

from ucgm.data.mixtures import GaussianMixture, OracleModel, eight_gaussians
from ucgm.sampling.registry import UCGM_DEFAULTS, UCGM_O2_DEFAULTS, get_sampler, ucgm_intervals
from ucgm.sampling.seeded import resolve_sampler
from ucgm.sampling.settings import SamplingConfig
from ucgm.sampling.ucgm_sampler import data_prediction_step, ucgm_sample
from ucgm.timegrids import kumaraswamy_grid
from ucgm.transports import make_transport

MEAN, STD = 0.7, 0.4


def gaussian_oracle() -> OracleModel:
    """Exact predictions of data N(MEAN, STD^2 I) in 2-D on the Linear path."""
    return OracleModel(GaussianMixture(torch.full((1, 2), MEAN), STD), make_transport("linear"))


def noise(count: int = 512, seed: int = 0) -> torch.Tensor:
    return torch.randn(count, 2, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def ode_error(sampler: str, nfe: int, settings=None) -> float:
    """RMS distance of the samples to the exact probability-flow endpoint ``MEAN + STD z`` (x_1 = z at t = 1),
    within budget ``nfe`` (the official order 2 spends ``2N - 1`` calls, so one fewer at even budgets)."""
    oracle, z = gaussian_oracle(), noise()
    result = get_sampler(sampler, settings)(oracle, oracle.transport, z, None, nfe, None)
    assert result.nfe <= nfe
    return float(((result.sample - (MEAN + STD * z)) ** 2).sum(dim=1).mean().sqrt())


def test_official_names_are_ucgm_sample_with_its_defaults():
    oracle, z = OracleModel(eight_gaussians(), make_transport("linear")), noise(64).float()
    for nfe in (3, 8):
        official = get_sampler("ucgm-official")(oracle, oracle.transport, z, None, nfe, None)
        assert torch.equal(official.sample, ucgm_sample(oracle, oracle.transport, z, steps=nfe).sample)
        second = get_sampler("ucgm-o2-official")(oracle, oracle.transport, z, None, nfe, None)
        direct = ucgm_sample(oracle, oracle.transport, z, steps=2 * ((nfe + 1) // 2), order=2)
        assert torch.equal(second.sample, direct.sample) and second.nfe == direct.nfe == 2 * ((nfe + 1) // 2) - 1
    ours = get_sampler("ucgm")(oracle, oracle.transport, z, None, 6, None)
    assert torch.equal(ours.sample, ucgm_sample(oracle, oracle.transport, z, steps=6, **UCGM_DEFAULTS).sample)


def test_data_form_extrapolation_is_the_multistep_data_update():
    """kappa in the data form: x_hat <- x_hat + kappa (x_hat - x_hat_prev) from the second step, then the
    data-prediction step; checked against a loop written from the formula."""
    oracle, z = OracleModel(eight_gaussians(), make_transport("linear")), noise(128)
    transport, kappa = oracle.transport, 0.4
    times = kumaraswamy_grid(5, (1.0, 1.3, 1.0), (0.0, 0.0))
    state, previous = z.clone(), None
    for i in range(5):
        data = transport.predict(oracle, state, times[i].expand(128)).data
        extrapolated = data if previous is None else data + kappa * (data - previous)
        previous = data
        state = data_prediction_step(transport, state, extrapolated, times[i], times[i + 1])
    last_raw = data
    result = ucgm_sample(oracle, transport, z, steps=5, extrapolation=kappa, time_warp=(1.0, 1.3, 1.0),
                         gaps=(0.0, 0.0), extrapolation_form="data", return_trajectory=True)
    torch.testing.assert_close(result.sample, last_raw, rtol=1e-12, atol=1e-12)
    # the state before the last step equals the loop's (the trajectory holds x_0 .. x_{N-1}, then the sample)
    assert torch.isfinite(result.trajectory).all() and result.trajectory.shape[0] == 6


@pytest.mark.parametrize("transport_name", ["linear", "vp"])
@pytest.mark.parametrize("warp", [(1.0, 1.0, 1.0), (1.0, 1.7, 1.0)])
def test_log_snr_extrapolation_at_one_half_is_dpm_solver_pp_2m(transport_name, warp):
    """kappa / r with kappa = 0.5 is DPM-Solver++(2M)'s D = x_hat + (x_hat - x_hat_prev) / (2 r) on the same grid,
    first order from t = 1 (lambda = -inf) and into t = 0 (lambda = inf)."""
    oracle, z = OracleModel(eight_gaussians(), make_transport(transport_name)), noise(256)
    for intervals in (2, 5, 9):
        grid = kumaraswamy_grid(intervals, warp, (0.0, 0.0))
        ours = ucgm_sample(oracle, oracle.transport, z, steps=intervals, extrapolation=0.5,
                           extrapolation_form="log-snr", times=grid, return_trajectory=True)
        dpm = get_sampler("dpm++2m", {"times": grid})(oracle, oracle.transport, z, None, intervals, None,
                                                      return_trajectory=True)
        torch.testing.assert_close(ours.trajectory, dpm.trajectory, rtol=0, atol=1e-7)
        assert ours.nfe == dpm.nfe == intervals
    euler_form = ucgm_sample(oracle, oracle.transport, z, steps=5, extrapolation=0.5, extrapolation_form="data",
                             time_warp=warp, gaps=(0.0, 0.0))
    assert (euler_form.sample - ours.sample).abs().max() > 1e-3  # the step ratio matters on these grids


def test_reused_corrector_call_is_the_next_steps_prediction():
    """reuse_corrector_call: the data corrector's call at the predicted state is the next step's prediction, so
    N calls run N intervals (all but the last corrected); checked against a loop written from the formula."""
    oracle, z = OracleModel(eight_gaussians(), make_transport("linear")), noise(128)
    transport, kappa, intervals = oracle.transport, 0.3, 6
    times = kumaraswamy_grid(intervals, (1.0, 1.7, 1.0), (0.0, 0.0))

    def data(x, t):
        return transport.predict(oracle, x, t.expand(x.shape[0])).data

    state, carried, previous = z.clone(), None, None
    for i in range(intervals):
        raw = data(state, times[i]) if carried is None else carried
        extrapolated = raw if previous is None else raw + kappa * (raw - previous)
        previous = raw
        predicted = data_prediction_step(transport, state, extrapolated, times[i], times[i + 1])
        if i < intervals - 1:
            carried = data(predicted, times[i + 1])
            state = data_prediction_step(transport, state, 0.5 * raw + 0.5 * carried, times[i], times[i + 1])
    result = ucgm_sample(oracle, transport, z, steps=intervals, order=2, corrector="data", reuse_corrector_call=True,
                         extrapolation=kappa, extrapolation_form="data", times=times, return_trajectory=True)
    torch.testing.assert_close(result.sample, raw, rtol=1e-10, atol=1e-10)
    assert result.nfe == intervals and result.trajectory.shape[0] == intervals + 1
    uncorrected = ucgm_sample(oracle, transport, z, steps=intervals, order=2, corrector="data",
                              reuse_corrector_call=True, corrections=0, extrapolation=kappa, extrapolation_form="data",
                              times=times)
    order_one = ucgm_sample(oracle, transport, z, steps=intervals, extrapolation=kappa, extrapolation_form="data",
                            times=times)
    assert torch.equal(uncorrected.sample, order_one.sample) and uncorrected.nfe == intervals


def test_reused_corrector_call_converges_at_second_order_at_one_call_per_interval():
    """Gaussian data, uniform grid, kappa = 0: doubling the calls (= intervals) divides the error by a ratio
    approaching 4 (measured 2.8, 3.1, 3.3 from 8 -> 16 -> 32 -> 64 calls); Euler's approaches 2 (1.98)."""
    settings = {"time_warp": (1.0, 1.0, 1.0), "reuse_corrector_call": True, "extrapolation": 0.0}
    coarse, fine = ode_error("ucgm-o2", 32, settings), ode_error("ucgm-o2", 64, settings)
    assert coarse / fine > 3.0 and ode_error("euler", 32) / ode_error("euler", 64) < 2.1
    assert fine < 0.25 * ode_error("euler", 64)


def test_stable_order_two_spends_every_call_and_official_order_two_does_not():
    for nfe in range(1, 10):
        intervals = ucgm_intervals("ucgm-o2", nfe)
        oracle = gaussian_oracle()
        result = get_sampler("ucgm-o2")(oracle, oracle.transport, noise(8), None, nfe, None)
        assert intervals == nfe and result.nfe == nfe  # each corrector call is the next step's prediction
        without_reuse = {"reuse_corrector_call": False}
        result = get_sampler("ucgm-o2", without_reuse)(oracle, oracle.transport, noise(8), None, nfe, None)
        assert ucgm_intervals("ucgm-o2", nfe, without_reuse) == nfe // 2 + 1 and result.nfe == nfe
    assert ucgm_intervals("ucgm-o2-official", 8) == 4 and ucgm_intervals("ucgm-o2-official", 8, {"gaps": (0, 0)}) == 4


def test_stable_order_two_converges_at_second_order_on_a_closed_form_ode():
    """Data N(m, s^2 I): the exact ODE endpoint of noise z is m + s z. Doubling the intervals divides the stable
    order-2 error by a ratio approaching 4 (measured 2.4, 2.7, 3.0 from 5 -> 9, 9 -> 17, 17 -> 33 intervals) and the
    order-1 (Euler) error by one approaching 2 (1.9). Without the reused call: N = n / 2 + 1 intervals."""
    settings = {"time_warp": (1.0, 1.0, 1.0), "reuse_corrector_call": False, "extrapolation": 0.0}
    coarse, fine = ode_error("ucgm-o2", 33, settings), ode_error("ucgm-o2", 65, settings)  # 17 and 33 intervals
    euler_coarse, euler_fine = ode_error("euler", 17), ode_error("euler", 33)
    assert coarse / fine > 2.8 and euler_coarse / euler_fine < 2.1
    assert fine < euler_fine


@pytest.mark.parametrize("nfe", [4, 8, 16])
def test_stable_order_two_beats_official_order_one_and_two_on_the_exact_ode(nfe):
    mine = ode_error("ucgm-o2", nfe)
    assert mine < ode_error("ucgm-official", nfe) and mine < ode_error("ucgm-o2-official", nfe)


def test_official_corrector_divides_by_vanishing_gamma_and_stable_one_does_not():
    oracle, z = gaussian_oracle(), noise(32)
    with pytest.raises(ValueError, match="x_t contains NaN or Inf"):  # the corrector's state at t_1 after 0 / 0
        ucgm_sample(oracle, oracle.transport, z, steps=8, order=2, gaps=(0.0, 0.0))
    stable = ucgm_sample(oracle, oracle.transport, z, steps=8, order=2, gaps=(0.0, 0.0), corrector="data")
    assert torch.isfinite(stable.sample).all()


def test_bad_corrections_and_forms_are_rejected():
    oracle, z = gaussian_oracle(), noise(4)
    with pytest.raises(ValueError, match="corrections=5 must be an integer from 0 to the 4 intervals"):
        ucgm_sample(oracle, oracle.transport, z, steps=8, order=2, corrections=5)
    with pytest.raises(ValueError, match="extrapolation_form"):
        ucgm_sample(oracle, oracle.transport, z, steps=4, extrapolation_form="both")
    with pytest.raises(ValueError, match="corrector"):
        ucgm_sample(oracle, oracle.transport, z, steps=4, order=2, corrector="noise")
    for order, corrector in ((1, "data"), (2, "official")):
        with pytest.raises(ValueError, match="reuse_corrector_call=True needs order=2 and corrector='data'"):
            ucgm_sample(oracle, oracle.transport, z, steps=4, order=order, corrector=corrector,
                        reuse_corrector_call=True)


def test_sampling_config_left_unset_keeps_the_samplers_defaults():
    assert resolve_sampler(SamplingConfig()) == ("ucgm", {"stochasticity": 0.0})
    name, options = resolve_sampler(SamplingConfig(sampler="ucgm-o2", gaps=[0.0, 0.1], extrapolation=0.2))
    assert name == "ucgm-o2" and options == {"stochasticity": 0.0, "extrapolation": 0.2, "gaps": (0.0, 0.1)}
    assert set(UCGM_O2_DEFAULTS) >= {"gaps", "corrector"} and UCGM_O2_DEFAULTS["corrector"] == "data"
