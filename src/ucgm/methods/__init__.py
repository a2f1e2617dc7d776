"""Training methods, grouped by family (``diffusion``, ``consistency``, ...), and their registry.

Every method follows the protocol of :mod:`ucgm.methods.base`; :func:`build_method` builds one from the
``objective`` section of a run config.
"""

from .base import Batch, Method, NetworkSpec, Networks, Objective, ObjectiveOutput, Phase
from .consistency.scm import SCMObjective
from .diffusion.flow_matching import FlowMatchingObjective
from .diffusion.ucgm import UCGMObjective
from .registry import METHOD_FAMILIES, METHODS, build_method, method_class, method_options

__all__ = ["Batch", "FlowMatchingObjective", "METHODS", "METHOD_FAMILIES", "Method", "NetworkSpec", "Networks",
           "Objective", "ObjectiveOutput", "Phase", "SCMObjective", "UCGMObjective", "build_method", "method_class",
           "method_options"]
