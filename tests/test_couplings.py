"""Teacher couplings: the pairs follow the teacher's probability-flow ODE (against a fine RK4 solve of the exact
mixture oracle), are deterministic from the seed, and survive a state-dict round trip unchanged."""

from __future__ import annotations

import pytest
import torch
from exact_flows import rk4_flow

from ucgm.data.mixtures import OracleModel, make_mixture
from ucgm.methods.couplings import TeacherCouplings
from ucgm.methods.probability_flow import probability_flow_sample
from ucgm.transports import make_transport


@pytest.fixture(scope="module")
def oracle():
    transport = make_transport("linear")
    return OracleModel(make_mixture("8gaussians"), transport), transport


def test_heun_pairs_follow_the_exact_flow_and_errors_shrink_with_steps(oracle):
    model, transport = oracle
    noise = torch.randn(256, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    labels = torch.arange(256) % 8
    exact = rk4_flow(model, transport, noise, 1.0, 0.0, labels, steps=400)
    errors = [float((probability_flow_sample(model, transport, noise, labels, steps) - exact).norm(dim=1).mean())
              for steps in (16, 32, 64)]
    assert errors[2] < 2e-3 < 0.05  # far below the mode width 0.05
    assert errors[0] > 3 * errors[1] > 9 * errors[2]  # second order: about 4x per halving
    euler = float((probability_flow_sample(model, transport, noise, labels, 64, "euler") - exact).norm(dim=1).mean())
    assert euler > 5 * errors[2]
    # the samples land on the labelled modes
    modes = model.mixture.means[labels]
    assert float((exact - modes).norm(dim=1).max()) < 0.3


def test_couplings_are_deterministic_from_the_seed_and_keyed_by_index(oracle):
    model, transport = oracle
    first, again, other = (TeacherCouplings(64, steps=8, chunk_size=24) for _ in range(3))
    first.generate(model, transport, (2,), 8, seed=3)
    again.generate(model, transport, (2,), 8, seed=3)
    other.generate(model, transport, (2,), 8, seed=4)
    assert torch.equal(first.noise, again.noise) and torch.equal(first.samples, again.samples)
    assert torch.equal(first.labels, again.labels)
    assert not torch.equal(first.noise, other.noise)
    indices = torch.tensor([5, 0, 5, 63])
    noise, samples, labels = first.batch(indices)
    assert torch.equal(noise, first.noise[indices]) and torch.equal(labels, first.labels[indices])
    expected = probability_flow_sample(model, transport, first.noise[indices], first.labels[indices], 8)
    torch.testing.assert_close(samples, expected.float())  # chunking does not change a pair
    assert first.labels.min() >= 0 and first.labels.max() < 8 and len(first.labels.unique()) > 4
    with pytest.raises(IndexError, match=r"\[0, 63\]"):
        first.batch(torch.tensor([64]))


def test_unconditional_couplings_have_no_labels_and_round_trip_exactly(oracle):
    model, transport = oracle
    couplings = TeacherCouplings(16, steps=4)
    assert couplings.state_dict() == {} and not couplings.generated
    with pytest.raises(RuntimeError, match="not generated"):
        couplings.batch(torch.tensor([0]))
    couplings.generate(model, transport, (2,), None, seed=0)
    assert couplings.labels is None
    restored = TeacherCouplings(16, steps=4)
    restored.load_state_dict(couplings.state_dict())
    assert torch.equal(restored.samples, couplings.samples) and restored.labels is None
    assert restored.seed == 0
    with pytest.raises(ValueError, match="expects size=8"):
        TeacherCouplings(8).load_state_dict(couplings.state_dict())
    indices = couplings.draw_indices(1000, torch.Generator().manual_seed(0))
    assert indices.min() == 0 and indices.max() == 15
