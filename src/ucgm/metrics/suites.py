"""The metrics ``ucgm evaluate`` computes for the data a run was trained on (lower is better unless noted).

* **Gaussian mixtures** (``data.name: mixture``): ``sliced_w2`` against exact mixture samples (``num_reference``,
  seed :data:`REFERENCE_SEED`, 256 projections, drawn with the same class proportions as the generated labels),
  ``missing_modes`` and ``mode_tv`` (:func:`~ucgm.metrics.mode_coverage`), and ``log_likelihood``, the exact mean
  log-density in nats (higher is better; conditional on the labels of a conditional model).
  Baseline: the same metrics of as many exact samples as generated ones (seed :data:`BASELINE_SEED`): the
  sample-noise floor no model can beat on average.
* **digits**: ``digits_fd`` against the held-out split (:func:`~ucgm.metrics.digits_fd.digits_frechet_distance`).
  Baseline: ``min(num, 1437)`` training-split digits.
* **other data** (image folders, latents, VAE latents): ``sliced_w2`` and ``mmd`` in model space against reference
  samples of the run's dataset (its options may be overridden, e.g. to point at held-out data): the first
  ``num_reference`` of a seeded permutation. MMD uses RBF bandwidths ``(0.5, 1, 2) x`` the median pairwise
  reference distance. Baseline: a disjoint slice of the same data (when it has enough samples).
* **FID / FD-DINOv2** (opt-in, image data only, see :mod:`ucgm.metrics.fid`): against the reference images
  (the held-out split for digits; the images behind the latents for VAE latents, samples decoded first).
"""

from __future__ import annotations

import copy
from typing import Callable, NamedTuple, Optional, Sequence

import torch
from torch import Tensor

from ..validation import check_positive_int
from ._inputs import as_sample_matrix, check_same_dimension
from .distances import _empirical_w2_squared, mmd
from .fid import FeatureNetwork, frechet_feature_distance, reference_statistics
from .modes import mixture_log_likelihood, mode_coverage

REFERENCE_SEED = 12345
BASELINE_SEED = 54321
NUM_PROJECTIONS = 256
MMD_BANDWIDTH_FACTORS = (0.5, 1.0, 2.0)
#: Rows of the reference used to find the median pairwise distance.
MEDIAN_SUBSET = 2000


def _sorted_columns(matrix: Tensor) -> Tensor:
    """Each column sorted (sorting contiguous rows of the transpose is several times faster on the CPU)."""
    return torch.sort(matrix.T.contiguous(), dim=1).values.T


class SlicedW2Against:
    """``sliced_wasserstein(samples, reference, num_projections, seed)`` for many sample sets against one
    reference: the same directions and value, with the reference's sorted projections computed once."""

    def __init__(self, reference: Tensor, num_projections: int = NUM_PROJECTIONS, seed: int = 0):
        check_positive_int("num_projections", num_projections)
        reference = as_sample_matrix("reference", reference)
        self.num_reference = reference.shape[0]
        generator = torch.Generator().manual_seed(seed)
        directions = torch.randn(reference.shape[1], num_projections, generator=generator, dtype=torch.float64)
        self.directions = directions / directions.norm(dim=0, keepdim=True)
        self.reference = reference
        self.sorted_reference = _sorted_columns(reference @ self.directions)

    def __call__(self, samples: Tensor) -> float:
        samples = as_sample_matrix("samples", samples)
        check_same_dimension("samples", samples, "reference", self.reference)
        sorted_samples = _sorted_columns(samples @ self.directions)
        return float(_empirical_w2_squared(sorted_samples, self.sorted_reference).mean().sqrt())


class MetricValue(NamedTuple):
    """One measured metric, with its protocol (sample counts, reference, extractor) when it has one."""

    metric: str
    value: float
    protocol: Optional[dict] = None


class FeatureDistance(NamedTuple):
    """An opt-in Fréchet distance: its metric name (``fid`` or ``fd_dinov2``) and feature network."""

    metric: str
    network: FeatureNetwork


class MetricSuite:
    """The metrics of one dataset: ``evaluate(samples, labels)`` and ``baselines()``, the same metrics of
    reference samples (named ``baseline_name``): the sample-noise floor."""

    dataset: str
    baseline_name: str

    def evaluate(self, samples: Tensor, labels: Optional[Tensor]) -> list[MetricValue]:
        raise NotImplementedError

    def baselines(self) -> list[MetricValue]:
        raise NotImplementedError


def _class_labels(count: int, num_classes: int) -> Optional[Tensor]:
    """``i % num_classes`` (the labels ``ucgm evaluate`` samples with), ``None`` when unconditional."""
    return torch.arange(count) % num_classes if num_classes else None


