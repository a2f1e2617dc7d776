"""A per-example buffer of a model's own estimates, keyed by dataset index (DDDM's ``x_bar``).

Entry ``i`` holds the estimate the model made for training example ``i`` at its previous visit and how many
visits it has had; an example never visited reads standard normal noise seeded by ``(seed, BUFFER_STREAM, i)``, so
the buffer needs no dataset size and is the same on every process. Writes made during a training step are staged
and applied when the next step begins (:meth:`EstimateBuffer.apply_pending`): every read of a step sees the buffer
as the previous steps left it, whatever the split of the batch into micro-batches or processes. Under
``torch.distributed`` the staged writes of all processes are gathered, so every process holds the same buffer and
a checkpoint written by rank 0 holds every write.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor
import torch.distributed as dist

from ...seeding import seeded_generator

#: Stream tag of the initial buffer values.
BUFFER_STREAM = 102


def _gathered(tensor: Tensor) -> Tensor:
    """``tensor`` concatenated over the processes of the default group (in rank order); itself without one."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts)


def first_occurrences(indices: Tensor) -> Tensor:
    """Positions of the first occurrence of each distinct value of ``indices`` (1-D), in increasing value order."""
    unique, inverse = torch.unique(indices, return_inverse=True)
    positions = torch.arange(indices.shape[0], device=indices.device)
    first = torch.full((unique.shape[0],), indices.shape[0], dtype=torch.long, device=indices.device)
    return first.scatter_reduce(0, inverse, positions, reduce="amin")


class EstimateBuffer:
    """Estimates of shape ``sample_shape`` per dataset index, with visit counts (see the module docstring)."""

    def __init__(self, seed: int = 0):
        self.seed = int(seed)
        self.values: Optional[Tensor] = None   # (capacity, *sample_shape)
        self.visits: Optional[Tensor] = None   # (capacity,) long
        self.pending: list[tuple[Tensor, Tensor]] = []
        self.device = torch.device("cpu")

    def _reserve(self, capacity: int, sample_shape: Sequence[int], dtype: torch.dtype) -> None:
        if self.values is not None and self.values.shape[0] >= capacity:
            return
        values = torch.zeros((capacity, *sample_shape), dtype=dtype, device=self.device)
        visits = torch.zeros(capacity, dtype=torch.long, device=self.device)
        if self.values is not None:
            values[: self.values.shape[0]] = self.values
            visits[: self.visits.shape[0]] = self.visits
        self.values, self.visits = values, visits

    def initial(self, indices: Tensor, sample_shape: Sequence[int], dtype: torch.dtype) -> Tensor:
        """The value of never-visited entries ``indices``: ``N(0, I)`` from ``(seed, BUFFER_STREAM, index)``."""
        rows = [torch.randn(tuple(sample_shape), generator=seeded_generator(self.seed, BUFFER_STREAM, int(index)))
                for index in indices.tolist()]
        return torch.stack(rows).to(dtype=dtype, device=self.device)

    def read(self, indices: Tensor, sample_shape: Sequence[int], dtype: torch.dtype = torch.float32
             ) -> tuple[Tensor, Tensor]:
        """``(estimates, visits)`` at ``indices`` (a never-visited entry: its initial noise and 0 visits)."""
        indices = indices.to(self.device).long()
        if bool((indices < 0).any()):
            raise IndexError("dataset indices must be >= 0")
        self._reserve(int(indices.max()) + 1, sample_shape, dtype)
        estimates, visits = self.values[indices].clone(), self.visits[indices].clone()
        fresh = visits == 0
        if bool(fresh.any()):
            estimates[fresh] = self.initial(indices[fresh], sample_shape, dtype)
        return estimates, visits

    def stage(self, indices: Tensor, estimates: Tensor) -> None:
        """Stage the write of ``estimates`` (detached) at ``indices``; gathered over processes at once."""
        self.pending.append((_gathered(indices.to(estimates.device).long()).to(self.device),
                             _gathered(estimates.detach()).to(self.device)))

    def apply_pending(self) -> None:
        """Write the staged estimates (for an index written more than once, the first staged value) and count one
        visit per written index."""
        if not self.pending:
            return
        indices = torch.cat([index for index, _ in self.pending])
        estimates = torch.cat([estimate for _, estimate in self.pending])
        self.pending = []
        first = first_occurrences(indices)
        indices, estimates = indices[first], estimates[first]
        self._reserve(int(indices.max()) + 1, estimates.shape[1:], estimates.dtype)
        self.values[indices] = estimates.to(self.values.dtype)
        self.visits[indices] += 1

    def to(self, device: torch.device | str) -> "EstimateBuffer":
        self.device = torch.device(device)
        if self.values is not None:
            self.values, self.visits = self.values.to(self.device), self.visits.to(self.device)
        self.pending = [(index.to(self.device), value.to(self.device)) for index, value in self.pending]
        return self

    def state_dict(self) -> dict:
        """Values, visit counts and staged writes (CPU tensors); ``{}`` while empty."""
        if self.values is None and not self.pending:
            return {}
        state = {"seed": self.seed, "pending_indices": [index.cpu().clone() for index, _ in self.pending],
                 "pending_values": [value.cpu().clone() for _, value in self.pending]}
        if self.values is not None:
            state.update(values=self.values.cpu().clone(), visits=self.visits.cpu().clone())
        return state

    def load_state_dict(self, state: dict) -> None:
        if not state:
            self.values = self.visits = None
            self.pending = []
            return
        self.seed = int(state["seed"])
        self.values = state["values"].to(self.device) if "values" in state else None
        self.visits = state["visits"].to(self.device) if "visits" in state else None
        self.pending = [(index.to(self.device), value.to(self.device))
                        for index, value in zip(state["pending_indices"], state["pending_values"])]
