"""Baseline solvers against the closed-form probability-flow ODE of a Gaussian data distribution N(m, s^2 I)."""

from __future__ import annotations

import math
from typing import Callable

import pytest
import torch
from torch import Tensor, nn

from ucgm.sampling.solvers import dpm_solver_pp_2m_sample, edm_stochastic_sample, euler_sample, heun_sample
from ucgm.timegrids import karras_grid, uniform_grid
from ucgm.transports import LinearPath, Transport, broadcast_time, make_transport

MEAN = torch.tensor([0.7, -0.4], dtype=torch.float64)
STD = 0.6
DETERMINISTIC_SOLVERS = (euler_sample, heun_sample, dpm_solver_pp_2m_sample)
ALL_SOLVERS = DETERMINISTIC_SOLVERS + (edm_stochastic_sample,)


class GaussianTeacher(nn.Module):
    """Exact network of N(MEAN, STD^2 I) for ``transport``.

    ``x_t ~ N(gamma m, c^2 I)`` with ``c^2 = gamma^2 s^2 + alpha^2``, so
    ``E[x | x_t] = m + gamma s^2 (x_t - gamma m) / c^2`` and ``E[z | x_t] = alpha (x_t - gamma m) / c^2``; the network
    returns the transport's target of both. Records the dtype, batch and labels of every call.
    """

    def __init__(self, transport: Transport, time_from_network: Callable[[Tensor], Tensor] = lambda s: s):
        super().__init__()
        self.transport, self.time_from_network = transport, time_from_network
        self.calls: list[tuple[torch.dtype, int, object]] = []

    def forward(self, x: Tensor, t_network: Tensor, labels: Tensor | None = None) -> Tensor:
        self.calls.append((x.dtype, x.shape[0], labels))
        path = self.transport.path
        t = self.time_from_network(t_network.to(torch.float64))
        x64 = x.to(torch.float64)
        alpha, gamma = path.alpha(broadcast_time(t, x64)), path.gamma(broadcast_time(t, x64))
        residual = x64 - gamma * MEAN
        variance = gamma**2 * STD**2 + alpha**2
        data = MEAN + gamma * STD**2 * residual / variance
        noise = alpha * residual / variance
        return (self.transport.target(data, noise, t) * self.transport.output_sign).to(x.dtype)


def exact_sample(transport: Transport, noise: Tensor, t_start: float) -> Tensor:
    """The exact PF-ODE from ``x_{t_start} = alpha z`` to t = 0, in data scale: the ODE keeps
    ``u = (x_t - gamma m) / c`` fixed, so the sample is ``m + sqrt(s^2 + sigma(0)^2) u`` (sigma = alpha / gamma)."""
    start, end = torch.tensor(t_start, dtype=torch.float64), torch.tensor(0.0, dtype=torch.float64)
    alpha, gamma = transport.alpha(start), transport.gamma(start)
    standardised = (alpha * noise.to(torch.float64) - gamma * MEAN) / torch.sqrt(gamma**2 * STD**2 + alpha**2)
    end_ratio = transport.alpha(end) / transport.gamma(end)
    return MEAN + torch.sqrt(STD**2 + end_ratio**2) * standardised


def make_noise(batch: int = 64, seed: int = 0) -> Tensor:
    return torch.randn(batch, 2, generator=torch.Generator().manual_seed(seed))


def solver_error(solver, transport: Transport, times: Tensor, noise: Tensor, **options) -> float:
    result = solver(GaussianTeacher(transport), transport, noise, times=times, **options)
    return (result.sample.to(torch.float64) - exact_sample(transport, noise, float(times[0]))).abs().max().item()


def observed_ratios(solver, transport: Transport, grids: list[Tensor], **options) -> tuple[list[float], list[float]]:
    noise = make_noise()
    errors = [solver_error(solver, transport, grid, noise, **options) for grid in grids]
    return errors, [coarse / fine for coarse, fine in zip(errors, errors[1:])]


@pytest.mark.parametrize("name", ["linear", "trigflow", "edm"])
def test_euler_converges_with_first_order(name):
    errors, ratios = observed_ratios(euler_sample, make_transport(name), [uniform_grid(n) for n in (16, 32, 64)])
    assert errors[-1] < 0.05
    assert all(1.7 < ratio < 2.35 for ratio in ratios), ratios


@pytest.mark.parametrize("name", ["linear", "trigflow", "edm", "vp"])
def test_heun_converges_with_second_order(name):
    errors, ratios = observed_ratios(heun_sample, make_transport(name), [uniform_grid(n) for n in (32, 64)])
    assert errors[-1] < 2e-3
    assert 3.4 < ratios[0] < 4.7, ratios


@pytest.mark.parametrize("name", ["linear", "trigflow", "edm"])
def test_dpm_solver_pp_2m_converges_with_second_order_on_karras_grid(name):
    transport = make_transport(name)
    grids = [karras_grid(n, transport.path, sigma_max=50.0) for n in (64, 128)]
    errors, ratios = observed_ratios(dpm_solver_pp_2m_sample, transport, grids)
    assert errors[-1] < 3e-3
    assert 3.4 < ratios[0] < 4.7, ratios


