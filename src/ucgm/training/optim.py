"""Optimizer construction, learning-rate warm-up and gradient sanitising / clipping."""

from __future__ import annotations

from typing import Iterable, Optional

import torch
from torch import nn

from .schema import OptimizerConfig


def build_optimizer(parameters: Iterable[nn.Parameter], settings: OptimizerConfig) -> torch.optim.Optimizer:
    """AdamW or RAdam with the configured learning rate, betas, eps and weight decay."""
    kwargs = {"lr": settings.lr, "betas": tuple(settings.betas), "eps": settings.eps,
              "weight_decay": settings.weight_decay}
    if settings.name == "adamw":
        return torch.optim.AdamW(parameters, **kwargs)
    if settings.name == "radam":
        return torch.optim.RAdam(parameters, **kwargs)
    raise ValueError(f"optimizer.name={settings.name!r} is not allowed; allowed values: 'adamw', 'radam'")


def warmup_lr(base_lr: float, step: int, warmup_steps: int) -> float:
    """Linear warm-up: ``base_lr * min(1, (step + 1) / warmup_steps)`` for 0-based ``step``."""
    if warmup_steps <= 0 or step >= warmup_steps:
        return base_lr
    return base_lr * (step + 1) / warmup_steps


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


@torch.no_grad()
def sanitise_and_clip(parameters: list[nn.Parameter], max_norm: Optional[float]) -> None:
    """Replace NaN gradients by 0 (and +-inf by the largest finite values), then clip the global norm."""
    gradients = [parameter.grad for parameter in parameters if parameter.grad is not None]
    for gradient in gradients:
        torch.nan_to_num_(gradient, nan=0.0)
    if max_norm is not None and gradients:
        torch.nn.utils.clip_grad_norm_(parameters, max_norm, foreach=True)
