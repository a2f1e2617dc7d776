"""Model conditions beyond ``(x, t, labels)``: every backbone is called ``model(x, t, labels, **conditions)``.

Two kinds, chosen by the condition's name (:data:`CONDITION_KINDS`):

* **scalar** conditions — a second time ``s`` (flow maps ``F(x_t, t, s)``), a step size ``step`` (shortcut
  models), a guidance scale ``guidance`` (guidance-conditioned students) — one number per sample, embedded like
  the time (sinusoidal features and a two-layer MLP) and added to the time embedding;
* **input** conditions — a self-conditioning estimate ``self_condition`` (Analog Bits, DDDM), a low-resolution
  image upsampled to the input size ``low_res`` (cascades), an initial velocity ``initial_velocity`` (constant
  acceleration flows) — tensors shaped like ``x``, each mapped by its own input layer and added to the input
  layer's output; a missing input condition counts as zeros (e.g. the first self-conditioning step).

Every condition layer starts at zero, so a model with extra conditions computes, at initialisation, exactly what
the same model without them computes; weights of a model without conditions load into it (the condition layers
are named ``conditions.*``). A backbone lists the conditions it accepts in its ``conditions`` option
(``model.conditions=[s]``); calling it with another one is an error.
"""

from __future__ import annotations

from typing import Callable, Mapping, Optional, Sequence

import torch
from torch import Tensor, nn

from .embeddings import TimeEmbedding, expand_time

SCALAR = "scalar"
INPUT = "input"
#: Every condition name a backbone can accept, and its kind.
CONDITION_KINDS: dict[str, str] = {
    "s": SCALAR,
    "step": SCALAR,
    "guidance": SCALAR,
    "self_condition": INPUT,
    "low_res": INPUT,
    "initial_velocity": INPUT,
}
#: Prefix of the parameter names of condition layers.
CONDITIONS_PREFIX = "conditions."


def check_condition_names(names: Sequence[str]) -> tuple[str, ...]:
    """``names`` as a tuple, or ``ValueError`` naming an unknown or repeated condition and the allowed ones."""
    names = tuple(names or ())
    for name in names:
        if name not in CONDITION_KINDS:
            raise ValueError(f"unknown model condition {name!r}; allowed: {', '.join(CONDITION_KINDS)}")
    if len(set(names)) != len(names):
        raise ValueError(f"model conditions {list(names)} name a condition twice")
    return names


class ConditionLayers(nn.Module):
    """The extra layers of a backbone's conditions: a zero-initialised embedding per scalar condition and a
    zero-initialised input layer per input condition (made by ``input_layer()``)."""

    def __init__(self, names: Sequence[str], embedding_dim: int, time_scale: float, frequency_dim: int,
                 input_layer: Callable[[], nn.Module]):
        super().__init__()
        self.names = check_condition_names(names)
        self.scalars = nn.ModuleDict()
        self.inputs = nn.ModuleDict()
        for name in self.names:
            if CONDITION_KINDS[name] == SCALAR:
                embedding = TimeEmbedding(embedding_dim, frequency_dim, time_scale)
                nn.init.zeros_(embedding.mlp[-1].weight)
                nn.init.zeros_(embedding.mlp[-1].bias)
                self.scalars[name] = embedding
            else:
                layer = input_layer()
                for parameter in layer.parameters():
                    nn.init.zeros_(parameter)
                self.inputs[name] = layer

    def check(self, conditions: Mapping[str, Optional[Tensor]], model_name: str) -> None:
        """Raise ``ValueError`` for conditions this backbone does not accept or scalar conditions left out."""
        unknown = sorted(set(conditions) - set(self.names))
        if unknown:
            accepted = ", ".join(self.names) if self.names else "none"
            raise ValueError(f"{model_name} got condition(s) {unknown} it was not built for (it accepts: "
                             f"{accepted}); add them to the model's `conditions` option")
        missing = [name for name in self.scalars if conditions.get(name) is None]
        if missing:
            raise ValueError(f"{model_name} needs the condition(s) {missing} at every call")

    def embedding(self, conditions: Mapping[str, Optional[Tensor]], batch_size: int, device: torch.device
                  ) -> Optional[Tensor]:
        """The sum of the scalar conditions' embeddings ``(B, dim)``, or ``None`` without scalar conditions."""
        total = None
        for name, layer in self.scalars.items():
            term = layer(expand_time(conditions[name], batch_size, device))
            total = term if total is None else total + term
        return total

    def input_term(self, conditions: Mapping[str, Optional[Tensor]], shape: torch.Size) -> Optional[Tensor]:
        """The sum of the input conditions' layer outputs, or ``None`` when none is given."""
        total = None
        for name, layer in self.inputs.items():
            value = conditions.get(name)
            if value is None:
                continue
            if value.shape != shape:
                raise ValueError(f"condition {name!r} must have the shape of x {tuple(shape)}, got "
                                 f"{tuple(value.shape)}")
            term = layer(value)
            total = term if total is None else total + term
        return total
