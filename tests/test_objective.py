"""UCGM-T objective: closed forms, tangents, its extra passes and their dropout masks, reproducibility, warnings and
input errors."""

import math

import pytest
import torch

from ucgm.methods import FlowMatchingObjective, UCGMObjective, build_method
from ucgm.methods.base import drop_labels
from ucgm.methods.diffusion.ucgm import data_prediction_tangent, sample_beta_time
from ucgm.transports import make_transport


class TinyModel(torch.nn.Module):
    """A small smooth conditional network ``model(x, t, labels)`` that counts its calls."""

    def __init__(self, dim=2, num_classes=3, hidden=32, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.num_classes = num_classes
        self.inp = torch.nn.Linear(dim + 1, hidden)
        self.emb = torch.nn.Embedding(num_classes + 1, hidden)
        self.out = torch.nn.Linear(hidden, dim)
        self.calls = []

    def forward(self, x, t, labels=None):
        self.calls.append((x.shape[0], torch.is_grad_enabled()))
        h = self.inp(torch.cat([x, t.reshape(-1, 1).to(x.dtype)], 1))
        if labels is not None:
            h = h + self.emb(labels)
        return self.out(torch.tanh(h))


def _batch(n=16, dim=2, seed=0):
    generator = torch.Generator().manual_seed(seed)
    data = torch.randn(n, dim, generator=generator)
    noise = torch.randn(n, dim, generator=generator)
    time = torch.rand(n, generator=generator) * 0.9 + 0.05
    labels = torch.randint(0, 3, (n,), generator=generator)
    return data, noise, time, labels


def test_lambda_zero_is_root_mean_square_flow_matching_error():
    model = TinyModel()
    data, noise, time, labels = _batch()
    objective = UCGMObjective("linear", consistency_ratio=0.0, label_dropout=0.0)
    got = objective(model, data, labels, time=time, noise=noise)
    x_t = (1 - time[:, None]) * data + time[:, None] * noise
    error = ((model(x_t, time, labels) - (noise - data)) ** 2).mean(1)
    torch.testing.assert_close(got.per_sample, error.sqrt().detach())
    torch.testing.assert_close(got.loss, error.sqrt().mean())
    fm = FlowMatchingObjective("linear")(model, data, labels, time=time, noise=noise)
    torch.testing.assert_close(fm.per_sample, error.detach())


def test_pseudo_huber_cosine_term_and_time_weighting():
    model = TinyModel()
    data, noise, time, labels = _batch()
    objective = UCGMObjective("linear", huber_constant=0.3, cosine_loss=True, time_weighting="cosine",
                              label_dropout=0.0)
    got = objective(model, data, labels, time=time, noise=noise)
    x_t = (1 - time[:, None]) * data + time[:, None] * noise
    output, target = model(x_t, time, labels), noise - data
    expected = torch.sqrt(((output - target) ** 2).mean(1) + 0.09) - 0.3
    expected = expected + 1 - torch.nn.functional.cosine_similarity(output, target, dim=1)
    expected = expected * torch.cos(time * math.pi / 2)
    torch.testing.assert_close(got.loss, expected.mean())


@pytest.mark.parametrize("transport_name", ["linear", "trigflow", "edm"])
def test_finite_difference_tangent_agrees_with_jvp(transport_name):
    transport = make_transport(transport_name)
    model = TinyModel().double()
    data, noise, time, labels = (v.double() if v.is_floating_point() else v for v in _batch(seed=2))
    with torch.no_grad():
        finite = data_prediction_tangent(model, transport, data, noise, time, labels, "finite_difference", 0.005)
    exact = data_prediction_tangent(model, transport, data, noise, time, labels, "jvp")
    cosine = torch.nn.functional.cosine_similarity(finite.flatten(), exact.flatten(), dim=0)
    assert cosine > 0.999


def test_lambda_one_target_formula_and_passes():
    model = TinyModel()
    data, noise, time, labels = _batch(seed=3)
    objective = UCGMObjective("linear", consistency_ratio=1.0, label_dropout=0.0)
    model.calls.clear()
    got = objective(model, data, labels, time=time, noise=noise)
    # one no-grad pass each for t + eps and t - eps (each sees the online dropout masks), then the online pass
    assert model.calls == [(16, False), (16, False), (16, True)]
    with torch.no_grad():
        x_t = (1 - time[:, None]) * data + time[:, None] * noise
        output = model(x_t, time, labels)

        def data_at(r):
            x_r = (1 - r[:, None]) * data + r[:, None] * noise
            return x_r - r[:, None] * model(x_r, r, labels)

        delta = ((data_at(time + 0.005) - data_at(time - 0.005)) / 0.01).clamp(-1, 1)
        target = output + (time / torch.sin(time * math.pi / 2) * 4)[:, None] * delta
    expected = ((output - target) ** 2).mean(1).sqrt().mean()
    torch.testing.assert_close(got.loss, expected, rtol=1e-4, atol=1e-6)


def test_hybrid_ratio_uses_model_at_scaled_time():
    model = TinyModel()
    data, noise, time, labels = _batch(seed=4)
    objective = UCGMObjective("linear", consistency_ratio=0.5, label_dropout=0.0)
    model.calls.clear()
    got = objective(model, data, labels, time=time, noise=noise)
    assert model.calls == [(16, False), (16, True)]
    with torch.no_grad():
        x_t = (1 - time[:, None]) * data + time[:, None] * noise
        output = model(x_t, time, labels)
        current = x_t - time[:, None] * output
        r = 0.5 * time
        x_r = (1 - r[:, None]) * data + r[:, None] * noise
        earlier = x_r - r[:, None] * model(x_r, r, labels)
        delta = ((current - earlier) / (0.5 * time[:, None])).clamp(-1, 1)
        target = output + (time / torch.sin(time * math.pi / 2) * 4)[:, None] * delta
    torch.testing.assert_close(got.loss, ((output - target) ** 2).mean(1).sqrt().mean(), rtol=1e-4, atol=1e-6)


def test_enhanced_target_rules_and_pass_counts():
    model, reference = TinyModel(seed=0), TinyModel(seed=1)
    data, noise, time, labels = _batch(seed=5)
    labels[-4:] = 3  # dropped rows carry the null label
    time[:6] = 0.9  # outside the enhanced range (0, 0.75)
    for style, expected_reference_calls in (("ft-vs-fe", [(16, False)]), ("fc-vs-fe", [(16, False)] * 2),
                                            ("fc-vs-xz", [(16, False)])):
        objective = UCGMObjective("linear", enhanced_ratio=0.5, enhanced_style=style, label_dropout=0.0)
        model.calls.clear(), reference.calls.clear()
        got = objective(model, data, labels, reference_model=reference, time=time, noise=noise)
        assert reference.calls == expected_reference_calls, style
        assert model.calls == [(16, True)]
        with torch.no_grad():
            x_t = (1 - time[:, None]) * data + time[:, None] * noise
            online = model(x_t, time, labels)
            nulls = torch.full_like(labels, 3)
            predictions = {
                "online": online, "ref_c": reference(x_t, time, labels), "ref_u": reference(x_t, time, nulls),
            }
            conditional = predictions["online" if style == "ft-vs-fe" else "ref_c"]
            truth = noise - data
            unconditional = truth if style == "fc-vs-xz" else predictions["ref_u"]
            # F is affine in (x, z), so the rules hold for the target F itself
            target = torch.where((time < 0.75)[:, None], truth + 0.5 * (conditional - unconditional),
                                 (truth + conditional) / 2)
            target = torch.where((labels == 3)[:, None], (truth + unconditional) / 2, target)
        torch.testing.assert_close(got.loss, ((online - target) ** 2).mean(1).sqrt().mean(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("options, expected", [
    ({"consistency_ratio": 1.0, "enhanced_style": "fc-vs-xz"}, [(16, False)] * 3 + [(16, True)]),
    ({"consistency_ratio": 1.0, "enhanced_style": "fc-vs-xz", "mode": "fast"}, [(16, False)] * 2 + [(16, True)]),
    ({"consistency_ratio": 0.5, "enhanced_style": "fc-vs-fe"}, [(16, False)] * 3 + [(16, True)]),
    ({"consistency_ratio": 1.0, "enhanced_style": "ft-vs-fe"}, [(16, False), (16, True), (16, False), (16, False)]),
])
def test_no_gradient_passes_run_before_the_online_pass_unless_they_read_it(options, expected):
    """Reference and tangent passes run before the online pass, which frees their temporaries before its graph is
    built; after an ``ft-vs-fe`` enhanced pair (read from the online prediction) the tangent passes follow it."""
    model, reference = TinyModel(seed=0), TinyModel(seed=1)
    reference.calls = model.calls  # one log of both networks' calls, in order
    data, noise, time, labels = _batch(seed=6)
    objective = UCGMObjective("linear", enhanced_ratio=0.5, label_dropout=0.0, **options)
    objective(model, data, labels, reference_model=reference, time=time, noise=noise)
    assert model.calls == expected


class MaskRecorder(torch.nn.Module):
    """Output = x times a dropout mask of a fixed width (the same for every batch size); records the masks."""

    def __init__(self, num_classes=3):
        super().__init__()
        self.num_classes = num_classes
        self.dropout = torch.nn.Dropout(0.5)
        self.scale = torch.nn.Parameter(torch.ones(()))
        self.masks = []

    def forward(self, x, t, labels=None):
        mask = self.dropout(torch.ones(x.shape[0], 64))
        self.masks.append(mask)
        return self.scale * x * mask[:, :x.shape[1]]


@pytest.mark.parametrize("options", [
    {"consistency_ratio": 1.0},
    {"consistency_ratio": 1.0, "tangent": "jvp"},
    {"consistency_ratio": 0.5},
    {"enhanced_ratio": 0.5, "enhanced_style": "ft-vs-fe"},
    {"enhanced_ratio": 0.5, "enhanced_style": "fc-vs-fe"},
    {"consistency_ratio": 1.0, "enhanced_ratio": 0.5, "enhanced_style": "fc-vs-xz"},
])
def test_every_extra_pass_sees_the_online_dropout_masks_drawn_from_the_generator(options):
    """The official code restores the online pass's RNG state before its tangent and enhanced-target passes; ucgm
    runs every pass of a loss under one dropout seed drawn from the batch generator (the policy of every method)."""
    model, reference = MaskRecorder().train(), MaskRecorder().train()
    data, noise, time, labels = _batch()
    objective = UCGMObjective("linear", label_dropout=0.0, **options)
    state = torch.get_rng_state()
    objective(model, data, labels, reference_model=reference, time=time, noise=noise,
              generator=torch.Generator().manual_seed(1))
    assert torch.equal(torch.get_rng_state(), state)  # no draw leaks into the global generator
    masks = model.masks + reference.masks
    assert len(masks) >= 2 and all(torch.equal(mask, masks[0]) for mask in masks)
    model.masks.clear()
    objective(model, data, labels, reference_model=reference, time=time, noise=noise,
              generator=torch.Generator().manual_seed(2))
    assert not torch.equal(model.masks[0], masks[0])  # another generator, other masks


def test_remapped_enhanced_ratio_and_label_dropout_without_a_null_label_warn():
    with pytest.warns(UserWarning, match=r"enhanced_ratio=2.0 >= 1 .* \(r - 1\) / r = 0.5"):
        objective = UCGMObjective("linear", enhanced_ratio=2.0)
    assert objective.enhanced_ratio == 0.5
    model = TinyModel()
    model.num_classes = None
    data, noise, time, labels = _batch()
    with pytest.warns(RuntimeWarning, match="label_dropout=0.1 is ignored: the model has no null label"):
        UCGMObjective("linear")(model, data, labels, time=time, noise=noise)


def test_reproducible_from_generator_and_explicit_inputs():
    model = TinyModel()
    data, _, _, labels = _batch()
    objective = UCGMObjective("linear", consistency_ratio=1.0, time_distribution=(0.8, 1.0, 1.0))
    first = objective(model, data, labels, generator=torch.Generator().manual_seed(7))
    second = objective(model, data, labels, generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(first.loss, second.loss)
    times = sample_beta_time(20000, (2.0, 5.0, 1.0), torch.Generator().manual_seed(0))
    assert float(times.mean()) == pytest.approx(2 / 7, abs=0.01)
    scaled = sample_beta_time(1000, (1.0, 1.0, 0.5), torch.Generator().manual_seed(0))
    assert float(scaled.max()) <= 0.5


def test_label_dropout_uses_null_label():
    labels = torch.zeros(4000, dtype=torch.long)
    dropped = drop_labels(labels, 0.5, 3, torch.Generator().manual_seed(0))
    assert set(dropped.unique().tolist()) == {0, 3}
    assert float((dropped == 3).float().mean()) == pytest.approx(0.5, abs=0.03)


def test_from_official_names_and_build_method():
    objective = UCGMObjective.from_official({"consistc_ratio": 1.0, "ema_decay_rate": 1.0, "scaled_cbl_eps": 5.0,
                                             "weight_funcion": "Cosine", "enhanced_ratio": 2.0,
                                             "enhanced_style": "fc-vs-xz"})
    assert objective.reference_mode == "frozen" and objective.huber_constant == 5.0
    assert objective.time_weighting == "cosine"
    multi = UCGMObjective.from_official({"enhanced_ratio": 2.0})  # official remap (r - 1) / r when lambda = 0
    assert multi.enhanced_ratio == 0.5 and multi.enhanced_style == "ft-vs-fe" and multi.reference_mode == "ema"
    built = build_method({"name": "ucgm", "consistency_ratio": 0.5}, make_transport("linear"))
    assert built.consistency_ratio == 0.5
    with pytest.raises(ValueError, match="unknown option 'consistency_ration'.*did you mean 'consistency_ratio'"):
        build_method({"name": "ucgm", "consistency_ration": 0.5}, make_transport("linear"))
    with pytest.raises(ValueError, match="unknown objective 'diffusion'"):
        build_method({"name": "diffusion"}, make_transport("linear"))
    with pytest.raises(ValueError, match="unknown official UCGM arguments"):
        UCGMObjective.from_official({"consistc_ratios": 1.0})


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"consistency_ratio": 1.5}, r"consistency_ratio=1.5 is outside the allowed range \[0.0, 1.0\]"),
        ({"consistency_ratio": -0.1}, "consistency_ratio"),
        ({"enhanced_style": "cfg"}, "enhanced_style='cfg' is not allowed; allowed values"),
        ({"time_weighting": "sigmoid"}, "time_weighting"),
        ({"reference": "teacher"}, "allowed values: 'ema', 'online', 'frozen'"),
        ({"time_distribution": (1.0, 0.0, 1.0)}, "three positive numbers"),
        ({"transport": "unknown"}, "unknown transport"),
    ],
)
def test_bad_configuration_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        UCGMObjective(**kwargs)


def test_bad_inputs_errors():
    model = TinyModel()
    data, noise, time, labels = _batch()
    objective = UCGMObjective("linear")
    with pytest.raises(ValueError, match="noise has shape .* data has shape"):
        objective(model, data, labels, noise=noise[:, :1])
    with pytest.raises(ValueError, match="data contains NaN or Inf"):
        objective(model, data.clone().fill_(float("nan")), labels)
    with pytest.raises(ValueError, match="labels has shape"):
        objective(model, data, labels[:3])
    with pytest.raises(ValueError, match="time has shape"):
        objective(model, data, labels, time=time[:4])
    enhanced = UCGMObjective("linear", enhanced_ratio=0.5)
    with pytest.raises(ValueError, match="needs class labels"):
        enhanced(model, data, None)
    with pytest.raises(ValueError, match="needs a reference_model"):
        enhanced(model, data, labels)
