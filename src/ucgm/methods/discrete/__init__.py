"""Discrete data and cascades with continuous models (Analog Bits self-conditioning, LowDiff-style cascades).
``DISCRETE_METHODS`` lists them by name for :mod:`ucgm.methods.registry`."""

from __future__ import annotations

from ..base import Method

#: Method name -> class.
DISCRETE_METHODS: dict[str, type[Method]] = {}
