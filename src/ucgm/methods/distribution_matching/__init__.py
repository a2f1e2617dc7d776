"""Distribution-matching distillation (DMD, DMD2, MSD, SIM, CoSIM). ``DISTRIBUTION_MATCHING_METHODS`` lists them by
name for :mod:`ucgm.methods.registry`."""

from __future__ import annotations

from ..base import Method

#: Method name -> class.
DISTRIBUTION_MATCHING_METHODS: dict[str, type[Method]] = {}
