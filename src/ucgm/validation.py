"""Input checks that turn bad input into a ``ValueError`` naming the problem and the allowed values, and the checks
of config settings (:class:`ConfigError`)."""

from __future__ import annotations

import math
from typing import Any, Iterable, Optional

import torch
from torch import Tensor


def check_choice(name: str, value, allowed: Iterable) -> None:
    """Raise unless ``value`` is one of ``allowed``."""
    allowed = tuple(allowed)
    if value not in allowed:
        raise ValueError(f"{name}={value!r} is not allowed; allowed values: {', '.join(map(repr, allowed))}")


def check_range(name: str, value: float, low: float, high: float) -> None:
    """Raise unless ``low <= value <= high`` (and finite)."""
    if not isinstance(value, (int, float)) or not (low <= value <= high):
        raise ValueError(f"{name}={value!r} is outside the allowed range [{low}, {high}]")


def check_positive_int(name: str, value, minimum: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name}={value!r} must be an integer >= {minimum}")


def nonfinite_rows(tensor: Tensor) -> Tensor:
    """Indices along the first axis of the entries (samples) of a floating tensor that hold NaN or Inf."""
    if tensor.ndim == 0:
        return torch.nonzero(~torch.isfinite(tensor.reshape(1))).flatten()
    return torch.nonzero(~torch.isfinite(tensor.reshape(tensor.shape[0], -1)).all(dim=1)).flatten()


def check_finite(name: str, tensor: Optional[Tensor]) -> None:
    """Raise if a floating tensor holds NaN or Inf, naming the first bad index along its first axis (the sample
    index of a batch)."""
    if tensor is not None and tensor.is_floating_point() and not torch.isfinite(tensor).all():
        rows = nonfinite_rows(tensor)
        total = tensor.shape[0] if tensor.ndim else 1
        raise ValueError(f"{name} contains NaN or Inf values at index {int(rows[0])} ({rows.numel()} of {total} "
                         f"along the first axis); all values must be finite")


def check_same_shape(name_a: str, a: Tensor, name_b: str, b: Tensor) -> None:
    if a.shape != b.shape:
        raise ValueError(f"{name_a} has shape {tuple(a.shape)} but {name_b} has shape {tuple(b.shape)}; they must match")


def check_batch(name: str, tensor: Optional[Tensor], batch_size: int) -> None:
    """Raise unless ``tensor`` (labels, times) has one entry per sample."""
    if tensor is not None and (tensor.ndim == 0 or tensor.shape[0] != batch_size):
        shape = tuple(tensor.shape)
        raise ValueError(f"{name} has shape {shape}; expected a leading batch dimension of {batch_size}")


# ------------------------------------------------------------------------------------------ settings
class ConfigError(ValueError):
    """A config (file, preset or override) that cannot be used; the message names the key and what is allowed."""


def is_number(value: Any) -> bool:
    """A finite int or float (not a bool)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def require(condition: bool, key: str, value: Any, requirement: str) -> None:
    """Raise :class:`ConfigError` ``"KEY=VALUE is invalid: REQUIREMENT"`` unless ``condition``."""
    if not condition:
        raise ConfigError(f"{key}={value!r} is invalid: {requirement}")


def require_int(key: str, value: Any, minimum: int) -> None:
    require(is_int(value) and value >= minimum, key, value, f"must be an integer >= {minimum}")


def require_choice(key: str, value: Any, allowed: tuple) -> None:
    require(value in allowed, key, value, f"allowed values: {', '.join(map(repr, allowed))}")


def require_numbers(key: str, value: Any, count: int) -> None:
    require(isinstance(value, (list, tuple)) and len(value) == count and all(map(is_number, value)),
            key, value, f"must be a list of {count} numbers")
