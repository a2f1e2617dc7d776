"""Distillation of guided and multi-step teachers (guided-model distillation with progressive step halving).
``DISTILLATION_METHODS`` lists them by name for :mod:`ucgm.methods.registry`."""

from __future__ import annotations

from ..base import Method
from .guided import GuidedDistillation

#: Method name -> class.
DISTILLATION_METHODS: dict[str, type[Method]] = {"guided_distillation": GuidedDistillation}
