"""The networks a method declares (:class:`~ucgm.methods.base.NetworkSpec`), built and prepared for training.

:func:`build_networks` turns a method's specs into modules: the run's network for the sampling role, fresh
backbones (``scratch``), copies of other roles (``copy:ROLE``), the exact mixture oracle (``oracle:MIXTURE``),
checkpoint networks (``checkpoint:PATH``, through a loader the caller provides) and modules the method builds
(``method``); checkpoint networks take the dtype of the run's network, and the trainer places every network on its
device. :class:`TrainedNetwork` holds what the trainer keeps per network: its training wrapper (DDP / FSDP),
optimizer, evaluation EMA and update count.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Callable, Mapping, Optional

import torch
from torch import nn

from ..methods.base import Method, NetworkSpec
from ..validation import ConfigError
from .distributed import DistributedContext
from .ema import EvaluationEMA
from .optim import build_optimizer
from .settings import EMAConfig, OptimizerConfig

#: ``(role, spec) -> module``: a fresh backbone for a ``scratch`` network (its spec's model options applied).
BackboneBuilder = Callable[[str, NetworkSpec], nn.Module]
#: ``(role, spec, path) -> module``: a network read from a checkpoint (a frozen one with a ``transport`` attribute).
CheckpointLoader = Callable[[str, NetworkSpec, str], nn.Module]


@dataclass
class NetworkSetup:
    """One network as the trainer receives it: the module, its spec and its resolved optimizer / EMA settings
    (``None`` for a network that is not optimised / keeps no EMA)."""

    module: nn.Module
    spec: NetworkSpec
    optimizer: Optional[OptimizerConfig]
    ema: Optional[EMAConfig]


def merged_settings(base, overrides: Optional[Mapping], kind: type, prefix: str):
    """``base`` (a settings dataclass) with ``overrides`` applied and validated (keys named ``prefix.KEY`` in
    errors); ``ConfigError`` on unknown keys."""
    values = dict(vars(base))
    for key, value in (overrides or {}).items():
        if key not in values:
            raise ConfigError(f"unknown setting {prefix}.{key}; allowed: {', '.join(values)}")
        values[key] = value
    settings = kind(**values)
    settings.validate(prefix)
    return settings


def _dependency_order(specs: Mapping[str, NetworkSpec]) -> list[str]:
    """Roles ordered so that every ``copy:ROLE`` source comes before its copies."""
    ordered: list[str] = []

    def visit(role: str, chain: tuple[str, ...]) -> None:
        if role in ordered:
            return
        if role in chain:
            raise ConfigError(f"network copies form a cycle: {' -> '.join(chain + (role,))}")
        init = specs[role].init
        if init.startswith("copy:"):
            source = init[len("copy:"):]
            if source not in specs:
                raise ConfigError(f"network {role!r} copies {source!r}, which the method does not declare "
                                  f"(networks: {', '.join(specs)})")
            visit(source, chain + (role,))
        ordered.append(role)

    for role in specs:
        visit(role, ())
    return ordered


def build_networks(method: Method, primary: nn.Module, optimizer: OptimizerConfig, ema: EMAConfig,
                   primary_pretrained: bool = False, build_backbone: Optional[BackboneBuilder] = None,
                   load_checkpoint: Optional[CheckpointLoader] = None,
                   overrides: Optional[Mapping[str, Mapping]] = None) -> dict[str, NetworkSetup]:
    """Every network of ``method`` by role. ``primary`` is the network of the sampling role (already initialised,
    e.g. from ``init.checkpoint``: ``primary_pretrained``); ``overrides`` holds the user's per-role settings
    (``{role: {"optimizer": {...}, "ema": {...}}}``, the run config's ``networks`` section)."""
    specs = method.networks()
    if method.sampling_role not in specs:
        raise ConfigError(f"{type(method).__name__} declares no network {method.sampling_role!r} (its sampling role)")
    unknown = sorted(set(overrides or {}) - set(specs))
    if unknown:
        raise ConfigError(f"networks.{unknown[0]}: this method has no network {unknown[0]!r}; its networks: "
                          f"{', '.join(specs)}")
    modules: dict[str, nn.Module] = {}
    pretrained = {method.sampling_role: primary_pretrained}
    for role in _dependency_order(specs):
        spec = specs[role]
        if role == method.sampling_role:
            modules[role] = primary
        elif spec.init == "scratch":
            if build_backbone is None:
                raise ConfigError(f"network {role!r} starts from scratch but no backbone builder was given")
            modules[role] = build_backbone(role, spec)
        elif spec.init.startswith("copy:"):
            source = spec.init[len("copy:"):]
            if spec.requires_pretrained and not pretrained.get(source, False):
                raise ConfigError(f"network {role!r} is a frozen copy of {source!r}, which starts from random "
                                  f"weights; set init.checkpoint to the checkpoint it should hold (e.g. `ucgm tune "
                                  f"SOURCE`), or use a reference that follows the model (reference=ema or online)")
            modules[role] = copy.deepcopy(modules[source])
            pretrained[role] = pretrained.get(source, False)
        elif spec.init.startswith("oracle:"):
            from ..data.mixtures import OracleModel, make_mixture

            try:
                modules[role] = OracleModel(make_mixture(spec.init[len("oracle:"):]), method.transport)
            except ValueError as error:
                raise ConfigError(f"network {role!r}: {error}") from error
        elif spec.init.startswith("checkpoint:"):
            if load_checkpoint is None:
                raise ConfigError(f"network {role!r} is read from {spec.init!r} but no checkpoint loader was given")
            modules[role] = load_checkpoint(role, spec, spec.init[len("checkpoint:"):]).to(dtype=_dtype_of(primary))
            pretrained[role] = True
        else:
            modules[role] = method.build_network(role)
    setups = {}
    for role, spec in specs.items():
        module = modules[role]
        if not spec.trainable:
            module.requires_grad_(False)
        user = dict((overrides or {}).get(role, {}))
        unknown_sections = sorted(set(user) - {"optimizer", "ema"})
        if unknown_sections:
            raise ConfigError(f"networks.{role}.{unknown_sections[0]} is not a network setting; allowed: "
                              f"networks.{role}.optimizer.KEY, networks.{role}.ema.KEY")
        optimizer_settings = merged_settings(optimizer, {**spec.optimizer, **user.get("optimizer", {})},
                                             OptimizerConfig, f"networks.{role}.optimizer") if spec.trainable else None
        ema_overrides = {**(spec.ema or {}), **user.get("ema", {})}
        ema_settings = merged_settings(ema, ema_overrides, EMAConfig, f"networks.{role}.ema") if spec.trainable \
            else None
        if ema_settings is not None and ema_settings.kind == "none":
            ema_settings = None
        setups[role] = NetworkSetup(module, spec, optimizer_settings, ema_settings)
    return setups


def _dtype_of(module: nn.Module) -> torch.dtype:
    """The floating dtype of a module's first floating parameter or buffer (float32 when it has none)."""
    tensors = list(module.parameters()) + list(module.buffers())
    return next((tensor.dtype for tensor in tensors if tensor.is_floating_point()), torch.float32)


class TrainedNetwork:
    """What the trainer keeps for one network: the module, its training wrapper, optimizer, EMA and the number of
    optimizer updates it has had (which drives its learning-rate warm-up and power-EMA profile)."""

    def __init__(self, role: str, setup: NetworkSetup, context: DistributedContext, parallel: str):
        self.role = role
        self.spec = setup.spec
        self.settings = setup.optimizer
        self.module = setup.module.to(context.device)
        self.trainable = setup.optimizer is not None and any(p.requires_grad for p in self.module.parameters())
        ema_copy = copy.deepcopy(self.module) if setup.ema is not None and self.trainable else None
        sharded = context.is_distributed and parallel == "fsdp"
        if self.trainable:
            self.wrapper = context.wrap(self.module, parallel)
        else:  # frozen networks are sharded too under FSDP (so that a target network matches its source)
            has_parameters = any(True for _ in self.module.parameters())
            self.wrapper = context.shard(self.module) if sharded and has_parameters else self.module
        if sharded and ema_copy is not None:
            ema_copy = context.shard(ema_copy)
        self.ema = EvaluationEMA(ema_copy, self.module, setup.ema) if ema_copy is not None else None
        self.parameters = [p for p in self.module.parameters() if p.requires_grad] if self.trainable else []
        self.optimizer = build_optimizer(self.parameters, setup.optimizer) if self.trainable else None
        self.updates = 0

    @property
    def owns_state(self) -> bool:
        """Whether the network's weights belong in a checkpoint (not an oracle or a checkpoint teacher)."""
        has_tensors = any(True for _ in self.module.state_dict())
        return has_tensors and not self.spec.init.startswith(("oracle:", "checkpoint:"))

    def set_requires_grad(self, enabled: bool) -> None:
        for parameter in self.parameters:
            parameter.requires_grad_(enabled)

    @torch.no_grad()
    def track(self, source: "TrainedNetwork", decay: float) -> None:
        """``theta <- decay * theta + (1 - decay) * theta_source`` (a target network following its source)."""
        targets = [p for p in self.module.parameters() if p.is_floating_point()]
        sources = [p for p in source.module.parameters() if p.is_floating_point()]
        torch._foreach_lerp_(targets, sources, 1.0 - decay)


def role_model_config(run_model: Mapping, spec: NetworkSpec) -> dict:
    """The backbone config of a network: the run's ``model`` section, the spec's model options over it, and the
    spec's conditions added to the model's ``conditions``."""
    config = {**dict(run_model), **dict(spec.model or {})}
    conditions = list(config.get("conditions") or ())
    config["conditions"] = conditions + [name for name in spec.conditions if name not in conditions]
    if not config["conditions"]:
        del config["conditions"]
    return config
