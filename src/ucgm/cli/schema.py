"""The typed sections of a run config and their validation.

A config is a nested dict with the sections of :data:`SECTIONS`. The *closed* sections (``transport``,
``optimizer``, ``training``, ``sampling``, ``init``) have the fixed keys of the dataclasses below; the *open*
sections (``data``, ``model``, ``objective``, ``tune``, ``tune_recipes``, ``objectives``) are handed to the builders of
those components (``tune`` is merged over the config by ``ucgm tune``, ``tune_recipes.NAME`` over ``tune`` by
``ucgm tune --recipe NAME``; ``objectives`` holds a preset's per-objective
defaults, applied by the ``objective=NAME`` override, see :func:`ucgm.cli.config.switch_objective`), which check
their own keys.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

from ..sampling.settings import SamplingConfig
from ..training.settings import EMAConfig, OptimizerConfig, TrainingConfig
from ..transports import PARAMETERISATIONS, TRANSPORT_NAMES
from ..validation import ConfigError, is_number, require, require_choice

INIT_WEIGHTS = ("ema", "model")


# ---------------------------------------------------------------------------------------- sections
@dataclass
class TransportConfig:
    """Which :func:`ucgm.transports.make_transport` to train and sample on."""

    name: str = "linear"
    parameterisation: Optional[str] = None
    half_pi: Optional[float] = None
    sigma_data: float = 0.5

    def validate(self, prefix: str = "transport") -> None:
        require_choice(f"{prefix}.name", str(self.name).lower(), TRANSPORT_NAMES)
        require_choice(f"{prefix}.parameterisation", self.parameterisation, (None,) + PARAMETERISATIONS)
        require(self.half_pi is None or (is_number(self.half_pi) and self.half_pi > 0), f"{prefix}.half_pi",
                 self.half_pi, "must be null (pi/2) or a positive number (1.57 reproduces the official code)")
        require(is_number(self.sigma_data) and self.sigma_data > 0, f"{prefix}.sigma_data", self.sigma_data,
                 "must be a positive number")


@dataclass
class InitConfig:
    """Start a run from the weights of another checkpoint (``ucgm tune`` sets it)."""

    checkpoint: Optional[str] = None
    weights: str = "ema"

    def validate(self, prefix: str = "init") -> None:
        require(self.checkpoint is None or isinstance(self.checkpoint, str), f"{prefix}.checkpoint",
                 self.checkpoint, "must be null or a checkpoint / run directory path")
        require_choice(f"{prefix}.weights", self.weights, INIT_WEIGHTS)


CLOSED_SECTIONS: dict[str, type] = {
    "transport": TransportConfig,
    "optimizer": OptimizerConfig,
    "training": TrainingConfig,
    "sampling": SamplingConfig,
    "init": InitConfig,
}
SECTIONS = ("data", "model", "transport", "objective", "networks", "optimizer", "training", "sampling", "init",
            "tune", "tune_recipes", "objectives")
#: Open sections whose keys are checked by the component that reads them (``networks.ROLE.optimizer.lr``: the
#: method's networks, see :func:`ucgm.training.networks.build_networks`).
FREE_SECTIONS = ("networks",)
#: Open sections that must name the component to build.
NAMED_SECTIONS = ("data", "model", "objective")


def section_defaults(name: str) -> dict:
    """The default values of a closed section as a plain nested dict."""
    return dataclasses.asdict(CLOSED_SECTIONS[name]())


def default_config() -> dict:
    """A config holding every section: defaults for the closed ones, empty open ones."""
    return {name: section_defaults(name) if name in CLOSED_SECTIONS else {} for name in SECTIONS}


def section_keys(name: str) -> list[str]:
    """Dotted keys of a closed section, nested ones included (``training.ema.decay``)."""
    keys = [f"{name}.{item.name}" for item in dataclasses.fields(CLOSED_SECTIONS[name])]
    if name == "training":
        keys += [f"training.ema.{item.name}" for item in dataclasses.fields(EMAConfig)]
    return keys


def typed_section(config: dict, name: str):
    """The dataclass view of closed section ``name`` of a complete config (not yet validated)."""
    values = dict(config[name])
    if name == "training":
        values["ema"] = EMAConfig(**values["ema"])
    return CLOSED_SECTIONS[name](**values)


@dataclass(frozen=True)
class RunConfig:
    """A run config parsed and validated once, at the entry (:func:`ucgm.cli.config.parse_run_config`), and
    handed down: the closed sections typed, beside ``values``, the plain nested dict that ``DIR/config.yaml``
    and checkpoint metadata hold (the open sections ``data``, ``model``, ``objective``, ``networks`` are read
    from it by the builders of those components)."""

    values: dict
    transport: TransportConfig
    optimizer: OptimizerConfig
    training: TrainingConfig
    sampling: SamplingConfig
    init: InitConfig

    def section(self, name: str) -> dict:
        """Open section ``name`` of the config (empty when unset)."""
        if name in CLOSED_SECTIONS:
            raise KeyError(f"{name!r} is a closed section; read RunConfig.{name}")
        return self.values.get(name) or {}
