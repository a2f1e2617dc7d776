"""sCM: JVP against finite-difference tangents, the 'auto' fallback, the tangent formulas, adaptive weighting, DDP,
the relation to UCGM-T, sCT / sCD on the 8-Gaussians mixture, the few-step sampler and input errors."""

import functools
import math
import warnings

import pytest
import torch
import torch.distributed as distributed

from ucgm.data.mixtures import GaussianMixture, OracleModel, eight_gaussians
from ucgm.metrics import sliced_wasserstein
from ucgm.models.mlp import MLP
from ucgm.methods import FlowMatchingObjective, SCMObjective, UCGMObjective, build_method
from ucgm.methods.consistency.adaptive_weighting import AdaptiveWeighting
from ucgm.methods.base import shared_randomness
from ucgm.methods.consistency import scm as scm_module
from ucgm.methods.consistency.scm import jvp_unsupported, sample_trigflow_time
from ucgm.methods.consistency.scm_tangent import (
    normalise_tangent,
    output_derivative_finite_difference,
    output_derivative_jvp,
    scm_tangent,
    tangent_warmup_ratio,
)
from ucgm.methods.diffusion.ucgm import data_prediction_tangent
from ucgm.sampling.scm_sampler import default_intermediate_angles, scm_sample
from ucgm.sampling.ucgm_sampler import ucgm_sample
from ucgm.transports import make_transport

TRIGFLOW = make_transport("trigflow")
HALF_PI = math.pi / 2


def small_network(seed=0, num_classes=3, dropout=0.0, dtype=torch.float32):
    """A small MLP with a non-zero output layer (the library MLP starts at F = 0)."""
    torch.manual_seed(seed)
    model = MLP(2, hidden=32, depth=2, num_classes=num_classes, time_scale=1.0, dropout=dropout)
    torch.nn.init.normal_(model.output[-1].weight, std=0.5)
    return model.to(dtype)


class _DoubleWithoutForwardAD(torch.autograd.Function):
    """``2 a`` with a backward but no ``jvp``: forward-mode AD through it fails, like fused attention kernels."""

    @staticmethod
    def forward(a):
        return 2 * a

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, grad):
        return 2 * grad


class NoForwardADNetwork(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.inner = small_network()
        self.num_classes = self.inner.num_classes

    def forward(self, x, t, labels=None):
        return _DoubleWithoutForwardAD.apply(self.inner(x, t, labels))


def same_dropout(device=torch.device("cpu"), seed=0):
    """The network-randomness context of one loss (what the objective passes its tangent passes)."""
    return functools.partial(shared_randomness, seed, device)


def batch(n=64, seed=0, dtype=torch.float32):
    generator = torch.Generator().manual_seed(seed)
    data = torch.randn(n, 2, generator=generator, dtype=dtype)
    noise = torch.randn(n, 2, generator=generator, dtype=dtype)
    time = (0.05 + 0.9 * torch.rand(n, generator=generator, dtype=torch.float64)).to(dtype)
    labels = torch.randint(0, 3, (n,), generator=generator)
    return data, noise, time, labels


def cosine(a, b):
    return float(torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0))


def flat_gradient(model):
    return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])


def tangents_both_ways(model, data, noise, time, labels, velocity=None):
    """sCT (``velocity=None``: points on the (x, z) pair) or sCD (points along ``velocity``) tangents by JVP and by
    finite differences, without warm-up (r = 1) and with sigma_d = 1."""
    x_t = TRIGFLOW.interpolate(data, noise, time)
    on_pair = velocity is None
    velocity = TRIGFLOW.target(data, noise, time) if on_pair else velocity
    state = same_dropout(data.device)
    angle = HALF_PI * time.double()
    with torch.no_grad():
        output = TRIGFLOW.network_output(model, x_t, time, labels)
        jvp = output_derivative_jvp(model, TRIGFLOW, x_t, time, velocity, labels, state)

        def point_at(offset):
            if on_pair:
                return TRIGFLOW.interpolate(data.double(), noise.double(), (angle + offset) / HALF_PI)
            return x_t.double() + offset[:, None] * velocity.double()

        difference = output_derivative_finite_difference(model, TRIGFLOW, point_at, angle, 1e-3 * angle, labels,
                                                         state, data.dtype).to(data.dtype)
    return [scm_tangent(output, velocity, x_t, derivative, HALF_PI * time, 1.0, 1.0)
            for derivative in (jvp, difference)]


