"""Where a sampler's random draws come from: one generator for the batch, or one stream per sample.

Every sampler that draws noise (stochastic UCGM-S, EDM churn, consistency re-noising, sCM, flow-map γ-sampling,
...) calls :func:`normal_noise` with the ``generator`` it was given. That is either a ``torch.Generator`` (one
stream for the whole batch) or a :class:`PerSampleNoise`: row ``k`` of every draw then comes from the stream of
sample ``indices[k]`` alone, seeded by ``(seed, indices[k])``, so a sample does not depend on the batch size or
on how the samples are split over processes.
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
from torch import Tensor

from ..seeding import seeded_generator


class PerSampleNoise:
    """Independent normal streams, one per sample: stream ``i`` is seeded by ``(seed, *coordinates, i)``.

    ``draw(shape)`` with ``shape[0] == len(indices)`` returns row ``k`` from the next values of stream
    ``indices[k]``; successive draws continue each stream.
    """

    def __init__(self, seed: int, indices: Sequence[int], *coordinates: int):
        self.indices = list(indices)
        self._streams = [seeded_generator(seed, *coordinates, int(index)) for index in self.indices]

    def __len__(self) -> int:
        return len(self._streams)

    def draw(self, shape: Sequence[int], dtype: torch.dtype = torch.float32,
             device: torch.device | str = "cpu") -> Tensor:
        shape = tuple(shape)
        if shape[0] != len(self._streams):
            raise ValueError(f"a draw of {shape[0]} rows from per-sample noise of {len(self._streams)} samples")
        rows = [torch.randn(shape[1:], generator=stream, dtype=dtype) for stream in self._streams]
        return torch.stack(rows).to(device)

    def subset(self, rows: Tensor | slice) -> "PerSampleNoise":
        """The streams of some rows (e.g. the samples a guided batch doubles), sharing their state."""
        chosen = PerSampleNoise.__new__(PerSampleNoise)
        positions = range(len(self._streams))[rows] if isinstance(rows, slice) else [int(r) for r in rows]
        chosen.indices = [self.indices[p] for p in positions]
        chosen._streams = [self._streams[p] for p in positions]
        return chosen


NoiseSource = Union[torch.Generator, PerSampleNoise, None]


def normal_noise(shape: Sequence[int], source: NoiseSource, dtype: torch.dtype = torch.float32,
                 device: torch.device | str = "cpu") -> Tensor:
    """``N(0, I)`` noise of ``shape`` from ``source``: per-sample streams, a generator (drawn on the generator's
    device, then moved to ``device``) or, for ``None``, the global generator."""
    if isinstance(source, PerSampleNoise):
        return source.draw(shape, dtype, device)
    generator_device: Optional[torch.device] = source.device if source is not None else None
    return torch.randn(tuple(shape), generator=source, dtype=dtype, device=generator_device or "cpu").to(device)
