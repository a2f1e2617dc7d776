"""What a run reports: ``DIR/stats.jsonl`` (one JSON object per logged step), its progress (a labelled bar on a
terminal, else a plain line at a steady interval, :mod:`ucgm.cli.progress`) and, when the ``tensorboard`` package
is installed, TensorBoard event files in ``DIR/tensorboard``.

A resumed run first cuts both logs back to its checkpoint's step (:func:`truncate_stats`,
:func:`truncate_tensorboard`), so that the steps it trains again are not recorded twice.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Optional

from ..atomic import atomic_path, atomic_write_text
from .progress import Progress

STATS_FILE = "stats.jsonl"
TENSORBOARD_DIRECTORY = "tensorboard"


def read_stats(path: Path) -> list[dict]:
    """The complete records of a stats file (a line cut short by a crash is skipped)."""
    records = []
    if not Path(path).is_file():
        return records
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and "step" in record:
            records.append(record)
    return records


def truncate_stats(path: Path, last_step: int) -> None:
    """Keep only the records up to ``last_step`` (those a resumed run will not write again), atomically."""
    if not Path(path).is_file():
        return
    kept = [record for record in read_stats(path) if record["step"] <= last_step]
    atomic_write_text(path, "".join(json.dumps(record) + "\n" for record in kept))


def truncate_tensorboard(directory: Path, last_step: int) -> int:
    """Rewrite each TensorBoard event file under ``directory`` without its events of steps after ``last_step``
    (and without a record cut short by a crash), atomically; returns how many events were dropped (0 when
    ``tensorboard`` is not installed)."""
    directory = Path(directory)
    if not directory.is_dir():
        return 0
    try:
        from tensorboard.backend.event_processing.event_file_loader import RawEventFileLoader
        from tensorboard.compat.proto.event_pb2 import Event
        from tensorboard.summary.writer.record_writer import RecordWriter
    except ImportError:
        return 0
    dropped = 0
    for path in sorted(directory.rglob("events.out.tfevents.*")):
        if not path.is_file() or path.name.startswith("."):
            continue
        records = list(RawEventFileLoader(str(path)).Load())
        kept = [record for record in records if Event.FromString(record).step <= last_step]
        if len(kept) == len(records) and path.stat().st_size == sum(len(record) + 16 for record in records):
            continue
        with atomic_path(path) as temporary, open(temporary, "wb") as handle:
            writer = RecordWriter(handle)
            for record in kept:
                writer.write(record)
        dropped += len(records) - len(kept)
    return dropped


def _open_tensorboard(directory: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is an optional dependency
        return None
    return SummaryWriter(log_dir=str(directory))


class RunLog:
    """Rank 0's reporter; on other ranks (``enabled=False``) every call is a no-op. ``progress``: the mode of
    :class:`~ucgm.cli.progress.Progress` (default: a bar on a terminal, else plain lines), labelled ``label``."""

    def __init__(self, run_dir: Path, total_steps: int, start_step: int, enabled: bool = True,
                 progress: Optional[bool] = None, label: str = "train"):
        self.enabled = enabled
        self.stats_path = Path(run_dir) / STATS_FILE
        self._stats = None
        self._tensorboard = None
        self._progress: Optional[Progress] = None
        if not enabled:
            return
        self._stats = open(self.stats_path, "a", encoding="utf-8")
        self._tensorboard = _open_tensorboard(Path(run_dir) / TENSORBOARD_DIRECTORY)
        self._progress = Progress(label, total_steps, "step", start_step, progress)

    @property
    def has_progress_bar(self) -> bool:
        """Whether progress is shown (a bar or plain lines), so that every step should :meth:`advance`."""
        return self._progress is not None and self._progress.shown

    def advance(self, steps: int = 1) -> None:
        """Count finished steps."""
        if self._progress is not None:
            self._progress.update(steps)

    def record(self, values: dict) -> None:
        """Append one record (it must hold ``step``); non-finite numbers are written as strings."""
        if not self.enabled:
            return
        clean = {key: _json_number(value) for key, value in values.items()}
        self._stats.write(json.dumps(clean) + "\n")
        self._stats.flush()
        if self._tensorboard is not None:
            for key, value in values.items():
                if key != "step" and isinstance(value, (int, float)):
                    self._tensorboard.add_scalar(key, value, values["step"])
        if self._progress is not None and isinstance(values.get("loss"), (int, float)):
            self._progress.update(0, loss=values["loss"])

    def message(self, text: str) -> None:
        """A human-readable line (above the progress bar when there is one)."""
        if self._progress is not None:
            self._progress.write(text)

    def close(self) -> None:
        for resource in (self._progress, self._tensorboard, self._stats):
            if resource is not None:
                resource.close()
        self._progress = self._tensorboard = self._stats = None


def _json_number(value):
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value
