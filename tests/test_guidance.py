"""Classifier-free guidance and autoguidance wrappers."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from ucgm.sampling.guidance import AutoGuidance, ClassifierFreeGuidance
from ucgm.sampling.solvers import euler_sample
from ucgm.transports import make_transport

NUM_CLASSES = 3


class LabelledModel(nn.Module):
    """A small class-conditional network (labels in 0..NUM_CLASSES, NUM_CLASSES = null) that records its calls."""

    def __init__(self, seed: int = 0, num_classes: int = NUM_CLASSES):
        super().__init__()
        torch.manual_seed(seed)
        self.num_classes = num_classes
        self.linear = nn.Linear(4, 4)
        self.embedding = nn.Embedding(num_classes + 1, 4)
        self.calls: list[tuple[Tensor, Tensor]] = []

    def forward(self, x: Tensor, t: Tensor, labels: Tensor | None = None) -> Tensor:
        self.calls.append((t.clone(), None if labels is None else labels.clone()))
        shift = 0.0 if labels is None else self.embedding(labels)
        return torch.tanh(self.linear(x)) * (1 + t[:, None]) + shift


def inputs(batch: int = 5, t: float = 0.5) -> tuple[Tensor, Tensor, Tensor]:
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(batch, 4, generator=generator)
    return x, torch.full((batch,), t), torch.randint(0, NUM_CLASSES, (batch,), generator=generator)


def null_labels(labels: Tensor) -> Tensor:
    return torch.full_like(labels, NUM_CLASSES)


def test_cfg_scale_one_is_exactly_the_conditional_model_in_one_call():
    model = LabelledModel()
    x, t, labels = inputs()
    guided = ClassifierFreeGuidance(model, 1.0)(x, t, labels)
    assert torch.equal(guided, model(x, t, labels))
    assert len(model.calls[0][0]) == 5


def test_cfg_scale_zero_is_exactly_the_unconditional_model():
    model = LabelledModel()
    x, t, labels = inputs()
    guided = ClassifierFreeGuidance(model, 0.0)(x, t, labels)
    assert torch.equal(guided, model(x, t, null_labels(labels)))


def test_cfg_combines_conditional_and_unconditional_in_one_doubled_call():
    model = LabelledModel()
    x, t, labels = inputs()
    guided = ClassifierFreeGuidance(model, 3.0)(x, t, labels)
    call_times, call_labels = model.calls[0]
    assert len(model.calls) == 1 and call_times.shape == (10,)
    assert torch.equal(call_labels, torch.cat([labels, null_labels(labels)]))
    conditional, unconditional = model(x, t, labels), model(x, t, null_labels(labels))
    torch.testing.assert_close(guided, unconditional + 3.0 * (conditional - unconditional))


def test_cfg_interval_is_closed_and_tested_on_the_first_network_time():
    model = LabelledModel()
    guidance = ClassifierFreeGuidance(model, 2.0, interval=(0.2, 0.6))
    x, _, labels = inputs()
    for first_time, doubled in [(0.1, False), (0.2, True), (0.6, True), (0.7, False)]:
        model.calls.clear()
        t = torch.full((5,), 0.4)
        t[0] = first_time
        output = guidance(x, t, labels)
        assert len(model.calls) == 1 and len(model.calls[0][0]) == (10 if doubled else 5)
        if not doubled:
            assert torch.equal(output, model(x, t, labels))


def test_cfg_interval_uses_the_network_time_of_the_transport():
    """ReLinear hands the network 1 - t: internal t = 0.9 is network time 0.1, inside (0, 0.3)."""
    model = LabelledModel()
    guidance = ClassifierFreeGuidance(model, 2.0, interval=(0.0, 0.3))
    x, _, labels = inputs()
    make_transport("relinear").network_output(guidance, x, torch.full((5,), 0.9), labels)
    assert len(model.calls[0][0]) == 10
    torch.testing.assert_close(model.calls[0][0], torch.full((10,), 0.1))


def test_cfg_on_the_network_output_guides_the_data_prediction_alike():
    """Every parameterisation is affine in F at fixed (x_t, t), so guiding F guides x_hat with the same scale."""
    transport = make_transport("trigflow")
    model = LabelledModel()
    x, t, labels = inputs()
    guided = transport.predict(ClassifierFreeGuidance(model, 2.5), x, t, labels).data
    conditional = transport.predict(model, x, t, labels).data
    unconditional = transport.predict(model, x, t, null_labels(labels)).data
    torch.testing.assert_close(guided, unconditional + 2.5 * (conditional - unconditional), atol=1e-5, rtol=1e-5)


def test_a_guided_call_counts_once_in_the_sampler():
    model = LabelledModel()
    transport = make_transport("linear")
    x, _, labels = inputs()
    result = euler_sample(ClassifierFreeGuidance(model, 2.0), transport, x, labels, steps=4)
    assert result.nfe == len(model.calls) == 4
    assert all(len(call_times) == 10 for call_times, _ in model.calls)


def test_cfg_null_label_override_and_num_classes():
    model = LabelledModel()
    guidance = ClassifierFreeGuidance(model, 2.0, null_label=0)
    assert guidance.num_classes == NUM_CLASSES
    x, t, labels = inputs()
    guidance(x, t, labels)
    assert torch.equal(model.calls[0][1][5:], torch.zeros(5, dtype=torch.long))


@pytest.mark.parametrize(
    "arguments, message",
    [
        ({"scale": float("nan")}, "scale"),
        ({"scale": "2"}, "scale"),
        ({"scale": 2.0, "interval": (0.6, 0.2)}, "interval"),
        ({"scale": 2.0, "interval": (0.1, 0.2, 0.3)}, "interval"),
        ({"scale": 2.0, "interval": (0.1, float("nan"))}, "interval"),
    ],
)
def test_cfg_rejects_bad_arguments(arguments, message):
    with pytest.raises(ValueError, match=message):
        ClassifierFreeGuidance(LabelledModel(), **arguments)


def test_cfg_needs_a_null_label_and_matching_labels():
    unlabelled = nn.Identity()
    with pytest.raises(ValueError, match="null_label"):
        ClassifierFreeGuidance(unlabelled, 2.0)
    guidance = ClassifierFreeGuidance(LabelledModel(), 2.0)
    x, t, labels = inputs()
    with pytest.raises(ValueError, match="labels"):
        guidance(x, t, None)
    with pytest.raises(ValueError, match="labels has shape"):
        guidance(x, t, labels[:3])


def test_autoguidance_scale_one_is_exactly_the_model_and_zero_the_guide():
    model, guide = LabelledModel(seed=0), LabelledModel(seed=1)
    x, t, labels = inputs()
    assert torch.equal(AutoGuidance(model, guide, 1.0)(x, t, labels), model(x, t, labels))
    assert torch.equal(AutoGuidance(model, guide, 0.0)(x, t, labels), guide(x, t, labels))


def test_autoguidance_extrapolates_from_the_guide_with_the_same_conditioning():
    model, guide = LabelledModel(seed=0), LabelledModel(seed=1)
    x, t, labels = inputs()
    wrapper = AutoGuidance(model, guide, 2.0)
    guided = wrapper(x, t, labels)
    assert wrapper.num_classes == NUM_CLASSES
    assert torch.equal(model.calls[0][1], labels) and torch.equal(guide.calls[0][1], labels)
    expected = guide(x, t, labels) + 2.0 * (model(x, t, labels) - guide(x, t, labels))
    torch.testing.assert_close(guided, expected)


def test_autoguidance_rejects_bad_arguments():
    with pytest.raises(ValueError, match="num_classes"):
        AutoGuidance(LabelledModel(), LabelledModel(num_classes=5), 2.0)
    with pytest.raises(ValueError, match="scale"):
        AutoGuidance(LabelledModel(), LabelledModel(), float("inf"))