# ------------------------------------------------------------------------------------------ tangents
def test_jvp_and_finite_difference_tangents_agree_for_sct_and_scd():
    model = small_network()
    data, noise, time, labels = batch()
    jvp, difference = tangents_both_ways(model, data, noise, time, labels)
    assert cosine(jvp, difference) > 0.999
    teacher_velocity = torch.randn_like(data)
    jvp, difference = tangents_both_ways(model, data, noise, time, labels, velocity=teacher_velocity)
    assert cosine(jvp, difference) > 0.999
    gradients = []
    for method in ("jvp", "finite_difference"):
        model.zero_grad()
        objective = SCMObjective(tangent_method=method, tangent_warmup_steps=0)
        objective(model, data, labels, time=time, noise=noise).loss.backward()
        gradients.append(flat_gradient(model))
    assert cosine(*gradients) > 0.99


def test_finite_difference_passes_replay_the_dropout_masks_of_the_online_pass():
    model = small_network(dropout=0.3).train()
    data, noise, time, labels = batch()
    gradients = []
    for method in ("jvp", "finite_difference"):
        model.zero_grad()
        objective = SCMObjective(tangent_method=method, tangent_warmup_steps=0, adaptive_weighting=False)
        objective(model, data, labels, time=time, noise=noise, generator=torch.Generator().manual_seed(11)
                  ).loss.backward()
        gradients.append(flat_gradient(model))
    assert cosine(*gradients) > 0.99  # with fresh masks the difference quotient would be mask noise / 2d
    state = torch.get_rng_state()
    SCMObjective(tangent_method="finite_difference")(model, data, labels, time=time, noise=noise,
                                                     generator=torch.Generator().manual_seed(11))
    assert torch.equal(state, torch.get_rng_state())  # every pass draws its dropout from the batch generator


def test_auto_falls_back_to_finite_differences_once_with_a_warning():
    model = NoForwardADNetwork()
    data, noise, time, labels = batch()
    with pytest.raises(RuntimeError):
        SCMObjective(tangent_method="jvp")(model, data, labels, time=time, noise=noise)
    objective = SCMObjective(tangent_method="auto")
    with pytest.warns(RuntimeWarning, match="forward-mode AD is not supported by this model"):
        first = objective(model, data, labels, time=time, noise=noise)
    assert objective.method_in_use == "finite_difference"
    assert objective.state_dict() == {"tangent_method_in_use": "finite_difference"}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        second = objective(model, data, labels, time=time, noise=noise)
    reference = SCMObjective(tangent_method="finite_difference")(model, data, labels, time=time, noise=noise)
    torch.testing.assert_close(first.per_sample, reference.per_sample)
    torch.testing.assert_close(second.per_sample, reference.per_sample)


