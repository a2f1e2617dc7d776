"""UCGM-S: grid, equivalences, exact-oracle behaviour (marginals, mixture recovery), NFE and input errors."""

import math

import pytest
import torch

from ucgm.data.mixtures import OracleModel, eight_gaussians
from ucgm.metrics import mode_coverage, sliced_wasserstein
from ucgm.sampling.solvers import euler_sample
from ucgm.sampling.ucgm_sampler import ucgm_sample
from ucgm.timegrids import kumaraswamy_grid
from ucgm.transports import Transport, broadcast_time, make_transport


class GaussianFlowMap(torch.nn.Module):
    """Exact consistency function of data N(m, s^2 I) on an identity-time transport: the probability-flow ODE maps
    ``x_t`` to ``m + s (x_t - gamma m) / sqrt(gamma^2 s^2 + alpha^2)``; its output is the F whose recovered data
    prediction is that endpoint (and whose noise prediction is consistent with x_t)."""

    num_classes = None

    def __init__(self, transport: Transport, mean=1.5, std=0.3):
        super().__init__()
        self.transport, self.mean, self.std = transport, mean, std

    def forward(self, x_t, t, labels=None):
        tb = broadcast_time(t, x_t)
        alpha, gamma = self.transport.alpha(tb), self.transport.gamma(tb)
        standardised = (x_t - gamma * self.mean) / torch.sqrt(gamma**2 * self.std**2 + alpha**2)
        data = self.mean + self.std * standardised
        noise = (x_t - gamma * data) / alpha
        return self.transport.output_from_predictions(data, noise, t)


class ConditionalShift(torch.nn.Module):
    """A toy conditional network: output depends on the label (null label = 2)."""

    num_classes = 2

    def forward(self, x, t, labels):
        return x * (1 + 0.1 * labels[:, None].to(x.dtype)) - t[:, None]


def test_grid_matches_official_rules():
    torch.testing.assert_close(kumaraswamy_grid(4), torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0], dtype=torch.float64))
    grid = kumaraswamy_grid(2, gaps=(0.001, 0.001))
    torch.testing.assert_close(grid, torch.tensor([0.999, 0.001, 0.0], dtype=torch.float64))
    warped = kumaraswamy_grid(8, (1.17, 0.8, 1.1), (0.001, 0.001), dtype=torch.float32)
    assert warped[0] == pytest.approx(0.9998922, abs=1e-6) and warped[-2] == pytest.approx(0.0049636, abs=1e-6)