class MixtureSuite(MetricSuite):
    """Sliced W2, mode statistics and exact log-likelihood against a :class:`~ucgm.data.mixtures.GaussianMixture`."""

    dataset = "gmm"
    baseline_name = "exact mixture samples"

    def __init__(self, mixture, num_samples: int, num_classes: int, num_reference: int = 20000):
        check_positive_int("num_reference", num_reference, minimum=2)
        self.mixture = mixture
        self.num_samples = num_samples
        self.num_classes = num_classes
        generator = torch.Generator().manual_seed(REFERENCE_SEED)
        reference, _ = mixture.sample(num_reference, generator, _class_labels(num_reference, num_classes))
        self.sliced_w2 = SlicedW2Against(reference)

    def evaluate(self, samples: Tensor, labels: Optional[Tensor]) -> list[MetricValue]:
        protocol = {"num_samples": int(samples.shape[0]), "num_reference": self.sliced_w2.num_reference,
                    "reference": f"exact mixture samples, seed {REFERENCE_SEED}", "projections": NUM_PROJECTIONS}
        modes = mode_coverage(samples, self.mixture)
        return [
            MetricValue("sliced_w2", self.sliced_w2(samples), protocol),
            MetricValue("missing_modes", float(modes["missing_modes"])),
            MetricValue("mode_tv", modes["mode_histogram_tv"]),
            MetricValue("log_likelihood", mixture_log_likelihood(samples, self.mixture, labels)),
        ]

    def baselines(self) -> list[MetricValue]:
        labels = _class_labels(self.num_samples, self.num_classes)
        exact, _ = self.mixture.sample(self.num_samples, torch.Generator().manual_seed(BASELINE_SEED), labels)
        return self.evaluate(exact, labels)


class DigitsSuite(MetricSuite):
    """The digits Fréchet distance against the held-out split, plus any opt-in feature distances."""

    dataset = "digits"
    baseline_name = "training-split digits"

    def __init__(self, num_samples: int, feature_distances: Sequence[FeatureDistance] = ()):
        from ..data.digits import DIGITS_NORMALISATION, load_digits_split

        self.num_samples = num_samples
        self.heldout = DIGITS_NORMALISATION.normalise(load_digits_split("heldout")[0])
        self.train = DIGITS_NORMALISATION.normalise(load_digits_split("train")[0])
        self.feature_metrics = _FeatureMetrics(feature_distances, self.heldout, "digits held-out split")

    def evaluate(self, samples: Tensor, labels: Optional[Tensor]) -> list[MetricValue]:
        from .digits_fd import digits_frechet_distance

        result = digits_frechet_distance(samples, reference=self.heldout)
        result["protocol"]["reference_source"] = "sklearn load_digits, held-out split (sample index % 5 == 0)"
        return [MetricValue("digits_fd", result["value"], result["protocol"])] + self.feature_metrics(samples)

    def baselines(self) -> list[MetricValue]:
        return self.evaluate(self.train[: min(self.num_samples, self.train.shape[0])], None)


class DataSuite(MetricSuite):
    """Sliced W2 and MMD in model space against reference samples of a finite dataset (plus opt-in feature
    distances on images); ``decode`` maps model-space samples to images (VAE latents), ``reference_images``
    are the images the feature distances compare with."""

    def __init__(self, dataset_name: str, reference: Tensor, spare: Optional[Tensor], source: str,
                 feature_distances: Sequence[FeatureDistance] = (), reference_images: Optional[Tensor] = None,
                 decode: Optional[Callable[[Tensor], Tensor]] = None):
        self.dataset = dataset_name
        self.baseline_name = "a disjoint slice of the reference data"
        self.reference = reference
        self.sliced_w2 = SlicedW2Against(reference)
        self.spare = spare
        self.source = source
        subset = reference[:MEDIAN_SUBSET].reshape(min(MEDIAN_SUBSET, reference.shape[0]), -1).double()
        median = float(torch.cdist(subset, subset).median())
        if not median > 0:
            raise ValueError(f"the reference data ({source}) has identical samples; MMD needs a spread")
        self.bandwidths = tuple(factor * median for factor in MMD_BANDWIDTH_FACTORS)
        self.decode = decode
        images = reference if reference_images is None else reference_images
        self.feature_metrics = _FeatureMetrics(feature_distances, images, source)

    def evaluate(self, samples: Tensor, labels: Optional[Tensor]) -> list[MetricValue]:
        protocol = {"num_samples": int(samples.shape[0]), "num_reference": int(self.reference.shape[0]),
                    "reference": self.source, "space": "model space, flattened"}
        values = [
            MetricValue("sliced_w2", self.sliced_w2(samples), {**protocol, "projections": NUM_PROJECTIONS}),
            MetricValue("mmd", mmd(samples, self.reference, self.bandwidths),
                        {**protocol, "bandwidths": list(self.bandwidths)}),
        ]
        images = samples if self.decode is None else self.decode(samples)
        return values + self.feature_metrics(images)

    def baselines(self) -> list[MetricValue]:
        return [] if self.spare is None else self.evaluate(self.spare, None)


