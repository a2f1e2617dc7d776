"""The LowDiff-style cascade: resolution pyramid, the exact Gaussian-process cascade oracle, the cascade sampler
(which reproduces the target distribution with the oracle) and the cascade wrapper around any method."""

from __future__ import annotations

import pytest
import torch

from ucgm.data.gaussian_process import CascadeOracle, GaussianProcessSignals, block_mean_matrix
from ucgm.data.resolution import downsample, level_shape, upsample
from ucgm.methods import build_method
from ucgm.methods.base import Batch, Networks
from ucgm.methods.discrete.cascade import Cascade, training_cost_fraction
from ucgm.models import build_model
from ucgm.sampling.cascade_sampler import cascade_levels, split_budget
from ucgm.sampling.registry import get_sampler
from ucgm.transports import make_transport

NUM = 6000


def test_pyramid_operators():
    x = torch.randn(3, 2, 8, 8)
    assert torch.equal(downsample(upsample(x, 2), 2), x)
    assert downsample(x, 4).shape == (3, 2, 2, 2) and level_shape((2, 8, 8), 0, 3) == (2, 2, 2)
    signal = torch.randn(4, 1, 16, dtype=torch.float64)
    assert torch.allclose(downsample(signal, 2).flatten(1), signal.flatten(1) @ block_mean_matrix(16, 2).T)
    with pytest.raises(ValueError, match=r"\(B, C, L\) or \(B, C, H, W\)"):
        downsample(torch.randn(4, 2), 2)


def test_budget_split_gives_every_level_a_call():
    assert split_budget(8, [0.75, 0.25]) == [6, 2]
    assert split_budget(2, [0.75, 0.25]) == [1, 1]
    assert sum(split_budget(13, [0.5, 0.3, 0.2])) == 13
    with pytest.raises(ValueError, match="one network call per cascade level"):
        split_budget(1, [0.5, 0.5])


def _sample_covariance(x: torch.Tensor) -> torch.Tensor:
    flat = x.flatten(1).to(torch.float64)
    return flat.T @ flat / flat.shape[0]


