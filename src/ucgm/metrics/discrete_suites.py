"""The metrics of the discrete and multi-resolution datasets (lower is better), for ``ucgm evaluate`` and the
benchmarks:

* **categorical** (:class:`~ucgm.data.discrete.CategoricalGridDataset`): samples are decoded (sign of every bit)
  to cells; ``tv`` and ``kl`` of their histogram against the exact table (:mod:`ucgm.metrics.histograms`).
  Baseline: as many exact draws from the table (seed :data:`~ucgm.metrics.suites.BASELINE_SEED`).
* **quantised digits**: decoded samples as grey images in [-1, 1]; ``digits_fd`` against the quantised
  held-out split (or ``reference_split``). Baseline: as many quantised training digits.
* **upsampled digits**: ``digits_fd`` of the samples averaged back to 8x8 against the held-out split treated
  alike, and ``sliced_w2`` in pixel space against the upsampled held-out split. Baseline: training digits.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..data.resolution import downsample
from .histograms import category_histogram, kl_divergence, total_variation
from .suites import BASELINE_SEED, MetricSuite, MetricValue, SlicedW2Against


class CategoricalSuite(MetricSuite):
    """Total variation and KL of decoded samples against the dataset's exact table."""

    dataset = "categorical"
    baseline_name = "exact draws from the table"

    def __init__(self, dataset, num_samples: int):
        self.data, self.num_samples = dataset, num_samples

    def histogram(self, samples: Tensor) -> Tensor:
        """Empirical category probabilities of model-space samples."""
        cells = self.data.denormalise(samples).long()
        return category_histogram(self.data.categories(cells), self.data.num_categories)

    def evaluate(self, samples: Tensor, labels: Optional[Tensor]) -> list[MetricValue]:
        histogram = self.histogram(samples)
        protocol = {"num_samples": int(samples.shape[0]), "categories": self.data.num_categories,
                    "reference": "exact probability table", "decoding": "sign of every bit"}
        return [MetricValue("tv", total_variation(histogram, self.data.table), protocol),
                MetricValue("kl", kl_divergence(histogram, self.data.table), protocol)]

    def baselines(self) -> list[MetricValue]:
        exact = self.data.sample_batch(self.num_samples, torch.Generator().manual_seed(BASELINE_SEED))[0]
        return self.evaluate(exact, None)


def _digits_fd(images: Tensor, reference: Tensor, source: str) -> MetricValue:
    from .digits_fd import digits_frechet_distance

    result = digits_frechet_distance(images, reference=reference)
    result["protocol"]["reference_source"] = source
    return MetricValue("digits_fd", result["value"], result["protocol"])


class QuantisedDigitsSuite(MetricSuite):
    """Digits FD of decoded quantised digits against the quantised ``reference_split``."""

    dataset = "quantised_digits"
    baseline_name = "quantised training-split digits"

    def __init__(self, dataset, num_samples: int, reference_split: str = "heldout"):
        self.data, self.num_samples = dataset, num_samples
        self.reference = dataset.grey_images(reference_split)
        self.source = f"digits {reference_split} split quantised to {dataset.levels} levels"

    def evaluate(self, samples: Tensor, labels: Optional[Tensor]) -> list[MetricValue]:
        return [_digits_fd(self.data.normaliser.display(samples), self.reference, self.source)]

    def baselines(self) -> list[MetricValue]:
        train = self.data.grey_images("train")
        return [_digits_fd(train[: min(self.num_samples, train.shape[0])], self.reference, self.source)]


class UpsampledDigitsSuite(MetricSuite):
    """Digits FD at 8x8 (block means) and pixel-space sliced W2 against the upsampled ``reference_split``."""

    dataset = "upsampled_digits"
    baseline_name = "training-split digits"

    def __init__(self, size: int, num_samples: int, reference_split: str = "heldout"):
        from ..data.upsampled_digits import DIGITS_SIZE, upsampled_digits

        self.factor = size // DIGITS_SIZE
        self.num_samples = num_samples
        self.reference = upsampled_digits(reference_split, size)[0]
        self.pooled_reference = downsample(self.reference, self.factor)
        self.train = upsampled_digits("train", size)[0]
        self.sliced_w2 = SlicedW2Against(self.reference)
        self.source = f"digits {reference_split} split at {size}x{size}"

    def evaluate(self, samples: Tensor, labels: Optional[Tensor]) -> list[MetricValue]:
        pooled = downsample(samples.float(), self.factor)
        protocol = {"num_samples": int(samples.shape[0]), "reference": self.source, "space": "pixels, flattened"}
        return [_digits_fd(pooled, self.pooled_reference, self.source + ", block means to 8x8"),
                MetricValue("sliced_w2", self.sliced_w2(samples), protocol)]

    def baselines(self) -> list[MetricValue]:
        return self.evaluate(self.train[: min(self.num_samples, self.train.shape[0])], None)