class _FeatureMetrics:
    """Opt-in Fréchet feature distances against fixed reference images (statistics computed once)."""

    def __init__(self, feature_distances: Sequence[FeatureDistance], reference_images: Tensor, source: str):
        if feature_distances and reference_images.ndim != 4:
            raise ValueError(f"FID / FD-DINOv2 need image data (N, C, H, W); the reference ({source}) has shape "
                             f"{tuple(reference_images.shape)}")
        self.entries = [(entry, reference_statistics(entry.network, reference_images, source))
                        for entry in feature_distances]

    def __call__(self, images: Tensor) -> list[MetricValue]:
        results = [(entry.metric, frechet_feature_distance(images, entry.network, statistics, entry.metric))
                   for entry, statistics in self.entries]
        return [MetricValue(metric, result["value"], result["protocol"]) for metric, result in results]


def _reference_indices(length: int, num_samples: int, num_reference: int, source: str) -> tuple[Tensor, Tensor]:
    """``(reference, spare)`` indices: the first ``num_reference`` of a seeded permutation of ``length`` rows and
    the next ``min(num_samples, remaining)`` (the baseline set; used when it has at least 2 rows)."""
    if length < 2:
        raise ValueError(f"the reference data ({source}) has {length} sample(s); at least 2 are needed")
    order = torch.randperm(length, generator=torch.Generator().manual_seed(REFERENCE_SEED))
    return order[:num_reference], order[num_reference:num_reference + num_samples]


#: Datasets whose metrics live in :mod:`ucgm.metrics.discrete_suites` (fixed references, no overrides).
DISCRETE_SUITE_DATASETS = ("categorical", "quantised_digits", "upsampled_digits")


def _discrete_suite(data: dict, num_samples: int, feature_distances: Sequence[FeatureDistance]) -> MetricSuite:
    from ..data import build_dataset
    from .discrete_suites import CategoricalSuite, QuantisedDigitsSuite, UpsampledDigitsSuite

    if feature_distances:
        raise ValueError(f"FID / FD-DINOv2 are not offered for {data['name']!r} data; its digits FD is computed")
    dataset = build_dataset(data)
    if data["name"] == "categorical":
        return CategoricalSuite(dataset, num_samples)
    if data["name"] == "quantised_digits":
        return QuantisedDigitsSuite(dataset, num_samples)
    return UpsampledDigitsSuite(dataset.size, num_samples)


def build_metric_suite(config: dict, num_samples: int, num_classes: int, num_reference: int = 20000,
                       data_overrides: Optional[dict] = None,
                       feature_distances: Sequence[FeatureDistance] = ()) -> MetricSuite:
    """The suite for the run whose resolved ``config`` is given; ``data_overrides`` replace options of its
    ``data`` section for the reference set (other data only); ``feature_distances`` need image data."""
    from ..data import build_dataset

    check_positive_int("num_samples", num_samples, minimum=2)
    data = copy.deepcopy(config["data"])
    name = data.get("name")
    if data_overrides and name in ("mixture", "digits") + DISCRETE_SUITE_DATASETS:
        raise ValueError(f"reference data overrides apply to file-based data only; {name!r} has a fixed reference")
    if name == "mixture":
        if feature_distances:
            raise ValueError("FID / FD-DINOv2 need image data; this run's data is a 2-D Gaussian mixture")
        return MixtureSuite(build_dataset(data).mixture, num_samples, num_classes, num_reference)
    if name == "digits":
        return DigitsSuite(num_samples, feature_distances)
    if name in DISCRETE_SUITE_DATASETS:
        return _discrete_suite(data, num_samples, feature_distances)
    data.update(data_overrides or {})
    dataset = build_dataset(data)
    source = "dataset " + ", ".join(f"{key}={value}" for key, value in sorted(data.items()))
    if not hasattr(dataset, "__len__"):
        raise ValueError(f"the reference data ({source}) is not a finite dataset; cannot take reference samples")
    take, spare_indices = _reference_indices(len(dataset), num_samples, num_reference, source)
    reference = dataset.batch(take)[0]
    spare = dataset.batch(spare_indices)[0] if spare_indices.shape[0] >= 2 else None
    reference_images, decode = None, None
    if name == "vae_images" and feature_distances:
        reference_images, decode = dataset.images.batch(take)[0], dataset.decode
    elif feature_distances and name != "image_folder":
        raise ValueError(f"FID / FD-DINOv2 need image data; this run's data {name!r} is not images")
    return DataSuite(name, reference, spare, source, feature_distances, reference_images, decode)
