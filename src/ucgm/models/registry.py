"""Build a backbone from a config dict, and count parameters."""

from __future__ import annotations

import inspect
from typing import Any, Callable

from torch import nn

from .dit import DiT, parse_dit_name
from .mlp import MLP
from .unet import UNet

#: config ``name`` -> backbone class; ``"DiT-<size>/<patch>"`` names are accepted too (see :func:`build_model`).
MODEL_CLASSES: dict[str, Callable[..., nn.Module]] = {"mlp": MLP, "unet": UNet, "dit": DiT}


def _check_keys(name: str, model_class: Callable[..., nn.Module], kwargs: dict[str, Any]) -> None:
    """Raise ``ValueError`` for keys the constructor does not take or required keys that are missing."""
    parameters = dict(inspect.signature(model_class).parameters)
    allowed = ", ".join(sorted(parameters))
    unknown = sorted(set(kwargs) - set(parameters))
    if unknown:
        raise ValueError(f"unknown key(s) {unknown} for model {name!r}; allowed keys: name, {allowed}")
    missing = sorted(key for key, p in parameters.items() if p.default is inspect.Parameter.empty and key not in kwargs)
    if missing:
        raise ValueError(f"model {name!r} needs the key(s) {missing}; allowed keys: name, {allowed}")


def build_model(config: dict[str, Any]) -> nn.Module:
    """Build a backbone from ``{"name": ..., **kwargs}``; ``name`` is ``mlp``, ``unet``, ``dit`` or e.g. ``DiT-XL/2``.

    Example: ``build_model({"name": "dit", "size": "S", "patch_size": 2, "input_size": 32, "in_channels": 4,
    "num_classes": 1000})``. The remaining keys are the constructor's keyword arguments.
    """
    if "name" not in config:
        raise ValueError(f"model config needs a 'name'; allowed: {', '.join(MODEL_CLASSES)} or DiT-<size>/<patch>")
    kwargs = dict(config)
    name = str(kwargs.pop("name"))
    key = name.lower()
    if key.startswith(("dit-", "sit-")):
        size, patch_size = parse_dit_name(name)
        for preset_key in ("size", "patch_size"):
            if preset_key in kwargs:
                raise ValueError(f"{preset_key!r} is set by the name {name!r}; remove it or use name 'dit'")
        kwargs.update(size=size, patch_size=patch_size)
        key = "dit"
    if key not in MODEL_CLASSES:
        raise ValueError(f"unknown model name {name!r}; allowed: {', '.join(MODEL_CLASSES)} or DiT-<size>/<patch>")
    _check_keys(name, MODEL_CLASSES[key], kwargs)
    return MODEL_CLASSES[key](**kwargs)


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameter values (works on the meta device); ``trainable_only`` skips frozen parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
