"""The method-agnostic trainer: an objective, a model, deterministic batches, and the machinery around them.

Per step: learning-rate warm-up, the objective's progress (``objective.set_progress(step, total_steps)`` for
objectives with curricula), reference-network update (``objective.reference_mode``), one objective call per
micro-batch (gradient accumulation, DDP/FSDP gradient sync on the last one), NaN-free gradients, optional norm
clipping, the optimizer step and the evaluation-EMA update. Nothing in a step synchronises with the device:
losses are summed on the device and read only when :meth:`Trainer.pop_mean_loss` is called (at log steps).
"""

from __future__ import annotations

import contextlib
import copy
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence

import torch
from torch import Tensor, nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from ..methods.base import Objective
from .batches import BatchSource, DatasetBatches, ShardPlan
from .checkpoint import CheckpointError, read_state, read_weights, write_checkpoint
from .distributed import DistributedContext, resolve_device
from .ema import EvaluationEMA
from .optim import build_optimizer, sanitise_and_clip, set_lr, warmup_lr
from .reference import ReferenceNetwork
from .schema import OptimizerConfig, TrainingConfig

_FULL_STATE = StateDictOptions(full_state_dict=True, cpu_offload=True)
_LOAD_FULL_STATE = StateDictOptions(full_state_dict=True)


class Hook:
    """A callback run after every ``every``-th step (and after the last step of :meth:`Trainer.fit`)."""

    def __init__(self, every: int, callback: Callable[["Trainer"], None]):
        self.every = every
        self.callback = callback

    def __call__(self, trainer: "Trainer") -> None:
        self.callback(trainer)


