"""FID and FD-DINOv2 from user-supplied local weight files; nothing is ever downloaded.

Both are the Fréchet distance (:func:`~ucgm.metrics.frechet_distance`)
``|mu_s - mu_r|^2 + tr(C_s + C_r - 2 (C_s^{1/2} C_r C_s^{1/2})^{1/2})`` between Gaussians fitted (mean, unbiased
covariance) to features of generated samples ``s`` and of reference images ``r``; they differ in the features.

* **FID** (Heusel et al. 2017): 2048-d pool features of the TensorFlow FID Inception-v3, read from the TorchScript
  file ``inception-2015-12-05.pt`` (NVIDIA's conversion, the file StyleGAN2-ADA, StyleGAN3 and EDM/EDM2 load).
  It is called as ``net(images, return_features=True)`` on uint8 RGB ``(N, 3, H, W)`` images at their own size (the
  network resizes to 299 x 299 itself). Give the file as an argument or in ``$UCGM_INCEPTION_WEIGHTS``.
* **FD-DINOv2** (Stein et al. 2023, the EDM2 protocol): the CLS features of DINOv2 ViT-L/14 (1024-d), built from a
  local clone of ``facebookresearch/dinov2`` (``torch.hub.load(dir, "dinov2_vitl14", source="local",
  pretrained=False)``) with the weights file ``dinov2_vitl14_pretrain.pth``; images go uint8 -> ``/255`` ->
  bicubic (antialiased) resize to 224 x 224 -> ImageNet mean / std. Give the directory and the file as arguments
  or in ``$UCGM_DINOV2_REPO`` and ``$UCGM_DINOV2_WEIGHTS``.

Why not torchmetrics or clean-fid: torchmetrics' Inception is torch-fidelity's, which imports torchvision, and the
PyPI torchvision does not import against a CPU-only torch build; clean-fid depends on installing another torch.
The TorchScript file is the network those tools use for TensorFlow-compatible FID, loaded here with torch alone.

Images are model-space samples in [-1, 1] ``(N, C, H, W)``, ``C`` = 1 (repeated to RGB) or 3, quantised as
``round((x + 1) * 127.5)`` clamped to 0..255. Every value comes with its protocol: sample and reference counts, the
reference source and the SHA-256 of the reference statistics, the feature extractor, its weight file and that
file's SHA-256, and the preprocessing. Values are comparable only when the protocols agree; with fewer samples
than feature dimensions the covariance is rank-deficient and the value is biased upwards (flagged in the
protocol).
"""

from __future__ import annotations

import hashlib
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Protocol, Union

import numpy as np
import torch
from torch import Tensor

from ..atomic import atomic_path
from ..validation import check_choice, check_positive_int
from .features import frechet_distance

PathLike = Union[str, os.PathLike]

INCEPTION_WEIGHTS_ENV = "UCGM_INCEPTION_WEIGHTS"
DINOV2_REPO_ENV = "UCGM_DINOV2_REPO"
DINOV2_WEIGHTS_ENV = "UCGM_DINOV2_WEIGHTS"
INCEPTION_FILE_NAME = "inception-2015-12-05.pt"
INCEPTION_FEATURE_DIM = 2048
#: DINOv2 backbones of the facebookresearch/dinov2 hubconf and their CLS feature sizes; FD-DINOv2 uses ViT-L/14.
DINOV2_FEATURE_DIMS = {"dinov2_vits14": 384, "dinov2_vitb14": 768, "dinov2_vitl14": 1024, "dinov2_vitg14": 1536}
DINOV2_DEFAULT_MODEL = "dinov2_vitl14"
DINOV2_IMAGE_SIZE = 224
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
QUANTISATION = "uint8 = clamp(round((x + 1) * 127.5), 0, 255) from [-1, 1]; 1 channel repeated to RGB"


class MissingWeightsError(FileNotFoundError):
    """A feature network's local file or directory is missing; the message names it and how to provide it."""


