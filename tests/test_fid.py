"""FID / FD-DINOv2 from local files: clear errors when a file is missing, and the full path on stand-in networks.

The real Inception-v3 and DINOv2 weights cannot be fetched here, so the full path runs on *stand-ins*: a tiny
TorchScript module with the FID network's calling convention (uint8 RGB in, 2048 features out) and a tiny local
hub repository whose ``dinov2_vits14`` entry point builds a small CNN with 384 outputs. Their values mean nothing;
the tests check the loading, preprocessing, statistics, protocol and error handling around them.
"""

from __future__ import annotations

import textwrap

import pytest
import torch
from torch import Tensor, nn

from ucgm.metrics.fid import (
    DINOV2_REPO_ENV,
    DINOV2_WEIGHTS_ENV,
    INCEPTION_WEIGHTS_ENV,
    DINOv2Features,
    InceptionFeatures,
    MissingWeightsError,
    ReferenceStatistics,
    fd_dinov2,
    fid,
    file_sha256,
    frechet_feature_distance,
    images_to_uint8,
    reference_statistics,
)


pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.*:DeprecationWarning")


class StandInInception(nn.Module):
    """Not Inception: a random 3x3 convolution, global average pooling and a projection to ``dim`` features,
    called like the TorchScript FID network (``net(uint8 images, return_features=True)``)."""

    def __init__(self, dim: int = 2048):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 8, kernel_size=3, padding=1)
        self.project = nn.Linear(8, dim)

    def forward(self, images: Tensor, return_features: bool = False) -> Tensor:
        pooled = torch.relu(self.conv(images.float() / 255)).mean(dim=(2, 3))
        return self.project(pooled)


HUBCONF = textwrap.dedent('''
    """Stand-in for facebookresearch/dinov2's hubconf.py: NOT DINOv2, a tiny CNN with the ViT-S/14 feature size."""
    import torch
    from torch import nn

    dependencies = ["torch"]


    def dinov2_vits14(pretrained=True, **kwargs):
        assert not pretrained, "the stand-in has no pretrained weights"
        return nn.Sequential(nn.Conv2d(3, 4, kernel_size=14, stride=14), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                             nn.Flatten(), nn.Linear(4, 384))
''')


@pytest.fixture(scope="module")
def inception_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("inception") / "standin-inception.pt"
    torch.jit.save(torch.jit.script(StandInInception().eval()), str(path))
    return path


@pytest.fixture(scope="module")
def dinov2_files(tmp_path_factory):
    repo = tmp_path_factory.mktemp("dinov2_repo")
    (repo / "hubconf.py").write_text(HUBCONF)
    namespace: dict = {}
    exec(HUBCONF, namespace)
    torch.manual_seed(0)
    weights = repo.parent / "standin_dinov2_vits14_pretrain.pth"
    torch.save(namespace["dinov2_vits14"](pretrained=False).state_dict(), weights)
    return repo, weights


def _images(count: int, seed: int, shift: float = 0.0, channels: int = 3) -> Tensor:
    generator = torch.Generator().manual_seed(seed)
    return (torch.rand(count, channels, 16, 16, generator=generator) * 1.6 - 0.8 + shift).clamp(-1, 1)


# ------------------------------------------------------------------------------------------ errors
def test_missing_inception_file_names_the_file_and_how_to_provide_it(monkeypatch, tmp_path):
    monkeypatch.delenv(INCEPTION_WEIGHTS_ENV, raising=False)
    with pytest.raises(MissingWeightsError, match=r"inception-2015-12-05\.pt.*UCGM_INCEPTION_WEIGHTS"):
        InceptionFeatures()
    missing = tmp_path / "nowhere" / "inception-2015-12-05.pt"
    with pytest.raises(MissingWeightsError, match="nowhere/inception-2015-12-05.pt.*from the argument"):
        InceptionFeatures(missing)
    monkeypatch.setenv(INCEPTION_WEIGHTS_ENV, str(missing))
    with pytest.raises(MissingWeightsError, match=r"from the \$UCGM_INCEPTION_WEIGHTS"):
        fid(_images(4, 0), _images(4, 1))


def test_missing_dinov2_code_or_weights_name_what_is_missing(monkeypatch, tmp_path, dinov2_files):
    monkeypatch.delenv(DINOV2_REPO_ENV, raising=False)
    monkeypatch.delenv(DINOV2_WEIGHTS_ENV, raising=False)
    with pytest.raises(MissingWeightsError, match="facebookresearch/dinov2.*UCGM_DINOV2_REPO"):
        DINOv2Features()
    with pytest.raises(MissingWeightsError, match="no hubconf.py"):
        DINOv2Features(tmp_path)
    repo, _ = dinov2_files
    with pytest.raises(MissingWeightsError, match=r"dinov2_vitl14_pretrain\.pth.*UCGM_DINOV2_WEIGHTS"):
        DINOv2Features(repo)
    with pytest.raises(ValueError, match="DINOv2 model='vit_huge'"):
        DINOv2Features(repo, model="vit_huge")


