"""Conditioning embeddings shared by the backbones: network time and class label.

The network time ``t`` may be ``t`` in [0, 1], ``1 - t``, ``t * 1000`` or an EDM ``sigma`` up to ~80, depending on
the transport. It is multiplied by ``time_scale`` and expanded into sinusoidal (Fourier) features whose
frequencies are spread geometrically from 1 down to ``1 / max_period``; sines and cosines stay bounded for any
time value, so every range gives finite features.

The class embedding has ``num_classes + 1`` rows: row ``num_classes`` is the null label used for
classifier-free guidance. Label dropout is not done here (the training objective does it).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor, nn

from ..validation import check_positive_int

DEFAULT_TIME_SCALE = 1000.0


def expand_time(t: Tensor | float, batch_size: int, device: torch.device) -> Tensor:
    """Return the network time as a float tensor of shape ``(batch_size,)`` (a scalar is broadcast)."""
    t = torch.as_tensor(t, device=device)
    if not t.is_floating_point():
        t = t.float()
    if t.ndim == 0:
        return t.expand(batch_size)
    if t.shape != (batch_size,):
        raise ValueError(f"time must be a scalar or have shape ({batch_size},), got {tuple(t.shape)}")
    return t


def sinusoidal_features(
    t: Tensor, dim: int, time_scale: float = DEFAULT_TIME_SCALE, max_period: float = 10000.0
) -> Tensor:
    """Sinusoidal features ``(B, dim)`` of ``s = time_scale * t``: ``[cos(w_k s), sin(w_k s)]``,
    ``w_k = max_period^(-k / half)``.

    Computed in float32 whatever the dtype of ``t``; an odd ``dim`` is padded with one zero column.
    """
    half = dim // 2
    exponents = torch.arange(half, device=t.device, dtype=torch.float32) / half
    frequencies = torch.exp(-math.log(max_period) * exponents)
    angles = (time_scale * t.float())[:, None] * frequencies[None, :]
    features = torch.cat([torch.cos(angles), torch.sin(angles)], dim=1)
    if dim % 2:
        features = torch.nn.functional.pad(features, (0, 1))
    return features


class TimeEmbedding(nn.Module):
    """Network time ``(B,)`` -> ``(B, dim)``: sinusoidal features followed by a two-layer SiLU MLP."""

    def __init__(self, dim: int, frequency_dim: int = 256, time_scale: float = DEFAULT_TIME_SCALE):
        super().__init__()
        self.frequency_dim = frequency_dim
        self.time_scale = time_scale
        self.mlp = nn.Sequential(nn.Linear(frequency_dim, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, t: Tensor) -> Tensor:
        features = sinusoidal_features(t, self.frequency_dim, self.time_scale)
        return self.mlp(features.to(self.mlp[0].weight.dtype))


def check_num_classes(num_classes: Optional[int]) -> None:
    """Raise ``ValueError`` unless ``num_classes`` is ``None`` (unconditional) or a positive int."""
    if num_classes is not None:
        check_positive_int("num_classes (None for an unconditional model)", num_classes)


def resolve_labels(labels: Optional[Tensor], num_classes: int, batch_size: int, device: torch.device) -> Tensor:
    """Check class labels ``(B,)`` against ``[0, num_classes]``; ``None`` becomes the null label ``num_classes``."""
    if labels is None:
        return torch.full((batch_size,), num_classes, dtype=torch.long, device=device)
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise ValueError(f"labels must be an integer tensor, got dtype {labels.dtype}")
    if labels.shape != (batch_size,):
        raise ValueError(f"labels must have shape ({batch_size},), got {tuple(labels.shape)}")
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) > num_classes):
        raise ValueError(
            f"labels must lie in [0, {num_classes}] ({num_classes} is the null label), "
            f"got values in [{int(labels.min())}, {int(labels.max())}]"
        )
    return labels


class ClassEmbedding(nn.Module):
    """Class label ``(B,)`` int64 in ``[0, num_classes]`` -> ``(B, dim)``; row ``num_classes`` is the null label."""

    def __init__(self, num_classes: int, dim: int):
        super().__init__()
        check_num_classes(num_classes)
        self.num_classes = num_classes
        self.table = nn.Embedding(num_classes + 1, dim)
        nn.init.normal_(self.table.weight, std=0.02)

    def forward(self, labels: Tensor) -> Tensor:
        return self.table(labels)


class ConditionEmbedding(nn.Module):
    """Time embedding plus, for class-conditional models, the class embedding: ``(t, labels) -> (B, dim)``.

    ``num_classes = None`` makes the embedding unconditional: labels are ignored. For a conditional embedding,
    ``labels = None`` means "no label" and selects the null label for the whole batch.
    """

    def __init__(
        self,
        dim: int,
        num_classes: Optional[int] = None,
        time_scale: float = DEFAULT_TIME_SCALE,
        frequency_dim: int = 256,
    ):
        super().__init__()
        check_num_classes(num_classes)
        self.num_classes = num_classes
        self.time = TimeEmbedding(dim, frequency_dim, time_scale)
        self.label = ClassEmbedding(num_classes, dim) if num_classes is not None else None

    def forward(self, t: Tensor, labels: Optional[Tensor], batch_size: int) -> Tensor:
        weight = self.time.mlp[0].weight
        embedding = self.time(expand_time(t, batch_size, weight.device))
        if self.label is None:
            return embedding
        return embedding + self.label(resolve_labels(labels, self.num_classes, batch_size, weight.device))
