"""What every ucgm dataset provides, and the affine normalisation that maps raw data to model space.

A dataset yields ``(x, labels)``: ``x`` is a float32 tensor ``(B, *shape)`` in the normalised space the model sees,
``labels`` a long tensor ``(B,)`` of class ids or ``None`` for unconditional data (``num_classes == 0``).
Batches are drawn deterministically: :meth:`Dataset.sample_batch` takes a ``torch.Generator`` so that a trainer
which derives one generator per step resumes exactly.
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
from torch import Tensor

from ..validation import check_positive_int

Number = Union[float, Sequence[float]]


class AffineNormalisation:
    """``normalised = raw * scale + shift``.

    ``scale`` and ``shift`` are numbers (global) or one number per channel (channel = first axis of a sample,
    i.e. dim 1 of a batch).
    """

    def __init__(self, scale: Number, shift: Number):
        self.scale = _as_float_or_list(scale)
        self.shift = _as_float_or_list(shift)
        if isinstance(self.scale, list) and isinstance(self.shift, list) and len(self.scale) != len(self.shift):
            raise ValueError(f"scale has {len(self.scale)} channels but shift has {len(self.shift)}; they must match")
        if any(value == 0 for value in _as_list(self.scale)):
            raise ValueError("scale must be non-zero so that the normalisation can be inverted")

    def normalise(self, raw: Tensor) -> Tensor:
        """Map a raw batch ``(B, C, ...)`` to model space."""
        scale, shift = self._broadcastable(raw)
        return raw * scale + shift

    def denormalise(self, x: Tensor) -> Tensor:
        """Map a model-space batch ``(B, C, ...)`` back to raw data units."""
        scale, shift = self._broadcastable(x)
        return (x - shift) / scale

    def to_dict(self) -> dict:
        """A JSON-serialisable description, e.g. for a checkpoint: ``{"kind": "affine", "scale": .., "shift": ..}``."""
        return {"kind": "affine", "scale": self.scale, "shift": self.shift}

    @classmethod
    def from_dict(cls, description: dict) -> "AffineNormalisation":
        """Rebuild from :meth:`to_dict` output."""
        if description.get("kind") != "affine":
            raise ValueError(f"normalisation kind={description.get('kind')!r} is not allowed; allowed values: 'affine'")
        return cls(description["scale"], description["shift"])

    def _broadcastable(self, batch: Tensor) -> tuple[Tensor, Tensor]:
        return _broadcast(self.scale, batch), _broadcast(self.shift, batch)


def _as_float_or_list(value: Union[Number, Tensor]) -> Union[float, list[float]]:
    if isinstance(value, Tensor):
        value = value.tolist()
    if isinstance(value, (list, tuple)):
        return [float(item) + 0.0 for item in value]  # + 0.0 turns -0.0 into 0.0
    return float(value) + 0.0


def _as_list(value: Union[float, list[float]]) -> list[float]:
    return value if isinstance(value, list) else [value]


def _broadcast(value: Union[float, list[float]], batch: Tensor) -> Tensor:
    tensor = torch.tensor(value, dtype=batch.dtype, device=batch.device)
    if tensor.ndim == 0:
        return tensor
    if batch.ndim < 2 or batch.shape[1] != tensor.shape[0]:
        raise ValueError(
            f"per-channel normalisation has {tensor.shape[0]} channels but the batch has shape {tuple(batch.shape)}"
        )
    return tensor.reshape(1, -1, *([1] * (batch.ndim - 2)))


class Dataset:
    """Base class: ``shape`` (one sample), ``num_classes`` (0 = unconditional), ``normalisation`` and batches.

    Subclasses implement :meth:`sample_batch`; finite ones also implement :meth:`batch` and ``__len__``.
    """

    shape: tuple[int, ...]
    num_classes: int
    normaliser: AffineNormalisation

    @property
    def normalisation(self) -> dict:
        """How raw data was mapped to model space (see :class:`AffineNormalisation`)."""
        return self.normaliser.to_dict()

    def denormalise(self, x: Tensor) -> Tensor:
        """Map model-space samples back to raw data units."""
        return self.normaliser.denormalise(x)

    def sample_batch(self, batch_size: int, generator: torch.Generator) -> tuple[Tensor, Optional[Tensor]]:
        """Draw a random batch; the same generator state gives the same batch."""
        raise NotImplementedError


class FiniteDataset(Dataset):
    """A dataset of ``len(self)`` indexed samples; random batches draw indices uniformly with replacement.

    ``decoded_per_batch``: whether :meth:`batch` decodes its samples from files (the trainer then decodes the
    coming batches in ``DataLoader`` worker processes)."""

    decoded_per_batch = False

    def __len__(self) -> int:
        raise NotImplementedError

    def batch(self, indices: Tensor) -> tuple[Tensor, Optional[Tensor]]:
        """The samples at ``indices`` (a 1-D long tensor)."""
        raise NotImplementedError

    def draw_indices(self, batch_size: int, generator: torch.Generator) -> Tensor:
        """``batch_size`` uniform random indices (CPU long tensor) drawn with ``generator``."""
        check_positive_int("batch_size", batch_size)
        return torch.randint(len(self), (batch_size,), generator=generator, device=generator.device).cpu()

    def sample_batch(self, batch_size: int, generator: torch.Generator) -> tuple[Tensor, Optional[Tensor]]:
        return self.batch(self.draw_indices(batch_size, generator))


class TensorDataset(FiniteDataset):
    """A finite dataset held in memory as normalised float32 tensors."""

    def __init__(self, data: Tensor, labels: Optional[Tensor], num_classes: int, normaliser: AffineNormalisation):
        if labels is not None and labels.shape != (data.shape[0],):
            raise ValueError(
                f"labels have shape {tuple(labels.shape)} but there are {data.shape[0]} samples; "
                f"expected labels of shape ({data.shape[0]},)"
            )
        self.data = data.to(torch.float32).contiguous()
        self.labels = None if labels is None else labels.to(torch.long)
        self.num_classes = num_classes
        self.shape = tuple(self.data.shape[1:])
        self.normaliser = normaliser

    def __len__(self) -> int:
        return self.data.shape[0]

    def batch(self, indices: Tensor) -> tuple[Tensor, Optional[Tensor]]:
        labels = None if self.labels is None else self.labels[indices]
        return self.data[indices], labels
