"""The Gaussian-mixture oracle against Monte Carlo, autograd and closed forms; the toy data sets."""

import math

import pytest
import torch

from ucgm.data.mixtures import (
    GaussianMixture,
    OracleModel,
    checkerboard,
    eight_gaussians,
    grid,
    make_mixture,
)
from ucgm.transports import make_transport

TRANSPORTS = ["linear", "trigflow", "edm", "vp"]


def _uneven_mixture() -> GaussianMixture:
    """Three components of different widths and weights; class 1 holds two of them."""
    means = [[1.0, 0.0], [-0.8, 0.6], [0.2, -1.1]]
    return GaussianMixture(means, [0.3, 0.5, 0.4], weights=[0.5, 0.3, 0.2], component_labels=[0, 1, 1])


def _noisy_points(mixture, transport, t, n, seed, labels=None):
    generator = torch.Generator().manual_seed(seed)
    x, labels = mixture.sample(n, generator, labels)
    z = torch.randn(x.shape, generator=generator)
    return transport.interpolate(x.double(), z.double(), t), labels


@pytest.mark.parametrize("name", TRANSPORTS)
def test_oracle_matches_importance_weighted_monte_carlo(name):
    """E[x | x_t] ~= sum_i w_i x_i / sum_i w_i with x_i ~ p(x | c) and w_i = N(x_t; gamma x_i, alpha^2 I); the
    velocity then is alpha' (x_t - gamma E[x|x_t]) / alpha + gamma' E[x|x_t]."""
    mixture, transport = _uneven_mixture(), make_transport(name)
    n = 100_000
    priors = {
        None: mixture.sample(n, torch.Generator().manual_seed(1))[0].double(),
        1: mixture.sample(n, torch.Generator().manual_seed(1), torch.ones(n, dtype=torch.long))[0].double(),
    }
    for ratio in (0.3, 1.0, 3.0):  # noise-to-signal ratio alpha / gamma: comparable difficulty on every path
        t = transport.path.time_for_ratio(torch.tensor(ratio, dtype=torch.float64))
        alpha, gamma = transport.alpha(t), transport.gamma(t)
        for label, prior in priors.items():
            labels = None if label is None else torch.full((6,), label)
            x_t, _ = _noisy_points(mixture, transport, t, 6, seed=2, labels=labels)
            log_weights = -((x_t[:, None, :] - gamma * prior[None]) ** 2).sum(-1) / (2 * alpha**2)
            mc_data = torch.softmax(log_weights, dim=1) @ prior
            mc_velocity = transport.alpha_dot(t) * (x_t - gamma * mc_data) / alpha + transport.gamma_dot(t) * mc_data
            times = t.expand(6)
            assert torch.allclose(mixture.posterior_mean(x_t, times, transport, labels), mc_data, atol=0.01)
            # the same 0.01 on E[x|x_t], propagated through v = alpha' (x_t - gamma E[x]) / alpha + gamma' E[x]
            velocity_tolerance = 0.01 * (transport.alpha_dot(t).abs() * gamma / alpha + transport.gamma_dot(t).abs())
            velocity = mixture.velocity(x_t, times, transport, labels)
            assert torch.allclose(velocity, mc_velocity, atol=float(velocity_tolerance))


@pytest.mark.parametrize("name", TRANSPORTS)
def test_score_is_gradient_of_log_density_and_tweedie_holds(name):
    """score = grad log p_t (autograd) and E[x | x_t] = (x_t + alpha^2 score) / gamma, E[z | x_t] = -alpha score."""
    mixture, transport = _uneven_mixture(), make_transport(name)
    t = torch.tensor([0.05, 0.2, 0.4, 0.6, 0.8, 0.95], dtype=torch.float64)
    x_t, labels = _noisy_points(mixture, transport, t, 6, seed=3)
    labels[0] = mixture.num_classes  # one unconditional row
    x_t.requires_grad_(True)
    log_density = mixture.log_density(x_t, t, transport, labels)
    (autograd_score,) = torch.autograd.grad(log_density.sum(), x_t)
    score = mixture.score(x_t.detach(), t, transport, labels)
    assert torch.allclose(score, autograd_score, rtol=1e-10, atol=1e-10)
    alpha, gamma = transport.alpha(t)[:, None], transport.gamma(t)[:, None]
    data, noise = mixture.predictions(x_t.detach(), t, transport, labels)
    assert torch.allclose(data, (x_t.detach() + alpha**2 * score) / gamma, rtol=1e-9, atol=1e-9)
    assert torch.allclose(noise, -alpha * score, rtol=1e-9, atol=1e-9)
    assert torch.allclose(alpha * noise + gamma * data, x_t.detach(), atol=1e-12)


