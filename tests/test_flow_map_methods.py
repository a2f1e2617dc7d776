"""CTM, Shortcut, MeanFlow and Align Your Flow against exact answers. Ground truth: the exact flow map
``Phi(x, t, s)`` of a Gaussian mixture by a fine RK4 solve of its exact probability-flow ODE
(:mod:`flow_map_oracle`), read as a two-time network for every second-time condition. Each method's target with the
exact oracle matches ``Phi`` to the order its formula promises (CTM: Heun teacher steps, second order; Shortcut: the
bootstrap target is exact for the exact map and first order in ``d`` for an instantaneous model; MeanFlow and AYF:
the average-velocity identity), MeanFlow's JVP and finite-difference tangents agree, AYF's Eulerian gradient is
MeanFlow's direction, and the losses vanish at the exact map but not at a perturbed one."""

from __future__ import annotations

import math
from typing import Optional

import pytest
import torch
from flow_map_oracle import ExactFlowMapModel, exact_flow_map, unconditional_velocity
from torch import Tensor, nn

from ucgm.data.mixtures import GaussianMixture, OracleModel
from ucgm.methods.base import Batch, Networks
from ucgm.methods.flow_maps.ayf import AlignYourFlow
from ucgm.methods.flow_maps.base import TeacherVelocity
from ucgm.methods.flow_maps.core import FlowMapParameterisation
from ucgm.methods.flow_maps.ctm import ConsistencyTrajectoryModel
from ucgm.methods.flow_maps.meanflow import MeanFlow
from ucgm.methods.flow_maps.shortcut import ShortcutModel
from ucgm.methods.flow_maps.tangent import TangentEstimator
from ucgm.methods.teachers import Teacher
from ucgm.models.mlp import MLP
from ucgm.sampling.flow_map_sampler import flow_map_grid
from ucgm.transports import make_transport

#: flow_maps.md's toy harness: means (2, 0), (-1, +-1.5), std 0.3, weights 0.5 / 0.3 / 0.2.
MEANS, WEIGHTS = [[2.0, 0.0], [-1.0, 1.5], [-1.0, -1.5]], [0.5, 0.3, 0.2]
MIXTURE = GaussianMixture(MEANS, 0.3, WEIGHTS)
LINEAR = make_transport("linear")
ORACLE = OracleModel(MIXTURE, LINEAR)


class ExactTwoTimeNetwork(nn.Module):
    """The exact flow map as a backbone ``model(x, t, labels, s=..., step=...)`` on the linear transport (identity
    network time): ``step`` is decoded as ``parameterisation`` encodes it (``gap``: ``s = t - step``; ``log2_gap``:
    ``s = t - 2^-step``). ``bias`` perturbs the output (a wrong map)."""

    def __init__(self, second_time: str = "s", steps: int = 20, bias: float = 0.0):
        super().__init__()
        self.exact, self.second_time, self.bias = ExactFlowMapModel(MIXTURE, LINEAR, steps), second_time, bias
        self.num_classes = MIXTURE.num_classes

    def forward(self, x: Tensor, t: Tensor, labels: Optional[Tensor] = None, s: Optional[Tensor] = None,
                step: Optional[Tensor] = None) -> Tensor:
        if step is not None:
            s = t - (step if self.second_time == "gap" else torch.exp2(-step))
        return self.exact(x, t, labels, s=s) + self.bias


class InstantaneousNetwork(nn.Module):
    """A ``d -> 0`` model: the exact ODE velocity for every second time (one Euler step per jump)."""

    def __init__(self):
        super().__init__()
    def forward(self, x, t, labels=None, s=None, step=None):
        return ORACLE(x, t, labels)


def _points(batch: int = 12, t: float | Tensor = 0.7, seed: int = 0) -> tuple[Tensor, Tensor, Tensor]:
    """``(x_t, data, noise)`` in float64 on the linear path at time(s) ``t``."""
    generator = torch.Generator().manual_seed(seed)
    data = MIXTURE.sample(batch, generator=generator)[0].double()
    noise = torch.randn(batch, 2, generator=generator, dtype=torch.float64)
    return LINEAR.interpolate(data, noise, torch.as_tensor(t, dtype=torch.float64)), data, noise


def _exact_average_velocity(x_t: Tensor, t: Tensor, s: Tensor) -> Tensor:
    return (x_t - exact_flow_map(MIXTURE, LINEAR, x_t, t, s, steps=100)) / (t - s)[:, None]


def _batch(data: Tensor, seed: int = 1) -> Batch:
    return Batch(data=data, labels=None, indices=None, generator=torch.Generator().manual_seed(seed))


