"""The flow-map core (``ucgm.methods.flow_maps.core``) and its samplers (``flow-map``, ``shortcut``) against exact
answers: the DDIM jump of the recovered predictions on every transport, the exact boundary, the instantaneous
velocity at ``s = t``, the second-time conditions, and sampling with the exact flow map of a Gaussian mixture."""

from __future__ import annotations

import math

import pytest
import torch
from flow_map_oracle import ExactFlowMapModel, exact_flow_map

from ucgm.data.mixtures import make_mixture
from ucgm.methods.flow_maps.core import (
    SECOND_TIMES,
    FlowMapModel,
    FlowMapParameterisation,
    average_velocity,
    jump,
    jump_coefficients,
    output_from_average_velocity,
)
from ucgm.models.mlp import MLP
from ucgm.sampling.flow_map_sampler import dyadic_grid, flow_map_grid, flow_map_sample, training_grid_indices
from ucgm.sampling.guidance import ClassifierFreeGuidance
from ucgm.sampling.registry import get_sampler
from ucgm.timegrids import karras_sigmas
from ucgm.transports import make_transport

TRANSPORTS = [("linear", None), ("linear", "data"), ("relinear", None), ("trigflow", None), ("edm", None),
              ("vp", None), ("linear", "edm")]


def _network(parameterisation: FlowMapParameterisation, seed: int = 0) -> MLP:
    torch.manual_seed(seed)
    network = MLP(2, hidden=16, depth=1, num_classes=8, conditions=parameterisation.conditions)
    for parameter in network.parameters():  # non-zero output layer and condition embeddings
        torch.nn.init.normal_(parameter, std=0.3)
    return network