@pytest.mark.parametrize("name", TRANSPORTS)
def test_class_densities_average_to_the_unconditional_density(name):
    """sum_c W_c p_t(x | c) = p_t(x), and the null label is the unconditional density."""
    mixture, transport = _uneven_mixture(), make_transport(name)
    x_t, _ = _noisy_points(mixture, transport, 0.5, 10, seed=4)
    unconditional = mixture.log_density(x_t, 0.5, transport)
    per_class = torch.stack(
        [mixture.log_density(x_t, 0.5, transport, torch.full((10,), c)) for c in range(mixture.num_classes)]
    )
    averaged = torch.logsumexp(per_class + mixture.class_weights.log()[:, None], dim=0)
    assert torch.allclose(averaged, unconditional, atol=1e-12)
    null = torch.full((10,), mixture.num_classes)
    assert torch.allclose(mixture.log_density(x_t, 0.5, transport, null), unconditional, atol=1e-12)
    assert torch.allclose(mixture.class_weights, torch.tensor([0.5, 0.5], dtype=torch.float64))


@pytest.mark.parametrize("name", ["linear", "trigflow", "vp"])
def test_log_density_at_time_zero_is_the_data_log_prob(name):
    mixture, transport = _uneven_mixture(), make_transport(name)
    x, labels = mixture.sample(20, torch.Generator().manual_seed(5))
    assert torch.allclose(mixture.log_density(x, 0.0, transport, labels), mixture.log_prob(x, labels), atol=1e-9)


def test_log_prob_matches_the_weighted_sum_of_normal_densities():
    mixture = _uneven_mixture()
    x = torch.tensor([[0.3, -0.2], [1.0, 0.1]], dtype=torch.float64)
    expected = sum(
        w * torch.exp(-((x - torch.tensor(m)) ** 2).sum(1) / (2 * s**2)) / (2 * math.pi * s**2)
        for m, s, w in [([1.0, 0.0], 0.3, 0.5), ([-0.8, 0.6], 0.5, 0.3), ([0.2, -1.1], 0.4, 0.2)]
    )
    assert torch.allclose(mixture.log_prob(x), expected.log(), atol=1e-12)


