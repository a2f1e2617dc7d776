"""Training objectives. Each is selected by ``objective.name`` in a config; the trainer knows none of them."""

from __future__ import annotations

import difflib
import inspect

from ..transports import Transport
from .base import Objective, ObjectiveOutput
from .diffusion.flow_matching import FlowMatchingObjective
from .consistency.scm import SCMObjective
from .diffusion.ucgm import UCGMObjective

OBJECTIVES: dict[str, type] = {
    "ucgm": UCGMObjective,
    "flow_matching": FlowMatchingObjective,
}


def register_objective(name: str, objective_class: type) -> None:
    """Make ``objective_class`` selectable as ``objective.name = name``."""
    OBJECTIVES[name] = objective_class


register_objective("scm", SCMObjective)


def build_objective(config: dict, transport: Transport) -> Objective:
    """Instantiate ``config["name"]`` with the remaining keys as keyword arguments and the run's transport."""
    config = dict(config)
    name = config.pop("name", "ucgm")
    if name not in OBJECTIVES:
        raise ValueError(f"unknown objective {name!r}; allowed: {', '.join(sorted(OBJECTIVES))}")
    objective_class = OBJECTIVES[name]
    allowed = [p for p in inspect.signature(objective_class.__init__).parameters if p not in ("self", "transport")]
    for key in config:
        if key not in allowed:
            close = difflib.get_close_matches(key, allowed, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ValueError(f"unknown option {key!r} for objective {name!r}{hint}; allowed: {', '.join(allowed)}")
    return objective_class(transport=transport, **config)


# The other method families register themselves on import.
from .consistency import presets as consistency_registry  # noqa: E402,F401

__all__ = ["OBJECTIVES", "FlowMatchingObjective", "Objective", "ObjectiveOutput", "SCMObjective", "UCGMObjective",
           "build_objective", "register_objective"]