def test_the_ground_truth_velocity_is_the_oracles():
    t = torch.linspace(0.05, 0.95, 12, dtype=torch.float64)
    x_t, _, _ = _points(t=t)
    torch.testing.assert_close(unconditional_velocity(MIXTURE, LINEAR, x_t, t), MIXTURE.velocity(x_t, t, LINEAR))


# ------------------------------------------------------------------------------------------------------- CTM
def test_ctm_teacher_steps_converge_at_second_order_to_the_exact_map():
    """``x_u`` = k Heun steps of the exact oracle along the Karras grid; the grid of ``2N - 1`` points nests the
    ``N``-point one, so 2k steps of the finer grid reach the same time: the error falls about 4x."""
    errors = []
    for num_scales, factor in ((19, 1), (37, 2), (73, 4)):
        ctm = ConsistencyTrajectoryModel(teacher=ORACLE, num_scales=num_scales,
                                         max_teacher_steps=num_scales - 1)
        start, steps = 4 * factor, 6 * factor
        grid = ctm.grid
        x_t, data, noise = _points(t=grid[start])
        n = torch.full((x_t.shape[0],), start)
        x_u = ctm.teacher_point(x_t, n, steps, None, data, noise)
        exact = exact_flow_map(MIXTURE, LINEAR, x_t, grid[start], grid[start + steps], steps=200)
        errors.append((x_u - exact).norm(dim=1).mean().item())
    assert errors[0] < 0.05  # |x_u - x_t| is about 0.3
    assert 3.0 < errors[0] / errors[1] < 6.0 and 3.0 < errors[1] / errors[2] < 6.0


def test_ctm_loss_vanishes_at_the_exact_map_and_the_dsm_term_denoises_exactly():
    ctm = ConsistencyTrajectoryModel(teacher=ORACLE, num_scales=37, max_teacher_steps=36,
                                     dsm_weight=1.0)
    _, data, _ = _points(batch=16)

    def loss(bias):
        network = ExactTwoTimeNetwork("s", bias=bias)
        return ctm.loss("train", Networks({"model": network, "target": network}), _batch(data)).stats

    exact, wrong = loss(0.0), loss(0.2)  # exact: only the Heun teacher's error is left
    assert exact["ctm_loss"] < 1e-4 and wrong["ctm_loss"] > 100 * exact["ctm_loss"]
    # g*(x, t, t) = E[x | x_t]: the exact map's data prediction is the DSM minimiser
    x_t, _, _ = _points(t=torch.full((12,), 0.4, dtype=torch.float64))
    t = torch.full((12,), 0.4, dtype=torch.float64)
    output = ctm.flow_map.output(ExactTwoTimeNetwork("s"), x_t, t, t)
    torch.testing.assert_close(LINEAR.recover(output, x_t, t)[0], MIXTURE.posterior_mean(x_t, t, LINEAR))


def test_ctm_draws_its_indices_as_the_official_sampler():
    ctm = ConsistencyTrajectoryModel(num_scales=18, max_teacher_steps=17)
    generator = torch.Generator().manual_seed(0)
    counts = torch.zeros(18)
    for _ in range(3000):
        k, n, m = ctm.sample_indices(64, generator)
        counts[k] += 1
        assert bool((n >= 0).all() and (n + k <= 17).all() and (m >= n + k).all() and (m <= 17).all())
    frequencies = counts[1:] / counts.sum()
    expected = torch.arange(1, 18, dtype=torch.float32) / (17 * 18 / 2)  # P(k) ~ k
    assert (frequencies - expected).abs().max() < 0.01


def test_ctm_samples_on_its_training_grid():
    """CTM's sampler visits points of the grid its loss trains (``ctm.grid``) unless told otherwise."""
    ctm = ConsistencyTrajectoryModel(num_scales=12, max_teacher_steps=11)
    name, settings = ctm.sampler()
    assert name == "flow-map" and settings["karras_points"] == 12
    grid = flow_map_grid(LINEAR.path, 4, settings["grid"], sigma_min=settings["sigma_min"],
                         sigma_max=settings["sigma_max"], rho=settings["rho"], karras_points=settings["karras_points"])
    assert all(bool(torch.isclose(ctm.grid, time, rtol=0, atol=1e-12).any()) for time in grid)
    assert "karras_points" not in ConsistencyTrajectoryModel(sample_on_training_grid=False).sampler()[1]


