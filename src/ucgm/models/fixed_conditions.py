"""Calling a backbone with input conditions fixed in advance (a cascade's ``low_res`` image), and finding out
whether a (wrapped) backbone accepts a condition at all."""

from __future__ import annotations

from typing import Callable, Optional

from torch import Tensor, nn

from .conditions import ConditionLayers

#: Attributes under which ucgm's wrappers keep the network they call (DDP ``module``, guidance ``model``).
WRAPPED_ATTRIBUTES = ("module", "model")


def accepts_condition(model: Callable, name: str) -> bool:
    """Whether ``model`` — a backbone, or a wrapper keeping one as ``module`` / ``model`` — was built with
    condition ``name`` (an oracle or a backbone without condition layers does not accept it)."""
    seen = set()
    while model is not None and id(model) not in seen:
        seen.add(id(model))
        layers = getattr(model, "conditions", None)
        if isinstance(layers, ConditionLayers):
            return name in layers.names
        model = next((getattr(model, attribute) for attribute in WRAPPED_ATTRIBUTES
                      if isinstance(getattr(model, attribute, None), nn.Module)), None)
    return False


def tile_rows(value: Tensor, rows: int) -> Tensor:
    """``value`` ``(B, ...)`` repeated to ``rows = k B`` rows (objectives that call the model on concatenated
    copies of their batch, e.g. ``[t + eps; t - eps]``)."""
    if rows == value.shape[0]:
        return value
    if rows % value.shape[0]:
        raise ValueError(f"a fixed condition of {value.shape[0]} rows cannot serve a call with {rows} rows")
    return value.repeat(rows // value.shape[0], *([1] * (value.ndim - 1)))


class WithConditions(nn.Module):
    """``model(x, t, labels, **fixed, **conditions)``: ``fixed`` input conditions ``(B, ...)`` are tiled to the
    call's batch; conditions given at call time win."""

    def __init__(self, model: Callable, **fixed: Optional[Tensor]):
        super().__init__()
        self.model = model
        self.fixed = fixed
        self.num_classes = getattr(model, "num_classes", None)

    def forward(self, x: Tensor, t: Tensor, labels: Optional[Tensor] = None, **conditions: Optional[Tensor]
                ) -> Tensor:
        given = {name: tile_rows(value, x.shape[0]) for name, value in self.fixed.items() if value is not None}
        return self.model(x, t, labels, **{**given, **conditions})
