"""What a run reports: ``DIR/stats.jsonl`` (one JSON object per logged step), a progress bar on a terminal and,
when the ``tensorboard`` package is installed, TensorBoard event files in ``DIR/tensorboard``."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Optional

from ..atomic import atomic_write_text

STATS_FILE = "stats.jsonl"


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


def _open_tensorboard(directory: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is an optional dependency
        return None
    return SummaryWriter(log_dir=str(directory))


class RunLog:
    """Rank 0's reporter; on other ranks (``enabled=False``) every call is a no-op."""

    def __init__(self, run_dir: Path, total_steps: int, start_step: int, enabled: bool = True,
                 progress: Optional[bool] = None):
        self.enabled = enabled
        self.stats_path = Path(run_dir) / STATS_FILE
        self._stats = None
        self._tensorboard = None
        self._bar = None
        if not enabled:
            return
        self._stats = open(self.stats_path, "a", encoding="utf-8")
        self._tensorboard = _open_tensorboard(Path(run_dir) / "tensorboard")
        if progress if progress is not None else sys.stderr.isatty():
            from tqdm import tqdm

            self._bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True)

    @property
    def has_progress_bar(self) -> bool:
        return self._bar is not None

    def advance(self, steps: int = 1) -> None:
        """Move the progress bar."""
        if self._bar is not None:
            self._bar.update(steps)

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
        if self._bar is not None:
            self._bar.set_postfix(loss=f"{values.get('loss', float('nan')):.4g}", refresh=False)

    def message(self, text: str) -> None:
        """A human-readable line (above the progress bar when there is one)."""
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.write(text, file=sys.stderr)
        else:
            print(text, file=sys.stderr, flush=True)

    def close(self) -> None:
        for resource in (self._bar, self._tensorboard, self._stats):
            if resource is not None:
                resource.close()
        self._bar = self._tensorboard = self._stats = None


def _json_number(value):
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value
