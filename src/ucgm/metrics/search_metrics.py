"""The two metrics of a schedule search (lower is better): one for the *search* set, one for the *evaluation*
set, with different reference data where the dataset has a reference, so that a search is never judged on
what it was tuned on.

| data | metric | search reference | evaluation reference |
|---|---|---|---|
| mixture | ``sliced_w2`` | exact samples, seed :data:`SEARCH_REFERENCE_SEED` | exact samples, seed 12345 (``ucgm evaluate``'s) |
| digits | ``digits_fd`` | training split | held-out split (``ucgm evaluate``'s) |
| categorical | ``tv`` | exact table | exact table |
| quantised_digits, upsampled_digits | ``digits_fd`` | training split | held-out split |
| other finite data | ``sliced_w2`` | first half of a seeded permutation | second half |

Mixture references have the class proportions of the labels ``i % num_classes`` the samples are drawn with.
"""

from __future__ import annotations

import copy
from typing import Callable, NamedTuple

import torch
from torch import Tensor

from .suites import NUM_PROJECTIONS, REFERENCE_SEED, SlicedW2Against, _class_labels

SEARCH_REFERENCE_SEED = 24680
NUM_REFERENCE = 20000


class SearchMetrics(NamedTuple):
    """The metric's name and its search-set and evaluation-set versions ``samples -> value``."""

    name: str
    search: Callable[[Tensor], float]
    evaluation: Callable[[Tensor], float]


def _first_value(suite) -> Callable[[Tensor], float]:
    return lambda samples: suite.evaluate(samples, None)[0].value


def search_metrics(config: dict, num_classes: int, num_samples: int, num_reference: int = NUM_REFERENCE
                   ) -> SearchMetrics:
    """The :class:`SearchMetrics` of a run's resolved ``config`` (its ``data`` section); ``num_reference`` exact
    mixture samples per reference."""
    from ..data import build_dataset

    data = copy.deepcopy(config["data"])
    name = data.get("name")
    if name == "mixture":
        mixture = build_dataset(data).mixture

        def reference(seed: int) -> SlicedW2Against:
            labels = _class_labels(num_reference, num_classes)
            return SlicedW2Against(mixture.sample(num_reference, torch.Generator().manual_seed(seed), labels)[0],
                                   NUM_PROJECTIONS)

        return SearchMetrics("sliced_w2", reference(SEARCH_REFERENCE_SEED), reference(REFERENCE_SEED))
    if name == "digits":
        from ..data.digits import DIGITS_NORMALISATION, load_digits_split
        from .digits_fd import digits_frechet_distance

        def against(split: str) -> Callable[[Tensor], float]:
            images = DIGITS_NORMALISATION.normalise(load_digits_split(split)[0])
            return lambda samples: digits_frechet_distance(samples, reference=images)["value"]

        return SearchMetrics("digits_fd", against("train"), against("heldout"))
    if name == "categorical":
        from .discrete_suites import CategoricalSuite

        suite = CategoricalSuite(build_dataset(data), num_samples)
        return SearchMetrics("tv", _first_value(suite), _first_value(suite))
    if name == "quantised_digits":
        from .discrete_suites import QuantisedDigitsSuite

        dataset = build_dataset(data)
        return SearchMetrics("digits_fd", _first_value(QuantisedDigitsSuite(dataset, num_samples, "train")),
                             _first_value(QuantisedDigitsSuite(dataset, num_samples, "heldout")))
    if name == "upsampled_digits":
        from .discrete_suites import UpsampledDigitsSuite

        size = build_dataset(data).size
        return SearchMetrics("digits_fd", _first_value(UpsampledDigitsSuite(size, num_samples, "train")),
                             _first_value(UpsampledDigitsSuite(size, num_samples, "heldout")))
    dataset = build_dataset(data)
    if not hasattr(dataset, "__len__") or len(dataset) < 4:
        raise ValueError(f"a schedule search needs reference data; {name!r} data is not a finite dataset of at "
                         "least 4 samples")
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(REFERENCE_SEED))
    half = len(dataset) // 2
    return SearchMetrics("sliced_w2", SlicedW2Against(dataset.batch(order[:half])[0]),
                         SlicedW2Against(dataset.batch(order[half:])[0]))
