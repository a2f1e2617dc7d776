"""The plainest hand-written training loop, the yardstick for the trainer's throughput (``ucgm bench``)."""

from __future__ import annotations

import copy
from typing import Optional, Sequence

import torch
from torch import Tensor, nn

from ..methods.base import Objective


def minimal_training_loop(model: nn.Module, objective: Objective,
                          batches: Sequence[tuple[Optional[Tensor], ...]], steps: int, lr: float) -> Tensor:
    """``steps`` AdamW steps of ``objective`` on ``batches`` (used in turn); returns the per-step losses.

    No EMA, clipping, warm-up, seeding or logging: the objective draws from the global RNG. The objective's
    progress and the reference network it asks for are kept as in the trainer (an EMA reference follows the model
    with ``objective.tracking_decay``).
    """
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    mode = objective.reference_mode
    reference = copy.deepcopy(model).requires_grad_(False) if mode in ("ema", "frozen") else None
    losses = []
    for step in range(steps):
        data, labels, *_ = batches[step % len(batches)]  # (data, labels) or (data, labels, indices)
        objective.set_progress(step, steps)
        if mode == "ema":
            with torch.no_grad():
                torch._foreach_lerp_(list(reference.parameters()), list(model.parameters()),
                                     1.0 - objective.tracking_decay("reference", step))
        reference_model = model if mode == "online" else reference
        loss = objective(model, data, labels, reference_model=reference_model).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.detach())
    return torch.stack(losses)