# -------------------------------------------------------------------------------------------------- Shortcut
def test_shortcut_bootstrap_target_is_the_exact_average_velocity_for_the_exact_map():
    """Two half jumps of the exact map compose: the target is ``u*(x, t, t - d)`` to ODE tolerance."""
    shortcut = ShortcutModel()
    network = ExactTwoTimeNetwork("log2_gap")
    t = torch.full((12,), 0.75, dtype=torch.float64)
    x_t, _, _ = _points(t=t)
    for level in (1, 2, 3):
        gap = torch.full((12,), 2.0 ** -level, dtype=torch.float64)
        target = shortcut.bootstrap_target(network, x_t, t, gap, None, guided_rows=0)
        torch.testing.assert_close(target, _exact_average_velocity(x_t, t, t - gap), rtol=0, atol=1e-5)


def test_shortcut_bootstrap_target_of_an_instantaneous_model_is_first_order_in_d():
    shortcut = ShortcutModel()
    t = torch.full((64,), 0.7, dtype=torch.float64)
    x_t, _, _ = _points(batch=64, t=t)
    errors = []
    for gap in (0.1, 0.05, 0.025, 0.0125):
        gaps = torch.full((64,), gap, dtype=torch.float64)
        target = shortcut.bootstrap_target(InstantaneousNetwork(), x_t, t, gaps, None, guided_rows=0)
        errors.append((target - _exact_average_velocity(x_t, t, t - gaps)).norm(dim=1).mean().item())
    ratios = [first / second for first, second in zip(errors, errors[1:])]
    assert all(1.7 < ratio < 2.3 for ratio in ratios), errors


def test_shortcut_batch_split_levels_and_the_flow_matching_rows_target_the_velocity():
    shortcut = ShortcutModel(levels=7, bootstrap_every=8)
    levels = shortcut.bootstrap_levels(32)
    assert levels.tolist() == [6] * 4 + [5] * 4 + [4] * 4 + [3] * 4 + [2] * 4 + [1] * 4 + [0] * 4 + [0] * 4
    times = shortcut.grid_times(torch.tensor([0, 1, 3] * 200), torch.Generator().manual_seed(0))
    sections = torch.tensor([1.0, 2.0, 8.0] * 200, dtype=torch.float64)
    assert bool((((1 - times) * sections).round() == (1 - times) * sections).all()) and bool((times > 0).all())
    # a network that outputs the exact velocity zeroes the flow-matching rows' loss exactly only in expectation;
    # the instantaneous oracle at d = 1/128 is O(1/128) from u(x, t, t - 1/128) -> the bootstrap rows are small
    _, data, _ = _points(batch=256)
    network = ExactTwoTimeNetwork("log2_gap")
    stats = shortcut.loss("train", Networks({"model": network, "target": network}), _batch(data)).stats
    assert stats["bootstrap_loss"] < 1e-8 < stats["flow_matching_loss"]


# -------------------------------------------------------------------------------------------------- MeanFlow
@pytest.mark.parametrize("tangent_method", ["jvp", "finite_difference"])
def test_meanflow_target_is_the_exact_average_velocity_along_the_exact_map(tangent_method):
    """``u = v - (t - r) du/dt`` with the tangent ``(v, 1, 0)`` on ``(z, t, r)``, ``h = t - r`` formed inside: with
    the exact map and the marginal velocity the target equals ``u*`` (the identity MeanFlow's loss is built on)."""
    meanflow = MeanFlow(tangent_method=tangent_method, finite_difference_step=1e-4)
    network = ExactTwoTimeNetwork("gap", steps=10)  # forward-mode AD through the RK4 solve is slow
    generator = torch.Generator().manual_seed(3)
    t = 0.3 + 0.6 * torch.rand(5, generator=generator, dtype=torch.float64)
    r = t * torch.rand(5, generator=generator, dtype=torch.float64)
    r[:2] = t[:2]  # r = t rows: plain flow matching
    x_t, _, _ = _points(batch=5, t=t)
    velocity = MIXTURE.velocity(x_t, t, LINEAR)
    derivative = meanflow.time_derivative(network, x_t, t, r, velocity, None)
    assert torch.equal(derivative[:2], torch.zeros_like(derivative[:2]))  # not evaluated where r = t
    target = velocity - (t - r)[:, None] * derivative
    torch.testing.assert_close(target[2:], _exact_average_velocity(x_t[2:], t[2:], r[2:]), rtol=0, atol=1e-4)
    torch.testing.assert_close(target[:2], velocity[:2])


