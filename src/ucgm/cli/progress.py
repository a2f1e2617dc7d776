"""Progress of long commands: a labelled progress bar on a terminal, otherwise (batch jobs, ``nohup``, logs) one
plain line at a steady interval, e.g.

    train runs/gmm: step 1200/3000 (40%), loss 0.0312, 41.2 step/s, ETA 44s

``mode``: ``None`` (the default of every command) chooses by whether stderr is a terminal, ``True`` forces the
bar, ``False`` shows nothing. The interval of plain lines is :data:`DEFAULT_INTERVAL` seconds, or the
``UCGM_PROGRESS_INTERVAL`` environment variable.
"""

from __future__ import annotations

import math
import os
import sys
import time
from typing import Optional

#: Seconds between two plain progress lines.
DEFAULT_INTERVAL = 10.0


def progress_interval() -> float:
    """:data:`DEFAULT_INTERVAL`, or the ``UCGM_PROGRESS_INTERVAL`` environment variable (seconds >= 0)."""
    text = os.environ.get("UCGM_PROGRESS_INTERVAL")
    if text is None:
        return DEFAULT_INTERVAL
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value >= 0:
        raise ValueError(f"UCGM_PROGRESS_INTERVAL={text!r} must be a number of seconds >= 0")
    return value


def format_duration(seconds: float) -> str:
    """``42s``, ``3m05s``, ``2h07m``."""
    if not math.isfinite(seconds):
        return "?"
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


class Progress:
    """Progress of ``total`` units (``step``, ``batch``, ...) of a labelled job, from ``initial`` done.

    :meth:`update` counts units done and sets values shown beside the count (e.g. ``loss``); :meth:`write`
    prints a message (above the bar); :meth:`close` ends the bar, or prints the last plain line.
    """

    def __init__(self, label: str, total: int, unit: str = "step", initial: int = 0, mode: Optional[bool] = None,
                 interval: Optional[float] = None):
        self.label, self.total, self.unit = label, total, unit
        self.done = self._start = initial
        self.values: dict[str, float] = {}
        self._bar = None
        self._lines = False
        self._interval = progress_interval() if interval is None else interval
        self._started = self._last_line = time.perf_counter()
        terminal = sys.stderr.isatty()
        if mode is True or (mode is None and terminal):
            from tqdm import tqdm

            self._bar = tqdm(total=total, initial=initial, desc=label, unit=unit, dynamic_ncols=True,
                             file=sys.stderr)
        elif mode is None:
            self._lines = True

    @property
    def shown(self) -> bool:
        """Whether anything is displayed (a bar or plain lines)."""
        return self._bar is not None or self._lines

    def update(self, count: int = 1, **values: float) -> None:
        self.done += count
        self.values.update(values)
        if self._bar is not None:
            if values:
                self._bar.set_postfix({key: f"{value:.4g}" for key, value in self.values.items()}, refresh=False)
            self._bar.update(count)
        elif self._lines and time.perf_counter() - self._last_line >= self._interval:
            self._print_line()

    def line(self) -> str:
        """The plain progress line: count, values, rate and ETA."""
        elapsed = time.perf_counter() - self._started
        rate = (self.done - self._start) / elapsed if elapsed > 0 else 0.0
        remaining = (self.total - self.done) / rate if rate > 0 else math.inf
        percent = f" ({100 * self.done / self.total:.0f}%)" if self.total else ""
        parts = [f"{self.label}: {self.unit} {self.done}/{self.total}{percent}"]
        parts += [f"{key} {value:.4g}" for key, value in self.values.items()]
        parts += [f"{rate:.3g} {self.unit}/s", f"ETA {format_duration(remaining)}"]
        return ", ".join(parts)

    def _print_line(self) -> None:
        print(self.line(), file=sys.stderr, flush=True)
        self._last_line = time.perf_counter()

    def write(self, text: str) -> None:
        if self._bar is not None:
            self._bar.write(text, file=sys.stderr)
        else:
            print(text, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        elif self._lines and self.done > self._start:
            self._print_line()
            self._lines = False
