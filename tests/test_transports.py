"""Transports: recovery round trips, derivatives against autograd, adapters and conventions."""

import math

import pytest
import torch

from ucgm.conventions import (
    diffusers_flow_transport,
    from_flow_matching_time,
    shift_sigma,
    to_diffusers_timestep,
    velocity_from_flow_matching,
)
from ucgm.transports import (
    OFFICIAL_HALF_PI,
    PARAMETERISATIONS,
    PATHS,
    TRANSPORT_NAMES,
    EDMPath,
    Transport,
    TransportAdapter,
    broadcast_time,
    edm_denoiser_transport,
    make_transport,
)

TIMES = torch.tensor([0.02, 0.1, 0.35, 0.5, 0.77, 0.95], dtype=torch.float64)


@pytest.fixture(autouse=True)
def double_precision():
    """Exact identities are checked in float64; the default dtype is restored for other test modules."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


def _pair(batch=6, dim=3, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, dim, generator=generator), torch.randn(batch, dim, generator=generator)


@pytest.mark.parametrize("name", TRANSPORT_NAMES)
def test_named_transport_round_trip(name):
    transport = make_transport(name)
    data, noise = _pair()
    x_t = transport.interpolate(data, noise, TIMES)
    output = transport.target(data, noise, TIMES)
    data_hat, noise_hat = transport.recover(output, x_t, TIMES)
    torch.testing.assert_close(data_hat, data)
    torch.testing.assert_close(noise_hat, noise)


@pytest.mark.parametrize("path_name", sorted(PATHS))
@pytest.mark.parametrize("parameterisation", PARAMETERISATIONS)
def test_every_parameterisation_round_trip(path_name, parameterisation):
    transport = Transport(PATHS[path_name](), parameterisation)
    data, noise = _pair(seed=1)
    x_t = transport.interpolate(data, noise, TIMES)
    output = transport.target(data, noise, TIMES)
    data_hat, noise_hat = transport.recover(output, x_t, TIMES)
    torch.testing.assert_close(data_hat, data)
    torch.testing.assert_close(noise_hat, noise)
    tb = broadcast_time(TIMES, data)
    torch.testing.assert_close(transport.alpha(tb) * noise_hat + transport.gamma(tb) * data_hat, x_t)


@pytest.mark.parametrize("path_name", sorted(PATHS))
def test_path_derivatives_equal_autograd(path_name):
    path = PATHS[path_name]()
    t = TIMES.clone().requires_grad_(True)
    for value, derivative in ((path.alpha, path.alpha_dot), (path.gamma, path.gamma_dot)):
        (grad,) = torch.autograd.grad(value(t).sum(), t)
        torch.testing.assert_close(derivative(t.detach()), grad)


@pytest.mark.parametrize("path_name", sorted(PATHS))
def test_time_for_ratio_inverts_noise_to_signal_ratio(path_name):
    path = PATHS[path_name]()
    ratio = path.alpha(TIMES) / path.gamma(TIMES)
    torch.testing.assert_close(path.time_for_ratio(ratio), TIMES)


def test_boundaries_data_at_zero_noise_at_one():
    for name in TRANSPORT_NAMES:
        transport = make_transport(name)
        zero = torch.tensor(0.0)
        assert abs(float(transport.alpha(zero))) < 0.005, name
    assert float(make_transport("linear").gamma(torch.tensor(1.0))) == 0.0


def test_official_trig_constant_and_edm_values():
    official = make_transport("TrigFlow", half_pi=OFFICIAL_HALF_PI)
    assert float(official.gamma(torch.tensor(1.0))) == pytest.approx(math.cos(1.57))
    edm = make_transport("EDM")
    t = torch.tensor(0.1)
    assert float(edm.denominator(t)) == pytest.approx(2.0)
    assert float(make_transport("TrigLinear").denominator(t)) == pytest.approx(-1.1441, abs=1e-4)
    assert float(EDMPath().sigma(torch.tensor(0.0))) == pytest.approx(math.exp(-6.36))


class ExactGaussianModel(torch.nn.Module):
    """Exact prediction for data N(0, s^2 I), for a transport with identity network time:
    ``E[x | x_t] = gamma s^2 / (gamma^2 s^2 + alpha^2) x_t``, ``E[z | x_t] = alpha / (gamma^2 s^2 + alpha^2) x_t``."""

    num_classes = None

    def __init__(self, transport, std=0.7):
        super().__init__()
        self.transport, self.std = transport, std

    def forward(self, x_t, t, labels=None):
        tb = broadcast_time(t, x_t)
        alpha, gamma = self.transport.alpha(tb), self.transport.gamma(tb)
        variance = gamma**2 * self.std**2 + alpha**2
        data = gamma * self.std**2 / variance * x_t
        noise = alpha / variance * x_t
        return self.transport.output_from_predictions(data, noise, t)


@pytest.mark.parametrize("native_name", ["linear", "trigflow", "edm", "vp"])
@pytest.mark.parametrize("target_name", ["linear", "triglinear", "edm"])
def test_adapter_reproduces_exact_predictions_of_another_transport(native_name, target_name):
    native, target = make_transport(native_name), make_transport(target_name)
    adapter = TransportAdapter(ExactGaussianModel(native), native, target)
    x_t = torch.randn(6, 3, generator=torch.Generator().manual_seed(3))
    expected = target.predict(ExactGaussianModel(target), x_t, TIMES)
    got = adapter.transport.predict(adapter, x_t, TIMES)
    torch.testing.assert_close(got.data, expected.data)
    torch.testing.assert_close(got.noise, expected.noise)


def test_relinear_calls_network_with_reversed_time_and_negated_output():
    seen = {}

    def native_model(x, t, labels):  # predicts x - z in "1 = data" time, like LightningDiT
        seen["t"] = t
        return -x

    transport = make_transport("relinear")
    x_t, t = torch.ones(2, 2), torch.tensor([0.2, 0.6])
    torch.testing.assert_close(transport.network_output(native_model, x_t, t), x_t)
    torch.testing.assert_close(seen["t"], 1 - t)


def test_edm_denoiser_transport_feeds_sigma_and_unscaled_input():
    path = EDMPath()
    data, noise = _pair(seed=4)

    def denoiser(x_sigma, sigma, labels):
        # an oracle that knows the data: checks it receives x + sigma z
        torch.testing.assert_close(x_sigma, data + broadcast_time(sigma, data) * noise)
        return data

    transport = edm_denoiser_transport()
    x_t = transport.interpolate(data, noise, TIMES)
    prediction = transport.predict(denoiser, x_t, TIMES)
    torch.testing.assert_close(prediction.data, data)
    torch.testing.assert_close(prediction.noise, noise)
    torch.testing.assert_close(transport.network_time(TIMES), path.sigma(TIMES))


def test_flow_matching_and_diffusers_conventions():
    data, noise = _pair(seed=5)
    t = torch.tensor(0.3)
    t_meta = 1 - t
    x_meta = t_meta * data + (1 - t_meta) * noise  # Meta flow_matching CondOT path
    linear = make_transport("linear")
    torch.testing.assert_close(linear.interpolate(data, noise, from_flow_matching_time(t_meta)), x_meta)
    torch.testing.assert_close(velocity_from_flow_matching(data - noise), noise - data)
    assert float(to_diffusers_timestep(torch.tensor(0.25))) == 250.0
    assert shift_sigma(0.5, 3.0) == pytest.approx(0.75)
    diffusers_transport = diffusers_flow_transport()
    torch.testing.assert_close(diffusers_transport.network_time(torch.tensor([0.5])), torch.tensor([500.0]))


def test_bad_names_are_clear_errors():
    with pytest.raises(ValueError, match="unknown transport 'flowy'.*allowed: linear"):
        make_transport("flowy")
    with pytest.raises(ValueError, match="unknown parameterisation.*allowed"):
        make_transport("linear", parameterisation="score")
