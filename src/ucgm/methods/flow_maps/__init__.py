"""Two-time flow maps ``F(x_t, t, s)`` and direct few-step models (CTM, Shortcut, MeanFlow, IMM, Align Your Flow,
CAF, DDDM). ``FLOW_MAP_METHODS`` lists them by name for :mod:`ucgm.methods.registry`."""

from __future__ import annotations

from ..base import Method
from .caf import ConstantAccelerationFlowMethod
from .dddm import DirectlyDenoisingMethod
from .imm import InductiveMomentMatching

#: Method name -> class.
FLOW_MAP_METHODS: dict[str, type[Method]] = {
    "caf": ConstantAccelerationFlowMethod,
    "dddm": DirectlyDenoisingMethod,
    "imm": InductiveMomentMatching,
}
