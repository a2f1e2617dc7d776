"""Two-time flow maps ``F(x_t, t, s)`` and direct few-step models (CTM, Shortcut, MeanFlow, IMM, Align Your Flow,
CAF, DDDM). ``FLOW_MAP_METHODS`` lists them by name for :mod:`ucgm.methods.registry`."""

from __future__ import annotations

from ..base import Method
from .ayf import AlignYourFlow
from .caf import ConstantAccelerationFlowMethod
from .ctm import ConsistencyTrajectoryModel
from .dddm import DirectlyDenoisingMethod
from .imm import InductiveMomentMatching
from .meanflow import MeanFlow
from .shortcut import ShortcutModel

#: Method name -> class.
FLOW_MAP_METHODS: dict[str, type[Method]] = {
    "ayf": AlignYourFlow,
    "caf": ConstantAccelerationFlowMethod,
    "ctm": ConsistencyTrajectoryModel,
    "dddm": DirectlyDenoisingMethod,
    "imm": InductiveMomentMatching,
    "meanflow": MeanFlow,
    "shortcut": ShortcutModel,
}
