"""Metrics against closed forms: sliced W2, MMD, energy distance, Fréchet distance, PRDC, mode coverage, ODE
likelihood."""

import math

import numpy as np
import pytest
import scipy.linalg
import torch

from ucgm.data.mixtures import GaussianMixture, OracleModel, eight_gaussians
from ucgm.metrics import (
    energy_distance,
    frechet_distance,
    frechet_distance_from_features,
    mixture_log_likelihood,
    mmd,
    mode_coverage,
    ode_log_likelihood,
    prdc,
    sliced_wasserstein,
)
from ucgm.transports import make_transport


def _gaussian(n, mean, std, seed):
    generator = torch.Generator().manual_seed(seed)
    mean = torch.as_tensor(mean, dtype=torch.float64)
    return mean + std * torch.randn(n, mean.shape[0], generator=generator, dtype=torch.float64)


# ------------------------------------------------------------------------------------------ sliced W2
def test_sliced_w2_of_shifted_gaussians_is_shift_over_dimension():
    """Projecting N(m, s^2 I) on a unit direction theta gives W2^2 = (theta . (m1 - m2))^2, whose mean over
    uniform directions is |m1 - m2|^2 / d. The samples are centred exactly on their means, so that the
    sample-mean error (the dominant finite-n term) does not blur the comparison."""
    shift = torch.tensor([1.0, -0.5, 0.8])
    a, b = _gaussian(3000, torch.zeros(3), 0.7, seed=0), _gaussian(3000, torch.zeros(3), 0.7, seed=1)
    a, b = a - a.mean(0), b - b.mean(0) + shift
    value = sliced_wasserstein(a, b, num_projections=2000, seed=3)
    assert value**2 == pytest.approx(float(shift.pow(2).sum()) / 3, rel=0.05)
    translated = sliced_wasserstein(a[:200], a[:200] + shift, num_projections=20_000, seed=4)  # (theta . shift)^2
    assert translated**2 == pytest.approx(float(shift.pow(2).sum()) / 3, rel=0.02)


def test_sliced_w2_matches_quantiles_exactly_for_unequal_sizes():
    """1-D: W2^2({0, 1}, {0, 0.5, 1}) = int (F_a^-1 - F_b^-1)^2 = 0.25/6 + 0.25/6 = 1/12."""
    value = sliced_wasserstein(torch.tensor([0.0, 1.0]), torch.tensor([1.0, 0.0, 0.5]), num_projections=3)
    assert value == pytest.approx(math.sqrt(1 / 12), rel=1e-12)
    points = _gaussian(100, [0.0, 1.0], 1.0, seed=4)
    assert sliced_wasserstein(points, points[torch.randperm(100)]) == pytest.approx(0.0, abs=1e-12)


def test_sliced_w2_is_deterministic_for_a_seed():
    a, b = _gaussian(300, [0.0, 0.0, 0.0], 1.0, seed=5), _gaussian(200, [0.3, 0.0, 0.0], 1.0, seed=6)
    assert sliced_wasserstein(a, b, seed=7) == sliced_wasserstein(a, b, seed=7)
    assert sliced_wasserstein(a, b, seed=7) != sliced_wasserstein(a, b, seed=8)


# ------------------------------------------------------------------------------------------ MMD / energy
def _rbf_mmd_closed_form(shift: float, std: float, dim: int, bandwidths) -> float:
    """For N(m1, s^2 I) vs N(m2, s^2 I): E exp(-|x - y|^2 / 2h^2) = (h^2 / (h^2 + 2 s^2))^(d/2)
    exp(-|m1 - m2|^2 / (2 (h^2 + 2 s^2))), so MMD^2 = 2 mean_h c_h (1 - exp(-shift^2 / (2 (h^2 + 2 s^2))))."""
    terms = [
        (h**2 / (h**2 + 2 * std**2)) ** (dim / 2) * (1 - math.exp(-(shift**2) / (2 * (h**2 + 2 * std**2))))
        for h in bandwidths
    ]
    return 2 * sum(terms) / len(terms)


def test_unbiased_mmd_matches_the_gaussian_closed_form():
    bandwidths = (0.2, 0.5, 1.0, 2.0)
    a = _gaussian(2000, [0.0, 0.0], 0.5, seed=10)
    same = _gaussian(2000, [0.0, 0.0], 0.5, seed=11)
    shifted = _gaussian(2000, [0.6, 0.0], 0.5, seed=12)
    assert abs(mmd(a, same, bandwidths)) < 2e-3
    expected = _rbf_mmd_closed_form(0.6, 0.5, 2, bandwidths)
    assert expected > 0.1
    assert mmd(a, shifted, bandwidths) == pytest.approx(expected, rel=0.05)


