"""Optimizer construction, learning-rate warm-up and the gradient norm (non-finite checks and clipping)."""

from __future__ import annotations

from typing import Iterable

import torch
from torch import Tensor, nn

from .settings import OptimizerConfig


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
def gradient_norm(parameters: list[nn.Parameter]) -> Tensor:
    """``||g||_2`` over every gradient of ``parameters`` (0 without gradients), as ``clip_grad_norm_`` computes it:
    the norm of the per-tensor norms."""
    gradients = [parameter.grad for parameter in parameters if parameter.grad is not None]
    if not gradients:
        return torch.zeros(())
    norms = torch._foreach_norm(gradients, 2.0)
    return torch.linalg.vector_norm(torch.stack([norm.to(gradients[0].device) for norm in norms]), 2.0)
