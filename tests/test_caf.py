"""CAF against exact answers: the kinematics reach the data for every h, the sampler is exact for an acceleration
that does not change along the path (any N, NFE = N + 1), conditioning on the initial velocity keeps crossing paths
apart where the exact rectified-flow velocity averages them, the couplings are made once and kept in the state."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor
from training_fixtures import tiny_gmm_config

from ucgm.cli.train import run_training
from ucgm.methods.couplings import TeacherCouplings
from ucgm.methods.flow_maps.caf import (
    ConstantAccelerationFlow,
    ConstantAccelerationFlowMethod,
    caf_acceleration_target,
    caf_distance,
    caf_state,
)
from ucgm.sampling.caf_sampler import caf_sample
from ucgm.sampling.registry import get_sampler
from ucgm.training.checkpoint import read_state
from ucgm.transports import make_transport


def _pair(batch: int = 64, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, 2, generator=generator, dtype=torch.float64),
            torch.randn(batch, 2, generator=generator, dtype=torch.float64) + 3.0)


@pytest.mark.parametrize("h", [0.5, 1.0, 1.5, 2.0])
def test_the_constant_acceleration_path_reaches_the_data_and_is_the_phi_interpolation(h):
    x0, x1 = _pair()
    v0 = h * (x1 - x0)
    torch.testing.assert_close(caf_state(x0, x1, v0, torch.ones(64, dtype=torch.float64)), x1)
    torch.testing.assert_close(caf_state(x0, x1, v0, torch.zeros(64, dtype=torch.float64)), x0)
    tau = torch.rand(64, dtype=torch.float64)
    phi = (h * tau + (1 - h) * tau**2)[:, None]
    torch.testing.assert_close(caf_state(x0, x1, v0, tau), (1 - phi) * x0 + phi * x1)
    acceleration = caf_acceleration_target(x0, x1, v0)
    # x(tau) = x0 + v0 tau + a tau^2 / 2 with the target acceleration
    torch.testing.assert_close(caf_state(x0, x1, v0, tau), x0 + v0 * tau[:, None] + acceleration * tau[:, None] ** 2 / 2)
    if h == 1.0:
        assert float(acceleration.abs().max()) == 0.0  # rectified flow: no acceleration


def test_the_one_step_estimate_of_any_intermediate_state_is_the_data():
    """x_hat1 = x_tau + v0 (1 - tau) + (1 - tau^2) a / 2 (official get_caf_estimate with s = 1) for any v0."""
    x0, x1 = _pair()
    v0 = torch.randn(x0.shape, dtype=torch.float64)  # an imperfect initial velocity
    tau = torch.rand(64, dtype=torch.float64)[:, None]
    x_tau = caf_state(x0, x1, v0, tau[:, 0])
    estimate = x_tau + v0 * (1 - tau) + 0.5 * (1 - tau**2) * caf_acceleration_target(x0, x1, v0)
    torch.testing.assert_close(estimate, x1)


class ExactPairFlow(ConstantAccelerationFlow):
    """The exact CAF of known pairs: v0 = h (x1 - x0) and the constant acceleration a* (independent of x)."""

    def __init__(self, x1, h):
        super().__init__(torch.nn.Identity(), torch.nn.Identity())
        self.x1, self.h, self.calls = x1, h, 0

    def initial_velocity(self, noise, labels=None):
        self.calls += 1
        return self.h * (self.x1 - noise)

    def acceleration(self, x, tau, labels, initial_velocity):
        self.calls += 1
        x0 = self.x1 - initial_velocity / self.h
        return caf_acceleration_target(x0, self.x1, initial_velocity)


@pytest.mark.parametrize("steps", [1, 2, 3, 8])
def test_the_sampler_is_exact_for_a_constant_acceleration_at_every_step_count(steps):
    x0, x1 = _pair()
    model = ExactPairFlow(x1, h=1.5)
    result = caf_sample(model, make_transport("linear"), x0, steps=steps, return_trajectory=True)
    torch.testing.assert_close(result.sample, x1)
    assert result.nfe == steps + 1 == model.calls
    assert result.trajectory.shape == (steps + 1, 64, 2) and torch.equal(result.trajectory[0], x0)
    by_budget = get_sampler("caf")(ExactPairFlow(x1, 1.5), make_transport("linear"), x0, None, steps + 1, None)
    torch.testing.assert_close(by_budget.sample, x1)
    assert by_budget.nfe == steps + 1


def test_one_nfe_is_below_the_caf_budget_and_other_samplers_are_refused():
    x0, x1 = _pair(4)
    with pytest.raises(ValueError, match="smallest budget 2"):
        get_sampler("caf")(ExactPairFlow(x1, 1.5), make_transport("linear"), x0, None, 1, None)
    with pytest.raises(TypeError, match="--sampler caf"):
        ConstantAccelerationFlow(torch.nn.Identity(), torch.nn.Identity())(x0, torch.ones(4))
    clipped = caf_sample(ExactPairFlow(x1, 1.5), make_transport("linear"), x0, steps=2, clip=1.0).sample
    assert float(clipped.max()) == 1.0


def test_huber_distance_is_the_official_pseudo_huber():
    prediction, target = torch.randn(5, 1, 4, 4), torch.randn(5, 1, 4, 4)
    constant = 0.00054 * 16
    expected = (torch.sqrt(((prediction - target) ** 2).sum(dim=(1, 2, 3)) + constant**2) - constant) / 16
    torch.testing.assert_close(caf_distance(prediction, target, "huber"), expected)
    torch.testing.assert_close(caf_distance(prediction, target, "l2"), ((prediction - target) ** 2).mean(dim=(1, 2, 3)))


def test_bad_options_are_clear_errors():
    with pytest.raises(ValueError, match="distance"):
        ConstantAccelerationFlowMethod(distance="lpips")
    with pytest.raises(ValueError, match="teacher_transport"):
        ConstantAccelerationFlowMethod(teacher_transport="linear")


def test_couplings_are_generated_once_kept_in_the_state_and_not_regenerated_on_resume(tmp_path, monkeypatch):
    calls = []
    original = TeacherCouplings.generate

    def counting(self, *args, **kwargs):
        calls.append(self.size)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(TeacherCouplings, "generate", counting)
    overrides = ["objective=caf", "objective.num_couplings=512", "objective.teacher_steps=16",
                 "training.checkpoint_every=3", "training.log_every=1"]
    run_training(tiny_gmm_config(*overrides, "training.steps=3"), tmp_path / "run", progress=False)
    assert calls == [512]
    first = read_state(tmp_path / "run" / "checkpoints" / "step_0000003")["method"]["couplings"]
    run_training(tiny_gmm_config(*overrides, "training.steps=6"), tmp_path / "run", progress=False)
    assert calls == [512]  # resumed from the checkpoint, not regenerated
    later = read_state(tmp_path / "run" / "checkpoints" / "step_0000006")["method"]["couplings"]
    assert all(torch.equal(first[key], later[key]) for key in ("noise", "samples", "labels"))
    # the pairs are the teacher's ODE solutions: the exact oracle puts each sample near its labelled mode
    from ucgm.data.mixtures import make_mixture

    modes = make_mixture("8gaussians").means[later["labels"]].float()
    assert float((later["samples"] - modes).norm(dim=1).max()) < 0.35


def test_the_optional_adversarial_stage_trains_a_discriminator_phase(tmp_path):
    from ucgm.cli.run_log import read_stats
    from ucgm.training.checkpoint import read_checkpoint_info

    overrides = ["objective=caf", "objective.num_couplings=256", "objective.teacher_steps=8",
                 "objective.adversarial_weight=0.5", "objective.adversarial_start=2", "training.steps=4",
                 "training.log_every=1", "training.checkpoint_every=4"]
    run_training(tiny_gmm_config(*overrides), tmp_path / "run", progress=False)
    records = read_stats(tmp_path / "run" / "stats.jsonl")
    assert all({"loss/velocity", "loss/acceleration", "loss/discriminator"} <= set(record) for record in records)
    weights = [record["caf_adaptive_weight"] for record in records if "caf_adaptive_weight" in record]
    assert weights and all(0.01 <= weight <= 10 for weight in weights)
    assert "discriminator" in read_checkpoint_info(tmp_path / "run").groups
    assert ConstantAccelerationFlowMethod().schedule()[-1].name == "acceleration"  # off by default


class CrossingCoupling:
    """Two noise modes ``m_k`` (std ``sigma``) coupled to data by translations ``d_k`` whose straight paths cross at
    ``tau = 1/2``: ``x1 = x0 + d_k``. The exact rectified-flow velocity ``E[x1 - x0 | x_tau]`` and CAF's exact
    stage-1 initial velocity ``h E[x1 - x0 | x0]`` are posterior means over the two modes."""

    means = torch.tensor([[-1.0, 1.0], [-1.0, -1.0]], dtype=torch.float64)
    shifts = torch.tensor([[2.0, -2.0], [2.0, 2.0]], dtype=torch.float64)

    def __init__(self, sigma: float = 0.2):
        self.sigma = sigma

    def sample(self, batch: int) -> tuple[Tensor, Tensor]:
        generator = torch.Generator().manual_seed(0)
        modes = torch.randint(2, (batch,), generator=generator)
        x0 = self.means[modes] + self.sigma * torch.randn(batch, 2, generator=generator, dtype=torch.float64)
        return x0, x0 + self.shifts[modes]

    def mean_shift(self, x: Tensor, tau: float) -> Tensor:
        """``E[d_k | x_tau = x]`` on the straight paths ``x_tau = x0 + tau d_k``."""
        centres = self.means + tau * self.shifts
        log_weights = -((x[:, None, :] - centres[None]) ** 2).sum(-1) / (2 * self.sigma**2)
        return torch.softmax(log_weights, dim=1) @ self.shifts


class ExactCrossingFlow(ConstantAccelerationFlow):
    """CAF's exact stages on :class:`CrossingCoupling`: ``v_hat0 = h E[d | x0]``; given ``v0 = h d`` the target
    ``a* = 2 d - 2 v0 = (2 / h - 2) v0`` depends on the pair only through ``v0``."""

    def __init__(self, coupling: CrossingCoupling, h: float):
        super().__init__(torch.nn.Identity(), torch.nn.Identity())
        self.coupling, self.h = coupling, h

    def initial_velocity(self, noise, labels=None):
        return self.h * self.coupling.mean_shift(noise, 0.0)

    def acceleration(self, x, tau, labels, initial_velocity):
        return (2 / self.h - 2) * initial_velocity


@pytest.mark.parametrize("steps", [2, 4])
def test_velocity_conditioning_resolves_crossing_paths_that_rectified_flow_averages(steps):
    """flow_maps.md CAF toy check (iii), with exact models: Euler on the exact rectified-flow velocity merges the
    two crossing paths (the posterior at the crossing is 1/2 : 1/2), CAF's sampler conditioned on ``v_hat0`` keeps
    them apart."""
    coupling = CrossingCoupling()
    x0, x1 = coupling.sample(512)
    state = x0
    for k in range(steps):
        state = state + coupling.mean_shift(state, k / steps) / steps
    flow_error = float((state - x1).norm(dim=1).mean())
    for h in (1.0, 1.5):
        model = ExactCrossingFlow(coupling, h)
        # at tau = 0 the modes are apart: v_hat0 identifies the pair, and a(v_hat0) is the pair's target a*
        v0 = model.initial_velocity(x0)
        torch.testing.assert_close(v0, h * (x1 - x0), atol=1e-6, rtol=0)
        torch.testing.assert_close(model.acceleration(x0, 0.5, None, v0), caf_acceleration_target(x0, x1, v0),
                                   atol=1e-5, rtol=0)
        caf_error = float((caf_sample(model, make_transport("linear"), x0, steps=steps).sample - x1).norm(dim=1).mean())
        assert caf_error < 1e-3 < 0.5 < flow_error