def test_meanflow_u_at_equal_times_is_the_instantaneous_velocity_and_converges_at_first_order():
    flow_map = FlowMapParameterisation(LINEAR, "gap")
    network = ExactTwoTimeNetwork("gap")
    t = torch.full((16,), 0.6, dtype=torch.float64)
    x_t, _, _ = _points(batch=16, t=t)
    velocity = MIXTURE.velocity(x_t, t, LINEAR)
    torch.testing.assert_close(flow_map.average_velocity(network, x_t, t, t), velocity)
    errors = [(flow_map.average_velocity(network, x_t, t, t - gap) - velocity).norm(dim=1).mean().item()
              for gap in (0.02, 0.01, 0.005)]
    assert all(1.8 < first / second < 2.2 for first, second in zip(errors, errors[1:])), errors


def test_jvp_and_finite_difference_tangents_agree_on_a_network():
    torch.manual_seed(0)
    network = MLP(2, hidden=32, depth=2, time_scale=1.0, conditions=("step",)).double()
    for parameter in network.parameters():  # a non-zero output layer and condition embedding
        torch.nn.init.normal_(parameter, std=0.3)
    flow_map = FlowMapParameterisation(LINEAR, "gap")
    x_t = torch.randn(10, 2, dtype=torch.float64)
    t = torch.linspace(0.3, 0.9, 10, dtype=torch.float64)
    r = 0.5 * t
    tangent = torch.randn(10, 2, dtype=torch.float64)

    def velocity(model, point, time):
        return flow_map.average_velocity(model, point, time, r)

    directions = (tangent, torch.ones_like(t))
    exact = TangentEstimator("jvp")(velocity, network, (x_t, t), directions)
    reference = torch.func.jvp(lambda point, time: velocity(network, point, time), (x_t, t), directions)[1]
    torch.testing.assert_close(exact, reference, rtol=1e-12, atol=1e-12)  # dual parameters: the same derivative
    differences = [TangentEstimator("finite_difference", step)(velocity, network, (x_t, t), directions)
                   for step in (1e-2, 5e-3)]
    errors = [(difference - exact).abs().max().item() for difference in differences]
    assert errors[1] < 1e-3 and 3.0 < errors[0] / errors[1] < 5.0  # O(step^2)
    # the pitfall: a tangent (v, 1, 0) on (z, t, h) (h held fixed) is another derivative
    fixed_gap = TangentEstimator("jvp")(lambda model, point, time: flow_map.average_velocity(model, point, time,
                                                                                             time - t + r),
                                        network, (x_t, t), directions)
    assert (fixed_gap - exact).abs().max() > 1e-3


def test_meanflow_loss_is_zero_at_the_exact_map_with_the_marginal_velocity():
    """The loss's target is linear in ``v``; with the marginal velocity in place of ``z - x`` the exact map has zero
    loss and a perturbed map does not (``MeanFlow.loss`` itself, its weighting and its times)."""
    _, data, _ = _points(batch=16)

    class MarginalVelocity(MeanFlow):
        def loss(self, phase, networks, batch):
            original = self.transport.velocity
            self.transport = make_transport("linear")
            self.transport.velocity = lambda d, z, t: MIXTURE.velocity(
                self.transport.interpolate(d, z, t), t, LINEAR)
            try:
                return super().loss(phase, networks, batch)
            finally:
                self.transport.velocity = original

    meanflow = MarginalVelocity(equal_times_fraction=0.25, tangent_method="finite_difference",
                                finite_difference_step=1e-4)
    exact = meanflow.loss("train", Networks({"model": ExactTwoTimeNetwork("gap")}), _batch(data)).stats
    wrong = meanflow.loss("train", Networks({"model": ExactTwoTimeNetwork("gap", bias=0.05)}),
                          _batch(data)).stats
    assert exact["squared_error"] < 1e-9 and wrong["squared_error"] > 1e-3


def test_meanflow_guided_velocity_mixes_the_model_as_the_official_code():
    """``v_g = w v + (1 - w - k) u(z, t, t | null) + k u(z, t, t | c)`` on kept labels, ``v`` on dropped ones."""

    class Velocity(nn.Module):
        num_classes = 4

        def forward(self, x, t, labels=None, step=None):
            return x * 0 + labels[:, None].to(x.dtype)  # u(., ., . | c) = c

    meanflow = MeanFlow(guidance_scale=2.0, guidance_mix=0.5)
    velocity = torch.full((4, 2), 10.0)
    labels = torch.tensor([1, 2, 4, 3])  # 4 = null
    t = torch.tensor([0.5, 0.5, 0.5, 0.5])
    guided = meanflow.guided_velocity(Velocity(), velocity, torch.zeros(4, 2), t, labels)
    expected = 2.0 * 10 + (1 - 2.0 - 0.5) * 4 + 0.5 * labels.float()
    torch.testing.assert_close(guided[[0, 1, 3], 0], expected[[0, 1, 3]])
    torch.testing.assert_close(guided[2], velocity[2])


