"""Distribution-matching methods against exact answers: Gaussian-mixture generators have closed-form scores, so the
fake score can be exact (an oracle of the generator's own mixture) and the teacher is the data's oracle."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from ucgm.data.mixtures import GaussianMixture, OracleModel, eight_gaussians
from ucgm.methods.base import Batch, Networks
from ucgm.methods.distribution_matching import CoSIM, DMD2
from ucgm.methods.distribution_matching.cosim import semi_implicit_fisher_loss
from ucgm.methods.distribution_matching.generator import RoutedGenerator, simulate_to_step
from ucgm.methods.distribution_matching.msd import student_for_label, student_route
from ucgm.methods.distribution_matching.scores import distribution_matching_gradient, fake_score_loss
from ucgm.methods.distribution_matching.sim import sim_generator_loss
from ucgm.methods.distribution_matching.times import karras_index_sigmas, karras_index_times
from ucgm.models import MLP, UNet, DiT
from ucgm.models.bottleneck import capture_bottleneck
from ucgm.sampling.generator_sampler import generator_sample
from ucgm.sampling.registry import get_sampler
from ucgm.transports import make_transport

LINEAR = make_transport("linear")


def _generator_samples(means: torch.Tensor, std: float, count: int, seed: int = 0) -> torch.Tensor:
    """``x = means[k] + std * eps`` with components ``k`` cycling (a reparametrised mixture generator)."""
    generator = torch.Generator().manual_seed(seed)
    components = torch.arange(count) % means.shape[0]
    return means[components] + std * torch.randn(count, means.shape[1], generator=generator, dtype=means.dtype)


def _dmd2_with_exact_fake_score(fake_means: torch.Tensor) -> tuple[DMD2, Networks]:
    method = DMD2(LINEAR, teacher="oracle:8gaussians")
    fake = OracleModel(GaussianMixture(fake_means.detach(), 0.05), LINEAR)
    return method, Networks({"fake_score": fake})


def test_karras_index_times_follow_the_official_grid():
    sigmas = karras_index_sigmas()
    assert sigmas[0].item() == pytest.approx(0.002) and sigmas[-1].item() == pytest.approx(80.0)
    assert sigmas[500].item() == pytest.approx(2.53, abs=0.01) and sigmas[980].item() == pytest.approx(72.05, abs=0.01)
    times = karras_index_times(LINEAR.path, 20000, (0.02, 0.98), torch.Generator().manual_seed(0), torch.float64)
    allowed = sigmas[20:981] / (1 + sigmas[20:981])
    assert times.min().item() == pytest.approx(allowed.min().item()) and times.max().item() == pytest.approx(
        allowed.max().item())
    assert torch.isin(times, allowed).all()


def test_dmd_gradient_vanishes_when_the_generator_equals_the_data():
    means = eight_gaussians().means
    method, networks = _dmd2_with_exact_fake_score(means)
    x = _generator_samples(means, 0.05, 512).float().requires_grad_(True)
    loss, _ = method.matching_loss(x, None, networks, torch.Generator().manual_seed(1))
    (gradient,) = torch.autograd.grad(loss, x)
    assert gradient.abs().max().item() < 1e-6


def test_dmd_gradient_is_g_over_numel_and_points_towards_the_data():
    data_means = eight_gaussians().means
    shift = torch.tensor([0.15, -0.1], dtype=torch.float64)
    fake_means = (data_means + shift).requires_grad_(True)
    method, networks = _dmd2_with_exact_fake_score(fake_means)
    x = _generator_samples(fake_means, 0.05, 4096).float()
    x.retain_grad()
    loss, _ = method.matching_loss(x, None, networks, torch.Generator().manual_seed(2))
    loss.backward()
    # the injected gradient is g / numel, with g recomputed from the same draws
    generator = torch.Generator().manual_seed(2)
    t = karras_index_times(LINEAR.path, x.shape[0], (0.02, 0.98), generator, x.dtype)
    noise = torch.randn(x.shape, generator=generator, dtype=x.dtype)
    x_t = LINEAR.interpolate(x.detach(), noise, t)
    real = method.real_score(x_t, t, None)
    fake = LINEAR.predict(networks.module("fake_score"), x_t, t).data
    g = distribution_matching_gradient(x.detach(), real[None], fake[None])
    torch.testing.assert_close(x.grad, g / x.numel(), rtol=1e-5, atol=1e-9)
    # descending it moves every generator mode towards its data mode (the mixture is reparametrised)
    step = 0.05 / fake_means.grad.abs().max()
    before = (fake_means - data_means).norm(dim=1)
    after = (fake_means - step * fake_means.grad - data_means).norm(dim=1)
    assert bool((after < before).all())


def test_pooled_noise_draws_tame_the_heavy_tailed_normaliser_of_two_feature_data():
    """In 2-D one draw's normaliser mean_features |x - x_hat_real| is a mean of two values ~ sigma |z_i|, so a few
    samples with a small draw dominate the batch gradient; pooling draws at each sample's level removes the tail and
    more samples' gradients point towards the data (a generator 20 % too wide, exact fake score)."""
    data_means = eight_gaussians().means
    fake_means = data_means * 1.2
    fake = OracleModel(GaussianMixture(fake_means, 0.05), LINEAR)
    x = _generator_samples(fake_means, 0.05, 4096).float()

    def descent(draws: int) -> torch.Tensor:
        method = DMD2(LINEAR, teacher="oracle:8gaussians", gan=False, matching_noise_draws=draws)
        samples = x.clone().requires_grad_(True)
        loss, _ = method.matching_loss(samples, None, Networks({"fake_score": fake}), torch.Generator().manual_seed(1))
        return -torch.autograd.grad(loss, samples)[0] * samples.numel()

    def top_percent_share(g: torch.Tensor) -> float:
        energy = (g**2).sum(dim=1).sort(descending=True).values
        return float(energy[: len(energy) // 100].sum() / energy.sum())

    def inward_fraction(g: torch.Tensor) -> float:
        return float(((g * x).sum(dim=1) < 0).float().mean())

    one, pooled = descent(1), descent(16)
    assert top_percent_share(one) > 0.4 and top_percent_share(pooled) < 0.2  # measured 0.50 and 0.13
    assert inward_fraction(pooled) > inward_fraction(one) + 0.05  # measured 0.84 and 0.75


def test_pooled_matching_gradient_is_the_mean_difference_over_the_pooled_normaliser():
    x = torch.tensor([[1.0, -2.0], [0.5, 0.0]])
    real = torch.stack([x + torch.tensor([[0.1, 0.3], [0.2, 0.2]]), x - torch.tensor([[0.3, 0.1], [0.0, 0.4]])])
    fake = real + torch.tensor([[[1.0, 0.0], [0.0, 2.0]], [[3.0, 0.0], [0.0, -2.0]]])
    expected = torch.tensor([[2.0, 0.0], [0.0, 0.0]]) / torch.tensor([[0.2], [0.2]])
    torch.testing.assert_close(distribution_matching_gradient(x, real, fake), expected)
    with pytest.raises(ValueError, match="draws"):
        distribution_matching_gradient(x, real[0], fake[0])


def test_the_fake_score_loss_is_minimised_by_the_generators_exact_score():
    generator_mixture = GaussianMixture(eight_gaussians().means * 0.7 + 0.2, 0.1)
    samples = generator_mixture.sample(200000, torch.Generator().manual_seed(3))[0].double()
    draws = torch.Generator().manual_seed(4)
    t = torch.rand(samples.shape[0], generator=draws, dtype=torch.float64)
    noise = torch.randn(samples.shape, generator=draws, dtype=torch.float64)
    exact = OracleModel(generator_mixture, LINEAR)

    def loss(model) -> float:
        return fake_score_loss(model, LINEAR, samples, t, noise, None).mean().item()

    offset = torch.tensor([0.3, -0.2], dtype=torch.float64)
    shifted = loss(lambda x, time, labels=None: exact(x, time) + offset)
    # L(F* + d) - L(F*) = |d|^2 / D exactly in expectation: the cross term vanishes at the minimiser
    assert shifted - loss(exact) == pytest.approx(float((offset**2).mean()), rel=0.03)
    assert loss(OracleModel(eight_gaussians(), LINEAR)) > loss(exact) + 0.01  # the data's score is not the minimiser


def _gaussian_prediction(mean, std):
    """``E[x0 | x_t]`` for ``x0 ~ N(mean, std^2)`` on the linear path."""

    def predict(x_t, t, labels=None):
        alpha, gamma = t[:, None], 1 - t[:, None]
        return mean + gamma * std**2 * (x_t - gamma * mean) / (gamma**2 * std**2 + alpha**2)

    return predict


def _hermite(points: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Nodes and weights of E[f(xi)], xi ~ N(0, 1)."""
    nodes, weights = np.polynomial.hermite_e.hermegauss(points)
    return torch.tensor(nodes), torch.tensor(weights / math.sqrt(2 * math.pi))


@pytest.mark.parametrize("time", [0.3, 0.75])
def test_sim_loss_gradient_equals_the_divergence_gradient_on_a_1d_gaussian(time):
    """d/dtheta E[L_SIM] (through x_t, teacher and frozen exact fake score) equals d/dtheta D with pi frozen,
    D = E_{x ~ p_theta,t} w(t) d(s_theta(x) - s_q(x)), by Gauss-Hermite quadrature (a pseudo-Huber constant large
    enough for the quadrature to converge: with c = 0.5 both sides agree only to 3e-3 at 80 nodes, to 6e-4 at
    160, as the quadrature of the sharper integrands converges)."""
    data_mean, data_std, c = 0.4, 0.6, 5.0
    mean0, std0 = torch.tensor(-0.3, dtype=torch.float64), torch.tensor(1.3, dtype=torch.float64)
    alpha, gamma = time, 1 - time
    weight = alpha**2 / gamma
    nodes, weights = _hermite(100)

    theta = torch.stack([mean0, std0]).requires_grad_(True)
    variance = gamma**2 * std0**2 + alpha**2
    x = gamma * mean0 + variance.sqrt() * nodes  # x ~ p_theta0,t (pi frozen)
    score_theta = -(x - gamma * theta[0]) / (gamma**2 * theta[1] ** 2 + alpha**2)
    score_q = -(x - gamma * data_mean) / (gamma**2 * data_std**2 + alpha**2)
    y = (score_theta - score_q).detach()
    divergence_part = (weights * weight * (y / torch.sqrt(y**2 + c**2)) * score_theta).sum()
    (expected,) = torch.autograd.grad(divergence_part, theta)

    theta = torch.stack([mean0, std0]).requires_grad_(True)
    eps, z = torch.meshgrid(nodes, nodes, indexing="ij")
    pair_weights = (weights[:, None] * weights[None, :]).reshape(-1)
    x0 = (theta[0] + theta[1] * eps.reshape(-1))[:, None]
    t = torch.full((x0.shape[0],), time, dtype=torch.float64)
    per_sample = sim_generator_loss(x0, z.reshape(-1, 1), t, LINEAR.path, _gaussian_prediction(data_mean, data_std),
                                    _gaussian_prediction(mean0, std0), None, c)
    (got,) = torch.autograd.grad((pair_weights * per_sample).sum(), theta)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-14)


def test_sim_loss_has_zero_gradient_when_the_generator_equals_the_data():
    theta = torch.tensor([0.4, 0.6], dtype=torch.float64, requires_grad=True)
    nodes, weights = _hermite(40)
    eps, z = torch.meshgrid(nodes, nodes, indexing="ij")
    x0 = (theta[0] + theta[1] * eps.reshape(-1))[:, None]
    t = torch.full((x0.shape[0],), 0.5, dtype=torch.float64)
    exact = _gaussian_prediction(0.4, 0.6)
    per_sample = sim_generator_loss(x0, z.reshape(-1, 1), t, LINEAR.path, exact, exact, None, 1e-3)
    (gradient,) = torch.autograd.grad(((weights[:, None] * weights[None, :]).reshape(-1) * per_sample).sum(), theta)
    assert gradient.abs().max().item() < 1e-10


def test_cosim_loss_at_the_exact_auxiliary_score_is_the_fisher_divergence_and_its_gradient():
    """E[L_phi] at f = f* equals the scaled Fisher divergence E ||x_hat_f* - x_hat_real||^2, and (envelope theorem,
    f* maximises L_phi) its gradient with f frozen equals the divergence's total gradient."""
    data_mean, data_std, time = 0.4, 0.6, 0.4
    mean0, std0 = -0.3, 1.3
    nodes, weights = _hermite(80)
    eps, z = torch.meshgrid(nodes, nodes, indexing="ij")
    pair_weights = (weights[:, None] * weights[None, :]).reshape(-1)
    s = torch.full((pair_weights.shape[0],), time, dtype=torch.float64)
    real = _gaussian_prediction(data_mean, data_std)

    theta = torch.tensor([mean0, std0], dtype=torch.float64, requires_grad=True)
    x_hat = (theta[0] + theta[1] * eps.reshape(-1))[:, None]
    per_sample = semi_implicit_fisher_loss(x_hat, z.reshape(-1, 1), s, LINEAR, real,
                                           _gaussian_prediction(mean0, std0), None)
    value = (pair_weights * per_sample).sum()
    (got,) = torch.autograd.grad(value, theta)

    theta_f = torch.tensor([mean0, std0], dtype=torch.float64, requires_grad=True)
    alpha, gamma = time, 1 - time
    x_s = gamma * theta_f[0] + torch.sqrt(gamma**2 * theta_f[1] ** 2 + alpha**2) * nodes
    times = torch.full((x_s.shape[0],), time, dtype=torch.float64)
    fisher = (weights * (_gaussian_prediction(theta_f[0], theta_f[1])(x_s[:, None], times)
                         - real(x_s[:, None], times))[:, 0] ** 2).sum()
    (expected,) = torch.autograd.grad(fisher, theta_f)
    assert value.item() == pytest.approx(fisher.item(), rel=1e-9)
    torch.testing.assert_close(got, expected, rtol=1e-7, atol=1e-12)


def test_msd_routing_covers_every_label_exactly_once():
    for num_classes, num_students in ((8, 4), (10, 3), (8, 1), (8, 8)):
        route = student_route(num_classes, num_students)
        assert route.shape == (num_classes,)  # one student per label
        assert sorted(set(route.tolist())) == list(range(num_students))  # every student owns a label
        assert bool((route[1:] >= route[:-1]).all())  # contiguous blocks
    with pytest.raises(ValueError, match="exceeds the 3 classes"):
        student_for_label(torch.arange(3), 3, 4)


def test_routed_generator_calls_each_label_s_student():
    students = [lambda x, t, labels, k=k: x * 0 + k for k in range(4)]
    routed = RoutedGenerator(students, student_route(8, 4), 8)
    labels = torch.tensor([7, 0, 3, 4, 1, 6, 2, 5])
    output = routed(torch.zeros(8, 2), torch.ones(8), labels)
    assert output[:, 0].tolist() == (labels // 2).float().tolist()
    with pytest.raises(ValueError, match="every class has its student"):
        routed(torch.zeros(1, 2), torch.ones(1), torch.tensor([8]))


def test_backward_simulation_starts_from_pure_noise_and_follows_the_chain():
    noise = torch.randn(16, 2, generator=torch.Generator().manual_seed(5))
    oracle = OracleModel(eight_gaussians(), LINEAR)
    assert torch.equal(simulate_to_step(oracle, LINEAR, noise, None, [1.0, 0.5], 0, torch.Generator()), noise)
    state = simulate_to_step(oracle, LINEAR, noise, None, [1.0, 0.5], 1, torch.Generator().manual_seed(6))
    fresh = torch.randn(noise.shape, generator=torch.Generator().manual_seed(6))
    x_hat = LINEAR.predict(oracle, noise, torch.ones(16)).data
    torch.testing.assert_close(state, 0.5 * fresh + 0.5 * x_hat)
    sampled = generator_sample(oracle, LINEAR, noise, steps=2, times=[1.0, 0.5],
                               generator=torch.Generator().manual_seed(6)).sample
    torch.testing.assert_close(sampled, LINEAR.predict(oracle, state, torch.full((16,), 0.5)).data)


def test_the_generator_sampler_stops_at_the_trained_steps():
    sampler = get_sampler("generator", {"times": [1.0, 0.5]})
    oracle = OracleModel(eight_gaussians(), LINEAR)
    assert sampler(oracle, LINEAR, torch.randn(4, 2), None, 2, None).nfe == 2
    with pytest.raises(ValueError, match="trained for 2 step"):
        sampler(oracle, LINEAR, torch.randn(4, 2), None, 3, None)
    assert get_sampler("generator")(oracle, LINEAR, torch.randn(4, 2), None, 5, None).nfe == 5


@pytest.mark.parametrize("backbone, x, channels", [
    (MLP(2, hidden=16, depth=2, classifier_head=True), torch.randn(3, 2), 16),
    (UNet(8, 1, base_channels=8, channel_mults=(1, 2), num_res_blocks=1, max_groups=4, classifier_head=True),
     torch.randn(3, 1, 8, 8), 16),
    (DiT(8, 2, 1, size="S", depth=2, hidden_size=32, num_heads=2, classifier_head=True), torch.randn(3, 1, 8, 8), 32),
])
def test_backbones_expose_bottleneck_features_to_their_classifier_head(backbone, x, channels):
    with capture_bottleneck(backbone) as captured:
        output = backbone(x, torch.rand(3))
    assert output.shape == x.shape and backbone.bottleneck_channels == channels
    features = captured.require()
    assert features.shape[0] == 3 and channels in features.shape
    logits = backbone.classifier_head(features)
    assert logits.shape == (3,)
    logits.sum().backward()  # the head's gradient reaches the backbone's encoder
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in backbone.bottleneck_layer().parameters())
    assert "classifier_head.mix.weight" in backbone.state_dict()
    # without the option the weights (and so older checkpoints) are unchanged
    assert not any(key.startswith("classifier_head") for key in MLP(2, hidden=16, depth=2).state_dict())


def test_dmd2_fake_score_phase_trains_score_and_head_in_one_pass():
    method = DMD2(LINEAR, teacher="oracle:8gaussians")
    generator, fake = MLP(2, hidden=16, depth=1), MLP(2, hidden=16, depth=1, classifier_head=True)
    calls = []
    fake.register_forward_hook(lambda module, inputs, output: calls.append(inputs[0].shape[0]))
    batch = Batch(torch.randn(32, 2), None, None, torch.Generator().manual_seed(0))
    output = method.loss("fake_score", Networks({"generator": generator, "fake_score": fake}), batch)
    output.loss.backward()
    assert calls == [96]  # fake-score rows, noised data and noised samples together
    assert fake.classifier_head.mix.weight.grad.abs().sum() > 0
    assert {"gan_real_logit", "gan_fake_logit"} <= set(output.stats)


def test_cosim_samples_any_number_of_steps_and_rejects_bad_sources():
    assert CoSIM(LINEAR, teacher="oracle:8gaussians").sampler() == ("generator", {})
    with pytest.raises(ValueError, match="source_time_range"):
        CoSIM(LINEAR, teacher="oracle:8gaussians", source_time_range=(0.0, 1.0))
    with pytest.raises(ValueError, match="a teacher is required"):
        DMD2(LINEAR)


def test_fake_score_ema_is_declared_and_read_by_the_matching_gradient():
    means = eight_gaussians().means
    method = DMD2(LINEAR, teacher="oracle:8gaussians", fake_score_ema=0.9)
    assert method.networks()["fake_score"].ema == {"kind": "constant", "decay": 0.9}
    assert DMD2(LINEAR, teacher="oracle:8gaussians").networks()["fake_score"].ema == {"kind": "none"}
    exact = OracleModel(GaussianMixture(means, 0.05), LINEAR)
    shifted = OracleModel(GaussianMixture(means + 0.3, 0.05), LINEAR)
    x = _generator_samples(means, 0.05, 512).float().requires_grad_(True)

    def gradient(networks: Networks) -> torch.Tensor:
        loss, _ = method.matching_loss(x, None, networks, torch.Generator().manual_seed(1))
        return torch.autograd.grad(loss, x)[0]

    # the generator equals the data: stationary under the (exact) EMA, not under the trained (shifted) network
    assert gradient(Networks({"fake_score": shifted}, {}, {"fake_score": exact})).abs().max().item() < 1e-6
    assert gradient(Networks({"fake_score": exact}, {}, {"fake_score": shifted})).abs().max().item() > 1e-4
    with pytest.raises(ValueError, match="keeps no EMA"):
        gradient(Networks({"fake_score": exact}))
    for bad in (1.0, -0.1, "0.9"):
        with pytest.raises(ValueError, match="fake_score_ema"):
            DMD2(LINEAR, teacher="oracle:8gaussians", fake_score_ema=bad)


def test_options_are_the_options_dataclass_fields_with_each_method_s_defaults():
    from ucgm.methods import method_options
    from ucgm.methods.distribution_matching import MSD, SIM

    assert DMD2(LINEAR, teacher="oracle:8gaussians").update_ratio == 5
    assert SIM(LINEAR, teacher="oracle:8gaussians").matching_time_range == (0.0, 0.8)
    msd = MSD(LINEAR, teacher="oracle:8gaussians", num_students=2, gan=False)
    assert (msd.num_students, msd.uses_classifier_head, msd.update_ratio) == (2, False, 5)
    assert {"fake_score_ema", "gan", "num_students", "student_model"} <= set(method_options("msd"))
    assert "generator_steps" not in method_options("cosim")
    with pytest.raises(ValueError, match="unknown option.*generator_steps.*allowed: teacher"):
        CoSIM(LINEAR, teacher="oracle:8gaussians", generator_steps=2)
