"""Deterministic per-step batches, split into shards over processes and gradient-accumulation rounds.

The global batch of each update of step ``k`` is cut into ``world_size * grad_accumulation`` equal *shards*;
process ``r`` handles shards ``r * A .. r * A + A - 1`` (``A`` accumulation rounds). Shard ``s`` of update
``slot`` of step ``k`` draws its data and its objective randomness from generators seeded by
``(seed, stream, k, s)`` (``(seed, stream, k, s, slot)`` for the later updates of a multi-phase step), so a step
is the same whether it is run fresh or after a resume, and one process with ``A = 2`` sees exactly the samples
and noise of two processes with ``A = 1``.
"""

from __future__ import annotations

from typing import Iterator, Optional, Protocol, Sequence

import torch
from torch import Tensor

from ..data.base import FiniteDataset
from ..methods.base import Batch
from ..seeding import DATA_STREAM, GLOBAL_STREAM, OBJECTIVE_STREAM, derive_seed, seed_global_rngs


class BatchSource(Protocol):
    """Where the trainer gets a shard's data: ``shard_batch(coordinates, size) -> (data, labels, indices)``.

    ``coordinates`` is ``(step, shard)`` for the first update of a step and ``(step, shard, slot)`` for the
    ``slot``-th update of a multi-phase step; ``indices`` are the dataset indices of the samples (``None`` for
    data drawn afresh)."""

    def shard_batch(self, coordinates: tuple[int, ...], size: int
                    ) -> tuple[Tensor, Optional[Tensor], Optional[Tensor]]:
        ...


class DatasetBatches:
    """Shards drawn from a dataset with a generator seeded by ``(seed, data stream, *coordinates)``: indexed
    datasets (:class:`ucgm.data.base.FiniteDataset`) draw uniform indices, others ``sample_batch``."""

    def __init__(self, dataset, seed: int):
        self.dataset = dataset
        self.seed = seed
        self._generator = torch.Generator()

    def shard_batch(self, coordinates: tuple[int, ...], size: int
                    ) -> tuple[Tensor, Optional[Tensor], Optional[Tensor]]:
        self._generator.manual_seed(derive_seed(self.seed, DATA_STREAM, *coordinates))
        if isinstance(self.dataset, FiniteDataset):
            indices = self.dataset.draw_indices(size, self._generator)
            data, labels = self.dataset.batch(indices)
            return data, labels, indices
        data, labels = self.dataset.sample_batch(size, self._generator)
        return data, labels, None


class CycledBatches:
    """Fixed, ready-made batches used in turn (``step * shards + shard`` modulo their number, then ``+ slot``); for
    benchmarks that feed the trainer and a hand-written loop the same tensors."""

    def __init__(self, batches: Sequence[tuple[Tensor, Optional[Tensor]]], shards_per_step: int = 1):
        if not batches:
            raise ValueError("CycledBatches needs at least one (data, labels) batch")
        self.batches = list(batches)
        self.shards_per_step = shards_per_step

    def shard_batch(self, coordinates: tuple[int, ...], size: int
                    ) -> tuple[Tensor, Optional[Tensor], Optional[Tensor]]:
        step, shard, *slot = coordinates
        index = (step * self.shards_per_step + shard + sum(slot)) % len(self.batches)
        data, labels = self.batches[index]
        if data.shape[0] != size:
            raise ValueError(f"ready-made batch has {data.shape[0]} samples; the trainer expects shards of {size}")
        return data, labels, None


class ShardPlan:
    """Which shards this process runs at each update, on which device, and with which objective generator."""

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

    def micro_batches(self, step: int, slot: int = 0) -> Iterator[Batch]:
        """This process's shards of update ``slot`` of ``step``, moved to the device, each with its seeded objective
        generator; the global torch RNG (dropout) is reseeded for each shard as well."""
        for round_index in range(self.rounds):
            shard = self.first_shard + round_index
            coordinates = (step, shard) if slot == 0 else (step, shard, slot)
            seed_global_rngs(derive_seed(self.seed, GLOBAL_STREAM, *coordinates), self.device)
            data, labels, indices = self.source.shard_batch(coordinates, self.shard_size)
            generator = self._generators[round_index]
            generator.manual_seed(derive_seed(self.seed, OBJECTIVE_STREAM, *coordinates))
            data = data.to(self.device, non_blocking=True)
            labels = None if labels is None else labels.to(self.device, non_blocking=True)
            yield Batch(data, labels, indices, generator)
