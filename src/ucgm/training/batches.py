"""Deterministic per-step batches, split into shards over processes and gradient-accumulation rounds.

The global batch of each update of step ``k`` is cut into ``world_size * grad_accumulation`` equal *shards*;
process ``r`` handles shards ``r * A .. r * A + A - 1`` (``A`` accumulation rounds). Shard ``s`` of update
``slot`` of step ``k`` draws its data and its objective randomness from generators seeded by
``(seed, stream, k, s)`` (``(seed, stream, k, s, slot)`` for the later updates of a multi-phase step), so a step
is the same whether it is run fresh or after a resume, and one process with ``A = 2`` sees exactly the samples
and noise of two processes with ``A = 1``.

Datasets that decode every batch from files (``decoded_per_batch``, e.g. image folders) are read by
:class:`LoaderBatches`: a ``torch.utils.data.DataLoader`` whose workers decode the shards of the coming updates
ahead of time, in the order the trainer will ask for them; the shards are exactly those of
:class:`DatasetBatches`, so the number of workers changes nothing but the speed, and a resumed run restarts the
loader at its first step.
"""

from __future__ import annotations

from typing import Iterator, Optional, Protocol, Sequence

import torch
import torch.utils.data
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


def draw_shard(dataset, seed: int, coordinates: tuple[int, ...], size: int, generator: torch.Generator
               ) -> tuple[Tensor, Optional[Tensor], Optional[Tensor]]:
    """The shard at ``coordinates``: ``generator`` seeded by ``(seed, data stream, *coordinates)``; indexed datasets
    (:class:`ucgm.data.base.FiniteDataset`) draw uniform indices, others ``sample_batch``."""
    generator.manual_seed(derive_seed(seed, DATA_STREAM, *coordinates))
    if isinstance(dataset, FiniteDataset):
        indices = dataset.draw_indices(size, generator)
        data, labels = dataset.batch(indices)
        return data, labels, indices
    data, labels = dataset.sample_batch(size, generator)
    return data, labels, None


class DatasetBatches:
    """Shards drawn from a dataset in the training process (:func:`draw_shard`)."""

    def __init__(self, dataset, seed: int):
        self.dataset = dataset
        self.seed = seed
        self._generator = torch.Generator()

    def shard_batch(self, coordinates: tuple[int, ...], size: int
                    ) -> tuple[Tensor, Optional[Tensor], Optional[Tensor]]:
        return draw_shard(self.dataset, self.seed, coordinates, size, self._generator)


class _ShardDecoder(torch.utils.data.Dataset):
    """``decoder[coordinates]``: the coordinates and :func:`draw_shard`'s shard there (decoded in a worker)."""

    def __init__(self, dataset: FiniteDataset, seed: int, size: int):
        self.dataset, self.seed, self.size = dataset, seed, size

    def __getitem__(self, coordinates: tuple[int, ...]):
        return (coordinates, *draw_shard(self.dataset, self.seed, coordinates, self.size, torch.Generator()))


class _CoordinateStream(torch.utils.data.Sampler):
    """The coordinates the trainer will ask for, from ``first`` on (:meth:`ShardPlan.coordinates_from`)."""

    def __init__(self, plan: "ShardPlan", first: tuple[int, ...]):
        self.plan, self.first = plan, first

    def __iter__(self) -> Iterator[tuple[int, ...]]:
        return self.plan.coordinates_from(self.first)


def _one_thread_worker(worker_id: int) -> None:
    torch.set_num_threads(1)


class LoaderBatches:
    """Shards of a :class:`~ucgm.data.base.FiniteDataset` decoded ahead of time by a ``DataLoader`` with ``workers``
    worker processes keeping ``prefetch`` shards each in flight. :class:`ShardPlan` tells it the order of the
    coming shards; asking for other coordinates than the next one (a resumed run) restarts the loader there."""

    def __init__(self, dataset: FiniteDataset, seed: int, workers: int, prefetch: int = 2):
        if workers < 1 or prefetch < 1:
            raise ValueError(f"workers={workers!r} and prefetch={prefetch!r} must be integers >= 1")
        self.dataset, self.seed, self.workers, self.prefetch = dataset, seed, workers, prefetch
        self.plan: Optional[ShardPlan] = None
        self._iterator: Optional[Iterator] = None
        self._size: Optional[int] = None

    def follow(self, plan: "ShardPlan") -> None:
        """Read shards in the order of ``plan``."""
        self.plan, self._iterator = plan, None

    def _start(self, coordinates: tuple[int, ...], size: int) -> None:
        if self.plan is None:
            raise ValueError("LoaderBatches reads shards in a ShardPlan's order: pass it to a ShardPlan first")
        loader = torch.utils.data.DataLoader(
            _ShardDecoder(self.dataset, self.seed, size), batch_size=None,
            sampler=_CoordinateStream(self.plan, coordinates), num_workers=self.workers,
            prefetch_factor=self.prefetch, worker_init_fn=_one_thread_worker,
            pin_memory=self.plan.device.type == "cuda")
        self._iterator, self._size = iter(loader), size

    def shard_batch(self, coordinates: tuple[int, ...], size: int
                    ) -> tuple[Tensor, Optional[Tensor], Optional[Tensor]]:
        coordinates = tuple(coordinates)
        if self._iterator is None or size != self._size:
            self._start(coordinates, size)
        decoded, data, labels, indices = next(self._iterator)
        if tuple(decoded) != coordinates:  # not the shard the plan predicted (e.g. a resume): restart there
            self._start(coordinates, size)
            decoded, data, labels, indices = next(self._iterator)
        return data, labels, indices

    def close(self) -> None:
        """Stop the worker processes."""
        self._iterator = None


