"""Deterministic per-step batches, split into shards over processes and gradient-accumulation rounds.

The global batch of step ``k`` is cut into ``world_size * grad_accumulation`` equal *shards*; process ``r``
handles shards ``r * A .. r * A + A - 1`` (``A`` accumulation rounds). Shard ``s`` of step ``k`` draws its
data and its objective randomness from generators seeded by ``(seed, stream, k, s)``, so a step is the same
whether it is run fresh or after a resume, and one process with ``A = 2`` sees exactly the samples and noise
of two processes with ``A = 1``.
"""

from __future__ import annotations

from typing import Iterator, NamedTuple, Optional, Protocol, Sequence

import torch
from torch import Tensor

from .seeding import DATA_STREAM, GLOBAL_STREAM, OBJECTIVE_STREAM, derive_seed, seed_global_rngs


class BatchSource(Protocol):
    """Where the trainer gets a shard's data: ``shard_batch(step, shard, size) -> (data, labels)``."""

    def shard_batch(self, step: int, shard: int, size: int) -> tuple[Tensor, Optional[Tensor]]:
        ...


class DatasetBatches:
    """Shards drawn with ``dataset.sample_batch(size, generator)`` (any :class:`ucgm.data.base.Dataset`)."""

    def __init__(self, dataset, seed: int):
        self.dataset = dataset
        self.seed = seed
        self._generator = torch.Generator()

    def shard_batch(self, step: int, shard: int, size: int) -> tuple[Tensor, Optional[Tensor]]:
        self._generator.manual_seed(derive_seed(self.seed, DATA_STREAM, step, shard))
        return self.dataset.sample_batch(size, self._generator)


class CycledBatches:
    """Fixed, ready-made batches used in turn (``step * shards + shard`` modulo their number); for benchmarks
    that feed the trainer and a hand-written loop the same tensors."""

    def __init__(self, batches: Sequence[tuple[Tensor, Optional[Tensor]]], shards_per_step: int = 1):
        if not batches:
            raise ValueError("CycledBatches needs at least one (data, labels) batch")
        self.batches = list(batches)
        self.shards_per_step = shards_per_step

    def shard_batch(self, step: int, shard: int, size: int) -> tuple[Tensor, Optional[Tensor]]:
        data, labels = self.batches[(step * self.shards_per_step + shard) % len(self.batches)]
        if data.shape[0] != size:
            raise ValueError(f"ready-made batch has {data.shape[0]} samples; the trainer expects shards of {size}")
        return data, labels


class MicroBatch(NamedTuple):
    data: Tensor
    labels: Optional[Tensor]
    generator: torch.Generator


class ShardPlan:
    """Which shards this process runs at each step, on which device, and with which objective generator."""

    def __init__(self, source: BatchSource, batch_size: int, grad_accumulation: int, rank: int, world_size: int,
                 seed: int, device: torch.device):
        shards = world_size * grad_accumulation
        if batch_size % shards:
            raise ValueError(f"training.batch_size={batch_size} must be divisible by world_size * grad_accumulation "
                             f"= {world_size} * {grad_accumulation} = {shards}")
        self.source = source
        self.shard_size = batch_size // shards
        self.first_shard = rank * grad_accumulation
        self.rounds = grad_accumulation
        self.seed = seed
        self.device = device
        self._generators = [torch.Generator() for _ in range(grad_accumulation)]

    def micro_batches(self, step: int) -> Iterator[MicroBatch]:
        """This process's shards of ``step``, moved to the device, each with its seeded objective generator; the
        global torch RNG (dropout) is reseeded for each shard as well."""
        for round_index in range(self.rounds):
            shard = self.first_shard + round_index
            seed_global_rngs(derive_seed(self.seed, GLOBAL_STREAM, step, shard), self.device)
            data, labels = self.source.shard_batch(step, shard, self.shard_size)
            generator = self._generators[round_index]
            generator.manual_seed(derive_seed(self.seed, OBJECTIVE_STREAM, step, shard))
            data = data.to(self.device, non_blocking=True)
            labels = None if labels is None else labels.to(self.device, non_blocking=True)
            yield MicroBatch(data, labels, generator)
