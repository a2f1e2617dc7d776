"""What every training objective provides to the (method-agnostic) trainer."""

from __future__ import annotations

from typing import Callable, Iterator, NamedTuple, Optional

import torch
from torch import Tensor, nn


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

    # The trainer drives every objective through the methods below; the defaults fit a stateless objective
    # without parameters of its own (curricula override set_progress, sCM's weighting head the rest).
    def set_progress(self, step: int, total_steps: Optional[int] = None) -> None:
        """Tell the objective the training step it is at (curricula, warm-ups); called before every loss."""

    def parameters(self) -> Iterator[nn.Parameter]:
        """Trainable parameters the objective owns besides the model's (optimised alongside them)."""
        return iter(())

    def state_dict(self) -> dict:
        """The objective's own trainable state, for checkpoints."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        if state:
            raise ValueError(f"{type(self).__name__} has no state of its own, but the checkpoint holds {sorted(state)}")

    def to(self, device: torch.device | str) -> "Objective":
        """Move the objective's own modules to ``device``."""
        return self

    def average_gradients(self) -> None:
        """Average the gradients of :meth:`parameters` over the process group (they live outside DDP)."""

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
