"""The plainest hand-written training loop, the yardstick for the trainer's throughput (``ucgm bench``)."""

from __future__ import annotations

import copy
from typing import Optional, Sequence

import torch
from torch import Tensor, nn

from ..methods.base import Objective
from ..training.reference import ReferenceNetwork


def minimal_training_loop(model: nn.Module, objective: Objective,
                          batches: Sequence[tuple[Tensor, Optional[Tensor]]], steps: int, lr: float) -> Tensor:
    """``steps`` AdamW steps of ``objective`` on ``batches`` (used in turn); returns the per-step losses.

    No EMA, clipping, warm-up, seeding or logging: the objective draws from the global RNG. The objective's
    progress and the reference network it asks for are kept as in the trainer.
    """
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    mode = objective.reference_mode
    reference = ReferenceNetwork(mode, copy.deepcopy(model) if mode in ("ema", "frozen") else model, model)
    losses = []
    for step in range(steps):
        data, labels = batches[step % len(batches)]
        objective.set_progress(step, steps)
        reference.before_step(objective.reference_decay)
        loss = objective(model, data, labels, reference_model=reference.module).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.detach())
    return torch.stack(losses)
