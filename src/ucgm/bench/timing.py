"""Side-by-side wall-time measurement: variants are run interleaved so that machine noise hits all alike."""

from __future__ import annotations

import statistics
import time
from typing import Callable


def interleaved_medians(variants: dict[str, Callable[[], object]], repeats: int, warmup: int = 3) -> dict[str, float]:
    """Median seconds per call of each variant, calling them in turn ``repeats`` times after ``warmup`` rounds."""
    for _ in range(warmup):
        for run in variants.values():
            run()
    samples: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(repeats):
        for name, run in variants.items():
            start = time.perf_counter()
            run()
            samples[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in samples.items()}