def test_a_file_that_is_not_torchscript_is_refused(tmp_path):
    bogus = tmp_path / "inception-2015-12-05.pt"
    bogus.write_bytes(b"not a network")
    with pytest.raises(ValueError, match="not a loadable TorchScript Inception network"):
        InceptionFeatures(bogus)


def test_a_network_with_the_wrong_feature_size_is_refused(tmp_path):
    path = tmp_path / "small.pt"
    torch.jit.save(torch.jit.script(StandInInception(dim=16).eval()), str(path))
    with pytest.raises(ValueError, match="returned 16 features per image; expected 2048"):
        InceptionFeatures(path).features(_images(2, 0))


def test_too_few_samples_and_mismatched_statistics_are_clear_errors(inception_file):
    network = InceptionFeatures(inception_file)
    reference = reference_statistics(network, _images(40, 1), "stand-in reference")
    with pytest.raises(ValueError, match="too few to estimate a covariance"):
        frechet_feature_distance(_images(1, 2), network, reference, "fid")
    with pytest.raises(ValueError, match="too few to estimate a covariance"):
        reference_statistics(network, _images(1, 2), "one image")
    narrow = ReferenceStatistics(torch.zeros(16), torch.eye(16), 100, "16-d statistics")
    with pytest.raises(ValueError, match="reference statistics have 16 features but .* gives 2048"):
        frechet_feature_distance(_images(8, 2), network, narrow, "fid")
    foreign = ReferenceStatistics(reference.mean, reference.covariance, 40, "other extractor", "0" * 64)
    with pytest.raises(ValueError, match="made by an extractor with SHA-256 0000"):
        frechet_feature_distance(_images(8, 2), network, foreign, "fid")
    with pytest.raises(ValueError, match=r"expected \(N, C, H, W\) with C = 1 or 3"):
        images_to_uint8(torch.zeros(2, 2, 8, 8))


# ------------------------------------------------------------------------------- full path (stand-ins)
def test_fid_full_path_on_a_standin_network_records_its_protocol(inception_file, monkeypatch):
    monkeypatch.setenv(INCEPTION_WEIGHTS_ENV, str(inception_file))
    reference_images = _images(48, 1)
    same = fid(_images(48, 2), reference_images)
    shifted = fid(_images(48, 2, shift=0.5), reference_images)
    assert 0 <= same["value"] < shifted["value"]
    network = InceptionFeatures()
    assert torch.equal(network.features(_images(5, 2)), network.features(_images(5, 2)))  # deterministic
    protocol = same["protocol"]
    assert protocol["metric"] == "fid" and protocol["num_samples"] == 48 and protocol["num_reference"] == 48
    assert protocol["feature_extractor"]["sha256"] == file_sha256(inception_file)
    assert protocol["feature_extractor"]["weights_file"] == str(inception_file)
    assert protocol["feature_extractor"]["feature_dim"] == 2048
    assert len(protocol["reference_statistics_sha256"]) == 64
    assert protocol["covariance_rank_deficient"] is True


def test_reference_statistics_round_trip_and_grey_images(inception_file, tmp_path):
    network = InceptionFeatures(inception_file)
    grey = _images(30, 3, channels=1)
    statistics = reference_statistics(network, grey, "grey stand-in reference")
    statistics.save(tmp_path / "stats.npz")
    loaded = ReferenceStatistics.load(tmp_path / "stats.npz")
    assert loaded.sha256() == statistics.sha256() and loaded.count == 30
    assert loaded.extractor_sha256 == file_sha256(inception_file) and loaded.source == "grey stand-in reference"
    assert torch.equal(loaded.mean, statistics.mean) and torch.equal(loaded.covariance, statistics.covariance)
    from_file = fid(_images(30, 4, channels=1), loaded, inception_file)
    assert from_file["value"] > 0 and from_file["protocol"]["reference_source"] == "grey stand-in reference"
    with pytest.raises(ValueError, match="does not exist"):
        ReferenceStatistics.load(tmp_path / "missing.npz")


def test_fd_dinov2_full_path_on_a_standin_hub_repository(dinov2_files, monkeypatch):
    repo, weights = dinov2_files
    monkeypatch.setenv(DINOV2_REPO_ENV, str(repo))
    monkeypatch.setenv(DINOV2_WEIGHTS_ENV, str(weights))
    network = DINOv2Features(model="dinov2_vits14")
    assert network.features(_images(3, 0)).shape == (3, 384)
    result = fd_dinov2(_images(24, 2), _images(24, 1), model="dinov2_vits14")
    assert result["value"] >= 0
    extractor = result["protocol"]["feature_extractor"]
    assert result["protocol"]["metric"] == "fd_dinov2"
    assert extractor["sha256"] == file_sha256(weights) and extractor["feature_dim"] == 384
    assert "bicubic" in extractor["preprocessing"] and extractor["code_directory"] == str(repo)
