"""Settings of the trainer: optimizer, evaluation EMA and the run's duration, batch, precision and cadence.

The ``optimizer`` and ``training`` sections of a run config, typed; a method's networks may override the optimizer
and EMA settings per network (:class:`ucgm.methods.base.NetworkSpec`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Optional

from ..validation import is_int, is_number, require, require_choice, require_int, require_numbers

OPTIMIZERS = ("adamw", "radam")
EMA_KINDS = ("constant", "power", "none")
PRECISIONS = ("fp32", "bf16")
PARALLEL_MODES = ("ddp", "fsdp")
#: Largest relative std an EDM2 power-function EMA can have (exponent gamma = 0).
MAX_POWER_EMA_STD = math.sqrt(1 / 12)


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
        require_choice(f"{prefix}.name", self.name, OPTIMIZERS)
        require(is_number(self.lr) and self.lr > 0, f"{prefix}.lr", self.lr, "must be a positive number")
        require_numbers(f"{prefix}.betas", self.betas, 2)
        require(all(0 <= beta < 1 for beta in self.betas), f"{prefix}.betas", self.betas, "each must lie in [0, 1)")
        require(is_number(self.eps) and self.eps > 0, f"{prefix}.eps", self.eps, "must be a positive number")
        require(is_number(self.weight_decay) and self.weight_decay >= 0, f"{prefix}.weight_decay",
                 self.weight_decay, "must be a number >= 0")
        require_int(f"{prefix}.warmup_steps", self.warmup_steps, 0)
        require(self.grad_clip is None or (is_number(self.grad_clip) and self.grad_clip > 0),
                 f"{prefix}.grad_clip", self.grad_clip, "must be null (no clipping) or a positive number")


@dataclass
class EMAConfig:
    """Evaluation EMA: ``constant`` decay, EDM2 ``power`` function with relative std ``std``, or ``none``."""

    kind: str = "constant"
    decay: float = 0.999
    std: float = 0.05

    def validate(self, prefix: str = "training.ema") -> None:
        require_choice(f"{prefix}.kind", self.kind, EMA_KINDS)
        if self.kind == "constant":
            require(is_number(self.decay) and 0 <= self.decay < 1, f"{prefix}.decay", self.decay,
                     "must lie in [0, 1)")
        if self.kind == "power":
            require(is_number(self.std) and 0 < self.std < MAX_POWER_EMA_STD, f"{prefix}.std", self.std,
                     f"must lie in (0, {MAX_POWER_EMA_STD:.4f})")


@dataclass
class TrainingConfig:
    """Duration (``steps`` or ``kimg``), batch, EMA, precision, seed, parallelism, the logging cadence, how
    many consecutive updates with non-finite gradients (skipped) end a run (``max_nonfinite_steps``), and the
    intra-op threads per process (``threads``: ``auto`` or a number, :mod:`ucgm.training.threads`); datasets
    that decode every batch from files are read by ``data_workers`` loader processes (0: in the training process),
    each ``data_prefetch`` shards ahead (:func:`ucgm.training.batches.dataset_batches`)."""

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
    max_nonfinite_steps: int = 20
    device: str = "auto"
    threads: Any = "auto"
    data_workers: int = 2
    data_prefetch: int = 2

    def validate(self, prefix: str = "training") -> None:
        require((self.steps is None) != (self.kimg is None), f"{prefix}.steps", self.steps,
                 f"set exactly one of {prefix}.steps and {prefix}.kimg (kimg={self.kimg!r})")
        if self.steps is not None:
            require_int(f"{prefix}.steps", self.steps, 1)
        else:
            require(is_number(self.kimg) and self.kimg > 0, f"{prefix}.kimg", self.kimg, "must be a positive number")
        require_int(f"{prefix}.batch_size", self.batch_size, 1)
        require_int(f"{prefix}.grad_accumulation", self.grad_accumulation, 1)
        require(self.batch_size % self.grad_accumulation == 0, f"{prefix}.batch_size", self.batch_size,
                 f"must be divisible by {prefix}.grad_accumulation={self.grad_accumulation}")
        self.ema.validate(f"{prefix}.ema")
        require_choice(f"{prefix}.precision", self.precision, PRECISIONS)
        require_int(f"{prefix}.seed", self.seed, 0)
        require_int(f"{prefix}.log_every", self.log_every, 1)
        require_int(f"{prefix}.checkpoint_every", self.checkpoint_every, 1)
        require_int(f"{prefix}.keep_last", self.keep_last, 1)
        require_int(f"{prefix}.sample_every", self.sample_every, 0)
        require_choice(f"{prefix}.parallel", self.parallel, PARALLEL_MODES)
        require_int(f"{prefix}.max_nonfinite_steps", self.max_nonfinite_steps, 1)
        require(is_number(self.dist_timeout) and self.dist_timeout > 0, f"{prefix}.dist_timeout",
                 self.dist_timeout, "must be a positive number of seconds")
        require(isinstance(self.device, str) and self.device.split(":")[0] in ("auto", "cpu", "cuda", "mps"),
                 f"{prefix}.device", self.device, "allowed values: 'auto', 'cpu', 'cuda', 'cuda:N', 'mps'")
        require_int(f"{prefix}.data_workers", self.data_workers, 0)
        require_int(f"{prefix}.data_prefetch", self.data_prefetch, 1)
        require(self.threads == "auto" or (is_int(self.threads) and self.threads >= 1), f"{prefix}.threads",
                 self.threads, "must be 'auto' or an integer >= 1")

    def total_steps(self) -> int:
        """The run length in optimisation steps (``kimg`` thousand images rounded up to whole batches)."""
        if self.steps is not None:
            return self.steps
        return max(1, math.ceil(self.kimg * 1000 / self.batch_size))
