"""The typed sections of a run config and their validation.

A config is a nested dict with the sections of :data:`SECTIONS`. The *closed* sections (``transport``,
``optimizer``, ``training``, ``sampling``, ``init``) have the fixed keys of the dataclasses below; the *open*
sections (``data``, ``model``, ``objective``, ``tune``, ``objectives``) are handed to the builders of those
components (``tune`` is merged over the config by ``ucgm tune``; ``objectives`` holds a preset's per-objective
defaults, applied by the ``objective=NAME`` override, see :func:`ucgm.cli.config.switch_objective`), which check
their own keys.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Optional

from ..sampling.registry import SAMPLER_NAMES
from ..transports import PARAMETERISATIONS, TRANSPORT_NAMES


class ConfigError(ValueError):
    """A config (file, preset or override) that cannot be used; the message names the key and what is allowed."""


OPTIMIZERS = ("adamw", "radam")
EMA_KINDS = ("constant", "power", "none")
PRECISIONS = ("fp32", "bf16")
PARALLEL_MODES = ("ddp", "fsdp")
INIT_WEIGHTS = ("ema", "model")
#: Largest relative std an EDM2 power-function EMA can have (exponent gamma = 0).
MAX_POWER_EMA_STD = math.sqrt(1 / 12)


# ------------------------------------------------------------------------------------------ checks
def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _require(condition: bool, key: str, value: Any, requirement: str) -> None:
    if not condition:
        raise ConfigError(f"{key}={value!r} is invalid: {requirement}")


def _check_int(key: str, value: Any, minimum: int) -> None:
    _require(_is_int(value) and value >= minimum, key, value, f"must be an integer >= {minimum}")


def _check_choice(key: str, value: Any, allowed: tuple) -> None:
    _require(value in allowed, key, value, f"allowed values: {', '.join(map(repr, allowed))}")


def _check_numbers(key: str, value: Any, count: int) -> None:
    _require(isinstance(value, (list, tuple)) and len(value) == count and all(map(_is_number, value)),
             key, value, f"must be a list of {count} numbers")


# ---------------------------------------------------------------------------------------- sections
@dataclass
class TransportConfig:
    """Which :func:`ucgm.transports.make_transport` to train and sample on."""

    name: str = "linear"
    parameterisation: Optional[str] = None
    half_pi: Optional[float] = None
    sigma_data: float = 0.5

    def validate(self, prefix: str = "transport") -> None:
        _check_choice(f"{prefix}.name", str(self.name).lower(), TRANSPORT_NAMES)
        _check_choice(f"{prefix}.parameterisation", self.parameterisation, (None,) + PARAMETERISATIONS)
        _require(self.half_pi is None or (_is_number(self.half_pi) and self.half_pi > 0), f"{prefix}.half_pi",
                 self.half_pi, "must be null (pi/2) or a positive number (1.57 reproduces the official code)")
        _require(_is_number(self.sigma_data) and self.sigma_data > 0, f"{prefix}.sigma_data", self.sigma_data,
                 "must be a positive number")


@dataclass
class OptimizerConfig:
    """Optimizer, learning-rate warm-up and gradient clipping."""

    name: str = "adamw"
    lr: float = 1e-4
    betas: list = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    weight_decay: float = 0.0
    warmup_steps: int = 0
    grad_clip: Optional[float] = None

    def validate(self, prefix: str = "optimizer") -> None:
        _check_choice(f"{prefix}.name", self.name, OPTIMIZERS)
        _require(_is_number(self.lr) and self.lr > 0, f"{prefix}.lr", self.lr, "must be a positive number")
        _check_numbers(f"{prefix}.betas", self.betas, 2)
        _require(all(0 <= beta < 1 for beta in self.betas), f"{prefix}.betas", self.betas, "each must lie in [0, 1)")
        _require(_is_number(self.eps) and self.eps > 0, f"{prefix}.eps", self.eps, "must be a positive number")
        _require(_is_number(self.weight_decay) and self.weight_decay >= 0, f"{prefix}.weight_decay",
                 self.weight_decay, "must be a number >= 0")
        _check_int(f"{prefix}.warmup_steps", self.warmup_steps, 0)
        _require(self.grad_clip is None or (_is_number(self.grad_clip) and self.grad_clip > 0),
                 f"{prefix}.grad_clip", self.grad_clip, "must be null (no clipping) or a positive number")


@dataclass
class EMAConfig:
    """Evaluation EMA: ``constant`` decay, EDM2 ``power`` function with relative std ``std``, or ``none``."""

    kind: str = "constant"
    decay: float = 0.999
    std: float = 0.05

    def validate(self, prefix: str = "training.ema") -> None:
        _check_choice(f"{prefix}.kind", self.kind, EMA_KINDS)
        if self.kind == "constant":
            _require(_is_number(self.decay) and 0 <= self.decay < 1, f"{prefix}.decay", self.decay,
                     "must lie in [0, 1)")
        if self.kind == "power":
            _require(_is_number(self.std) and 0 < self.std < MAX_POWER_EMA_STD, f"{prefix}.std", self.std,
                     f"must lie in (0, {MAX_POWER_EMA_STD:.4f})")


@dataclass
class TrainingConfig:
    """Duration (``steps`` or ``kimg``), batch, EMA, precision, seed, parallelism and the logging cadence."""

    steps: Optional[int] = None
    kimg: Optional[float] = None
    batch_size: int = 256
    grad_accumulation: int = 1
    ema: EMAConfig = field(default_factory=EMAConfig)
    precision: str = "fp32"
    seed: int = 0
    log_every: int = 100
    checkpoint_every: int = 1000
    keep_last: int = 3
    sample_every: int = 0
    parallel: str = "ddp"
    dist_timeout: float = 600.0
    device: str = "auto"

    def validate(self, prefix: str = "training") -> None:
        _require((self.steps is None) != (self.kimg is None), f"{prefix}.steps", self.steps,
                 f"set exactly one of {prefix}.steps and {prefix}.kimg (kimg={self.kimg!r})")
        if self.steps is not None:
            _check_int(f"{prefix}.steps", self.steps, 1)
        else:
            _require(_is_number(self.kimg) and self.kimg > 0, f"{prefix}.kimg", self.kimg, "must be a positive number")
        _check_int(f"{prefix}.batch_size", self.batch_size, 1)
        _check_int(f"{prefix}.grad_accumulation", self.grad_accumulation, 1)
        _require(self.batch_size % self.grad_accumulation == 0, f"{prefix}.batch_size", self.batch_size,
                 f"must be divisible by {prefix}.grad_accumulation={self.grad_accumulation}")
        self.ema.validate(f"{prefix}.ema")
        _check_choice(f"{prefix}.precision", self.precision, PRECISIONS)
        _check_int(f"{prefix}.seed", self.seed, 0)
        _check_int(f"{prefix}.log_every", self.log_every, 1)
        _check_int(f"{prefix}.checkpoint_every", self.checkpoint_every, 1)
        _check_int(f"{prefix}.keep_last", self.keep_last, 1)
        _check_int(f"{prefix}.sample_every", self.sample_every, 0)
        _check_choice(f"{prefix}.parallel", self.parallel, PARALLEL_MODES)
        _require(_is_number(self.dist_timeout) and self.dist_timeout > 0, f"{prefix}.dist_timeout",
                 self.dist_timeout, "must be a positive number of seconds")
        _require(isinstance(self.device, str) and self.device.split(":")[0] in ("auto", "cpu", "cuda", "mps"),
                 f"{prefix}.device", self.device, "allowed values: 'auto', 'cpu', 'cuda', 'cuda:N', 'mps'")

    def total_steps(self) -> int:
        """The run length in optimisation steps (``kimg`` thousand images rounded up to whole batches)."""
        if self.steps is not None:
            return self.steps
        return max(1, math.ceil(self.kimg * 1000 / self.batch_size))


@dataclass
class SamplingConfig:
    """Default sampler settings for ``ucgm sample`` and the periodic sample grids."""

    sampler: str = "ucgm"
    nfe: int = 40
    stochasticity: Any = 0.0
    extrapolation: float = 0.0
    time_warp: list = field(default_factory=lambda: [1.0, 1.0, 1.0])
    gaps: list = field(default_factory=lambda: [0.001, 0.001])
    cfg_scale: Optional[float] = None
    cfg_interval: Optional[list] = None
    num: int = 64
    batch_size: int = 256
    seed: int = 0
    labels: Optional[list] = None

    def validate(self, prefix: str = "sampling") -> None:
        _check_choice(f"{prefix}.sampler", self.sampler, SAMPLER_NAMES)
        _check_int(f"{prefix}.nfe", self.nfe, 1)
        _require(self.stochasticity in ("sde", "auto") or (_is_number(self.stochasticity)
                                                         and 0 <= self.stochasticity <= 1),
                 f"{prefix}.stochasticity", self.stochasticity, "must lie in [0, 1] or be 'sde' or 'auto'")
        _require(_is_number(self.extrapolation) and self.extrapolation >= 0, f"{prefix}.extrapolation",
                 self.extrapolation, "must be a number >= 0")
        _check_numbers(f"{prefix}.time_warp", self.time_warp, 3)
        _check_numbers(f"{prefix}.gaps", self.gaps, 2)
        _require(self.cfg_scale is None or _is_number(self.cfg_scale), f"{prefix}.cfg_scale", self.cfg_scale,
                 "must be null (no guidance) or a number")
        if self.cfg_interval is not None:
            _check_numbers(f"{prefix}.cfg_interval", self.cfg_interval, 2)
        _check_int(f"{prefix}.num", self.num, 1)
        _check_int(f"{prefix}.batch_size", self.batch_size, 1)
        _check_int(f"{prefix}.seed", self.seed, 0)
        _require(self.labels is None or (isinstance(self.labels, list) and self.labels
                                         and all(_is_int(label) and label >= 0 for label in self.labels)),
                 f"{prefix}.labels", self.labels, "must be null or a non-empty list of class ids")


@dataclass
class InitConfig:
    """Start a run from the weights of another checkpoint (``ucgm tune`` sets it)."""

    checkpoint: Optional[str] = None
    weights: str = "ema"

    def validate(self, prefix: str = "init") -> None:
        _require(self.checkpoint is None or isinstance(self.checkpoint, str), f"{prefix}.checkpoint",
                 self.checkpoint, "must be null or a checkpoint / run directory path")
        _check_choice(f"{prefix}.weights", self.weights, INIT_WEIGHTS)


CLOSED_SECTIONS: dict[str, type] = {
    "transport": TransportConfig,
    "optimizer": OptimizerConfig,
    "training": TrainingConfig,
    "sampling": SamplingConfig,
    "init": InitConfig,
}
SECTIONS = ("data", "model", "transport", "objective", "optimizer", "training", "sampling", "init", "tune",
            "objectives")
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
    """The dataclass view of closed section ``name`` of a (validated) config."""
    values = dict(config[name])
    if name == "training":
        values["ema"] = EMAConfig(**values["ema"])
    return CLOSED_SECTIONS[name](**values)
