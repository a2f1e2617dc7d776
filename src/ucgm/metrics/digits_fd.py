"""Digits Fréchet distance: the offline analogue of FID for the 8x8 scikit-learn digits.

Features are the penultimate layer of a small CNN that ucgm trains itself, deterministically, on the digits
training split (:func:`ucgm.data.load_digits_split`). The weights are trained on first use and cached as
safetensors in ``$UCGM_CACHE`` (default ``~/.cache/ucgm``) together with the SHA-256 checksum of the weights and
the held-out accuracy; every result records that checksum, so numbers are comparable only when it agrees.
Reference statistics come from the held-out split, which generative models never train on.

``python -m ucgm.metrics.digits_fd`` trains (or loads) the classifier and prints its checksum and accuracy.
"""

from __future__ import annotations

import hashlib
import math
import os
import tempfile
from pathlib import Path
from typing import Optional, Union

import torch
from torch import Tensor, nn

from ..data.digits import DIGITS_NORMALISATION, load_digits_split
from ..validation import check_finite, check_positive_int
from .features import frechet_distance_from_features

EXTRACTOR_NAME = "ucgm-digits-cnn-v1"
FEATURE_DIM = 64
NUM_DIGIT_CLASSES = 10
TRAINING_SEED = 0
TRAINING_EPOCHS = 20
TRAINING_BATCH_SIZE = 64
LEARNING_RATE = 2e-3
REFERENCE_SOURCE = "sklearn load_digits, held-out split (sample index % 5 == 0)"


class DigitsClassifier(nn.Module):
    """Two 3x3 convolutions (16, 32 channels), a 2x2 max-pool, a 64-unit ReLU layer (the features) and a
    linear 10-way head."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.Conv2d(16, 32, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(32 * 4 * 4, FEATURE_DIM),
            nn.ReLU(),
        )
        self.head = nn.Linear(FEATURE_DIM, NUM_DIGIT_CLASSES)

    def forward(self, images: Tensor) -> Tensor:
        return self.head(self.features(images))


def weights_checksum(state_dict: dict[str, Tensor]) -> str:
    """SHA-256 over the tensors in name order (name, dtype, shape and raw bytes of each)."""
    digest = hashlib.sha256()
    for name in sorted(state_dict):
        tensor = state_dict[name].detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.numpy().tobytes())
    return digest.hexdigest()


@torch.enable_grad()
def train_digits_classifier(seed: int = TRAINING_SEED) -> tuple[dict[str, Tensor], float]:
    """Train the classifier on the digits training split; returns its weights and held-out accuracy.

    Deterministic: fixed seed, deterministic algorithms and one CPU thread (restored afterwards), so the same
    machine and torch version always give the same weights. Gradients are on whatever the caller's mode (the
    classifier is trained on first use, which may happen inside a sampling loop).
    """
    train_images, train_labels = _normalised_split("train")
    previous_threads = torch.get_num_threads()
    previous_deterministic = torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = DigitsClassifier()
        generator = torch.Generator().manual_seed(seed)
        optimiser = torch.optim.Adam(model.parameters(), lr=LEARNING_RATE)
        steps_per_epoch = math.ceil(len(train_labels) / TRAINING_BATCH_SIZE)
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, T_max=TRAINING_EPOCHS * steps_per_epoch)
        model.train()
        for _ in range(TRAINING_EPOCHS):
            order = torch.randperm(len(train_labels), generator=generator)
            for batch in order.split(TRAINING_BATCH_SIZE):
                loss = nn.functional.cross_entropy(model(train_images[batch]), train_labels[batch])
                optimiser.zero_grad(set_to_none=True)
                loss.backward()
                optimiser.step()
                schedule.step()
        model.eval()
        heldout_images, heldout_labels = _normalised_split("heldout")
        with torch.no_grad():
            accuracy = (model(heldout_images).argmax(dim=1) == heldout_labels).double().mean().item()
    finally:
        torch.use_deterministic_algorithms(previous_deterministic)
        torch.set_num_threads(previous_threads)
    return {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}, accuracy


def default_cache_dir() -> Path:
    """``$UCGM_CACHE`` when set, else ``~/.cache/ucgm``."""
    return Path(os.environ.get("UCGM_CACHE") or Path.home() / ".cache" / "ucgm")


def load_or_train_classifier(cache_dir: Optional[Union[str, Path]] = None) -> tuple[dict[str, Tensor], dict]:
    """The classifier weights and their metadata (``sha256``, ``heldout_accuracy``, ``path``), trained and
    cached on first use. A cached file whose weights do not match its recorded checksum is an error."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    path = Path(cache_dir or default_cache_dir()) / f"{EXTRACTOR_NAME}.safetensors"
    if not path.is_file():
        state_dict, accuracy = train_digits_classifier()
        metadata = {"name": EXTRACTOR_NAME, "sha256": weights_checksum(state_dict), "heldout_accuracy": repr(accuracy)}
        _write_atomically(path, lambda temporary: save_file(state_dict, str(temporary), metadata=metadata))
    state_dict = load_file(str(path))
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata() or {}
    if metadata.get("sha256") != weights_checksum(state_dict):
        raise ValueError(
            f"cached digits classifier {str(path)!r} does not match its recorded SHA-256; delete it to retrain"
        )
    return state_dict, {
        "sha256": metadata["sha256"],
        "heldout_accuracy": float(metadata["heldout_accuracy"]),
        "path": path,
    }


