"""What every training objective provides to the (method-agnostic) trainer."""

from __future__ import annotations

from typing import Callable, Iterator, NamedTuple, Optional

import torch
from torch import Tensor, nn

from ..validation import check_finite, check_same_shape


def unwrap(model: Callable) -> Callable:
    """The module inside a DDP/FSDP wrapper (no-gradient passes bypass the wrapper's gradient hooks)."""
    return getattr(model, "module", model)


def resolve_null_label(model: Callable, null_label: Optional[int]) -> Optional[int]:
    """The null (unconditional) label: ``null_label`` when given, else the model's ``num_classes``."""
    return null_label if null_label is not None else getattr(unwrap(model), "num_classes", None)


def drop_labels(labels: Optional[Tensor], probability: float, null_label: Optional[int],
                generator: Optional[torch.Generator] = None) -> Optional[Tensor]:
    """Replace each label by ``null_label`` with ``probability`` (classifier-free guidance training); labels pass
    unchanged when there are none, no null label, or ``probability == 0``."""
    if labels is None or null_label is None or probability == 0:
        return labels
    keep = torch.rand(labels.shape[0], generator=generator).to(labels.device) >= probability
    return torch.where(keep, labels, torch.full_like(labels, null_label))


def draw_noise(data: Tensor, noise: Optional[Tensor], generator: Optional[torch.Generator] = None) -> Tensor:
    """``noise`` checked against ``data`` (same shape, finite), or fresh ``N(0, I)`` noise from ``generator``."""
    if noise is None:
        return torch.randn(data.shape, generator=generator, dtype=data.dtype).to(data.device)
    check_same_shape("noise", noise, "data", data)
    check_finite("noise", noise)
    return noise


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