@pytest.mark.parametrize("name", ["linear", "trigflow"])
def test_dpm_solver_pp_2m_converges_on_default_uniform_grid_from_t1(name):
    grids = [uniform_grid(n) for n in (64, 128)]
    errors, ratios = observed_ratios(dpm_solver_pp_2m_sample, make_transport(name), grids)
    assert all(math.isfinite(error) for error in errors)
    assert errors[-1] < 2e-3
    assert ratios[0] > 2.5, ratios


def test_edm_sampler_without_churn_is_second_order():
    transport = make_transport("trigflow")
    grids = [karras_grid(n, transport.path) for n in (32, 64)]
    errors, ratios = observed_ratios(edm_stochastic_sample, transport, grids, s_churn=0.0)
    assert errors[-1] < 1e-2
    assert 3.4 < ratios[0] < 4.7, ratios


@pytest.mark.parametrize("solver", [dpm_solver_pp_2m_sample, edm_stochastic_sample])
def test_sigma_based_solvers_do_not_depend_on_the_path(solver):
    """Both solvers act on (sigma, x_sigma) only: on one sigma grid every path gives the same sample (EDM's path is
    left out: its t = 0 is sigma ~ 0.0017, not 0)."""
    noise = make_noise(16)
    samples = []
    for name in ("linear", "trigflow", "vp"):
        transport = make_transport(name)
        times = karras_grid(12, transport.path, sigma_max=40.0)
        result = solver(GaussianTeacher(transport), transport, noise, times=times,
                        **({"generator": torch.Generator().manual_seed(3)} if solver is edm_stochastic_sample else {}))
        samples.append(result.sample)
    for sample in samples[1:]:
        torch.testing.assert_close(sample, samples[0], atol=1e-5, rtol=1e-5)


def test_relinear_network_time_and_sign_give_the_linear_result():
    noise = make_noise(8)
    linear, relinear = make_transport("linear"), make_transport("relinear")
    reference = euler_sample(GaussianTeacher(linear), linear, noise, steps=10).sample
    reversed_teacher = GaussianTeacher(relinear, time_from_network=lambda s: 1 - s)
    torch.testing.assert_close(euler_sample(reversed_teacher, relinear, noise, steps=10).sample, reference)


def test_one_step_from_pure_noise_returns_the_data_mean():
    """On the Linear path x_hat(x_1) = E[x] = m: one Euler or DPM step from t = 1 lands on m."""
    transport = make_transport("linear")
    noise = make_noise(4)
    for solver in (euler_sample, heun_sample, dpm_solver_pp_2m_sample):
        result = solver(GaussianTeacher(transport), transport, noise, steps=1)
        torch.testing.assert_close(result.sample.to(torch.float64), MEAN.expand(4, 2), atol=1e-6, rtol=0)
        assert result.nfe == 1


def test_edm_stochastic_sampler_preserves_target_mean_and_std():
    transport = make_transport("linear")
    generator = torch.Generator().manual_seed(5)
    noise = torch.randn(8000, 2, generator=generator)
    stochastic = edm_stochastic_sample(GaussianTeacher(transport), transport, noise, steps=64, s_noise=1.0,
                                       generator=generator).sample.to(torch.float64)
    deterministic = edm_stochastic_sample(GaussianTeacher(transport), transport, noise, steps=64,
                                          s_churn=0.0).sample.to(torch.float64)
    standard_error = STD / math.sqrt(noise.shape[0])
    assert (stochastic.mean(0) - MEAN).abs().max() < 4 * standard_error
    assert (stochastic.std(0) - STD).abs().max() < 0.03
    assert (stochastic - deterministic).abs().mean() > 0.3  # the churn really injected noise


def test_edm_stochastic_sampler_is_reproducible_with_a_generator():
    transport = make_transport("edm")
    noise = make_noise(8)
    first, second = (edm_stochastic_sample(GaussianTeacher(transport), transport, noise, steps=6,
                                           generator=torch.Generator().manual_seed(7)) for _ in range(2))
    other = edm_stochastic_sample(GaussianTeacher(transport), transport, noise, steps=6,
                                  generator=torch.Generator().manual_seed(8))
    assert torch.equal(first.sample, second.sample)
    assert not torch.allclose(first.sample, other.sample)


def test_edm_sampler_churn_stays_inside_the_path_time_range():
    """EDM's path has sigma(1) ~ 78: churned noise levels above it are capped at t = 1."""
    transport = make_transport("edm")
    teacher = GaussianTeacher(transport)
    network_times: list[float] = []
    teacher.register_forward_pre_hook(lambda module, inputs: network_times.append(float(inputs[1][0])))
    edm_stochastic_sample(teacher, transport, make_noise(4), steps=8, s_churn=80.0, s_tmax=math.inf,
                          generator=torch.Generator().manual_seed(0))
    assert max(network_times) <= 1.0
    assert max(network_times) > 0.999