def _write_atomically(path: Path, write) -> None:
    """Call ``write(temporary_path)`` in ``path``'s directory, then rename, so ``path`` is never half-written."""
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(descriptor)
    try:
        write(Path(temporary))
        os.chmod(temporary, 0o644)
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)


def _normalised_split(split: str) -> tuple[Tensor, Tensor]:
    images, labels = load_digits_split(split)
    return DIGITS_NORMALISATION.normalise(images), labels


class DigitsFeatureExtractor:
    """Penultimate-layer features ``(N, 64)`` of the cached digits classifier for images in [-1, 1].

    Images may be ``(N, 1, 8, 8)``, ``(N, 8, 8)`` or ``(N, 64)`` in the model space of the ``digits`` dataset;
    values are clamped to [-1, 1] first (as saving them as images would).
    """

    name = EXTRACTOR_NAME

    def __init__(self, cache_dir: Optional[Union[str, Path]] = None):
        state_dict, info = load_or_train_classifier(cache_dir)
        self.model = DigitsClassifier()
        self.model.load_state_dict(state_dict)
        self.model.eval().requires_grad_(False)
        self.sha256: str = info["sha256"]
        self.heldout_accuracy: float = info["heldout_accuracy"]
        self.weights_path: Path = info["path"]

    @torch.no_grad()
    def features(self, images: Tensor) -> Tensor:
        """Float64 features ``(N, 64)``."""
        return self.model.features(_as_digit_images(images)).to(torch.float64)

    @torch.no_grad()
    def logits(self, images: Tensor) -> Tensor:
        """Class logits ``(N, 10)``."""
        return self.model(_as_digit_images(images))

    def describe(self) -> dict:
        """Name, feature size and checksum, for a metric's protocol record."""
        return {"name": self.name, "feature_dim": FEATURE_DIM, "sha256": self.sha256}


def _as_digit_images(images: Tensor) -> Tensor:
    images = torch.as_tensor(images).detach().cpu().to(torch.float32)
    if images.ndim < 2 or images[0].numel() != 64:
        raise ValueError(f"digit images have shape {tuple(images.shape)}; expected (N, 1, 8, 8), (N, 8, 8) or (N, 64)")
    check_finite("digit images", images)
    return images.reshape(-1, 1, 8, 8).clamp(-1.0, 1.0)


_EXTRACTORS: dict[Path, DigitsFeatureExtractor] = {}


def get_digits_feature_extractor(cache_dir: Optional[Union[str, Path]] = None) -> DigitsFeatureExtractor:
    """One :class:`DigitsFeatureExtractor` per cache directory and process."""
    key = Path(cache_dir or default_cache_dir()).resolve()
    if key not in _EXTRACTORS:
        _EXTRACTORS[key] = DigitsFeatureExtractor(key)
    return _EXTRACTORS[key]


def digits_frechet_distance(
    samples: Tensor,
    reference: Optional[Tensor] = None,
    num_reference: Optional[int] = None,
    cache_dir: Optional[Union[str, Path]] = None,
) -> dict:
    """Fréchet distance between classifier features of ``samples`` and of reference digits (both in [-1, 1]).

    ``reference`` defaults to the held-out digits split; ``num_reference`` keeps its first rows only.
    Returns ``{"value": float, "protocol": {...}}``; the protocol records the sample and reference counts, the
    reference source and the feature extractor's name and checksum. Small sample sets bias the value upwards,
    so compare values only at equal counts.
    """
    source = REFERENCE_SOURCE if reference is None else "user-provided reference images"
    if reference is None:
        reference = _normalised_split("heldout")[0]
    if num_reference is not None:
        check_positive_int("num_reference", num_reference, minimum=2)
        if num_reference > reference.shape[0]:
            raise ValueError(
                f"num_reference={num_reference} exceeds the {reference.shape[0]} reference images available"
            )
        reference = reference[:num_reference]
    extractor = get_digits_feature_extractor(cache_dir)
    value = frechet_distance_from_features(extractor.features(samples), extractor.features(reference))
    protocol = {
        "metric": "digits_frechet_distance",
        "num_samples": int(samples.shape[0]),
        "num_reference": int(reference.shape[0]),
        "reference_source": source,
        "feature_extractor": extractor.describe(),
        "input_range": "[-1, 1], clamped",
    }
    return {"value": value, "protocol": protocol}


if __name__ == "__main__":
    _extractor = get_digits_feature_extractor()
    print(f"{_extractor.name}: {_extractor.weights_path}")
    print(f"sha256 {_extractor.sha256}, held-out accuracy {_extractor.heldout_accuracy:.4f}")
