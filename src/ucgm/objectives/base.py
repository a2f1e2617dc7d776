"""What every training objective provides to the (method-agnostic) trainer."""

from __future__ import annotations

from typing import Callable, NamedTuple, Optional

import torch
from torch import Tensor


class ObjectiveOutput(NamedTuple):
    """``loss``: the scalar to differentiate; ``per_sample``: its per-sample terms; ``stats``: extra scalars to log."""

    loss: Tensor
    per_sample: Tensor
    stats: dict


class Objective:
    """A training objective: ``objective(model, data, labels, reference_model=..., generator=...)``.

    ``reference_mode`` tells the trainer which reference network the objective needs next to the online model:
    ``None`` (none), ``"ema"`` (an EMA copy with decay ``reference_decay``), ``"online"`` (the online model
    itself, without gradient) or ``"frozen"`` (a copy of the model the run started from).
    """

    reference_mode: Optional[str] = None
    reference_decay: float = 0.0

    def __call__(
        self,
        model: Callable,
        data: Tensor,
        labels: Optional[Tensor] = None,
        *,
        reference_model: Optional[Callable] = None,
        generator: Optional[torch.Generator] = None,
    ) -> ObjectiveOutput:
        raise NotImplementedError
