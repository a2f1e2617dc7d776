"""From config sections to the objects a run needs: dataset, transport, model and objective.

The builders belong to their packages (:func:`ucgm.data.build_dataset`, :func:`ucgm.models.build_model`,
:func:`ucgm.methods.build_objective`); this module fills in what the model needs to know about the data and
turns builder errors into :class:`~ucgm.training.schema.ConfigError` naming the section.
"""

from __future__ import annotations

import copy
import inspect
import math
from typing import Callable, Optional, TypeVar

from torch import nn

from ..transports import Transport, make_transport
from ..training.schema import ConfigError, typed_section

T = TypeVar("T")


def _in_section(section: str, build: Callable[[], T]) -> T:
    try:
        return build()
    except (ValueError, TypeError, KeyError) as error:
        raise ConfigError(f"{section}: {error}") from error


def _constructor_keys(factory: Callable, skip: tuple = ()) -> list[str]:
    return [name for name in inspect.signature(factory).parameters if name not in ("self",) + skip]


def _model_class(name: str) -> Optional[Callable]:
    from ..models.registry import MODEL_CLASSES

    key = name.lower()
    return MODEL_CLASSES["dit"] if key.startswith(("dit-", "sit-")) else MODEL_CLASSES.get(key)


def _objective_classes() -> dict:
    """Every selectable objective (the consistency family registers itself when its registry is imported)."""
    from ..methods import OBJECTIVES

    return OBJECTIVES


def accepted_keys(section: str, name: str) -> Optional[list[str]]:
    """The options component ``name`` of open section ``section`` accepts (for override checking)."""
    if section == "data":
        from ..data import DATASETS

        return _constructor_keys(DATASETS[name]) if name in DATASETS else None
    if section == "model":
        model_class = _model_class(name)
        return _constructor_keys(model_class) if model_class is not None else None
    if section == "objective":
        objectives = _objective_classes()
        return _constructor_keys(objectives[name], ("transport",)) if name in objectives else None
    return None


def build_dataset(config: dict):
    """The run's dataset (``data`` section)."""
    from ..data import build_dataset as build

    return _in_section("data", lambda: build(copy.deepcopy(config["data"])))


def data_defaults(model_name: str, shape: tuple, num_classes: int) -> dict:
    """Model options derived from the data, for the options the model class takes: ``data_dim`` (features per
    sample), ``in_channels`` and ``input_size`` (images ``(C, H, W)``) and ``num_classes`` (``None`` when
    unconditional)."""
    model_class = _model_class(model_name)
    if model_class is None:
        return {}
    accepted = set(_constructor_keys(model_class))
    derived = {"data_dim": math.prod(shape), "num_classes": num_classes or None}
    if len(shape) == 3:
        derived.update(in_channels=shape[0], input_size=shape[-1])
    return {key: value for key, value in derived.items() if key in accepted}


def with_data_defaults(config: dict, shape: tuple, num_classes: int) -> dict:
    """A copy of ``config`` whose ``model`` section also holds the data-derived options it did not set, so that
    the saved config alone rebuilds the model."""
    config = copy.deepcopy(config)
    for key, value in data_defaults(config["model"]["name"], tuple(shape), num_classes).items():
        config["model"].setdefault(key, value)
    return config


def build_transport(config: dict) -> Transport:
    """The run's transport (``transport`` section)."""
    settings = typed_section(config, "transport")
    kwargs = {"parameterisation": settings.parameterisation, "sigma_data": settings.sigma_data}
    if settings.half_pi is not None:
        kwargs["half_pi"] = settings.half_pi
    return _in_section("transport", lambda: make_transport(settings.name, **kwargs))


def build_model(config: dict) -> nn.Module:
    """The run's network (``model`` section, data-derived options filled in)."""
    from ..models import build_model as build

    return _in_section("model", lambda: build(copy.deepcopy(config["model"])))


def build_objective(config: dict, transport: Transport):
    """The run's objective (``objective`` section) on ``transport``."""
    from ..methods import build_objective as build

    _objective_classes()
    return _in_section("objective", lambda: build(copy.deepcopy(config["objective"]), transport))


def sampling_network(model: nn.Module, transport: Transport, config: dict) -> tuple[nn.Module, Transport]:
    """``(network, transport)`` to sample a backbone trained with ``config``: objectives that train a
    re-parameterised network (e.g. consistency models) wrap the backbone; others use it as it is."""
    from ..methods.consistency.base import sampling_model_from_config

    return sampling_model_from_config(model, transport, config.get("objective") or {})
