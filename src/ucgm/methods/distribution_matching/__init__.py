"""Distribution-matching distillation (DMD, DMD2, MSD, SIM, CoSIM). ``DISTRIBUTION_MATCHING_METHODS`` lists them by
name for :mod:`ucgm.methods.registry`; ``docs/distribution_matching.md`` documents them.

| name | class | what it trains |
|---|---|---|
| ``dmd`` | :class:`~.dmd.DMD` | distribution matching + regression on fixed teacher ODE pairs |
| ``dmd2`` | :class:`~.dmd2.DMD2` | distribution matching, two-time-scale updates, GAN on the fake score's bottleneck, backward simulation |
| ``msd`` | :class:`~.msd.MSD` | K DMD2 students over a partition of the classes |
| ``sim`` | :class:`~.sim.SIM` | score implicit matching (pseudo-Huber), gradient through teacher and fake score |
| ``cosim`` | :class:`~.cosim.CoSIM` | a continuous semi-implicit kernel, HSIVI-SM Fisher objective (ucgm's reading) |
"""

from __future__ import annotations

from ..base import Method
from .cosim import CoSIM
from .dmd import DMD
from .dmd2 import DMD2
from .msd import MSD
from .sim import SIM

#: Method name -> class.
DISTRIBUTION_MATCHING_METHODS: dict[str, type[Method]] = {"dmd": DMD, "dmd2": DMD2, "msd": MSD, "sim": SIM,
                                                          "cosim": CoSIM}
