"""Deterministic seeds derived from a run seed and integer coordinates (step, shard, sample index, ...).

Every random draw of a training step comes from generators seeded by :func:`derive_seed`, so a run restarted
from a checkpoint at step ``k`` draws exactly what the uninterrupted run drew at step ``k``.
"""

from __future__ import annotations

import torch

_MASK = (1 << 64) - 1

#: Stream tags keep the data, objective and sampling draws of one step independent of each other.
DATA_STREAM = 1
OBJECTIVE_STREAM = 2
SAMPLE_STREAM = 3
#: Seeds the global torch RNG before each shard (dropout and any draw not made from the objective's generator).
GLOBAL_STREAM = 4
#: Seeds model initialisation.
INIT_STREAM = 5


def _mix(value: int) -> int:
    """SplitMix64 finaliser: a bijective scramble of a 64-bit integer."""
    value = (value + 0x9E3779B97F4A7C15) & _MASK
    value = ((value ^ (value >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    value = ((value ^ (value >> 27)) * 0x94D049BB133111EB) & _MASK
    return value ^ (value >> 31)


def derive_seed(seed: int, *coordinates: int) -> int:
    """A 63-bit seed that depends on ``seed`` and on every coordinate, in order."""
    state = _mix(int(seed) & _MASK)
    for coordinate in coordinates:
        state = _mix(state ^ (int(coordinate) & _MASK))
    return state >> 1


def seeded_generator(seed: int, *coordinates: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A fresh generator on ``device`` seeded with :func:`derive_seed` ``(seed, *coordinates)``."""
    generator = torch.Generator(device=device)
    generator.manual_seed(derive_seed(seed, *coordinates))
    return generator


def seed_global_rngs(seed: int, device: torch.device) -> None:
    """Seed the default CPU generator and, for a CUDA ``device``, its default generator (dropout draws from
    these). Much cheaper than :func:`torch.manual_seed`, which seeds every accelerator."""
    torch.default_generator.manual_seed(seed)
    if device.type == "cuda":
        torch.cuda.default_generators[device.index if device.index is not None else 0].manual_seed(seed)
