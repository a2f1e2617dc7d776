"""From a run config to the objects a run needs: dataset, transport, method and the method's networks.

The builders belong to their packages (:func:`ucgm.data.build_dataset`, :func:`ucgm.models.build_model`,
:func:`ucgm.methods.build_method`, :func:`ucgm.training.networks.build_networks`); this module fills in what the
model needs to know about the data, resolves the networks a method declares (fresh backbones, checkpoints) and
turns builder errors into :class:`~ucgm.validation.ConfigError` naming the section.
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
import math
from typing import Callable, Optional, TypeVar

from torch import nn

from ..methods import Method, NetworkSpec, method_class, method_options
from ..training.loading import load_checkpoint_model, method_from_config, transport_from_settings
from ..training.networks import NetworkSetup, build_networks, role_model_config
from ..transports import Transport
from ..validation import ConfigError
from .config import as_run_config
from .schema import RunConfig

T = TypeVar("T")


def in_section(section: str, build: Callable[[], T]) -> T:
    """``build()``, with its ``ValueError`` / ``TypeError`` / ``KeyError`` turned into a :class:`ConfigError`
    naming the config section."""
    try:
        return build()
    except ConfigError:
        raise
    except (ValueError, TypeError, KeyError) as error:
        raise ConfigError(f"{section}: {error}") from error


def _constructor_keys(factory: Callable, skip: tuple = ()) -> list[str]:
    return [name for name in inspect.signature(factory).parameters if name not in ("self",) + skip]


def _model_class(name: str) -> Optional[Callable]:
    from ..models.registry import MODEL_CLASSES

    key = name.lower()
    return MODEL_CLASSES["dit"] if key.startswith(("dit-", "sit-")) else MODEL_CLASSES.get(key)


def accepted_keys(section: str, name: str) -> Optional[list[str]]:
    """The options component ``name`` of open section ``section`` accepts (for override checking)."""
    if section == "data":
        from ..data import DATASETS

        return _constructor_keys(DATASETS[name]) if name in DATASETS else None
    if section == "model":
        model_class = _model_class(name)
        return _constructor_keys(model_class) if model_class is not None else None
    if section == "objective":
        try:
            method_class(name)
        except ValueError:
            return None
        return method_options(name)
    return None


def build_dataset(config: RunConfig | dict):
    """The run's dataset (``data`` section)."""
    from ..data import build_dataset as build

    data = as_run_config(config).section("data")
    return in_section("data", lambda: build(copy.deepcopy(data)))


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


def with_data_defaults(config: RunConfig | dict, shape: tuple, num_classes: int) -> RunConfig:
    """``config`` whose ``model`` section also holds the data-derived options it did not set, so that the saved
    config alone rebuilds the model."""
    run = as_run_config(config)
    values = copy.deepcopy(run.values)
    for key, value in data_defaults(values["model"]["name"], tuple(shape), num_classes).items():
        values["model"].setdefault(key, value)
    return dataclasses.replace(run, values=values)


def build_transport(config: RunConfig | dict) -> Transport:
    """The run's transport (``transport`` section)."""
    settings = as_run_config(config).transport
    return in_section("transport", lambda: transport_from_settings(vars(settings)))


def build_method(config: RunConfig | dict) -> Method:
    """The run's method (``objective`` section) on the run's transport."""
    run = as_run_config(config)
    build_transport(run)
    return in_section("objective", lambda: method_from_config(run.values))


def build_model(config: RunConfig | dict, spec: Optional[NetworkSpec] = None) -> nn.Module:
    """A backbone of the run (``model`` section, data-derived options filled in), with the options and
    conditions of network ``spec``."""
    return _backbone(as_run_config(config).section("model"), spec or NetworkSpec())


def _backbone(model: dict, spec: NetworkSpec) -> nn.Module:
    """The backbone of model section ``model`` with the options and conditions of network ``spec``."""
    from ..models import build_model as build

    return in_section("model", lambda: build(role_model_config(model, spec)))


def _checkpoint_network(role: str, spec: NetworkSpec, path: str) -> nn.Module:
    """A network read from a checkpoint: a frozen one as the checkpoint's method samples it (with its
    ``transport``), a trainable one as the checkpoint's raw backbone — with the spec's model options over the
    checkpoint's model section when it has any (e.g. ``classifier_head``: the layers they add start at their own
    initialisation, every checkpoint weight is loaded)."""
    loaded = load_checkpoint_model(path)
    if spec.trainable:
        backbone = loaded.networks[loaded.method.sampling_role]
        if spec.model:
            backbone = _with_model_options(role, backbone, loaded.config, spec)
        return backbone.requires_grad_(True).train()
    model = loaded.model
    if not isinstance(model, nn.Module):
        raise ConfigError(f"network {role!r}: {path!r} does not give a module to train with")
    model.transport = loaded.transport
    return model


def _with_model_options(role: str, backbone: nn.Module, checkpoint_config: dict, spec: NetworkSpec) -> nn.Module:
    """The checkpoint's backbone rebuilt with ``spec.model`` over its model section, holding all of its weights."""
    module = _backbone(checkpoint_config["model"], NetworkSpec(model=spec.model))
    unexpected = module.load_state_dict(backbone.state_dict(), strict=False).unexpected_keys
    if unexpected:
        raise ConfigError(f"network {role!r}: the options {spec.model} drop checkpoint weights {unexpected[:3]}")
    return module.to(dtype=next(backbone.parameters()).dtype)


def build_run_networks(config: RunConfig | dict, method: Method, primary: nn.Module, pretrained: bool
                       ) -> dict[str, NetworkSetup]:
    """Every network of ``method`` for the run: ``primary`` (the sampling network, already initialised),
    fresh backbones, copies, oracles and checkpoint networks, with the run's optimizer and EMA settings and the
    ``networks`` section's per-role overrides."""
    run = as_run_config(config)
    return in_section("networks", lambda: build_networks(
        method, primary, run.optimizer, run.training.ema,
        primary_pretrained=pretrained, build_backbone=lambda role, spec: build_model(run, spec),
        load_checkpoint=_checkpoint_network,
        overrides=run.section("networks")))
