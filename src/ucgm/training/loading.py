"""Rebuild what a checkpoint trained: its method, the networks it samples with, and the sampling model.

A checkpoint is self-contained: its metadata holds the resolved run config, so
``load_checkpoint_model(path)`` needs nothing else. The networks are read as the method trained them
(:meth:`ucgm.methods.base.Method.sampling_model`: e.g. a consistency model's boundary-condition wrapper).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Mapping, NamedTuple, Optional

import torch
from torch import nn

from ..methods import Method, build_method
from ..models import build_model
from ..transports import Transport, make_transport
from .checkpoint import CheckpointError, CheckpointInfo, read_checkpoint_info, read_weights, weight_group_names
from .networks import role_model_config


class LoadedCheckpoint(NamedTuple):
    """A checkpoint ready to sample: ``model`` read through ``transport`` (the method's sampling model), the
    ``method``, its sampling ``networks`` by role, the resolved ``config`` and the checkpoint ``info``."""

    model: Callable
    transport: Transport
    method: Method
    networks: dict
    config: dict
    info: CheckpointInfo


def transport_from_settings(settings: Mapping) -> Transport:
    """The transport of a run config's ``transport`` section (``name``, ``parameterisation``, ``half_pi``,
    ``sigma_data``)."""
    kwargs = {"parameterisation": settings.get("parameterisation"), "sigma_data": settings.get("sigma_data", 0.5)}
    if settings.get("half_pi") is not None:
        kwargs["half_pi"] = settings["half_pi"]
    return make_transport(settings.get("name", "linear"), **kwargs)


def method_from_config(config: Mapping) -> Method:
    """The method of a resolved run config (its ``objective`` section on its transport)."""
    return build_method(dict(config.get("objective") or {"name": "ucgm"}), transport_from_settings(config["transport"]))


def load_checkpoint_model(checkpoint: Path | str, weights: str = "ema", device: torch.device | str = "cpu",
                          config: Optional[dict] = None) -> LoadedCheckpoint:
    """Rebuild the sampling model of ``checkpoint`` (run dir, checkpoint dir or ``model.safetensors``) from its
    ``weights`` (``"ema"``, falling back to ``"model"`` for networks without an EMA); ``config`` replaces the
    stored config (e.g. with other sampling settings)."""
    info = read_checkpoint_info(checkpoint)
    config = info.config if config is None else config
    try:
        method = method_from_config(config)
    except ValueError as error:
        raise CheckpointError(f"{str(info.path)!r}: its config names a method this ucgm cannot build ({error})"
                              ) from error
    specs = method.networks()
    networks: dict[str, nn.Module] = {}
    for role in method.sampling_roles():
        module = build_model(role_model_config(config["model"], specs[role]))
        name, ema_name = weight_group_names(role, method.sampling_role)
        group = ema_name if weights == "ema" and ema_name in info.groups else name
        try:
            module.load_state_dict(read_weights(info.path, group))
        except RuntimeError as error:
            raise CheckpointError(f"{str(info.path)!r}: the {group!r} weights do not fit the model its config "
                                  f"describes ({error})") from error
        networks[role] = module.to(device).eval().requires_grad_(False)
    model, transport = method.sampling_model(networks)
    return LoadedCheckpoint(model, transport, method, networks, config, info)
