"""Default settings of ``ucgm sample``, ``ucgm evaluate`` and training sample grids (the ``sampling`` section)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from ..validation import is_int, is_number, require, require_choice, require_int, require_numbers
from .registry import MAX_NFE, SAMPLER_NAMES


@dataclass
class SamplingConfig:
    """Default sampler settings for ``ucgm sample`` and the periodic sample grids; ``sampler = None`` samples
    with the run's own method's sampler (:meth:`ucgm.methods.base.Method.sampler`). UCGM-S settings left
    ``None`` (extrapolation, time_warp, gaps) keep the sampler's defaults (``ucgm``: ucgm's, ``ucgm-official``:
    the official ones; :mod:`ucgm.sampling.registry`)."""

    sampler: Optional[str] = None
    nfe: int = 40
    stochasticity: Any = 0.0
    extrapolation: Optional[float] = None
    time_warp: Optional[list] = None
    gaps: Optional[list] = None
    time_difference: Optional[float] = None
    cfg_scale: Optional[float] = None
    cfg_interval: Optional[list] = None
    num: int = 64
    batch_size: int = 256
    seed: int = 0
    labels: Optional[list] = None
    schedule: Optional[str] = None

    def validate(self, prefix: str = "sampling") -> None:
        require_choice(f"{prefix}.sampler", self.sampler, (None,) + SAMPLER_NAMES)
        require(is_int(self.nfe) and 1 <= self.nfe <= MAX_NFE, f"{prefix}.nfe", self.nfe,
                 f"must be an integer from 1 to {MAX_NFE}")
        require(self.stochasticity in ("sde", "auto") or (is_number(self.stochasticity)
                                                         and 0 <= self.stochasticity <= 1),
                 f"{prefix}.stochasticity", self.stochasticity, "must lie in [0, 1] or be 'sde' or 'auto'")
        require(self.extrapolation is None or (is_number(self.extrapolation) and self.extrapolation >= 0),
                 f"{prefix}.extrapolation", self.extrapolation, "must be null (the sampler's default) or a number >= 0")
        if self.time_warp is not None:
            require_numbers(f"{prefix}.time_warp", self.time_warp, 3)
        if self.gaps is not None:
            require_numbers(f"{prefix}.gaps", self.gaps, 2)
        require(self.time_difference is None or (is_number(self.time_difference) and self.time_difference >= 0),
                f"{prefix}.time_difference", self.time_difference,
                "must be null (the sampler's default, 0) or a number >= 0 (Analog Bits' td)")
        require(self.cfg_scale is None or is_number(self.cfg_scale), f"{prefix}.cfg_scale", self.cfg_scale,
                 "must be null (no guidance) or a number")
        if self.cfg_interval is not None:
            require_numbers(f"{prefix}.cfg_interval", self.cfg_interval, 2)
        require_int(f"{prefix}.num", self.num, 1)
        require_int(f"{prefix}.batch_size", self.batch_size, 1)
        require_int(f"{prefix}.seed", self.seed, 0)
        require(self.schedule is None or isinstance(self.schedule, str), f"{prefix}.schedule", self.schedule,
                "must be null or the path of a schedule file (ucgm search's schedule.json)")
        require(self.labels is None or (isinstance(self.labels, list) and self.labels
                                         and all(is_int(label) and label >= 0 for label in self.labels)),
                 f"{prefix}.labels", self.labels, "must be null or a non-empty list of class ids")
