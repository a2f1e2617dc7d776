"""Digits Fréchet distance: classifier accuracy, deterministic cached weights, and FD that ranks sample quality."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from ucgm.data import DigitsDataset
from ucgm.metrics.digits_fd import (
    EXTRACTOR_NAME,
    DigitsFeatureExtractor,
    default_cache_dir,
    digits_frechet_distance,
    get_digits_feature_extractor,
    load_or_train_classifier,
)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("ucgm_cache")


@pytest.fixture(scope="module")
def extractor(cache_dir):
    return get_digits_feature_extractor(cache_dir)


@pytest.fixture(scope="module")
def train_digits():
    return DigitsDataset("train").data


def test_classifier_is_accurate_on_the_heldout_split(extractor):
    heldout = DigitsDataset("heldout")
    accuracy = (extractor.logits(heldout.data).argmax(dim=1) == heldout.labels).double().mean().item()
    assert accuracy > 0.95
    assert accuracy == pytest.approx(extractor.heldout_accuracy)


def test_training_is_deterministic_and_cached(extractor, cache_dir, tmp_path):
    _, retrained = load_or_train_classifier(tmp_path)
    assert retrained["sha256"] == extractor.sha256
    modified = extractor.weights_path.stat().st_mtime_ns
    _, reloaded = load_or_train_classifier(cache_dir)
    assert reloaded["sha256"] == extractor.sha256 and extractor.weights_path.stat().st_mtime_ns == modified
    assert [path.name for path in cache_dir.iterdir()] == [f"{EXTRACTOR_NAME}.safetensors"]


def test_corrupted_cache_is_rejected(extractor, tmp_path):
    weights = load_file(str(extractor.weights_path))
    with safe_open(str(extractor.weights_path), framework="pt") as handle:
        metadata = handle.metadata()
    weights["head.bias"] = weights["head.bias"] + 1.0
    save_file(weights, str(tmp_path / f"{EXTRACTOR_NAME}.safetensors"), metadata=metadata)
    with pytest.raises(ValueError, match="SHA-256"):
        DigitsFeatureExtractor(tmp_path)


def test_cache_dir_follows_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("UCGM_CACHE", str(tmp_path))
    assert default_cache_dir() == tmp_path


def test_features_are_deterministic_and_validated(extractor, train_digits):
    features = extractor.features(train_digits[:50])
    assert features.shape == (50, 64) and features.dtype == torch.float64
    assert torch.equal(features, extractor.features(train_digits[:50].reshape(50, 64)))
    with pytest.raises(ValueError, match="shape"):
        extractor.features(torch.zeros(3, 1, 16, 16))
    with pytest.raises(ValueError, match="NaN or Inf"):
        extractor.features(torch.full((3, 64), float("nan")))


def test_frechet_distance_ranks_real_blurred_and_noise(extractor, cache_dir, train_digits):
    real = digits_frechet_distance(train_digits, cache_dir=cache_dir)
    blurred_images = torch.nn.functional.avg_pool2d(train_digits, 3, stride=1, padding=1, count_include_pad=False)
    blurred = digits_frechet_distance(blurred_images, cache_dir=cache_dir)["value"]
    noise_images = torch.rand(train_digits.shape, generator=torch.Generator().manual_seed(0)) * 2 - 1
    noise = digits_frechet_distance(noise_images, cache_dir=cache_dir)["value"]
    assert 0 < real["value"] < 40
    assert blurred > 8 * real["value"] and noise > 15 * real["value"]
    protocol = real["protocol"]
    assert protocol["num_samples"] == 1437 and protocol["num_reference"] == 360
    assert "held-out" in protocol["reference_source"]
    assert protocol["feature_extractor"] == {"name": EXTRACTOR_NAME, "feature_dim": 64, "sha256": extractor.sha256}


def test_frechet_distance_reference_options(cache_dir, train_digits):
    same = digits_frechet_distance(train_digits[:200], reference=train_digits[:200], cache_dir=cache_dir)
    assert same["value"] == pytest.approx(0.0, abs=1e-6)
    assert same["protocol"]["reference_source"] == "user-provided reference images"
    subset = digits_frechet_distance(train_digits, num_reference=100, cache_dir=cache_dir)
    assert subset["protocol"]["num_reference"] == 100
    with pytest.raises(ValueError, match="num_reference"):
        digits_frechet_distance(train_digits, num_reference=10_000, cache_dir=cache_dir)
