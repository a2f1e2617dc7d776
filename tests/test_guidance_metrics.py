"""Per-class metrics against exact answers, the NFE-match scan, and the guidance study's samplers."""

import pytest
import torch

from ucgm.analysis.nfe_match import smallest_matching_nfe
from ucgm.bench.guidance import guided_network, guidance_records
from ucgm.data.mixtures import GaussianMixture, OracleModel
from ucgm.metrics.per_class import class_mode_coverage, per_class_sliced_w2, rms_spread, within_class_spread
from ucgm.sampling.guidance import AutoGuidance, ClassifierFreeGuidance
from ucgm.transports import make_transport

#: Two classes, two components each, far apart.
MEANS = torch.tensor([[-4.0, 0.0], [0.0, 4.0], [4.0, 0.0], [0.0, -4.0]])
LABELS = torch.tensor([0, 0, 1, 1])


def mixture() -> GaussianMixture:
    return GaussianMixture(MEANS, 0.3, component_labels=LABELS)


def draw(count: int, seed: int):
    return mixture().sample(count, torch.Generator().manual_seed(seed))


def test_rms_spread_and_within_class_spread_are_exact_for_scaled_samples():
    points = torch.tensor([[0.0, 0.0], [2.0, 0.0], [0.0, 2.0], [2.0, 2.0]])
    assert rms_spread(points) == pytest.approx(2**0.5)
    reference, labels = draw(4000, 0)
    shrunk = reference.clone()
    for label in (0, 1):  # every class pulled halfway to its mean: spread exactly 1/2 of the data's
        rows = labels == label
        shrunk[rows] = 0.5 * (reference[rows] + reference[rows].mean(dim=0))
    assert within_class_spread(reference, labels, reference, labels) == pytest.approx(1.0)
    assert within_class_spread(shrunk, labels, reference, labels) == pytest.approx(0.5)


def test_per_class_sliced_w2_sees_swapped_labels_that_the_pooled_distance_cannot():
    reference, labels = draw(4000, 0)
    samples, sample_labels = draw(4000, 1)
    matched = per_class_sliced_w2(samples, sample_labels, reference, labels)
    swapped = per_class_sliced_w2(samples, 1 - sample_labels, reference, labels)
    pooled_with_swapped_labels = per_class_sliced_w2(samples, torch.zeros_like(sample_labels), reference,
                                                     torch.zeros_like(labels))
    # matched classes: the sampling noise of the components' shares (the same order as the pooled floor);
    # swapped: each class against the other's components, 4 sqrt(2) apart
    assert swapped > 5 * matched and swapped > 5 * pooled_with_swapped_labels


def test_class_mode_coverage_counts_the_covered_components_of_each_class():
    samples, labels = draw(4000, 0)
    assert class_mode_coverage(samples, labels, mixture()) == 1.0
    near_first = torch.cdist(samples, MEANS).argmin(dim=1)
    kept = (near_first == 0) | (near_first == 2)  # one component of each class
    assert class_mode_coverage(samples[kept], labels[kept], mixture()) == pytest.approx(0.5)


def test_per_class_metrics_reject_bad_input():
    reference, labels = draw(100, 0)
    with pytest.raises(ValueError, match="rows but 3 labels"):
        within_class_spread(reference, labels[:3], reference, labels)
    with pytest.raises(ValueError, match="classes \\[5\\] of the samples have no reference rows"):
        per_class_sliced_w2(reference, torch.full((100,), 5), reference, labels)
    with pytest.raises(ValueError, match="fewer than 2"):
        within_class_spread(reference[:3], torch.tensor([0, 1, 1]), reference, labels)
    with pytest.raises(ValueError, match="min_share"):
        class_mode_coverage(reference, labels, mixture(), min_share=0.0)


def test_smallest_matching_nfe_stops_at_the_first_budget_as_good_as_the_reference():
    called = []

    def score(nfe: int) -> float:
        called.append(nfe)
        return 1.0 / nfe

    found = smallest_matching_nfe(score, 0.2, (16, 2, 4, 8))
    assert found["smallest_nfe"] == 8 and called == [2, 4, 8] and found["values"] == {2: 0.5, 4: 0.25, 8: 0.125}
    assert smallest_matching_nfe(score, 0.01, (2, 4))["smallest_nfe"] is None
    assert smallest_matching_nfe(lambda nfe: float(nfe), 3.0, (2, 3, 4), higher_is_better=True)["smallest_nfe"] == 3
    with pytest.raises(ValueError, match="positive budgets"):
        smallest_matching_nfe(score, 0.2, (0, 2))


def test_guidance_kinds_and_records_on_an_exact_conditional_model():
    model = OracleModel(mixture(), make_transport("linear"))
    assert isinstance(guided_network("cfg", model, model, 2.0), ClassifierFreeGuidance)
    assert isinstance(guided_network("autoguidance", model, model, 2.0), AutoGuidance)
    with pytest.raises(ValueError, match="allowed: cfg, autoguidance"):
        guided_network("pag", model, model, 2.0)
    reference, labels = draw(2000, 3)

    def measure(samples, sample_labels):
        return {"within_class_spread": within_class_spread(samples, sample_labels, reference, labels)}

    records = guidance_records("toy", model, model, model.transport, (2,), 2, 200, measure, scales=(1.0, 3.0), nfe=8)
    assert [(r["guidance"], r["scale"]) for r in records] == [("cfg", 1.0), ("cfg", 3.0), ("autoguidance", 1.0),
                                                              ("autoguidance", 3.0)]
    values = {(r["guidance"], r["scale"]): r["value"] for r in records}
    # autoguidance by the model itself is the model at every scale; CFG at scale 3 narrows the classes
    assert values[("cfg", 1.0)] == pytest.approx(values[("autoguidance", 3.0)], rel=1e-6)
    assert values[("cfg", 3.0)] < values[("cfg", 1.0)]