def dataset_batches(dataset, training) -> BatchSource:
    """The shards of ``dataset`` for a run with :class:`~ucgm.training.settings.TrainingConfig` ``training``: decoded
    by ``training.data_workers`` loader workers (``training.data_prefetch`` shards each ahead) when the dataset
    decodes every batch (``decoded_per_batch``, e.g. image folders) and workers are asked for, else in-process."""
    if getattr(dataset, "decoded_per_batch", False) and training.data_workers > 0:
        return LoaderBatches(dataset, training.seed, training.data_workers, training.data_prefetch)
    return DatasetBatches(dataset, training.seed)


class CycledBatches:
    """Fixed, ready-made batches used in turn (``step * shards + shard`` modulo their number, then ``+ slot``); for
    benchmarks that feed the trainer and a hand-written loop the same tensors."""

    def __init__(self, batches: Sequence[tuple[Optional[Tensor], ...]], shards_per_step: int = 1):
        """``batches``: ``(data, labels)`` or ``(data, labels, indices)`` (dataset indices, for indexed datasets)."""
        if not batches:
            raise ValueError("CycledBatches needs at least one (data, labels) batch")
        self.batches = list(batches)
        self.shards_per_step = shards_per_step

    def shard_batch(self, coordinates: tuple[int, ...], size: int
                    ) -> tuple[Tensor, Optional[Tensor], Optional[Tensor]]:
        step, shard, *slot = coordinates
        index = (step * self.shards_per_step + shard + sum(slot)) % len(self.batches)
        data, labels, *indices = self.batches[index]
        if data.shape[0] != size:
            raise ValueError(f"ready-made batch has {data.shape[0]} samples; the trainer expects shards of {size}")
        return data, labels, indices[0] if indices else None


class ShardPlan:
    """Which shards this process runs at each update, on which device, and with which objective generator."""

    def __init__(self, source: BatchSource, batch_size: int, grad_accumulation: int, rank: int, world_size: int,
                 seed: int, device: torch.device, updates_per_step: int = 1):
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
        self.updates_per_step = updates_per_step
        self._generators = [torch.Generator() for _ in range(grad_accumulation)]
        if hasattr(source, "follow"):
            source.follow(self)

    def coordinates(self, step: int, slot: int, round_index: int) -> tuple[int, ...]:
        """The coordinates of this process's ``round_index``-th shard of update ``slot`` of ``step``."""
        shard = self.first_shard + round_index
        return (step, shard) if slot == 0 else (step, shard, slot)

    def coordinates_from(self, first: tuple[int, ...]) -> Iterator[tuple[int, ...]]:
        """Every shard coordinate the trainer asks for from ``first`` on, in order (steps, their updates, rounds)."""
        step, shard, *rest = first
        slot, round_index = (rest[0] if rest else 0), shard - self.first_shard
        while True:
            while slot < self.updates_per_step:
                while round_index < self.rounds:
                    yield self.coordinates(step, slot, round_index)
                    round_index += 1
                slot, round_index = slot + 1, 0
            step, slot = step + 1, 0

    def micro_batches(self, step: int, slot: int = 0) -> Iterator[Batch]:
        """This process's shards of update ``slot`` of ``step``, moved to the device, each with its seeded objective
        generator; the global torch RNG (dropout) is reseeded for each shard as well."""
        for round_index in range(self.rounds):
            coordinates = self.coordinates(step, slot, round_index)
            seed_global_rngs(derive_seed(self.seed, GLOBAL_STREAM, *coordinates), self.device)
            data, labels, indices = self.source.shard_batch(coordinates, self.shard_size)
            generator = self._generators[round_index]
            generator.manual_seed(derive_seed(self.seed, OBJECTIVE_STREAM, *coordinates))
            data = data.to(self.device, non_blocking=True)
            labels = None if labels is None else labels.to(self.device, non_blocking=True)
            yield Batch(data, labels, indices, generator)