def test_energy_distance_matches_the_one_dimensional_closed_form():
    """X ~ N(0,1), Y ~ N(mu,1): E|X - Y| = sqrt(2) sqrt(2/pi) exp(-mu^2/4) + mu (1 - 2 Phi(-mu/sqrt 2)),
    E|X - X'| = 2 / sqrt(pi), so the energy distance is 2 E|X - Y| - 4 / sqrt(pi)."""
    mu = 1.0
    phi = 0.5 * (1 + math.erf(-mu / math.sqrt(2) / math.sqrt(2)))
    cross = math.sqrt(2) * math.sqrt(2 / math.pi) * math.exp(-(mu**2) / 4) + mu * (1 - 2 * phi)
    expected = 2 * cross - 4 / math.sqrt(math.pi)
    a = _gaussian(4000, [0.0], 1.0, seed=13).squeeze(1)
    assert energy_distance(a, _gaussian(4000, [mu], 1.0, seed=14)) == pytest.approx(expected, rel=0.05)
    assert abs(energy_distance(a, _gaussian(4000, [0.0], 1.0, seed=15))) < 0.01


# ------------------------------------------------------------------------------------------ Fréchet
def test_frechet_distance_of_diagonal_gaussians():
    """Diagonal covariances: FD = |m1 - m2|^2 + sum_i (s1_i - s2_i)^2."""
    mu1, mu2 = np.array([0.0, 1.0, -1.0]), np.array([0.5, 1.0, 0.0])
    s1, s2 = np.array([1.0, 2.0, 0.5]), np.array([0.5, 2.0, 1.5])
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((s1 - s2) ** 2)
    assert frechet_distance(mu1, np.diag(s1**2), mu2, np.diag(s2**2)) == pytest.approx(expected, rel=1e-10)


def test_frechet_distance_of_full_covariances_matches_the_matrix_square_root_formula():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(4, 4)), rng.normal(size=(4, 4))
    cov1, cov2 = a @ a.T + 0.1 * np.eye(4), b @ b.T + 0.1 * np.eye(4)
    mu1, mu2 = rng.normal(size=4), rng.normal(size=4)
    cross = scipy.linalg.sqrtm(cov1 @ cov2).real
    expected = np.sum((mu1 - mu2) ** 2) + np.trace(cov1 + cov2 - 2 * cross)
    assert frechet_distance(mu1, cov1, mu2, cov2) == pytest.approx(expected, rel=1e-8)
    assert frechet_distance(mu1, cov1, mu1, cov1) == pytest.approx(0.0, abs=1e-9)


def test_frechet_distance_from_features_estimates_the_gaussian_value():
    a = _gaussian(20_000, [0.0, 0.0], 1.0, seed=20)
    b = _gaussian(20_000, [1.0, 0.0], 2.0, seed=21)
    assert frechet_distance_from_features(a, b) == pytest.approx(1.0 + 2 * (2.0 - 1.0) ** 2, rel=0.03)


def test_frechet_errors():
    with pytest.raises(ValueError, match="at least 2"):
        frechet_distance_from_features(torch.zeros(1, 3), torch.zeros(5, 3))
    with pytest.raises(ValueError, match="3 features per sample but feats_b has 2"):
        frechet_distance_from_features(torch.zeros(5, 3), torch.zeros(5, 2))
    with pytest.raises(ValueError, match="NaN"):
        frechet_distance_from_features(torch.tensor([[0.0], [float("nan")]]), torch.zeros(4, 1))
    with pytest.raises(ValueError, match="NaN"):
        frechet_distance(np.zeros(2), np.eye(2), np.zeros(2), np.full((2, 2), np.nan))
    with pytest.raises(ValueError, match=r"expected \(2, 2\)"):
        frechet_distance(np.zeros(2), np.eye(3), np.zeros(2), np.eye(2))


# ------------------------------------------------------------------------------------------ PRDC
def test_prdc_of_identical_sets():
    """Identical sets: every fake lies in a real ball and vice versa; density counts, ball by ball, the fakes
    inside, and each ball B(r_i, rad_k(r_i)) holds r_i and its k nearest neighbours, so density = (k + 1) / k."""
    features = _gaussian(500, [0.0, 0.0, 0.0], 1.0, seed=30)
    result = prdc(features, features.clone(), k=5)
    assert result["precision"] == 1.0 and result["recall"] == 1.0 and result["coverage"] == 1.0
    assert result["density"] == pytest.approx(6 / 5, rel=1e-12)