def _times(batch: int = 6, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    t = 0.05 + 0.9 * torch.rand(batch, generator=generator)
    return t, t * torch.rand(batch, generator=generator)


@pytest.mark.parametrize("name,parameterisation", TRANSPORTS)
def test_the_jump_is_the_ddim_step_of_the_recovered_predictions(name, parameterisation):
    transport = make_transport(name, parameterisation)
    flow_map = FlowMapParameterisation(transport, "s")
    network = _network(flow_map)
    x_t = torch.randn(6, 2, dtype=torch.float64)
    t, s = (time.double() for time in _times())
    network.double()
    output = flow_map.output(network, x_t, t, s)
    data, noise = transport.recover(output, x_t, t)
    expected = transport.path.alpha(s)[:, None] * noise + transport.path.gamma(s)[:, None] * data
    torch.testing.assert_close(flow_map.jump(network, x_t, t, s), expected, rtol=1e-10, atol=1e-10)
    # u(x, t, t) is the ODE velocity the output means, and the inverse recovers the output
    velocity = average_velocity(transport, output, x_t, t, t)
    torch.testing.assert_close(velocity, transport.velocity(data, noise, t), rtol=1e-10, atol=1e-10)
    u = average_velocity(transport, output, x_t, t, s)
    torch.testing.assert_close(output_from_average_velocity(transport, u, x_t, t, s), output, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("second_time", SECOND_TIMES)
@pytest.mark.parametrize("name,parameterisation", TRANSPORTS)
def test_the_boundary_holds_exactly(name, parameterisation, second_time):
    flow_map = FlowMapParameterisation(make_transport(name, parameterisation), second_time)
    network = _network(flow_map)
    x_t = torch.randn(6, 2)
    t, _ = _times()
    assert torch.equal(flow_map.jump(network, x_t, t, t), x_t)
    assert torch.equal(FlowMapModel(network, flow_map).jump(x_t, t, t), x_t)


def test_linear_velocity_output_is_the_average_velocity_and_data_output_is_ctms_g():
    x_t = torch.randn(6, 2, dtype=torch.float64)
    t, s = (time.double() for time in _times())
    output = torch.randn(6, 2, dtype=torch.float64)
    a, b = jump_coefficients(make_transport("linear"), t, s)
    assert torch.allclose(a, torch.zeros_like(a), atol=1e-15) and torch.allclose(b, torch.ones_like(b))
    ratio = (s / t)[:, None]
    ctm = ratio * x_t + (1 - ratio) * output  # G = (s/t) x_t + (1 - s/t) g, g = x_hat
    torch.testing.assert_close(jump(make_transport("linear", "data"), output, x_t, t, s), ctm)


def test_second_time_conditions():
    transport = make_transport("linear")
    t = torch.tensor([0.9, 0.5, 0.5, 0.25])
    s = torch.tensor([0.4, 0.5, 0.25, 0.25 - 1 / 1024])
    assert torch.equal(FlowMapParameterisation(transport, "s").condition(t, s)["s"], s)
    assert torch.allclose(FlowMapParameterisation(transport, "gap").condition(t, s)["step"], t - s)
    levels = FlowMapParameterisation(transport, "log2_gap").condition(t, s)["step"]
    assert torch.allclose(levels, torch.tensor([1.0, 7.0, 2.0, 7.0]))  # d = 1/2, 0 -> finest, 1/4, < 1/128 -> finest
    # the gap is formed inside: a JVP in t with s fixed moves h = t - s by 1 (MeanFlow's tangent (v, 1, 0))
    flow_map = FlowMapParameterisation(transport, "gap")
    _, dh_dt = torch.func.jvp(lambda time: flow_map.condition(time, s)["step"], (t,), (torch.ones_like(t),))
    assert torch.equal(dh_dt, torch.ones_like(t))
    with pytest.raises(ValueError, match="second_time"):
        FlowMapParameterisation(transport, "target")


def test_a_relinear_network_receives_both_times_reversed():
    seen = {}

    def network(x, t, labels=None, s=None):
        seen.update(t=t, s=s)
        return torch.zeros_like(x)

    flow_map = FlowMapParameterisation(make_transport("relinear"), "s")
    flow_map.output(network, torch.zeros(2, 2), torch.tensor([0.8, 0.6]), torch.tensor([0.3, 0.1]))
    assert torch.allclose(seen["t"], torch.tensor([0.2, 0.4])) and torch.allclose(seen["s"], torch.tensor([0.7, 0.9]))


def test_dyadic_grid_has_power_of_two_steps_for_any_budget():
    for steps in range(1, 40):
        grid = dyadic_grid(steps)
        gaps = grid[:-1] - grid[1:]
        assert grid.numel() == steps + 1 and grid[0] == 1 and grid[-1] == 0
        assert all(abs(math.log2(gap) - round(math.log2(gap))) < 1e-9 for gap in gaps.tolist())
        assert bool((gaps[:-1] >= gaps[1:]).all())  # larger steps first
    assert torch.allclose(dyadic_grid(8), torch.linspace(1, 0, 9, dtype=torch.float64))
    assert torch.allclose(dyadic_grid(3), torch.tensor([1.0, 0.5, 0.25, 0.0], dtype=torch.float64))


@pytest.mark.parametrize("name", ["linear", "trigflow"])
def test_the_exact_flow_map_samples_the_same_points_at_every_nfe(name):
    """Phi composes: jumping 1, 2 or 4 times along any grid with the exact map gives Phi(z, 1, 0)."""
    mixture = make_mixture("8gaussians")
    transport = make_transport(name)
    model = ExactFlowMapModel(mixture, transport, steps=100)
    noise = torch.randn(16, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    t_max = 1.0 if name == "linear" else 0.999
    expected = exact_flow_map(mixture, model.transport, noise * model.transport.path.alpha(torch.tensor(t_max)),
                              torch.tensor(t_max), torch.tensor(0.0), steps=400)
    for nfe in (1, 2, 4):
        sampler = get_sampler("flow-map", {"t_max": t_max})
        result = sampler(model, model.transport, noise, None, nfe, None)
        assert result.nfe == nfe
        torch.testing.assert_close(result.sample, expected, rtol=0, atol=1e-5)
    karras = flow_map_sample(model, model.transport, noise, times=flow_map_grid(transport.path, 3, "karras"))
    assert torch.isfinite(karras.sample).all()


def test_karras_points_put_the_jumps_on_the_training_grid():
    """``karras_points = P``: n jumps visit points ``round(i (P - 1) / n)`` of the P-point Karras grid (the first
    and the last always), and above ``P - 1`` jumps the plain Karras grid of ``n + 1`` points."""
    path = make_transport("linear").path
    training = path.time_for_sigma(karras_sigmas(18))
    for steps in (1, 2, 4, 8, 16, 17):
        grid = flow_map_grid(path, steps, "karras", karras_points=18)
        indices = [int(torch.argmin((training - time).abs())) for time in grid]
        assert torch.equal(grid, training[indices]) and indices[0] == 0 and indices[-1] == 17
        assert indices == [round(i * 17 / steps + 1e-9) for i in range(steps + 1)] and len(set(indices)) == steps + 1
    assert torch.equal(flow_map_grid(path, 17, "karras", karras_points=18), training)
    assert torch.equal(flow_map_grid(path, 20, "karras", karras_points=18), flow_map_grid(path, 20, "karras"))
    assert not torch.equal(flow_map_grid(path, 4, "karras", karras_points=18), flow_map_grid(path, 4, "karras"))
    assert torch.equal(training_grid_indices(4, 9), torch.tensor([0, 2, 4, 6, 8]))
    with pytest.raises(ValueError, match="at most 8 jumps"):
        training_grid_indices(9, 9)
    with pytest.raises(ValueError, match="needs grid='karras'"):
        flow_map_grid(path, 2, "uniform", karras_points=18)
    sampler = get_sampler("flow-map", {"grid": "karras", "karras_points": 18})
    noise = torch.randn(3, 2, dtype=torch.float64)
    transport = make_transport("linear")
    flow_map = FlowMapParameterisation(transport, "s")
    model = FlowMapModel(_network(flow_map).double(), flow_map)
    on_grid = flow_map_sample(model, model.transport, noise, times=flow_map_grid(path, 4, "karras", karras_points=18))
    torch.testing.assert_close(sampler(model, model.transport, noise, None, 4, None).sample, on_grid.sample)


@pytest.mark.parametrize("name", ["linear", "trigflow", "vp"])
def test_the_log_snr_grid_is_even_in_log_sigma_with_exact_ends(name):
    """``log_snr``: ``steps + 1`` strictly decreasing times with the exact ends whose ``log sigma`` steps are equal
    (on the linear path ``logit t``); the registry's ``flow-map`` spends one NFE per jump on it."""
    path = make_transport(name).path
    for steps in (1, 2, 4, 16):
        grid = flow_map_grid(path, steps, "log_snr", t_max=0.994, t_min=0.006)
        assert grid.dtype == torch.float64 and grid.numel() == steps + 1
        assert grid[0] == 0.994 and grid[-1] == 0.006 and bool((grid[1:] < grid[:-1]).all())
        gaps = torch.diff(path.sigma(grid).log())
        torch.testing.assert_close(gaps, gaps[:1].expand_as(gaps), rtol=1e-9, atol=1e-9)
    linear = flow_map_grid(make_transport("linear").path, 4, "log_snr", t_max=0.9, t_min=0.1)
    torch.testing.assert_close(linear, torch.sigmoid(torch.linspace(math.log(9), -math.log(9), 5, dtype=torch.float64)))
    with pytest.raises(ValueError, match="0 < t_min < t_max < 1"):
        flow_map_grid(path, 2, "log_snr", t_max=1.0, t_min=0.0)
    flow_map = FlowMapParameterisation(make_transport("linear"), "s")
    model = FlowMapModel(_network(flow_map).double(), flow_map)
    noise = torch.randn(3, 2, dtype=torch.float64)
    result = get_sampler("flow-map", {"grid": "log_snr", "t_max": 0.9, "t_min": 0.1})(model, model.transport, noise,
                                                                                      None, 4, None)
    assert result.nfe == 4
    torch.testing.assert_close(result.sample, flow_map_sample(model, model.transport, noise, times=linear).sample)


def test_gamma_sampling_renoises_to_the_next_level_and_gamma_one_is_cm_multistep():
    """With gamma = 1 every jump lands on the grid's end sigma_N, then ``x_sigma + sqrt(sigma_{i+1}^2 - sigma_N^2)
    eps`` (CM's multistep sampler); gamma = 0 adds no noise."""
    transport = make_transport("linear")
    flow_map = FlowMapParameterisation(transport, "s")
    model = FlowMapModel(_network(flow_map).double(), flow_map)
    noise = torch.randn(5, 2, dtype=torch.float64)
    grid = flow_map_grid(transport.path, 3, "karras")
    generator = torch.Generator().manual_seed(3)
    sampled = flow_map_sample(model, model.transport, noise, times=grid, gamma=1.0, generator=generator)
    replay, state = torch.Generator().manual_seed(3), noise * transport.path.alpha(grid[0])
    sigma_end = transport.path.sigma(grid[-1])
    for index in range(3):
        state = model.jump(state, grid[index].expand(5), grid[-1].expand(5))
        if index < 2:
            fresh = torch.randn(5, 2, generator=replay, dtype=torch.float64)
            sigma_next = transport.path.sigma(grid[index + 1])
            state = (state / transport.path.gamma(grid[-1]) + torch.sqrt(sigma_next**2 - sigma_end**2) * fresh) \
                * transport.path.gamma(grid[index + 1])
    torch.testing.assert_close(sampled.sample, state / transport.path.gamma(grid[-1]))
    deterministic = flow_map_sample(model, model.transport, noise, times=grid, gamma=0.0, generator=None)
    chain = noise * transport.path.alpha(grid[0])
    for index in range(3):
        chain = model.jump(chain, grid[index].expand(5), grid[index + 1].expand(5))
    torch.testing.assert_close(deterministic.sample, chain / transport.path.gamma(grid[-1]))


def test_guidance_wraps_a_flow_map_and_ode_solvers_sample_it_as_a_velocity_model():
    transport = make_transport("linear")
    flow_map = FlowMapParameterisation(transport, "gap")
    model = FlowMapModel(_network(flow_map), flow_map)
    x_t, t, s = torch.randn(4, 2), torch.full((4,), 0.8), torch.full((4,), 0.3)
    labels = torch.tensor([0, 1, 2, 3])
    guided = ClassifierFreeGuidance(model, 2.0)
    conditional = model(x_t, t, labels, s=s)
    unconditional = model(x_t, t, torch.full_like(labels, 8), s=s)
    torch.testing.assert_close(guided(x_t, t, labels, s=s), unconditional + 2.0 * (conditional - unconditional))
    assert torch.equal(model(x_t, t, labels), model(x_t, t, labels, s=t))  # no s: the instantaneous model
    result = get_sampler("euler")(model, model.transport, torch.randn(4, 2), labels, 4, None)
    assert torch.isfinite(result.sample).all() and result.nfe == 4
    shortcut = get_sampler("shortcut")(guided, model.transport, torch.randn(4, 2), labels, 3, None)
    assert shortcut.nfe == 3


def test_bad_grids_and_settings_are_clear_errors():
    path = make_transport("linear").path
    with pytest.raises(ValueError, match="decrease strictly"):
        flow_map_grid(path, 2, times=[0.0, 0.5, 1.0])
    with pytest.raises(ValueError, match="3 jumps need 4"):
        flow_map_grid(path, 3, times=[1.0, 0.0])
    with pytest.raises(ValueError, match="unknown flow-map grid"):
        flow_map_grid(path, 2, "cosine")
    with pytest.raises(ValueError, match="unknown settings"):
        get_sampler("shortcut", {"gamma": 0.5})
