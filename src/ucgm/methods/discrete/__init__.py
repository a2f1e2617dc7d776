"""Discrete data and cascades with continuous models: Analog Bits' self-conditioning and a LowDiff-style
cascade, as wrappers any method can use (objective options ``self_conditioning`` and ``cascade``), and
``DISCRETE_METHODS`` (methods of their own, none so far) for :mod:`ucgm.methods.registry`.

``objective: {name: ucgm, ..., self_conditioning: {rate: 0.5, clip: 1.0}, cascade: {levels: 2}}`` trains UCGM-T
self-conditioned and as a two-level cascade; :func:`wrapped_method` builds it.
"""

from __future__ import annotations

from typing import Callable, Mapping

from ...transports import Transport
from ..base import Method
from .cascade import Cascade, FixedConditionsTransport, check_cascade_options
from .self_conditioning import SelfConditioned, SelfConditioningTransport, check_self_conditioning

#: Method name -> class.
DISCRETE_METHODS: dict[str, type[Method]] = {}
#: Objective options that wrap whatever method the objective names.
WRAPPER_OPTIONS = ("self_conditioning", "cascade")


def wrapped_method(build: Callable[[Transport], Method], transport: Transport, options: Mapping) -> Method:
    """``build(view)`` wrapped as ``options`` ask (``None`` or a missing key: no wrapper).

    The inner method calls its networks through ``view``: a cascade's fixed ``low_res`` condition is added
    first, then self-conditioning splits the call's rows (conditions included) and runs its first pass, then
    ``transport`` calls the network.
    """
    unknown = sorted(set(options) - set(WRAPPER_OPTIONS))
    if unknown:
        raise ValueError(f"unknown wrapper option(s) {unknown}; allowed: {', '.join(WRAPPER_OPTIONS)}")
    view, self_conditioning, cascade = transport, None, None
    if options.get("self_conditioning") is not None:
        self_conditioning = SelfConditioningTransport(transport, *check_self_conditioning(options["self_conditioning"]))
        view = self_conditioning
    if options.get("cascade") is not None:
        cascade_options = check_cascade_options(options["cascade"])
        cascade = FixedConditionsTransport(view)
        view = cascade
    method = build(view)
    if self_conditioning is not None:
        method = SelfConditioned(method, self_conditioning)
    if cascade is not None:
        method = Cascade(method, cascade, **cascade_options)
    return method
