"""Teacher couplings: ``N`` fixed pairs ``(z_i, x_i = Phi_teacher(z_i)[, y_i])`` generated once and read by index.

Methods that train on deterministic noise-to-data pairs of a teacher (CAF's reflow couplings, DMD's regression
pairs, rectified-flow style reflow) keep a :class:`TeacherCouplings` in their own state:

* **generated once**, on first use, by integrating the teacher's probability-flow ODE
  (:func:`~ucgm.methods.probability_flow.probability_flow_sample`, Euler or Heun steps from ``t = 1`` to 0) from
  standard normal noise ``z_i`` — with labels ``y_i`` uniform over ``num_classes`` for a conditional teacher;
* **deterministic from the run seed**: noise and labels come from one generator seeded by
  ``derive_seed(seed, COUPLINGS_STREAM)``, so every process of a ``torchrun`` job and every run with that seed
  holds the same pairs;
* **checkpointed** in ``state.pt`` through the method's ``state_dict`` and restored exactly on resume (never
  regenerated);
* **read by sample index** ``0 .. N - 1``: :meth:`TeacherCouplings.draw_indices` draws a batch of indices from the
  loss's generator, :meth:`TeacherCouplings.batch` returns ``(noise, samples, labels)`` at those indices.

Usage inside a :class:`~ucgm.methods.base.Method`::

    self.couplings = TeacherCouplings(size=20000, steps=64, solver="heun")

    def set_seed(self, seed):                      # called once by the trainer
        self.seed = seed

    def loss(self, phase, networks, batch):
        if not self.couplings.generated:
            teacher, teacher_transport = self.teacher.resolved()          # ucgm.methods.teachers.Teacher
            self.couplings.generate(teacher, teacher_transport, batch.data.shape[1:], num_classes, self.seed,
                                    batch.data.device)
        indices = self.couplings.draw_indices(batch.data.shape[0], batch.generator)
        noise, samples, labels = self.couplings.batch(indices)
        ...

    def state_dict(self):
        return {"couplings": self.couplings.state_dict()}

    def load_state_dict(self, state):
        self.couplings.load_state_dict(state["couplings"])
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch
from torch import Tensor

from ..seeding import seeded_generator
from ..transports import Transport
from ..validation import check_choice, check_positive_int
from .probability_flow import PROBABILITY_FLOW_SOLVERS, probability_flow_sample

#: Stream tag of the couplings' noise and labels (apart from the trainer's data / objective / sampling streams).
COUPLINGS_STREAM = 101


class TeacherCouplings:
    """``size`` pairs ``(noise, teacher sample[, label])`` of a teacher's probability-flow ODE (``steps`` steps of
    ``solver``), generated once in chunks of ``chunk_size`` and then read by index."""

    def __init__(self, size: int, steps: int = 64, solver: str = "heun", chunk_size: int = 4096):
        check_positive_int("size", size)
        check_positive_int("steps", steps)
        check_choice("solver", solver, PROBABILITY_FLOW_SOLVERS)
        check_positive_int("chunk_size", chunk_size)
        self.size, self.steps, self.solver, self.chunk_size = size, steps, solver, chunk_size
        self.noise: Optional[Tensor] = None
        self.samples: Optional[Tensor] = None
        self.labels: Optional[Tensor] = None
        self.seed: Optional[int] = None
        self.device = torch.device("cpu")

    @property
    def generated(self) -> bool:
        return self.samples is not None

    def __len__(self) -> int:
        return self.size

    def generate(self, teacher: Callable, teacher_transport: Transport, sample_shape: Sequence[int],
                 num_classes: Optional[int], seed: int, device: Optional[torch.device | str] = None,
                 dtype: torch.dtype = torch.float32) -> None:
        """Draw the labels (uniform over ``num_classes``; none when ``num_classes`` is 0 or ``None``) and the noise
        ``z ~ N(0, I)`` of shape ``(size, *sample_shape)`` from ``derive_seed(seed, COUPLINGS_STREAM)``, then solve
        the teacher's ODE from each ``z`` (in ``dtype`` on ``device``, default the store's device)."""
        if device is not None:
            self.device = torch.device(device)
        device = self.device
        generator = seeded_generator(seed, COUPLINGS_STREAM)
        labels = torch.randint(num_classes, (self.size,), generator=generator) if num_classes else None
        noise = torch.randn((self.size, *sample_shape), generator=generator, dtype=torch.float64).to(dtype)
        samples = []
        for start in range(0, self.size, self.chunk_size):
            rows = slice(start, start + self.chunk_size)
            chunk_labels = None if labels is None else labels[rows].to(device)
            samples.append(probability_flow_sample(teacher, teacher_transport, noise[rows].to(device), chunk_labels,
                                                   self.steps, self.solver).to(dtype))
        self.noise, self.samples = noise.to(device), torch.cat(samples)
        self.labels = None if labels is None else labels.to(device)
        self.seed = int(seed)

    def draw_indices(self, batch_size: int, generator: torch.Generator) -> Tensor:
        """``batch_size`` indices uniform in ``0 .. size - 1`` (with replacement) drawn from ``generator``."""
        check_positive_int("batch_size", batch_size)
        return torch.randint(self.size, (batch_size,), generator=generator, device=generator.device)

    def batch(self, indices: Tensor) -> tuple[Tensor, Tensor, Optional[Tensor]]:
        """``(noise, teacher samples, labels or None)`` of the pairs at ``indices``."""
        if not self.generated:
            raise RuntimeError("the teacher couplings are not generated yet: call generate() first")
        indices = indices.to(self.samples.device)
        if bool(((indices < 0) | (indices >= self.size)).any()):
            raise IndexError(f"coupling indices must lie in [0, {self.size - 1}]")
        labels = None if self.labels is None else self.labels[indices]
        return self.noise[indices], self.samples[indices], labels

    def to(self, device: torch.device | str) -> "TeacherCouplings":
        """Keep the pairs on ``device`` (also those generated or loaded later)."""
        self.device = torch.device(device)
        if self.generated:
            self.noise, self.samples = self.noise.to(device), self.samples.to(device)
            self.labels = None if self.labels is None else self.labels.to(device)
        return self

    def state_dict(self) -> dict:
        """The pairs (CPU tensors) and how they were made; ``{}`` before generation."""
        if not self.generated:
            return {}
        state = {"noise": self.noise.cpu().clone(), "samples": self.samples.cpu().clone(), "seed": self.seed,
                 "steps": self.steps, "solver": self.solver}
        if self.labels is not None:
            state["labels"] = self.labels.cpu().clone()
        return state

    def load_state_dict(self, state: dict) -> None:
        """Restore the pairs of :meth:`state_dict` (``{}``: not generated yet)."""
        if not state:
            self.noise = self.samples = self.labels = self.seed = None
            return
        if state["samples"].shape[0] != self.size:
            raise ValueError(f"the checkpoint holds {state['samples'].shape[0]} teacher couplings, this method "
                             f"expects size={self.size}")
        self.noise, self.samples = state["noise"].to(self.device), state["samples"].to(self.device)
        self.labels = state["labels"].to(self.device) if "labels" in state else None
        self.seed = int(state["seed"])