def test_auto_tangent_never_falls_back_on_other_errors_and_its_choice_is_checkpointed(monkeypatch):
    """Only "forward-mode AD unsupported" switches to finite differences: out of memory (a RuntimeError too) and
    other failures propagate; a model that supports JVP is decided once for JVP; a resumed objective keeps the
    decision without probing again."""
    data, noise, time, labels = batch()
    assert jvp_unsupported(NotImplementedError("You must implement the jvp function"))
    assert jvp_unsupported(RuntimeError("Trying to use forward AD with _efficient_attention that does not support it"))
    assert not jvp_unsupported(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert not jvp_unsupported(RuntimeError("mat1 and mat2 shapes cannot be multiplied"))

    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    with monkeypatch.context() as patched:
        patched.setattr(scm_module, "output_derivative_jvp", out_of_memory)
        objective = SCMObjective(tangent_method="auto")
        with pytest.raises(torch.OutOfMemoryError):
            objective(small_network(), data, labels, time=time, noise=noise)
        assert objective.method_in_use == "auto"  # undecided: no silent switch

    supported = SCMObjective(tangent_method="auto")
    supported(small_network(), data, labels, time=time, noise=noise)
    assert supported.state_dict() == {"tangent_method_in_use": "jvp"}
    resumed = SCMObjective(tangent_method="auto")
    resumed.load_state_dict(SCMObjective(tangent_method="auto", adaptive_weighting=False).state_dict() |
                            {"tangent_method_in_use": "finite_difference"})
    calls = []
    monkeypatch.setattr(scm_module, "output_derivative_jvp", lambda *args, **kwargs: calls.append(1))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        resumed(NoForwardADNetwork(), data, labels, time=time, noise=noise)
    assert resumed.method_in_use == "finite_difference" and not calls
    with pytest.raises(ValueError, match="the checkpoint used tangent_method='finite_difference'"):
        SCMObjective(tangent_method="jvp").load_state_dict({"tangent_method_in_use": "finite_difference"})


def _decide_on_rank(rank: int, store: str, results: dict) -> None:
    """Rank 1's model has no forward-mode AD, rank 0's has: the ``auto`` decision must agree across ranks."""
    torch.set_num_threads(1)
    distributed.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        data, noise, time, labels = batch()
        objective = SCMObjective(tangent_method="auto")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            objective(NoForwardADNetwork() if rank == 1 else small_network(), data, labels, time=time, noise=noise)
        results[rank] = objective.method_in_use
    finally:
        distributed.destroy_process_group()


def test_the_auto_tangent_decision_is_the_same_on_every_rank(tmp_path):
    if not distributed.is_available() or not distributed.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    import torch.multiprocessing as multiprocessing

    results = multiprocessing.Manager().dict()
    multiprocessing.spawn(_decide_on_rank, args=(str(tmp_path / "store"), results), nprocs=2, join=True)
    assert dict(results) == {0: "finite_difference", 1: "finite_difference"}


def test_tangent_formula_warmup_and_normalisation():
    model = small_network(dtype=torch.float64)
    data, noise, time, labels = batch(dtype=torch.float64)
    objective = SCMObjective(tangent_method="jvp", tangent_warmup_steps=100, adaptive_weighting=False,
                             sigma_data=0.5, normalisation_constant=0.1)
    objective.set_progress(25, 1000)
    assert objective.warmup_ratio == 0.25
    assert tangent_warmup_ratio(250, 100) == 1.0 and tangent_warmup_ratio(7, 0) == 1.0

    x_t = TRIGFLOW.interpolate(data, noise, time)
    velocity = noise * torch.cos(HALF_PI * time)[:, None] - data * torch.sin(HALF_PI * time)[:, None]
    with torch.no_grad():
        output, derivative = torch.func.jvp(lambda x, t: model(x, t, labels), (x_t, time),
                                            (velocity, torch.full_like(time, 1 / HALF_PI)))
    cos, sin = torch.cos(HALF_PI * time)[:, None], torch.sin(HALF_PI * time)[:, None]
    expected = 0.5 * (-cos**2 * (output - velocity) - 0.25 * cos * sin * (x_t + derivative))
    tangent = scm_tangent(output, velocity, x_t, derivative, HALF_PI * time, 0.25, 0.5)
    torch.testing.assert_close(tangent, expected)

    normalised = normalise_tangent(tangent, "norm", 0.1)
    norms = tangent.norm(dim=1)
    torch.testing.assert_close(normalised, tangent / (norms[:, None] + 0.1))
    torch.testing.assert_close(normalised.norm(dim=1), norms / (norms + 0.1))
    torch.testing.assert_close(normalise_tangent(3 * tangent, "clamp"), torch.clamp(3 * tangent, -1, 1))
    assert normalise_tangent(tangent, "none") is tangent

    # The objective regresses F on F^- + g / (||g|| + c): the loss is mean(g_hat^2), its gradient -2 g_hat dF / D.
    result = objective(model, data, labels, time=time, noise=noise)
    torch.testing.assert_close(result.per_sample, (normalised**2).mean(dim=1))
    result.loss.backward()
    expected_gradient = torch.autograd.grad((-2 * normalised * model(x_t, time, labels)).mean(dim=1).mean(),
                                            list(model.parameters()))
    torch.testing.assert_close(flat_gradient(model), torch.cat([g.flatten() for g in expected_gradient]))


def test_adaptive_weighting_loss_head_gradients_and_state():
    model = small_network()
    data, noise, time, labels = batch()
    plain = SCMObjective(adaptive_weighting=False)(model, data, labels, time=time, noise=noise)
    objective = SCMObjective()
    torch.nn.init.constant_(objective.weighting.bias, 0.3)
    result = objective(model, data, labels, time=time, noise=noise)
    torch.testing.assert_close(result.per_sample, math.exp(-0.3) * plain.per_sample + 0.3)
    result.loss.backward()
    head = list(objective.weighting.parameters())
    assert len(head) == 2 and all(p.grad is not None and torch.isfinite(p.grad).all() for p in head)
    assert objective.build_network("weighting") is objective.weighting  # a network the trainer optimises
    assert set(objective.networks()) == {"model", "weighting"}
    assert [phase.networks for phase in objective.schedule()] == [("model", "weighting")]
    assert set(SCMObjective(adaptive_weighting=False).networks()) == {"model"}
    assert torch.equal(AdaptiveWeighting(seed=3).frequencies, AdaptiveWeighting(seed=3).frequencies)


def test_time_law_is_arctan_lognormal():
    generator = torch.Generator().manual_seed(0)
    time = sample_trigflow_time(20000, -1.0, 1.4, 0.5, HALF_PI, generator)
    log_sigma = torch.log(0.5 * torch.tan(HALF_PI * time))
    assert 0 < float(time.min()) and float(time.max()) <= 1
    assert abs(float(log_sigma.mean()) + 1.0) < 0.05 and abs(float(log_sigma.std()) - 1.4) < 0.05


# ------------------------------------------------------------------------------------------- DDP
@pytest.fixture
def single_process_group(tmp_path):
    if not distributed.is_available() or not distributed.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    distributed.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    yield
    distributed.destroy_process_group()


def test_ddp_wrapped_model_gives_the_same_loss_and_gradients(single_process_group):
    data, noise, time, labels = batch()
    results = []
    for wrap in (False, True):
        model = small_network()
        network = torch.nn.parallel.DistributedDataParallel(model) if wrap else model
        objective = SCMObjective(tangent_method="jvp")
        torch.nn.init.constant_(objective.weighting.bias, 0.1)
        result = objective(network, data, labels, time=time, noise=noise)
        result.loss.backward()
        results.append((result.loss.detach(), flat_gradient(model), objective.weighting.bias.grad))
    for plain, wrapped in zip(*results):
        torch.testing.assert_close(plain, wrapped)


# ------------------------------------------------------------------------------------ relation to UCGM
def test_ucgm_lambda_one_trigflow_loss_and_gradient_from_the_scm_tangent():
    """With exact derivatives, UCGM-T's target is F^- + 4 clamp(h g / (sigma_d cos s)) with sCM's g (r = 1)."""
    sigma_data = 0.5
    data, noise, time, labels = batch(dtype=torch.float64)
    ucgm_model, scm_model = small_network(dtype=torch.float64), small_network(dtype=torch.float64)
    ucgm = UCGMObjective("trigflow", consistency_ratio=1.0, tangent="jvp", label_dropout=0.0)
    ucgm_result = ucgm(ucgm_model, data, labels, time=time, noise=noise)
    ucgm_result.loss.backward()

    x_t = TRIGFLOW.interpolate(data, noise, time)
    output = TRIGFLOW.network_output(scm_model, x_t, time, labels)
    velocity = TRIGFLOW.target(data, noise, time)
    with torch.no_grad():
        derivative = output_derivative_jvp(scm_model, TRIGFLOW, x_t, time, velocity, labels,
                                           same_dropout(data.device))
        tangent = scm_tangent(output, velocity, x_t, derivative, HALF_PI * time, 1.0, sigma_data)
        data_prediction_rate = HALF_PI * tangent / (sigma_data * torch.cos(HALF_PI * time)[:, None])
        target = output + 4 * torch.clamp(data_prediction_rate, -1, 1)
    per_sample = ((output - target) ** 2).mean(dim=1).sqrt()
    per_sample.mean().backward()
    assert (data_prediction_rate.abs() > 1).any() and (data_prediction_rate.abs() < 1).any()  # clamp exercised
    torch.testing.assert_close(ucgm_result.per_sample, per_sample.detach())
    torch.testing.assert_close(flat_gradient(ucgm_model), flat_gradient(scm_model))


def test_ucgm_and_scm_finite_differences_agree_to_second_order():
    """UCGM differences x_hat at t +- 0.005; sCM differences F: both estimate d x_hat / dt to O(eps^2)."""
    model = small_network(dtype=torch.float64)
    data, noise, time, labels = batch(dtype=torch.float64)
    with torch.no_grad():
        exact = data_prediction_tangent(model, TRIGFLOW, data, noise, time, labels, method="jvp")
        ucgm_rate = data_prediction_tangent(model, TRIGFLOW, data, noise, time, labels, step=0.005)
    x_t = TRIGFLOW.interpolate(data, noise, time)
    velocity = TRIGFLOW.target(data, noise, time)
    angle = HALF_PI * time
    with torch.no_grad():
        output = TRIGFLOW.network_output(model, x_t, time, labels)
        derivative = output_derivative_finite_difference(
            model, TRIGFLOW, lambda offset: TRIGFLOW.interpolate(data, noise, (angle + offset) / HALF_PI), angle,
            torch.full_like(angle, 0.005 * HALF_PI), labels, same_dropout(data.device), torch.float64)
        tangent = scm_tangent(output, velocity, x_t, derivative, angle, 1.0, 1.0)
    scm_rate = HALF_PI * tangent / torch.cos(angle)[:, None]
    scale = float(exact.abs().max())
    assert float((scm_rate - exact).abs().max()) < 1e-3 * scale
    assert float((ucgm_rate - exact).abs().max()) < 1e-3 * scale
    assert float((scm_rate - ucgm_rate).abs().max()) > 1e-10 * scale  # different estimators, same limit


# --------------------------------------------------------------------------------------------- sampler
class ExactGaussianConsistency(torch.nn.Module):
    """The exact TrigFlow F of data N(0, a^2 I): f(x_s, s) = a x_s / sqrt(a^2 cos^2 s + sin^2 s)."""

    def __init__(self, std):
        super().__init__()
        self.std = std

    def forward(self, x, t, labels=None):
        angle = (HALF_PI * t)[:, None]
        scale = self.std / torch.sqrt(self.std**2 * torch.cos(angle) ** 2 + torch.sin(angle) ** 2)
        return (torch.cos(angle) - scale) * x / torch.sin(angle)


def test_sampler_steps_angles_and_exact_model():
    model = ExactGaussianConsistency(0.3)
    noise = torch.randn(20000, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert default_intermediate_angles(1) == [] and default_intermediate_angles(2) == [1.1]
    assert default_intermediate_angles(3) == pytest.approx([1.1, 0.55])
    for steps in (1, 2, 4):
        result = scm_sample(model, TRIGFLOW, noise, steps=steps, generator=torch.Generator().manual_seed(1),
                            return_trajectory=True)
        assert result.nfe == steps and result.trajectory.shape == (steps + 1, 20000, 2)
        assert abs(float(result.sample.std()) - 0.3) < 0.01
    one_step = scm_sample(model, TRIGFLOW, noise, steps=1).sample
    torch.testing.assert_close(one_step, 0.3 * noise)
    # The exact model is the oracle's consistency function: zero tangent along the oracle's ODE.
    oracle = OracleModel(GaussianMixture(torch.zeros(1, 2), 0.3), make_transport("linear"))
    data, noise, time, _ = batch(dtype=torch.float64)
    objective = SCMObjective(teacher=oracle, tangent_method="jvp", tangent_warmup_steps=0, adaptive_weighting=False,
                             tangent_normalisation="none")
    assert float(objective(model, data, time=time, noise=noise).stats["tangent_norm"]) < 1e-10


# ------------------------------------------------------------------------------------- toy training
@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def train(objective, steps, seed=0, learning_rate=3e-4):
    """Train a tiny MLP on the 8 Gaussians; return it, the per-step losses and the mixture."""
    mixture = eight_gaussians()
    torch.manual_seed(seed)
    model = MLP(2, hidden=64, depth=2, time_scale=1.0)
    optimizer = torch.optim.Adam(list(model.parameters()) + list(objective.parameters()), lr=learning_rate)
    generator = torch.Generator().manual_seed(seed + 1)
    losses = []
    for step in range(steps):
        objective.set_progress(step, steps)
        result = objective(model, mixture.sample(256, generator=generator)[0], generator=generator)
        optimizer.zero_grad()
        result.loss.backward()
        optimizer.step()
        losses.append(float(result.loss.detach()))
    return model, losses, mixture


def one_and_two_step_sliced_w2(model, mixture):
    reference = mixture.sample(4000, generator=torch.Generator().manual_seed(5))[0]
    noise = torch.randn(2000, 2, generator=torch.Generator().manual_seed(3))
    samples = [scm_sample(model, TRIGFLOW, noise, steps=steps, generator=torch.Generator().manual_seed(4)).sample
               for steps in (1, 2)]
    assert all(torch.isfinite(sample).all() for sample in samples)
    return [sliced_wasserstein(sample, reference) for sample in samples]


@pytest.mark.slow
def test_sct_on_eight_gaussians_reduces_its_loss_and_samples_in_one_and_two_steps(one_thread):
    """sCT's own loss is dominated by its one-sample velocity (it stays near 0.25 at r = 1); its progress shows in
    the same loss measured along the exact probability-flow ODE (sCD's loss with the oracle as teacher)."""
    mixture = eight_gaussians()
    generator = torch.Generator().manual_seed(99)
    data = mixture.sample(4096, generator=generator)[0]
    time = sample_trigflow_time(4096, generator=generator).float()
    noise = torch.randn(4096, 2, generator=generator)
    exact_loss = SCMObjective(teacher=OracleModel(mixture, TRIGFLOW), tangent_warmup_steps=0, adaptive_weighting=False)
    untrained = MLP(2, hidden=64, depth=2, time_scale=1.0)
    initial = float(exact_loss(untrained, data, time=time, noise=noise).loss.detach())
    model, _, _ = train(SCMObjective(tangent_method="finite_difference", tangent_warmup_steps=100,
                                     adaptive_weighting=False), 1500)
    final = float(exact_loss(model, data, time=time, noise=noise).loss.detach())
    one_step, two_step = one_and_two_step_sliced_w2(model, mixture)
    print(f"sCT 1500 steps: loss along the exact ODE {initial:.3f} -> {final:.3f}; "
          f"1-step SW2 {one_step:.3f}, 2-step SW2 {two_step:.3f}")
    assert final < 0.6 * initial
    assert one_step < 0.2 and two_step < 0.2  # the untrained network: 0.71 (1 step), 0.35 (2 steps)


def test_scd_with_the_exact_oracle_learns_a_one_step_map_in_a_short_run(one_thread):
    """The default run's sCD check at tiny size; the full-length quality checks above and below are ``slow``."""
    objective = SCMObjective(teacher=OracleModel(eight_gaussians(), make_transport("linear")),
                             tangent_method="finite_difference", tangent_warmup_steps=50, adaptive_weighting=False)
    torch.manual_seed(0)
    untrained_one_step, _ = one_and_two_step_sliced_w2(MLP(2, hidden=64, depth=2, time_scale=1.0), eight_gaussians())
    model, _, mixture = train(objective, 200)
    one_step, two_step = one_and_two_step_sliced_w2(model, mixture)
    assert one_step < 0.5 * untrained_one_step and two_step < 0.5 * untrained_one_step  # 0.23, 0.17 vs 0.71


@pytest.mark.slow
def test_scd_with_the_exact_oracle_is_within_twice_the_sliced_w2_of_64_step_flow_matching(one_thread):
    objective = SCMObjective(teacher=OracleModel(eight_gaussians(), make_transport("linear")),
                             tangent_method="finite_difference", tangent_warmup_steps=100, adaptive_weighting=False)
    model, _, mixture = train(objective, 1500)
    one_step, two_step = one_and_two_step_sliced_w2(model, mixture)
    flow_matching, _, _ = train(FlowMatchingWithProgress(TRIGFLOW), 1500)
    reference = mixture.sample(4000, generator=torch.Generator().manual_seed(5))[0]
    noise = torch.randn(2000, 2, generator=torch.Generator().manual_seed(3))
    flow_matching_64 = sliced_wasserstein(ucgm_sample(flow_matching, TRIGFLOW, noise, steps=64).sample, reference)
    print(f"sCD 1500 steps: 1-step SW2 {one_step:.3f}, 2-step SW2 {two_step:.3f}; "
          f"flow matching 1500 steps, 64 NFE: {flow_matching_64:.3f}")
    assert one_step < 0.1 and one_step < 2 * flow_matching_64


class FlowMatchingWithProgress(FlowMatchingObjective):
    """Flow matching with the two trainer hooks :func:`train` calls."""

    def set_progress(self, step, total_steps=None):
        pass

    def parameters(self):
        return iter(())


# ------------------------------------------------------------------------------------------ plumbing
def test_registered_and_built_from_a_config():
    objective = build_method({"name": "scm", "teacher": "oracle:8gaussians", "adaptive_weighting": False},
                                TRIGFLOW)
    assert isinstance(objective, SCMObjective) and objective.teacher_adapter is not None
    assert build_method({"name": "scm", "teacher": "reference"}, TRIGFLOW).reference_mode == "frozen"


def test_same_generator_same_loss():
    model = small_network()
    data, _, _, labels = batch()
    first, second = (SCMObjective(label_dropout=0.3)(model, data, labels, generator=torch.Generator().manual_seed(7))
                     for _ in range(2))
    torch.testing.assert_close(first.per_sample, second.per_sample)


@pytest.mark.parametrize("options, message", [
    ({"transport": "linear"}, "TrigFlow transport"),
    ({"tangent_method": "forward"}, "tangent_method"),
    ({"tangent_normalisation": "l2"}, "tangent_normalisation"),
    ({"normalisation_constant": 0.0}, "normalisation_constant"),
    ({"sigma_data": -0.5}, "sigma_data"),
    ({"log_sigma_std": 0.0}, "log_sigma_std"),
    ({"finite_difference_step": 0.5}, "finite_difference_step"),
    ({"tangent_warmup_steps": -1}, "tangent_warmup_steps"),
    ({"teacher": "teacher.pt"}, "teacher"),
    ({"teacher_transport": "linear"}, "teacher_transport"),
])
def test_bad_options_raise(options, message):
    with pytest.raises(ValueError, match=message):
        SCMObjective(**options)


def test_bad_call_inputs_raise():
    model = small_network()
    data, noise, time, labels = batch()
    objective = SCMObjective()
    with pytest.raises(ValueError, match="time must lie in"):
        objective(model, data, time=torch.zeros(64), noise=noise)
    with pytest.raises(ValueError, match="noise has shape"):
        objective(model, data, noise=noise[:, :1])
    with pytest.raises(ValueError, match="labels"):
        objective(model, data, labels[:3])
    with pytest.raises(ValueError, match="NaN"):
        objective(model, data * float("nan"))
    with pytest.raises(ValueError, match="reference_model"):
        SCMObjective(teacher="reference")(model, data)
    with pytest.raises(ValueError, match="step"):
        objective.set_progress(-1, 10)
    with pytest.raises(ValueError, match="TrigFlow"):
        scm_sample(model, make_transport("linear"), noise)
    with pytest.raises(ValueError, match="steps=2 needs 1"):
        scm_sample(model, TRIGFLOW, noise, steps=2, intermediate_angles=[1.0, 0.5])
    with pytest.raises(ValueError, match="decrease strictly"):
        scm_sample(model, TRIGFLOW, noise, steps=3, intermediate_angles=[0.5, 1.0])


def test_jvp_tangents_work_through_attention_models():
    """Fused CPU attention has no forward derivative; both JVP tangents (sCM's dF/ds, UCGM-T's dX/dt) run math
    attention and agree with their central differences on a tiny DiT."""
    from ucgm.models.dit import DiT

    torch.manual_seed(0)
    model = DiT(input_size=4, patch_size=2, in_channels=1, num_classes=None, depth=1, hidden_size=16,
                num_heads=2, time_scale=1.0).double().eval()  # its time embedding is float32: slow frequencies
    for parameter in model.parameters():  # the DiT zero-initialises its modulation and output layers
        parameter.data.normal_(0, 0.1)
    data, noise = torch.randn(3, 1, 4, 4, dtype=torch.float64), torch.randn(3, 1, 4, 4, dtype=torch.float64)
    time = torch.tensor([0.2, 0.5, 0.8], dtype=torch.float64)
    x_t = TRIGFLOW.interpolate(data, noise, time)
    velocity = TRIGFLOW.target(data, noise, time)
    with torch.no_grad():
        output_rate = output_derivative_jvp(model, TRIGFLOW, x_t, time, velocity, None, same_dropout())
        step = 1e-3
        central = (TRIGFLOW.network_output(model, x_t + step * velocity, time + step / HALF_PI, None)
                   - TRIGFLOW.network_output(model, x_t - step * velocity, time - step / HALF_PI, None)) / (2 * step)
        data_rate = data_prediction_tangent(model, TRIGFLOW, data, noise, time, None, method="jvp")
        data_difference = data_prediction_tangent(model, TRIGFLOW, data, noise, time, None, step=1e-3)
    assert float(output_rate.abs().max()) > 1e-2 and float(data_rate.abs().max()) > 1e-2
    torch.testing.assert_close(output_rate, central, rtol=1e-3, atol=1e-4 * float(central.abs().max()))
    torch.testing.assert_close(data_rate, data_difference, rtol=1e-3, atol=1e-4 * float(data_rate.abs().max()))