def test_prdc_of_independent_and_disjoint_samples():
    """Same distribution: density ~= 1 and coverage ~= 1 - prod_{i<k} (N-1-i)/(N+M-1-i) (Naeem et al., eq. 6);
    far-apart sets: all four are 0."""
    real, fake = _gaussian(1000, [0.0, 0.0], 1.0, seed=31), _gaussian(1000, [0.0, 0.0], 1.0, seed=32)
    result = prdc(real, fake, k=5)
    expected_coverage = 1 - math.prod((999 - i) / (1999 - i) for i in range(5))
    assert result["coverage"] == pytest.approx(expected_coverage, abs=0.02)
    assert result["density"] == pytest.approx(1.0, abs=0.1)
    assert result["precision"] > 0.8 and result["recall"] > 0.8
    far = prdc(real, fake + 100.0, k=5)
    assert far == {"precision": 0.0, "recall": 0.0, "density": 0.0, "coverage": 0.0}
    with pytest.raises(ValueError, match="k=5 must be smaller than the number of samples"):
        prdc(real[:5], fake, k=5)


# ------------------------------------------------------------------------------------------ mixtures
def test_mode_coverage_of_all_and_of_half_of_the_modes():
    mixture = eight_gaussians()
    samples, _ = mixture.sample(8000, torch.Generator().manual_seed(40))
    full = mode_coverage(samples, mixture)
    assert full["missing_modes"] == 0
    assert full["fraction_near_a_mode"] == pytest.approx(1 - math.exp(-4.5), abs=0.005)  # P(|eps| < 3) in 2-D
    assert full["mode_histogram_tv"] < 0.03
    half, _ = mixture.sample(8000, torch.Generator().manual_seed(41), torch.arange(8000) % 4)
    result = mode_coverage(half, mixture)
    assert result["missing_modes"] == 4
    assert result["mode_histogram_tv"] == pytest.approx(0.5, abs=1e-12)  # 4 modes of weight 1/8 hold no mass
    far = mode_coverage(samples + 10.0, mixture)
    assert far["fraction_near_a_mode"] == 0.0 and far["missing_modes"] == 8


def test_mixture_log_likelihood_is_the_exact_mean_log_density():
    mixture = GaussianMixture([[0.5, -1.0]], [0.8])
    samples = _gaussian(10, [0.0, 0.0], 1.0, seed=42)
    expected = (-np.log(2 * np.pi * 0.64) - ((samples - torch.tensor([0.5, -1.0])) ** 2).sum(1) / (2 * 0.64)).mean()
    assert mixture_log_likelihood(samples, mixture) == pytest.approx(float(expected), rel=1e-12)
    with pytest.raises(ValueError, match="mixture has dimension 2"):
        mode_coverage(torch.zeros(4, 3), mixture)


# ------------------------------------------------------------------------------------------ ODE likelihood
@pytest.mark.parametrize("name, t_min", [("linear", 0.0), ("trigflow", 0.0), ("vp", 1e-3), ("edm", 0.0)])
def test_ode_likelihood_of_a_single_gaussian_with_the_oracle(name, t_min):
    """Within 1% of the exact log density; EDM also checks the gamma(0) ~ 2 rescaling of the start point (its
    remaining ~0.01 nats come from the centred-data prior, gamma(1) mu != 0)."""
    mixture = GaussianMixture([[0.5, -0.3]], [0.7])
    oracle = OracleModel(mixture, make_transport(name))
    x, _ = mixture.sample(6, torch.Generator().manual_seed(50))
    result = ode_log_likelihood(oracle, oracle.transport, x, steps=16, t_min=t_min)
    exact = mixture.log_prob(x)
    assert torch.allclose(result["log_likelihood"], exact, rtol=0.01)
    assert torch.allclose(result["bits_per_dim"], -result["log_likelihood"] / (2 * math.log(2)))