def test_linear_path_endpoints_have_finite_limits():
    """t = 0 (alpha = 0): E[x|x_0] = x_0, E[z|x_0] = 0; t = 1 (gamma = 0): E[x|x_1] = class mean of the data."""
    mixture, transport = _uneven_mixture(), make_transport("linear")
    x = torch.randn(4, 2, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    data, noise = mixture.predictions(x, 0.0, transport)
    assert torch.allclose(data, x) and torch.equal(noise.abs(), torch.zeros_like(noise))
    labels = torch.tensor([0, 1, 2, 1])
    data, noise = mixture.predictions(x, 1.0, transport, labels)
    class_means = torch.tensor([[1.0, 0.0], [-0.8 * 0.6 + 0.2 * 0.4, 0.6 * 0.6 - 1.1 * 0.4]], dtype=torch.float64)
    overall = mixture.weights @ mixture.means
    expected = torch.stack([class_means[0], class_means[1], overall, class_means[1]])
    assert torch.allclose(data, expected, atol=1e-12) and torch.allclose(noise, x)
    velocity = mixture.velocity(x, torch.tensor([0.0, 0.0, 1.0, 1.0]), transport, labels)
    assert torch.isfinite(velocity).all()


def test_sampling_statistics():
    mixture = _uneven_mixture()
    x, labels = mixture.sample(40_000, torch.Generator().manual_seed(8))
    assert x.dtype == torch.get_default_dtype() and labels.dtype == torch.int64
    frequencies = torch.bincount(labels, minlength=2).double() / len(labels)
    assert torch.allclose(frequencies, mixture.class_weights, atol=0.01)
    assert torch.allclose(x.double().mean(0), mixture.weights @ mixture.means, atol=0.01)
    zeros = torch.zeros(20_000, dtype=torch.long)
    conditional, returned = mixture.sample(20_000, torch.Generator().manual_seed(9), zeros)
    assert torch.equal(returned, zeros)
    assert torch.allclose(conditional.double().mean(0), mixture.means[0], atol=0.01)
    assert torch.allclose(conditional.double().std(0), torch.full((2,), 0.3, dtype=torch.float64), atol=0.01)
    again, _ = mixture.sample(40_000, torch.Generator().manual_seed(8))
    assert torch.equal(again, x)


@pytest.mark.parametrize("name", ["linear", "relinear", "trigflow", "triglinear", "edm", "vp"])
def test_oracle_model_called_through_its_transport_returns_the_exact_predictions(name):
    mixture, transport = _uneven_mixture(), make_transport(name)
    oracle = OracleModel(mixture, transport)
    assert oracle.num_classes == 2
    t = torch.tensor([0.1, 0.3, 0.5, 0.7, 0.9], dtype=torch.float64)
    x_t, labels = _noisy_points(mixture, transport, t, 5, seed=10)
    prediction = oracle.transport.predict(oracle, x_t, t, labels)
    data, noise = mixture.predictions(x_t, t, transport, labels)
    assert torch.allclose(prediction.data, data, atol=1e-9) and torch.allclose(prediction.noise, noise, atol=1e-9)
    image_like = x_t.float().reshape(5, 2, 1, 1)
    output = oracle(image_like, t.float(), labels)
    assert output.shape == (5, 2, 1, 1) and output.dtype == torch.float32
    assert torch.allclose(output.double().reshape(5, 2), prediction.output, atol=1e-5)


def test_eight_gaussians_matches_the_parity_fixture_layout():
    mixture = eight_gaussians()
    k = torch.arange(8, dtype=torch.float64)
    centres = torch.stack([torch.cos(2 * math.pi * k / 8), torch.sin(2 * math.pi * k / 8)], dim=1)
    assert torch.allclose(mixture.means, centres)
    assert torch.equal(mixture.stds, torch.full((8,), 0.05, dtype=torch.float64))
    assert torch.equal(mixture.component_labels, torch.arange(8)) and mixture.num_classes == 8
    assert torch.allclose(make_mixture("8gaussians", radius=2.0).means, 2 * centres)


def test_checkerboard_has_one_mode_per_dark_square():
    mixture = checkerboard()
    assert mixture.means.shape == (8, 2) and mixture.num_classes == 8
    squares = torch.floor(mixture.means + 2.0).long()  # (column, row) index of the unit square
    assert torch.allclose(mixture.means, squares.double() - 1.5)
    assert bool((squares.sum(1) % 2 == 0).all())
    assert len({tuple(s) for s in squares.tolist()}) == 8


def test_grid_is_centred_with_the_requested_spacing():
    mixture = grid(n=3, spacing=2.0, std=0.1)
    assert mixture.means.shape == (9, 2)
    assert torch.allclose(mixture.means.mean(0), torch.zeros(2, dtype=torch.float64))
    assert torch.allclose(mixture.means[4], torch.zeros(2, dtype=torch.float64))
    assert set(mixture.means[:, 0].tolist()) == {-2.0, 0.0, 2.0}
    assert make_mixture("grid").num_components == 25


def test_bad_input_raises_clear_errors():
    mixture, transport = _uneven_mixture(), make_transport("linear")
    with pytest.raises(ValueError, match="allowed values: '8gaussians', 'checkerboard', 'grid'"):
        make_mixture("moons")
    with pytest.raises(ValueError, match="2 values per sample"):
        mixture.log_density(torch.zeros(4, 3), 0.5, transport)
    with pytest.raises(ValueError, match="leading batch dimension of 4"):
        mixture.velocity(torch.zeros(4, 2), torch.zeros(3), transport)
    with pytest.raises(ValueError, match="leading batch dimension of 4"):
        mixture.score(torch.zeros(4, 2), 0.5, transport, torch.zeros(5, dtype=torch.long))
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 2\]"):
        mixture.posterior_mean(torch.zeros(2, 2), 0.5, transport, torch.tensor([0, 3]))
    with pytest.raises(ValueError, match="stds must be positive"):
        GaussianMixture([[0.0], [1.0]], [0.1, -0.1])
    with pytest.raises(ValueError, match="weights must be non-negative"):
        GaussianMixture([[0.0], [1.0]], 0.1, weights=[1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match="means has shape"):
        GaussianMixture([0.0, 1.0], 0.1)
    with pytest.raises(ValueError, match="NaN"):
        mixture.log_prob(torch.tensor([[float("nan"), 0.0]]))
    with pytest.raises(ValueError, match="no mixture component"):
        GaussianMixture([[0.0]], 1.0, num_classes=2).sample(3, labels=torch.tensor([0, 1, 0]))