def test_cascade_with_the_exact_oracle_reproduces_the_gaussian_process():
    """Two levels (8 then 16 points), Heun with 31 calls per level: the sample covariance matches K as closely as
    exact draws of the same count do, and the refined level keeps the lower level's sample exactly."""
    signals = GaussianProcessSignals(length=16, lengthscale=2.0)
    oracle = CascadeOracle(signals, make_transport("linear"))
    noise = torch.randn(NUM, 1, 16, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    low, high = cascade_levels(oracle, oracle.transport, noise, None, [31, 31], get_sampler("heun"),
                               torch.Generator().manual_seed(1))
    target = signals.covariance
    error = float((_sample_covariance(high.sample) - target).norm() / target.norm())
    exact = signals.sample_batch(NUM, torch.Generator().manual_seed(2))[0]
    floor = float((_sample_covariance(exact) - target).norm() / target.norm())
    print(f"\ncascade covariance error {error:.4f}, exact draws {floor:.4f}")
    assert error < 1.5 * floor + 0.005
    low_target = signals.level_covariance(8)
    assert float((_sample_covariance(low.sample) - low_target).norm() / low_target.norm()) < 1.5 * floor + 0.005
    assert torch.allclose(downsample(high.sample, 2), low.sample, atol=1e-6)
    assert high.nfe == low.nfe == 31


def test_refinement_from_an_intermediate_time_keeps_the_lower_level_and_spends_the_budget():
    """With the exact oracle, a refinement started from the upsampled lower level noised to t_r = 0.5 keeps the
    lower level exactly in its block means; it spends exactly its calls; t_r = 1 is the pure-noise refinement."""
    signals = GaussianProcessSignals(length=16, lengthscale=2.0)
    oracle = CascadeOracle(signals, make_transport("linear"))
    noise = torch.randn(500, 1, 16, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    settings = {"levels": 2, "stage_sampler": "heun", "step_fractions": [0.5, 0.5]}

    def levels_of(**extra):
        sampler = get_sampler("cascade", {**settings, **extra})
        return sampler(oracle, oracle.transport, noise, None, 16, torch.Generator().manual_seed(1))

    refined = levels_of(refine_time=0.5)
    low = cascade_levels(oracle, oracle.transport, noise, None, [8, 8], get_sampler("heun"),
                         torch.Generator().manual_seed(1))[0]
    assert torch.allclose(downsample(refined.sample, 2), low.sample, atol=1e-6) and refined.nfe == 14  # Heun: 2 x 7
    assert not torch.allclose(refined.sample, levels_of().sample, atol=1e-3)
    assert torch.equal(levels_of(refine_time=1.0).sample, levels_of().sample)
    with pytest.raises(ValueError, match=r"refine_time=0 must be a number in \(0, 1\]"):
        levels_of(refine_time=0)
    with pytest.raises(ValueError, match="needs a stage sampler with a time grid"):
        get_sampler("cascade", {"levels": 2, "stage_sampler": "ddim", "refine_time": 0.5})(
            oracle, oracle.transport, noise, None, 4, None)


def test_a_cascade_ignoring_its_condition_breaks_the_refinement():
    """The negative control: refining without the low-resolution condition loses the lower level's sample."""
    signals = GaussianProcessSignals(length=16, lengthscale=2.0)
    oracle = CascadeOracle(signals, make_transport("linear"))

    class Deaf(torch.nn.Module):
        def forward(self, x, t, labels=None, low_res=None):
            return oracle(x, t, labels)

    noise = torch.randn(500, 1, 16, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    low, high = cascade_levels(Deaf(), oracle.transport, noise, None, [8, 8], get_sampler("heun"),
                               torch.Generator().manual_seed(1))
    assert (downsample(high.sample, 2) - low.sample).abs().mean() > 0.3


def test_registered_cascade_sampler_spends_the_budget_over_the_levels():
    signals = GaussianProcessSignals(length=8)
    oracle = CascadeOracle(signals, make_transport("linear"))
    noise = torch.randn(4, 1, 8, dtype=torch.float64)
    sampler = get_sampler("cascade", {"levels": 3, "stage_sampler": "euler"})
    result = sampler(oracle, oracle.transport, noise, None, 9, torch.Generator().manual_seed(0))
    assert result.sample.shape == (4, 1, 8) and result.nfe == 9 and torch.isfinite(result.sample).all()
    with pytest.raises(ValueError, match="one fraction per level"):
        get_sampler("cascade", {"levels": 2, "step_fractions": [1.0]})(oracle, oracle.transport, noise, None, 4, None)


def _cascade(objective: dict | None = None, **options) -> Cascade:
    method = build_method({"name": "ucgm", "label_dropout": 0.0, **(objective or {}),
                           "cascade": {"levels": 2, **options}}, make_transport("linear"))
    assert isinstance(method, Cascade)
    return method


def test_cascade_training_runs_one_level_per_step_with_the_condition_above_level_0():
    method = _cascade()
    assert "low_res" in method.networks()["model"].conditions
    model = build_model({"name": "unet", "input_size": 8, "in_channels": 1, "base_channels": 8,
                         "channel_mults": [1, 2], "num_res_blocks": 1, "max_groups": 4, "conditions": ["low_res"]})
    seen = []
    original = model.forward

    def spy(x, t, labels=None, **conditions):
        seen.append((x.shape[-1], conditions.get("low_res")))
        return original(x, t, labels, **conditions)

    model.forward = spy
    images = torch.randn(4, 1, 8, 8)
    levels = set()
    for seed in range(12):
        seen.clear()
        output = method.loss("train", Networks({"model": model}), Batch(images, None, None,
                                                                         torch.Generator().manual_seed(seed)))
        level = int(output.stats["cascade_level"])
        levels.add(level)
        size, condition = seen[-1]
        if level == 0:
            assert size == 4 and condition is None
        else:
            assert size == 8 and torch.equal(condition, upsample(downsample(images, 2), 2))
        assert torch.isfinite(output.loss)
    assert levels == {0, 1}
    assert method.sampler() == ("cascade", {"levels": 2, "stage_sampler": "ucgm", "stage_settings": {}})


def test_training_cost_fraction_is_the_expected_pixel_share_of_a_step():
    """Closed forms, and the mean pixel count of the batches the cascade's own level draws give it."""
    assert training_cost_fraction([1, 1]) == pytest.approx((1 / 4 + 1) / 2)
    assert training_cost_fraction([3, 1]) == pytest.approx(0.75 / 4 + 0.25)
    assert training_cost_fraction([1, 1, 2], spatial_axes=1) == pytest.approx((1 / 4 + 1 / 2 + 2) / 4)
    assert training_cost_fraction([1, 1], level_costs=[0.4, 1.0]) == pytest.approx(0.7)
    method = _cascade(level_weights=[3, 1])
    batch, generator, draws = Batch(torch.zeros(2, 1, 8, 8), None, None, None), torch.Generator().manual_seed(0), 4000
    pixels = sum(method.level_batch(batch, method.choose_level(generator))[0].data.numel() for _ in range(draws))
    share = pixels / (draws * batch.data.numel())
    # share = 1/4 + 3/4 q with q the fraction of level-1 draws, binomial with p = 1/4
    assert abs(share - training_cost_fraction([3, 1])) < 4 * 0.75 * (0.25 * 0.75 / draws) ** 0.5
    with pytest.raises(ValueError, match="level_costs"):
        training_cost_fraction([1, 1], level_costs=[1.0])
    with pytest.raises(ValueError, match="spatial_axes"):
        training_cost_fraction([1, 1], spatial_axes=3)


def test_cascade_and_self_conditioning_compose():
    method = build_method({"name": "flow_matching", "cascade": {"levels": 2},
                           "self_conditioning": {"rate": 0.5}}, make_transport("linear"))
    assert set(method.networks()["model"].conditions) == {"self_condition", "low_res"}
    model = build_model({"name": "unet", "input_size": 8, "in_channels": 1, "base_channels": 8,
                         "channel_mults": [1, 2], "num_res_blocks": 1, "max_groups": 4,
                         "conditions": ["self_condition", "low_res"]})
    for seed in range(4):
        output = method.loss("train", Networks({"model": model}),
                             Batch(torch.randn(4, 1, 8, 8), None, None, torch.Generator().manual_seed(seed)))
        output.loss.backward()
    network, transport = method.sampling_model({"model": model})
    name, settings = method.sampler()
    result = get_sampler(name, settings)(network, transport, torch.randn(3, 1, 8, 8), None, 4,
                                         torch.Generator().manual_seed(0))
    assert result.sample.shape == (3, 1, 8, 8) and result.nfe == 4


def test_bad_cascade_options_and_data_are_clear_errors():
    with pytest.raises(ValueError, match="unknown cascade option"):
        build_method({"name": "ucgm", "cascade": {"level": 2}}, make_transport("linear"))
    with pytest.raises(ValueError, match="levels=1 must be an integer >= 2"):
        _cascade(levels=1)
    with pytest.raises(ValueError, match="2 non-negative numbers"):
        _cascade(level_weights=[1.0])
    with pytest.raises(ValueError, match="refine_time=1.5 must be a number"):
        _cascade(refine_time=1.5)
    assert _cascade(refine_time=0.4).sampler()[1]["refine_time"] == 0.4
    method = _cascade()
    model = build_model({"name": "mlp", "data_dim": 2, "hidden": 8, "depth": 1, "conditions": ["low_res"]})
    with pytest.raises(ValueError, match="needs signals"):
        method.loss("train", Networks({"model": model}), Batch(torch.randn(4, 2), None, None, torch.Generator()))