@pytest.mark.parametrize(
    "solver, expected_nfe",
    [(euler_sample, lambda n: n), (heun_sample, lambda n: 2 * n - 1), (dpm_solver_pp_2m_sample, lambda n: n),
     (edm_stochastic_sample, lambda n: 2 * n - 1)],
)
def test_nfe_counts_every_model_call(solver, expected_nfe):
    transport = make_transport("trigflow")
    for steps in (1, 2, 7):
        teacher = GaussianTeacher(transport)
        assert solver(teacher, transport, make_noise(3), steps=steps).nfe == len(teacher.calls) == expected_nfe(steps)
    teacher = GaussianTeacher(transport)
    result = solver(teacher, transport, make_noise(3), steps=50, times=[0.9, 0.5, 0.2, 0.0])
    assert result.nfe == len(teacher.calls) == expected_nfe(3)


@pytest.mark.parametrize("solver", ALL_SOLVERS)
def test_trajectory_holds_grid_states_then_the_sample(solver):
    transport = make_transport("linear")
    noise = make_noise(5)
    result = solver(GaussianTeacher(transport), transport, noise, steps=6, return_trajectory=True,
                    **({"generator": torch.Generator().manual_seed(0)} if solver is edm_stochastic_sample else {}))
    assert result.trajectory.shape == (7, 5, 2)
    first_time = karras_grid(6, transport.path)[0] if solver is edm_stochastic_sample else torch.tensor(1.0)
    torch.testing.assert_close(result.trajectory[0], (transport.alpha(first_time) * noise).to(noise.dtype))
    assert torch.equal(result.trajectory[-1], result.sample)
    assert solver(GaussianTeacher(transport), transport, noise, steps=6).trajectory is None


@pytest.mark.parametrize("solver", ALL_SOLVERS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_network_is_called_in_the_noise_dtype_with_the_labels(solver, dtype):
    transport = make_transport("trigflow")
    teacher = GaussianTeacher(transport)
    labels = torch.tensor([0, 1, 2])
    result = solver(teacher, transport, make_noise(3).to(dtype), labels=labels, steps=3)
    assert result.sample.dtype == dtype
    assert all(call_dtype == dtype and batch == 3 and call_labels is labels
               for call_dtype, batch, call_labels in teacher.calls)


def test_epsilon_model_must_start_below_one_and_then_converges():
    """An epsilon model cannot give x_hat at t = 1 on the Linear path (D = -gamma = 0): start at t_max < 1."""
    transport = Transport(LinearPath(), "epsilon")
    with pytest.raises(ValueError, match="cannot recover predictions"):
        heun_sample(GaussianTeacher(transport), transport, make_noise(4), steps=4)
    error = solver_error(heun_sample, transport, uniform_grid(64, t_max=0.999), make_noise())
    assert error < 5e-3


@pytest.mark.parametrize("solver", ALL_SOLVERS)
@pytest.mark.parametrize(
    "options, message",
    [
        ({"steps": 0}, "steps"),
        ({"steps": 2.5}, "steps"),
        ({"times": [1.0, 0.5, 0.6, 0.0]}, "decrease strictly"),
        ({"times": [1.0, 0.5, 0.1]}, "end at 0"),
        ({"times": [1.5, 0.5, 0.0]}, "at most 1"),
        ({"times": [[0.9, 0.0]]}, "1-D grid"),
        ({"times": [0.9, float("nan"), 0.0]}, "NaN or Inf"),
        ({"labels": torch.tensor([0, 1])}, "labels"),
    ],
)
def test_bad_input_raises_value_error(solver, options, message):
    transport = make_transport("trigflow")
    with pytest.raises(ValueError, match=message):
        solver(GaussianTeacher(transport), transport, make_noise(3), **options)


@pytest.mark.parametrize("solver", ALL_SOLVERS)
@pytest.mark.parametrize("bad_value", [float("nan"), float("inf")])
def test_non_finite_noise_raises_value_error(solver, bad_value):
    transport = make_transport("linear")
    noise = make_noise(3)
    noise[1, 0] = bad_value
    with pytest.raises(ValueError, match="noise contains NaN or Inf"):
        solver(GaussianTeacher(transport), transport, noise, steps=2)


@pytest.mark.parametrize(
    "options, message",
    [
        ({"times": [1.0, 0.5, 0.0]}, "gamma = 0"),
        ({"s_churn": -1.0}, "s_churn"),
        ({"s_noise": float("nan")}, "s_noise"),
        ({"s_tmin": 2.0, "s_tmax": 1.0}, "s_tmax"),
    ],
)
def test_edm_sampler_rejects_bad_options(options, message):
    transport = make_transport("linear")
    with pytest.raises(ValueError, match=message):
        edm_stochastic_sample(GaussianTeacher(transport), transport, make_noise(3), steps=4, **options)
