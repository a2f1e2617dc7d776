"""Sampling schedules: an explicit time grid (and optionally the backbone blocks to skip at each step) for one
sampler at one NFE, as ``ucgm search`` finds it and ``ucgm sample --schedule`` / ``ucgm evaluate --schedule``
use it.

A schedule file (JSON, written atomically) holds ``{"format": "ucgm-schedule-v1", "sampler": NAME, "nfe": N,
"times": [t_0, ..., t_K = 0], "skip_blocks": null | [[block, ...] per step], "settings": {...}, "search": {...}}``:
the sampler runs with ``settings`` plus ``times`` (and ``skip_blocks``), registry settings every grid sampler takes
(:data:`GRID_SAMPLERS`). ``search`` records how it was found (free-form).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from ..atomic import atomic_write_text
from ..timegrids import checked_grid
from .registry import UCGM_SAMPLERS, two_call_intervals, ucgm_intervals

SCHEDULE_FORMAT = "ucgm-schedule-v1"
#: Samplers that take an explicit grid (``times``) and per-step block skipping (``skip_blocks``).
GRID_SAMPLERS = ("ucgm", "ucgm-o2", "euler", "heun", "dpm++2m")


def grid_intervals(sampler: str, nfe: int, settings: Optional[dict] = None) -> int:
    """The intervals of the grid ``sampler`` runs at budget ``nfe`` (with ``settings``' gaps for ``ucgm-o2``)."""
    if sampler not in GRID_SAMPLERS:
        raise ValueError(f"sampler {sampler!r} takes no explicit grid; allowed: {', '.join(GRID_SAMPLERS)}")
    if sampler in UCGM_SAMPLERS:
        return ucgm_intervals(sampler, nfe, settings)
    return two_call_intervals(nfe) if sampler == "heun" else nfe


@dataclass
class Schedule:
    """A sampler, its NFE, its grid, the blocks skipped per step (or ``None``), its other settings and a record
    of the search that found it."""

    sampler: str
    nfe: int
    times: list
    skip_blocks: Optional[list] = None
    settings: dict = field(default_factory=dict)
    search: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.sampler not in GRID_SAMPLERS:
            raise ValueError(f"schedule sampler {self.sampler!r} takes no explicit grid; allowed: "
                             f"{', '.join(GRID_SAMPLERS)}")
        if isinstance(self.nfe, bool) or not isinstance(self.nfe, int) or self.nfe < 1:
            raise ValueError(f"schedule nfe={self.nfe!r} must be an integer >= 1")
        self.times = [float(t) for t in checked_grid(self.times).tolist()]
        if self.skip_blocks is not None:
            if len(self.skip_blocks) != len(self.times) - 1:
                raise ValueError(f"schedule skip_blocks lists {len(self.skip_blocks)} steps for "
                                 f"{len(self.times) - 1} grid intervals")
            self.skip_blocks = [sorted(int(block) for block in step) for step in self.skip_blocks]
        for key in ("times", "skip_blocks"):
            if key in self.settings:
                raise ValueError(f"schedule settings must not hold {key!r} (it is a field of its own)")

    def sampler_settings(self) -> dict:
        """The registry settings of the schedule's sampler (``times`` and ``skip_blocks`` included)."""
        extra = {} if self.skip_blocks is None else {"skip_blocks": self.skip_blocks}
        return {**self.settings, "times": list(self.times), **extra}

    def to_dict(self) -> dict:
        return {"format": SCHEDULE_FORMAT, "sampler": self.sampler, "nfe": self.nfe, "times": self.times,
                "skip_blocks": self.skip_blocks, "settings": self.settings, "search": self.search}


def write_schedule(schedule: Schedule, path: Path | str) -> None:
    atomic_write_text(Path(path), json.dumps(schedule.to_dict(), indent=2) + "\n")


def read_schedule(path: Path | str) -> Schedule:
    """The schedule in ``path`` (a file, or a ``ucgm search`` output directory holding ``schedule.json``);
    ``ValueError`` naming what is wrong."""
    path = Path(path)
    if path.is_dir():
        path = path / "schedule.json"
    try:
        description = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as error:
        raise ValueError(f"cannot read schedule {str(path)!r}: {error}") from error
    if not isinstance(description, dict) or description.get("format") != SCHEDULE_FORMAT:
        raise ValueError(f"{str(path)!r} is not a ucgm schedule (expected \"format\": {SCHEDULE_FORMAT!r})")
    missing = sorted({"sampler", "nfe", "times"} - set(description))
    if missing:
        raise ValueError(f"schedule {str(path)!r} lacks {missing}")
    return Schedule(description["sampler"], description["nfe"], description["times"],
                    description.get("skip_blocks"), dict(description.get("settings") or {}),
                    dict(description.get("search") or {}))