# ------------------------------------------------------------------------------------------------------- AYF
def test_ayf_losses_vanish_at_the_exact_map_with_the_exact_oracle_teacher():
    _, data, _ = _points(batch=16)
    for loss_type, key in (("eulerian", "tangent_norm"), ("lagrangian", "residual_norm")):
        ayf = AlignYourFlow(teacher=ORACLE, loss_type=loss_type, tangent_warmup_steps=0,
                            tangent_method="finite_difference", finite_difference_step=1e-4)
        exact = ayf.loss("train", Networks({"model": ExactTwoTimeNetwork("s")}), _batch(data))
        wrong = ayf.loss("train", Networks({"model": ExactTwoTimeNetwork("s", bias=0.05)}), _batch(data))
        assert exact.stats[key] < 1e-5 and wrong.stats[key] > 1e-2, loss_type
        assert exact.loss < 1e-8 < wrong.loss


def test_ayf_eulerian_gradient_is_parallel_to_meanflows_per_sample():
    """Both gradients are ``(du/dtheta)^T g`` times a positive number per sample (flow_maps.md section 0)."""
    torch.manual_seed(0)
    backbone = MLP(2, hidden=16, depth=1, conditions=("s",)).double()

    class EitherTime(nn.Module):  # one network read with MeanFlow's (t, h) and AYF's (t, s)
        def forward(self, x, t, labels=None, s=None, step=None):
            return backbone(x, t, labels, s=t - step if step is not None else s)

    network = EitherTime()
    data, noise = torch.randn(1, 2, dtype=torch.float64), torch.randn(1, 2, dtype=torch.float64)
    t, s = torch.tensor([0.8], dtype=torch.float64), torch.tensor([0.3], dtype=torch.float64)
    meanflow = MeanFlow(equal_times_fraction=0.0, label_dropout=0.0, tangent_method="jvp")
    ayf = AlignYourFlow(tangent_warmup_steps=0, tangent_method="jvp")
    gradients = []
    for method in (meanflow, ayf):
        method.sample_times = lambda batch_size, generator: (t, s)
        method.noise_like = lambda like, generator: noise
        backbone.zero_grad()
        method.loss("train", Networks({"model": network}), _batch(data)).loss.backward()
        gradients.append(torch.cat([parameter.grad.flatten() for parameter in backbone.parameters()]))
    cosine = torch.nn.functional.cosine_similarity(gradients[0], gradients[1], dim=0)
    assert cosine > 1 - 1e-9 and gradients[0].norm() > 0


def test_ayf_autoguided_teacher():
    teacher = Teacher(ORACLE, None, LINEAR)
    wider = Teacher(OracleModel(GaussianMixture(MEANS, 0.6, WEIGHTS), LINEAR), None, LINEAR)
    x_t, _, _ = _points(batch=8, t=0.5)
    t = torch.full((8,), 0.5, dtype=torch.float64)
    plain = TeacherVelocity(teacher, LINEAR)(x_t, t)
    torch.testing.assert_close(plain, MIXTURE.velocity(x_t, t, LINEAR))
    torch.testing.assert_close(TeacherVelocity(teacher, LINEAR, teacher, scale=2.5)(x_t, t), plain)  # bad = good
    guide = TeacherVelocity(wider, LINEAR)(x_t, t)
    torch.testing.assert_close(TeacherVelocity(teacher, LINEAR, wider, scale=2.0)(x_t, t), guide + 2 * (plain - guide))


def test_ayf_times_and_warmup():
    ayf = AlignYourFlow(tangent_warmup_steps=100)
    t, s = ayf.sample_times(4096, torch.Generator().manual_seed(0))
    assert bool((s >= 0).all() and (t <= 1).all() and (t > s).all())
    gap = t - s
    assert abs(torch.logit(gap).mean().item() + 0.8) < 0.05 and abs(torch.logit(gap).std().item() - 1.0) < 0.05
    ayf.set_progress(25)
    assert ayf.warmup_ratio == 0.25
    ayf.set_progress(1000)
    assert ayf.warmup_ratio == 1.0
    with pytest.raises(ValueError, match="need a teacher"):
        AlignYourFlow(loss_type="lagrangian")
    with pytest.raises(ValueError, match="loss_type"):
        AlignYourFlow(loss_type="hamiltonian")
    assert math.isclose(AlignYourFlow(tangent_warmup_steps=0).warmup_ratio, 1.0)
