"""How many intra-op threads a training process uses (``training.threads``: ``auto`` or a number).

``auto`` takes, in this order: the thread count of the run being resumed (a run keeps its count, so that it
computes exactly as it did before an interruption); ``OMP_NUM_THREADS`` when set (``torchrun`` sets it to 1 per
process on CPU); under ``torchrun`` the cores available to the process divided by the processes on the node;
otherwise the cores available that other processes leave idle, measured over :data:`IDLE_WINDOW` seconds from
``/proc/stat`` (so that a run started beside a busy process does not oversubscribe the cores: threads that wait
for a descheduled sibling at every parallel region make a small run several times slower). The available cores
are the process's CPU affinity, capped by a cgroup CPU quota.
"""

from __future__ import annotations

import math
import os
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, NamedTuple, Optional, Union

import torch

#: Seconds over which the idle cores are measured.
IDLE_WINDOW = 0.25
AUTO = "auto"


class ThreadChoice(NamedTuple):
    """The intra-op thread count and why it was chosen."""

    threads: int
    reason: str


def available_cores() -> int:
    """The cores this process may run on: its CPU affinity, capped by a cgroup v2 ``cpu.max`` quota."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        if quota != "max":
            cores = min(cores, max(1, math.floor(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return max(1, cores)


def _cpu_times(cpus: set[int]) -> Optional[tuple[float, float]]:
    """``(busy, total)`` clock ticks of ``cpus`` since boot, from ``/proc/stat`` (``None`` where unavailable)."""
    try:
        lines = Path("/proc/stat").read_text().splitlines()
    except OSError:
        return None
    busy = total = 0.0
    for line in lines:
        name, *fields = line.split()
        if not (name.startswith("cpu") and name[3:].isdigit() and int(name[3:]) in cpus):
            continue
        ticks = [float(value) for value in fields[:8]]  # user nice system idle iowait irq softirq steal
        total += sum(ticks)
        busy += sum(ticks) - ticks[3] - ticks[4]
    return (busy, total) if total else None


def busy_cores(window: float = IDLE_WINDOW) -> Optional[float]:
    """How many of this process's cores other processes keep busy, averaged over ``window`` seconds."""
    cpus = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else set(range(os.cpu_count() or 1))
    before = _cpu_times(cpus)
    if before is None:
        return None
    time.sleep(window)
    after = _cpu_times(cpus)
    if after is None or after[1] <= before[1]:
        return None
    return len(cpus) * (after[0] - before[0]) / (after[1] - before[1])


def choose_threads(setting: Union[str, int], local_processes: int = 1, resumed: Optional[int] = None
                   ) -> ThreadChoice:
    """The thread count for ``training.threads = setting`` (see the module docstring)."""
    if setting != AUTO:
        return ThreadChoice(int(setting), "training.threads")
    if resumed is not None:
        return ThreadChoice(int(resumed), "as the run used before")
    if os.environ.get("OMP_NUM_THREADS"):
        return ThreadChoice(torch.get_num_threads(), "OMP_NUM_THREADS")
    cores = available_cores()
    if local_processes > 1:
        return ThreadChoice(max(1, cores // local_processes), f"{cores} cores / {local_processes} processes")
    busy = busy_cores()
    if busy is None:
        return ThreadChoice(cores, f"{cores} cores available")
    idle = min(cores, max(1, round(cores - busy)))
    return ThreadChoice(idle, f"{idle} of {cores} cores idle")


@contextmanager
def intra_op_threads(threads: int) -> Iterator[None]:
    """Run the block with ``threads`` intra-op threads, restoring the previous count afterwards."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)
