"""Precomputed latents from ``.safetensors`` (keys ``latents``, optional ``labels``) or ``.npy`` (+ labels ``.npy``).

``scaling`` standardises them with the data's own statistics: ``"per_channel"`` (mean and std of each channel,
dim 1), ``"global"`` (one mean and std) or ``"none"``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Union

import numpy as np
import torch
from torch import Tensor

from ..validation import check_choice, check_finite
from .base import AffineNormalisation, TensorDataset

LATENT_SCALINGS = ("per_channel", "global", "none")
LATENT_SUFFIXES = (".safetensors", ".npy")


class LatentsDataset(TensorDataset):
    """Latents ``(N, *shape)`` as float32, standardised by ``scaling``; labels from the file or ``labels_path``.

    ``num_classes`` defaults to ``max(label) + 1`` (0 without labels) when every class id below it occurs; labels
    that skip ids (e.g. a file of 99s alone, which would make 99 classes that never occur) need an explicit
    ``num_classes``.
    """

    def __init__(
        self,
        path: Union[str, Path],
        labels_path: Optional[Union[str, Path]] = None,
        scaling: str = "per_channel",
        num_classes: Optional[int] = None,
    ):
        check_choice("scaling", scaling, LATENT_SCALINGS)
        latents, labels = load_latents(path, labels_path)
        normaliser = fit_normalisation(latents, scaling)
        if num_classes is None:
            num_classes = 0 if labels is None else inferred_num_classes(labels)
        if labels is not None and (labels.min() < 0 or labels.max() >= num_classes):
            raise ValueError(f"labels must lie in [0, {num_classes - 1}] for num_classes={num_classes}")
        super().__init__(normaliser.normalise(latents), labels, num_classes, normaliser)
        self.path = Path(path)


def inferred_num_classes(labels: Tensor) -> int:
    """``max(labels) + 1`` when every id from 0 to the largest occurs; otherwise ``ValueError`` naming them."""
    present = torch.unique(labels)
    largest = int(present.max())
    if present.numel() != largest + 1:
        raise ValueError(f"labels use {present.numel()} distinct class id(s) (e.g. {present[:5].tolist()}) but the "
                         f"largest is {largest}, so {largest + 1 - present.numel()} class id(s) below it never occur; "
                         f"set num_classes explicitly (e.g. num_classes={largest + 1}) or renumber the classes "
                         f"0..{present.numel() - 1}")
    return largest + 1


def load_latents(
    path: Union[str, Path], labels_path: Optional[Union[str, Path]] = None
) -> tuple[Tensor, Optional[Tensor]]:
    """Read raw float32 latents and optional long labels, checking that they are finite and agree in length."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"latents file {str(path)!r} does not exist")
    check_choice("latents file suffix", path.suffix, LATENT_SUFFIXES)
    if path.suffix == ".safetensors":
        latents, labels = _read_safetensors(path)
    else:
        latents, labels = torch.from_numpy(np.load(path)), None
    if labels_path is not None:
        if labels is not None:
            raise ValueError(f"{str(path)!r} already holds labels; drop labels_path or the file's 'labels' key")
        labels_path = Path(labels_path)
        if not labels_path.is_file():
            raise ValueError(f"labels file {str(labels_path)!r} does not exist")
        labels = torch.from_numpy(np.load(labels_path))
    latents = latents.to(torch.float32)
    if latents.ndim < 2 or latents.shape[0] == 0:
        raise ValueError(f"latents have shape {tuple(latents.shape)}; expected (N, ...) with N >= 1 and a sample axis")
    check_finite("latents", latents)
    if labels is not None:
        if labels.is_floating_point() or labels.dtype == torch.bool:
            raise ValueError(f"labels have dtype {labels.dtype}; expected integer class ids")
        if labels.shape != (latents.shape[0],):
            raise ValueError(
                f"labels have shape {tuple(labels.shape)} but latents have shape {tuple(latents.shape)}; "
                f"expected labels of shape ({latents.shape[0]},)"
            )
        labels = labels.to(torch.long)
    return latents, labels


def _read_safetensors(path: Path) -> tuple[Tensor, Optional[Tensor]]:
    from safetensors.torch import load_file

    tensors = load_file(str(path))
    unknown = sorted(set(tensors) - {"latents", "labels"})
    if "latents" not in tensors or unknown:
        raise ValueError(f"{str(path)!r} holds keys {sorted(tensors)}; expected 'latents' and optionally 'labels'")
    return tensors["latents"], tensors.get("labels")


def fit_normalisation(latents: Tensor, scaling: str) -> AffineNormalisation:
    """The affine map that gives ``latents`` zero mean and unit std, per channel (dim 1) or globally."""
    check_choice("scaling", scaling, LATENT_SCALINGS)
    if scaling == "none":
        return AffineNormalisation(1.0, 0.0)
    reduce_dims = [dim for dim in range(latents.ndim) if dim != 1] if scaling == "per_channel" else None
    wide = latents.to(torch.float64)
    mean = wide.mean(dim=reduce_dims)
    std = wide.std(dim=reduce_dims, correction=0)
    if (std == 0).any():
        raise ValueError(f"latents have zero standard deviation ({scaling} scaling); use scaling='none'")
    return AffineNormalisation(scale=1.0 / std, shift=-mean / std)
