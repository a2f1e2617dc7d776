"""The registry of training methods by name (``objective.name`` in a run config), grouped by family.

Explicit: adding a method means adding its class to its family's table (``METHOD_FAMILIES`` below, or the
``*_METHODS`` dict of the family package), never registration as an import side effect. A method of
one's own, outside ucgm, is named by its import path: ``objective.name=package.module:ClassName`` (a subclass of
:class:`~ucgm.methods.base.Method` whose constructor takes ``transport`` and its options).
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import inspect
from typing import Any

from ..transports import Transport
from .base import Method
from .consistency.cm import (
    ConsistencyDistillation,
    ConsistencyTraining,
    EasyConsistencyTuning,
    ImprovedConsistencyTraining,
)
from .consistency.mcm import MultistepConsistency
from .consistency.scm import SCMObjective
from .consistency.tcm import TruncatedConsistency
from .diffusion.flow_matching import FlowMatchingObjective
from .diffusion.ucgm import UCGMObjective
from .discrete import DISCRETE_METHODS, WRAPPER_OPTIONS, wrapped_method
from .distillation import DISTILLATION_METHODS
from .distribution_matching import DISTRIBUTION_MATCHING_METHODS
from .flow_maps import FLOW_MAP_METHODS

#: Method name -> class, by family.
METHOD_FAMILIES: dict[str, dict[str, type[Method]]] = {
    "diffusion": {"ucgm": UCGMObjective, "flow_matching": FlowMatchingObjective},
    "consistency": {
        "cd": ConsistencyDistillation,
        "ct": ConsistencyTraining,
        "ict": ImprovedConsistencyTraining,
        "ect": EasyConsistencyTuning,
        "mcm": MultistepConsistency,
        "tcm": TruncatedConsistency,
        "scm": SCMObjective,
    },
    "flow_maps": FLOW_MAP_METHODS,
    "distribution_matching": DISTRIBUTION_MATCHING_METHODS,
    "distillation": DISTILLATION_METHODS,
    "discrete": DISCRETE_METHODS,
}
#: Every method by name.
METHODS: dict[str, type[Method]] = {name: cls for family in METHOD_FAMILIES.values() for name, cls in family.items()}


def _imported_method(name: str) -> type[Method]:
    """The class ``package.module:ClassName`` names."""
    module_name, _, class_name = name.partition(":")
    try:
        found = getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError) as error:
        raise ValueError(f"objective {name!r}: cannot import {class_name!r} from {module_name!r} ({error})") from error
    if not (isinstance(found, type) and issubclass(found, Method)):
        raise ValueError(f"objective {name!r} is not a ucgm Method subclass")
    return found


def method_class(name: str) -> type[Method]:
    """The class of method ``name`` (a registered name or ``package.module:ClassName``); ``ValueError`` naming
    the closest and the allowed names otherwise."""
    if isinstance(name, str) and ":" in name:
        return _imported_method(name)
    if name not in METHODS:
        close = difflib.get_close_matches(str(name), list(METHODS), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(f"unknown objective {name!r}{hint}; allowed: {', '.join(sorted(METHODS))}")
    return METHODS[name]


def method_options(name: str) -> list[str]:
    """The options method ``name`` accepts in its config section: its constructor's keyword arguments (the fields
    of its ``options_type`` dataclass for a method constructed as ``Method(transport, **options)``) and the
    wrapper options every method takes (:data:`~ucgm.methods.discrete.WRAPPER_OPTIONS`: ``self_conditioning``,
    ``cascade``)."""
    cls = method_class(name)
    options_type = getattr(cls, "options_type", None)
    own = [field.name for field in dataclasses.fields(options_type)] if options_type is not None else \
        [key for key in inspect.signature(cls.__init__).parameters if key not in ("self", "transport")]
    return own + [key for key in WRAPPER_OPTIONS if key not in own]


def build_method(config: dict[str, Any], transport: Transport) -> Method:
    """Instantiate ``config["name"]`` (default ``ucgm``) with the remaining keys as keyword arguments on the run's
    ``transport`` (wrapped as its ``self_conditioning`` / ``cascade`` options ask); an unknown option is an error
    naming the closest allowed one."""
    config = dict(config)
    name = config.pop("name", "ucgm")
    allowed = method_options(name)
    for key in config:
        if key not in allowed:
            close = difflib.get_close_matches(key, allowed, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ValueError(f"unknown option {key!r} for objective {name!r}{hint}; allowed: {', '.join(allowed)}")
    wrappers = {key: config.pop(key) for key in WRAPPER_OPTIONS if key in config}
    build = lambda view: method_class(name)(transport=view, **config)  # noqa: E731
    return wrapped_method(build, transport, wrappers) if wrappers else build(transport)