def test_ode_likelihood_of_a_bimodal_mixture_is_exact_and_hutchinson_is_unbiased():
    mixture = GaussianMixture([[-1.0, 0.0], [1.0, 0.5]], [0.5, 0.8], weights=[0.4, 0.6])
    oracle = OracleModel(mixture, make_transport("linear"))
    x, labels = mixture.sample(6, torch.Generator().manual_seed(51))
    exact = ode_log_likelihood(oracle, oracle.transport, x, steps=12)["log_likelihood"]
    assert torch.allclose(exact, mixture.log_prob(x), rtol=0.01)
    conditional = ode_log_likelihood(oracle, oracle.transport, x, labels, steps=12)["log_likelihood"]
    assert torch.allclose(conditional, mixture.log_prob(x, labels), rtol=0.01)
    # the trajectory does not depend on the probes, so the estimate's mean is the exact-divergence value at the
    # same step count. In 2-D a Rademacher probe errs by +-int (J_12 + J_21) dt (up to ~0.8 nats here), so one
    # probe is visibly off while the mean of 1000 probes has a standard deviation of about 0.025 nats.
    coarse = ode_log_likelihood(oracle, oracle.transport, x, steps=1, exact_divergence=True)["log_likelihood"]
    estimate = ode_log_likelihood(
        oracle, oracle.transport, x, steps=1, exact_divergence=False, hutchinson_samples=1000,
        generator=torch.Generator().manual_seed(52),
    )["log_likelihood"]
    assert torch.allclose(estimate, coarse, atol=0.1)
    single_probe = ode_log_likelihood(
        oracle, oracle.transport, x, steps=1, exact_divergence=False, generator=torch.Generator().manual_seed(52)
    )["log_likelihood"]
    assert (single_probe - coarse).abs().max() > 0.3


def test_ode_likelihood_uses_a_seeded_hutchinson_estimate_in_high_dimension():
    """D = 20 > 16: Hutchinson by default; Rademacher probes are exact for the isotropic Jacobian of one
    Gaussian, so the result still equals the density; anisotropic (two modes) it depends on the seed."""
    dim = 20
    single = GaussianMixture(torch.full((1, dim), 0.2), [0.9])
    oracle = OracleModel(single, make_transport("linear"))
    x, _ = single.sample(3, torch.Generator().manual_seed(53))
    result = ode_log_likelihood(oracle, oracle.transport, x, steps=12, generator=torch.Generator().manual_seed(1))
    assert torch.allclose(result["log_likelihood"], single.log_prob(x), rtol=0.01)
    two = GaussianMixture(torch.stack([torch.zeros(dim), torch.full((dim,), 0.3)]), [0.5, 1.0])
    oracle = OracleModel(two, make_transport("linear"))

    def run(seed):
        return ode_log_likelihood(
            oracle, oracle.transport, x, steps=4, generator=torch.Generator().manual_seed(seed)
        )["log_likelihood"]

    assert torch.equal(run(2), run(2))
    assert not torch.equal(run(2), run(3))


def test_ode_likelihood_errors():
    mixture = GaussianMixture([[0.0, 0.0]], [1.0])
    oracle = OracleModel(mixture, make_transport("linear"))
    x = torch.zeros(3, 2)
    with pytest.raises(ValueError, match="steps=0 must be an integer >= 1"):
        ode_log_likelihood(oracle, oracle.transport, x, steps=0)
    with pytest.raises(ValueError, match=r"t_min=1.0 is outside the allowed range \[0, 1\)"):
        ode_log_likelihood(oracle, oracle.transport, x, t_min=1.0)
    with pytest.raises(ValueError, match="allowed values: None"):
        ode_log_likelihood(oracle, oracle.transport, x, exact_divergence="yes")
    with pytest.raises(ValueError, match="leading batch dimension of 3"):
        ode_log_likelihood(oracle, oracle.transport, x, labels=torch.zeros(2, dtype=torch.long))


def test_distance_errors():
    with pytest.raises(ValueError, match="a has 3 features per sample but b has 2"):
        sliced_wasserstein(torch.zeros(4, 3), torch.zeros(4, 2))
    with pytest.raises(ValueError, match="at least 2"):
        mmd(torch.zeros(1, 2), torch.zeros(4, 2))
    with pytest.raises(ValueError, match="positive length scales"):
        mmd(torch.zeros(3, 2), torch.zeros(4, 2), bandwidths=(1.0, -1.0))
    with pytest.raises(ValueError, match="NaN"):
        energy_distance(torch.tensor([0.0, float("inf")]), torch.zeros(3))
    with pytest.raises(ValueError, match="num_projections=0"):
        sliced_wasserstein(torch.zeros(4, 2), torch.zeros(4, 2), num_projections=0)