def test_order_one_deterministic_equals_euler_on_linear_path():
    transport = make_transport("linear")
    oracle = OracleModel(eight_gaussians(), transport)
    noise = torch.randn(256, 2, generator=torch.Generator().manual_seed(0))
    labels = torch.randint(0, 8, (256,), generator=torch.Generator().manual_seed(1))
    ucgm = ucgm_sample(oracle, oracle.transport, noise, labels, steps=6, gaps=(0.0, 0.0))
    euler = euler_sample(oracle, oracle.transport, noise, labels, times=kumaraswamy_grid(6))
    assert ucgm.nfe == euler.nfe == 6
    torch.testing.assert_close(ucgm.sample, euler.sample, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("transport_name", ["linear", "trigflow", "edm"])
def test_full_stochasticity_with_exact_flow_map_preserves_marginals(transport_name):
    """rho = 1 re-noises the exact endpoint: every state is distributed as the noisy marginal at its time."""
    transport = make_transport(transport_name)
    model = GaussianFlowMap(transport)
    noise = torch.randn(40000, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    grid = kumaraswamy_grid(4, gaps=(0.001, 0.2))
    result = ucgm_sample(model, transport, noise, steps=4, stochasticity=1.0, gaps=(0.001, 0.2),
                         generator=torch.Generator().manual_seed(1), return_trajectory=True)
    for index in range(1, 4):
        t = grid[index]
        state = result.trajectory[index]
        alpha, gamma = transport.alpha(t), transport.gamma(t)
        assert float(state.mean()) == pytest.approx(float(gamma * 1.5), abs=0.02)
        assert float(state.std()) == pytest.approx(float(torch.sqrt(gamma**2 * 0.09 + alpha**2)), rel=0.02)
    assert float(result.sample.mean()) == pytest.approx(1.5, abs=0.01)
    assert float(result.sample.std()) == pytest.approx(0.3, rel=0.02)


def test_euler_with_oracle_velocity_reproduces_the_mixture():
    mixture = eight_gaussians()
    oracle = OracleModel(mixture, make_transport("linear"))
    generator = torch.Generator().manual_seed(0)
    reference, labels = mixture.sample(2000, generator=generator)
    noise = torch.randn(2000, 2, generator=generator, dtype=torch.float64)
    distance = {
        steps: sliced_wasserstein(euler_sample(oracle, oracle.transport, noise, None, steps=steps).sample, reference,
                                  num_projections=64, seed=0)
        for steps in (2, 64)
    }
    # the floor: two independent exact samples of the same size
    baseline = sliced_wasserstein(mixture.sample(2000, generator=generator)[0], reference, num_projections=64, seed=0)
    assert distance[64] < 1.2 * baseline
    assert distance[2] > 2 * baseline
    coverage = mode_coverage(euler_sample(oracle, oracle.transport, noise, None, steps=64).sample, mixture)
    assert coverage["missing_modes"] == 0 and coverage["fraction_near_a_mode"] > 0.97


def test_ucgm_sampler_with_oracle_recovers_mixture_and_extrapolation_runs():
    mixture = eight_gaussians()
    oracle = OracleModel(mixture, make_transport("linear"))
    generator = torch.Generator().manual_seed(0)
    reference, labels = mixture.sample(2000, generator=generator)
    noise = torch.randn(2000, 2, generator=generator, dtype=torch.float64)
    result = ucgm_sample(oracle, oracle.transport, noise, labels, steps=32, extrapolation=0.3,
                         time_warp=(1.17, 0.8, 1.1))
    assert result.nfe == 32
    baseline = sliced_wasserstein(mixture.sample(2000, generator=generator)[0], reference, num_projections=64, seed=0)
    assert sliced_wasserstein(result.sample, reference, num_projections=64, seed=0) < 1.2 * baseline


def test_nfe_counts_trajectory_and_statelessness():
    transport = make_transport("linear")
    model = GaussianFlowMap(transport)
    noise = torch.randn(8, 2, generator=torch.Generator().manual_seed(0))
    for steps, order, gaps, nfe in ((8, 1, (0.001, 0.001), 8), (8, 2, (0.001, 0.001), 7), (7, 2, (0.001, 0.001), 7),
                                    (4, 2, (0.001, 0.0), 4), (1, 1, (0.0, 0.0), 1)):
        first = ucgm_sample(model, transport, noise, steps=steps, order=order, gaps=gaps, return_trajectory=True)
        second = ucgm_sample(model, transport, noise, steps=steps, order=order, gaps=gaps)
        assert first.nfe == nfe, (steps, order, gaps)
        intervals = (steps + 1) // 2 if order == 2 else steps
        assert first.trajectory.shape == (intervals + 1, 8, 2)
        torch.testing.assert_close(first.trajectory[-1], first.sample)
        torch.testing.assert_close(first.sample, second.sample)


def test_classifier_free_guidance_scale_one_equals_conditional_model():
    transport = make_transport("linear")
    model = ConditionalShift()
    noise = torch.randn(6, 2, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([0, 1, 0, 1, 1, 0])
    plain = ucgm_sample(model, transport, noise, labels, steps=5, extrapolation=0.4)
    guided = ucgm_sample(model, transport, noise, labels, steps=5, extrapolation=0.4, cfg_scale=1.0,
                         cfg_interval=(0.0, 1.0))
    torch.testing.assert_close(guided.sample, plain.sample)
    assert guided.nfe == plain.nfe == 5
    stronger = ucgm_sample(model, transport, noise, labels, steps=5, cfg_scale=3.0)
    assert not torch.allclose(stronger.sample, plain.sample)


def test_sde_stochasticity_schedule_runs_and_is_seeded():
    transport = make_transport("linear")
    model = GaussianFlowMap(transport)
    noise = torch.randn(64, 2, generator=torch.Generator().manual_seed(0))
    first = ucgm_sample(model, transport, noise, steps=4, stochasticity="SDE", generator=torch.Generator().manual_seed(3))
    second = ucgm_sample(model, transport, noise, steps=4, stochasticity="sde", generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(first.sample, second.sample)
    assert torch.isfinite(first.sample).all()


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"steps": 0}, "steps=0 must be an integer >= 1"),
        ({"order": 3}, "order=3 is not allowed; allowed values: 1, 2"),
        ({"stochasticity": 1.5}, r"stochasticity=1.5 is outside the allowed range \[0.0, 1.0\]"),
        ({"stochasticity": "ode"}, "allowed values: 'sde', 'auto'"),
        ({"extrapolation": -0.1}, "extrapolation"),
        ({"gaps": (0.6, 0.6)}, "gaps"),
        ({"time_warp": (1.0, 0.0, 1.0)}, "time_warp"),
    ],
)
def test_bad_sampler_arguments(kwargs, message):
    transport = make_transport("linear")
    with pytest.raises(ValueError, match=message):
        ucgm_sample(GaussianFlowMap(transport), transport, torch.randn(4, 2), **kwargs)


def test_bad_sampler_inputs():
    transport = make_transport("linear")
    model = GaussianFlowMap(transport)
    with pytest.raises(ValueError, match="noise contains NaN or Inf"):
        ucgm_sample(model, transport, torch.full((4, 2), math.inf))
    with pytest.raises(ValueError, match="labels has shape"):
        ucgm_sample(model, transport, torch.randn(4, 2), torch.zeros(3, dtype=torch.long))