class Trainer:
    """Trains ``model`` with ``objective`` on ``batches`` (a :class:`BatchSource` or a dataset with
    ``sample_batch``); knows nothing about the method beyond the :class:`~ucgm.methods.base.Objective` API.

    ``context`` places the process in a ``torchrun`` job (default: one process on ``training.device``).
    """

    def __init__(self, model: nn.Module, objective: Objective, batches, training: TrainingConfig,
                 optimizer: OptimizerConfig, context: Optional[DistributedContext] = None):
        self.context = context or DistributedContext(device=resolve_device(training.device))
        self.training = training
        self.optimizer_settings = optimizer
        self.objective = objective
        self.model = model.to(self.context.device)
        mode = objective.reference_mode
        ema_copy = copy.deepcopy(self.model) if training.ema.kind != "none" else None
        reference_copy = copy.deepcopy(self.model) if mode in ("ema", "frozen") else None
        self.network = self.context.wrap(self.model, training.parallel)
        if self.context.is_distributed and training.parallel == "fsdp":
            ema_copy, reference_copy = (self.context.shard(c) if c is not None else None
                                        for c in (ema_copy, reference_copy))
        self.ema = EvaluationEMA(ema_copy, self.model, training.ema) if ema_copy is not None else None
        self.reference = ReferenceNetwork(mode, reference_copy if reference_copy is not None else self.model,
                                          self.model)
        self._total_steps = training.total_steps()
        self.parameters = [parameter for parameter in self.model.parameters() if parameter.requires_grad]
        self.optimizer = build_optimizer(self.parameters, optimizer)
        # Parameters the objective owns (e.g. sCM's adaptive weighting head) get an optimizer of their own.
        self.objective_parameters = list(objective.to(self.context.device).parameters())
        self.objective_optimizer = (build_optimizer(self.objective_parameters, optimizer)
                                    if self.objective_parameters else None)
        source: BatchSource = batches if hasattr(batches, "shard_batch") else DatasetBatches(batches, training.seed)
        self.plan = ShardPlan(source, training.batch_size, training.grad_accumulation, self.context.rank,
                              self.context.world_size, training.seed, self.context.device)
        self.step = 0
        self.last_stats: dict = {}
        self._loss_sum: Optional[Tensor] = None
        self._loss_count = 0

    # -------------------------------------------------------------------------------------- stepping
    @property
    def sampling_module(self) -> nn.Module:
        """The network to sample and evaluate with: the evaluation EMA, or the model without one."""
        return self.ema.module if self.ema is not None else self.model

    @property
    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.training.precision == "bf16" and self.context.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    @contextlib.contextmanager
    def _gradient_sync(self, enabled: bool) -> Iterator[None]:
        """Skip the cross-rank gradient reduction on all but the last micro-batch of a step."""
        if enabled or not self.context.is_distributed:
            yield
        elif isinstance(self.network, nn.parallel.DistributedDataParallel):
            with self.network.no_sync():
                yield
        else:
            self.network.set_requires_gradient_sync(False)
            try:
                yield
            finally:
                self.network.set_requires_gradient_sync(True)

    def train_step(self) -> None:
        """One optimisation step over this process's shards of the global batch."""
        step = self.step
        warmup = self.optimizer_settings.warmup_steps
        if warmup and step <= warmup:
            lr = warmup_lr(self.optimizer_settings.lr, step, warmup)
            for optimizer in filter(None, (self.optimizer, self.objective_optimizer)):
                set_lr(optimizer, lr)
        self.objective.set_progress(step, self._total_steps)
        self.reference.before_step(self.objective.reference_decay)
        rounds = self.plan.rounds
        step_loss = None
        for index, batch in enumerate(self.plan.micro_batches(step)):
            with self._gradient_sync(index == rounds - 1):
                with self._autocast():
                    output = self.objective(self.network, batch.data, batch.labels,
                                            reference_model=self.reference.module, generator=batch.generator)
                (output.loss if rounds == 1 else output.loss / rounds).backward()
            loss = output.loss.detach()
            step_loss = loss if step_loss is None else step_loss + loss
        sanitise_and_clip(self.parameters, self.optimizer_settings.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.objective_optimizer is not None:
            self.objective.average_gradients()
            sanitise_and_clip(self.objective_parameters, None)
            self.objective_optimizer.step()
            self.objective_optimizer.zero_grad(set_to_none=True)
        if self.ema is not None:
            self.ema.update(step)
        self.step = step + 1
        step_loss = step_loss if rounds == 1 else step_loss / rounds
        self._loss_sum = step_loss if self._loss_sum is None else self._loss_sum + step_loss
        self._loss_count += 1
        self.last_stats = output.stats

    def fit(self, until_step: int, hooks: Sequence[Hook] = ()) -> None:
        """Train until ``self.step == until_step``, running each hook after every ``hook.every``-th step and after
        the last one."""
        while self.step < until_step:
            self.train_step()
            for hook in hooks:
                if self.step % hook.every == 0 or self.step == until_step:
                    hook(self)

    def pop_mean_loss(self) -> float:
        """The loss averaged over the steps since the previous call and over ranks (a collective: every rank
        must call it at the same step); resets the average."""
        if self._loss_count == 0:
            return float("nan")
        mean = self.context.mean(self._loss_sum.float() / self._loss_count)
        self._loss_sum, self._loss_count = None, 0
        return float(mean.item())

    # ------------------------------------------------------------------------------------ checkpoints
    def weights(self) -> dict[str, dict[str, Tensor]]:
        """Full (unsharded) ``model`` and ``ema`` weights on the CPU (a collective under FSDP)."""
        groups = {"model": get_model_state_dict(self.model, options=_FULL_STATE)}
        if self.ema is not None:
            groups["ema"] = get_model_state_dict(self.ema.module, options=_FULL_STATE)
        return groups

    def resume_state(self) -> dict:
        """What ``state.pt`` holds: step, optimizer, learning-rate schedule (a function of the step, recorded for
        reference), RNG states, loss accumulator and reference network."""
        state = {
            "step": self.step,
            "optimizer": get_optimizer_state_dict(self.model, self.optimizer, options=_FULL_STATE),
            "scheduler": {"kind": "linear_warmup", "base_lr": self.optimizer_settings.lr,
                          "warmup_steps": self.optimizer_settings.warmup_steps},
            "rng": {"cpu": torch.get_rng_state()},
            "loss_sum": (self._loss_sum if self._loss_sum is not None else torch.zeros(())).detach().cpu(),
            "loss_count": self._loss_count,
        }
        if torch.cuda.is_available():
            state["rng"]["cuda"] = torch.stack(torch.cuda.get_rng_state_all())
        if self.objective_optimizer is not None:
            state["objective"] = {"weights": self.objective.state_dict(),
                                  "optimizer": self.objective_optimizer.state_dict()}
        if self.reference.owns_weights:
            state["reference"] = {"weights": get_model_state_dict(self.reference.module, options=_FULL_STATE),
                                  "decay": self.reference.decay}
        return state

    def save_checkpoint(self, run_dir: Path, metadata: dict, keep_last: Optional[int] = None) -> Optional[Path]:
        """Gather the state on every rank and let rank 0 write ``step_XXXXXXX``; returns its path on rank 0."""
        weights, state = self.weights(), self.resume_state()
        path = None
        if self.context.is_main:
            path = write_checkpoint(run_dir, self.step, weights, metadata, state, keep_last)
        self.context.barrier()
        return path

    def load_checkpoint(self, checkpoint: Path) -> None:
        """Restore everything :meth:`save_checkpoint` wrote (every rank reads the files)."""
        state = read_state(checkpoint)
        set_model_state_dict(self.model, read_weights(checkpoint, "model"), options=_LOAD_FULL_STATE)
        if self.ema is not None:
            set_model_state_dict(self.ema.module, read_weights(checkpoint, "ema"), options=_LOAD_FULL_STATE)
        set_optimizer_state_dict(self.model, self.optimizer, state["optimizer"], options=_LOAD_FULL_STATE)
        if self.reference.owns_weights:
            reference = state.get("reference")
            if reference is None:
                raise CheckpointError(f"{str(checkpoint)!r} holds no weights for the {self.reference.mode!r} "
                                      f"reference network this objective needs")
            set_model_state_dict(self.reference.module, reference["weights"], options=_LOAD_FULL_STATE)
            self.reference.decay = float(reference["decay"])
        if self.objective_optimizer is not None:
            self.objective.load_state_dict(state["objective"]["weights"])
            self.objective_optimizer.load_state_dict(state["objective"]["optimizer"])
        torch.set_rng_state(state["rng"]["cpu"])
        if "cuda" in state["rng"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(list(state["rng"]["cuda"]))
        self.step = int(state["step"])
        self._loss_count = int(state["loss_count"])
        self._loss_sum = state["loss_sum"].to(self.context.device) if self._loss_count else None