def file_sha256(path: PathLike) -> str:
    """SHA-256 of a file's bytes (read in 1 MiB blocks)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def resolve_local_path(given: Optional[PathLike], env_var: str, what: str, how_to_get: str, cli_option: str,
                       directory: bool = False) -> Path:
    """``given``, else ``$env_var``; raises :class:`MissingWeightsError` naming ``what`` (and the ``ucgm evaluate``
    option that gives it) when neither points to an existing file (or directory, when ``directory``)."""
    source = "argument" if given is not None else f"${env_var}"
    value = given if given is not None else os.environ.get(env_var)
    kind = "directory" if directory else "file"
    if not value:
        raise MissingWeightsError(
            f"{what} is needed but no {kind} was given: pass its path ({cli_option} for ucgm evaluate), or set "
            f"{env_var}=/path/to/it. {how_to_get}")
    path = Path(value).expanduser()
    exists = path.is_dir() if directory else path.is_file()
    if not exists:
        raise MissingWeightsError(f"{what} not found: {str(path)!r} (from the {source}) is not an existing {kind}. "
                                  f"{how_to_get}")
    return path


def images_to_uint8(images: Tensor) -> Tensor:
    """``(N, C, H, W)`` images in [-1, 1] (C = 1 or 3) as uint8 RGB ``(N, 3, H, W)`` (see :data:`QUANTISATION`)."""
    images = torch.as_tensor(images).detach()
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"images have shape {tuple(images.shape)}; expected (N, C, H, W) with C = 1 or 3")
    if not images.is_floating_point() or not bool(torch.isfinite(images).all()):
        raise ValueError("images must be finite floating-point values in [-1, 1]")
    quantised = ((images.float() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
    return quantised.expand(-1, 3, -1, -1) if quantised.shape[1] == 1 else quantised


class FeatureNetwork(Protocol):
    """What :func:`frechet_feature_distance` needs: ``features(images in [-1, 1]) -> (N, D)`` float64 and a
    description of itself for the protocol."""

    feature_dim: int

    def features(self, images: Tensor) -> Tensor: ...

    def describe(self) -> dict: ...


def _batched_features(images: Tensor, batch_size: int, extract, expected_dim: int, what: str) -> Tensor:
    check_positive_int("batch_size", batch_size)
    rgb = images_to_uint8(images)
    outputs = []
    with torch.no_grad():
        for start in range(0, rgb.shape[0], batch_size):
            features = torch.as_tensor(extract(rgb[start:start + batch_size]))
            features = features.reshape(features.shape[0], -1).to(torch.float64).cpu()
            if features.shape[1] != expected_dim:
                raise ValueError(f"{what} returned {features.shape[1]} features per image; expected {expected_dim} "
                                 "(is it the right network file?)")
            outputs.append(features)
    return torch.cat(outputs)


class InceptionFeatures:
    """FID features: the TorchScript TensorFlow-FID Inception-v3 at ``weights`` (or ``$UCGM_INCEPTION_WEIGHTS``)."""

    name = "TorchScript FID network (expects inception-2015-12-05.pt; identify it by sha256)"
    feature_dim = INCEPTION_FEATURE_DIM

    def __init__(self, weights: Optional[PathLike] = None, batch_size: int = 64, device: str = "cpu"):
        self.weights_path = resolve_local_path(
            weights, INCEPTION_WEIGHTS_ENV, f"the FID Inception network file ({INCEPTION_FILE_NAME})",
            "It is NVIDIA's TorchScript conversion of the TensorFlow FID Inception-v3 (the file StyleGAN2-ADA / "
            "StyleGAN3 / EDM download as metrics/inception-2015-12-05.pkl or .pt); copy it to this machine.",
            "--inception-weights")
        self.sha256 = file_sha256(self.weights_path)
        try:
            with warnings.catch_warnings():  # the published FID network is TorchScript, deprecated or not
                warnings.simplefilter("ignore", DeprecationWarning)
                self.network = torch.jit.load(str(self.weights_path), map_location=device).eval()
        except RuntimeError as error:
            raise ValueError(f"{str(self.weights_path)!r} is not a loadable TorchScript Inception network "
                             f"({error})") from error
        self.batch_size = batch_size
        self.device = torch.device(device)

    def features(self, images: Tensor) -> Tensor:
        """``(N, 2048)`` float64 pool features."""
        return _batched_features(images, self.batch_size,
                                 lambda rgb: self.network(rgb.to(self.device), return_features=True),
                                 self.feature_dim, str(self.weights_path))

    def describe(self) -> dict:
        return {"name": self.name, "feature_dim": self.feature_dim, "weights_file": str(self.weights_path),
                "sha256": self.sha256,
                "preprocessing": f"{QUANTISATION}; the network resizes to 299x299 itself"}


class DINOv2Features:
    """FD-DINOv2 features: ``model`` of the dinov2 hub repository at ``repo`` with the weights file ``weights``
    (defaults ``$UCGM_DINOV2_REPO``, ``$UCGM_DINOV2_WEIGHTS``)."""

    def __init__(self, repo: Optional[PathLike] = None, weights: Optional[PathLike] = None,
                 model: str = DINOV2_DEFAULT_MODEL, batch_size: int = 32, device: str = "cpu"):
        check_choice("DINOv2 model", model, DINOV2_FEATURE_DIMS)
        self.repo_path = resolve_local_path(
            repo, DINOV2_REPO_ENV, "the DINOv2 code (a local clone of facebookresearch/dinov2 with its hubconf.py)",
            "Clone or copy the repository to this machine and give its directory.", "--dinov2-repo", directory=True)
        if not (self.repo_path / "hubconf.py").is_file():
            raise MissingWeightsError(f"the DINOv2 code directory {str(self.repo_path)!r} has no hubconf.py; give "
                                      "the root of a facebookresearch/dinov2 clone")
        self.weights_path = resolve_local_path(
            weights, DINOV2_WEIGHTS_ENV, f"the DINOv2 weights file ({model}_pretrain.pth)",
            f"Copy the official {model}_pretrain.pth state dict to this machine.", "--dinov2-weights")
        self.sha256 = file_sha256(self.weights_path)
        network = torch.hub.load(str(self.repo_path), model, source="local", pretrained=False, verbose=False)
        network.load_state_dict(torch.load(self.weights_path, map_location="cpu", weights_only=True))
        self.network = network.to(device).eval().requires_grad_(False)
        self.model = model
        self.feature_dim = DINOV2_FEATURE_DIMS[model]
        self.batch_size = batch_size
        self.device = torch.device(device)

    def _extract(self, rgb: Tensor) -> Tensor:
        x = rgb.to(self.device, torch.float32) / 255
        x = torch.nn.functional.interpolate(x, size=(DINOV2_IMAGE_SIZE, DINOV2_IMAGE_SIZE), mode="bicubic",
                                            antialias=True, align_corners=False)
        mean = torch.tensor(IMAGENET_MEAN, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(IMAGENET_STD, device=x.device).view(1, 3, 1, 1)
        return self.network((x - mean) / std)

    def features(self, images: Tensor) -> Tensor:
        """``(N, D)`` float64 CLS features."""
        return _batched_features(images, self.batch_size, self._extract, self.feature_dim, self.model)

    def describe(self) -> dict:
        return {"name": f"{self.model} (torch hub, local)", "feature_dim": self.feature_dim,
                "code_directory": str(self.repo_path), "weights_file": str(self.weights_path), "sha256": self.sha256,
                "preprocessing": f"{QUANTISATION}; /255, bicubic antialiased resize to {DINOV2_IMAGE_SIZE}x"
                                 f"{DINOV2_IMAGE_SIZE}, ImageNet mean {IMAGENET_MEAN} / std {IMAGENET_STD}"}


@dataclass(frozen=True)
class ReferenceStatistics:
    """Mean ``(D,)``, unbiased covariance ``(D, D)`` and count of reference features, where they came from and the
    checksum of the extractor that made them (``None`` when unknown, e.g. statistics made by another tool)."""

    mean: Tensor
    covariance: Tensor
    count: int
    source: str
    extractor_sha256: Optional[str] = None

    @classmethod
    def from_features(cls, features: Tensor, source: str, extractor_sha256: Optional[str] = None
                      ) -> "ReferenceStatistics":
        """Fit the statistics; needs at least 2 feature rows for a covariance."""
        mean, covariance = gaussian_statistics(features, "reference features")
        return cls(mean, covariance, int(features.shape[0]), source, extractor_sha256)

    @property
    def feature_dim(self) -> int:
        return int(self.mean.shape[0])

    def sha256(self) -> str:
        """SHA-256 of the float64 bytes of the mean, then the covariance."""
        digest = hashlib.sha256(self.mean.to(torch.float64).numpy().tobytes())
        digest.update(self.covariance.to(torch.float64).numpy().tobytes())
        return digest.hexdigest()

    def save(self, path: PathLike) -> None:
        """Write an ``.npz`` with ``mu`` and ``sigma`` (the keys other FID tools use) plus count and provenance."""
        with atomic_path(path) as temporary:
            with open(temporary, "wb") as handle:
                np.savez(handle, mu=self.mean.numpy(), sigma=self.covariance.numpy(), count=self.count,
                         source=self.source, extractor_sha256=self.extractor_sha256 or "")

    @classmethod
    def load(cls, path: PathLike) -> "ReferenceStatistics":
        """Read an ``.npz`` with ``mu`` and ``sigma`` (ucgm's, or another tool's without provenance)."""
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"reference statistics file {str(path)!r} does not exist")
        with np.load(path) as stored:
            missing = [key for key in ("mu", "sigma") if key not in stored.files]
            if missing:
                raise ValueError(f"{str(path)!r} lacks {missing}; reference statistics need 'mu' and 'sigma'")
            mean = torch.from_numpy(stored["mu"].astype(np.float64))
            covariance = torch.from_numpy(stored["sigma"].astype(np.float64))
            count = int(stored["count"]) if "count" in stored.files else -1
            source = str(stored["source"]) if "source" in stored.files else f"statistics file {path.name}"
            sha = str(stored["extractor_sha256"]) if "extractor_sha256" in stored.files else ""
        if mean.ndim != 1 or covariance.shape != (mean.shape[0], mean.shape[0]):
            raise ValueError(f"{str(path)!r}: mu {tuple(mean.shape)} and sigma {tuple(covariance.shape)} must be "
                             "(D,) and (D, D)")
        return cls(mean, covariance, count, source, sha or None)


def gaussian_statistics(features: Tensor, name: str) -> tuple[Tensor, Tensor]:
    """Mean and unbiased covariance ``sum (f - mean)(f - mean)^T / (n - 1)`` of ``(n, D)`` features, n >= 2."""
    features = torch.as_tensor(features).detach().to(torch.float64)
    if features.ndim != 2:
        raise ValueError(f"{name} have shape {tuple(features.shape)}; expected (n, D)")
    if features.shape[0] < 2:
        raise ValueError(f"{name}: {features.shape[0]} sample(s) are too few to estimate a covariance; at least 2 "
                         "are needed (and more than the feature dimension for an unbiased value)")
    if not bool(torch.isfinite(features).all()):
        raise ValueError(f"{name} contain NaN or Inf values")
    return features.mean(dim=0), torch.cov(features.T).reshape(features.shape[1], features.shape[1])


def reference_statistics(network: FeatureNetwork, images: Tensor, source: str) -> ReferenceStatistics:
    """Statistics of the features of reference ``images`` (in [-1, 1]) under ``network``."""
    return ReferenceStatistics.from_features(network.features(images), source, network.describe()["sha256"])


def frechet_feature_distance(samples: Tensor, network: FeatureNetwork, reference: ReferenceStatistics,
                             metric: str) -> dict:
    """Fréchet distance between ``network`` features of ``samples`` (images in [-1, 1]) and ``reference``.

    Returns ``{"value", "protocol"}``. Raises ``ValueError`` when the reference has another feature size or was made
    by a different extractor (its recorded checksum differs), or with fewer than 2 samples.
    """
    description = network.describe()
    if reference.feature_dim != network.feature_dim:
        raise ValueError(f"reference statistics have {reference.feature_dim} features but {description['name']} "
                         f"gives {network.feature_dim}; they must come from the same feature extractor")
    if reference.extractor_sha256 is not None and reference.extractor_sha256 != description["sha256"]:
        raise ValueError(f"reference statistics were made by an extractor with SHA-256 {reference.extractor_sha256},"
                         f" not by {description['weights_file']} (SHA-256 {description['sha256']})")
    mean, covariance = gaussian_statistics(network.features(samples), "sample features")
    value = frechet_distance(mean, covariance, reference.mean, reference.covariance)
    count = int(samples.shape[0])
    protocol = {
        "metric": metric, "num_samples": count, "num_reference": reference.count,
        "reference_source": reference.source, "reference_statistics_sha256": reference.sha256(),
        "feature_extractor": description,
        "covariance_rank_deficient": count <= network.feature_dim or 0 < reference.count <= network.feature_dim,
    }
    return {"value": value, "protocol": protocol}


def fid(samples: Tensor, reference: Union[Tensor, ReferenceStatistics], weights: Optional[PathLike] = None,
        reference_source: str = "user-provided reference images") -> dict:
    """FID of ``samples`` against reference images or statistics (see the module docstring for the protocol)."""
    network = InceptionFeatures(weights)
    if not isinstance(reference, ReferenceStatistics):
        reference = reference_statistics(network, reference, reference_source)
    return frechet_feature_distance(samples, network, reference, "fid")


def fd_dinov2(samples: Tensor, reference: Union[Tensor, ReferenceStatistics], repo: Optional[PathLike] = None,
              weights: Optional[PathLike] = None, model: str = DINOV2_DEFAULT_MODEL,
              reference_source: str = "user-provided reference images") -> dict:
    """FD-DINOv2 of ``samples`` against reference images or statistics (protocol in the module docstring)."""
    network = DINOv2Features(repo, weights, model)
    if not isinstance(reference, ReferenceStatistics):
        reference = reference_statistics(network, reference, reference_source)
    return frechet_feature_distance(samples, network, reference, "fd_dinov2")
