"""The method-agnostic trainer: a method, its networks, deterministic batches, and the machinery around them.

Per step ``k``: the method's progress (``method.set_progress(k, total_steps)``), the target networks' EMA
updates (networks declared with ``tracks``, decay ``method.tracking_decay(role, k)``), then every phase of
``method.schedule()`` in order, each ``repeats`` times: only the phase's networks take gradients; one loss per
micro-batch (gradient accumulation, DDP/FSDP gradient sync on the last one); per network: learning-rate
warm-up, a non-finite check of the gradients (a sub-update with a non-finite gradient is skipped and counted; a
run of ``training.max_nonfinite_steps`` such steps stops training with :class:`TrainingDiverged`), optional norm
clipping, the optimizer step and the evaluation-EMA update. Nothing in a step synchronises with the device
except the non-finite check; losses are read only by :meth:`Trainer.pop_mean_losses` (at log steps).
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Callable, Iterator, Mapping, Optional, Sequence

import torch
from torch import Tensor, nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from ..methods.base import Method, Networks, Phase
from .batches import BatchSource, ShardPlan, dataset_batches
from .checkpoint import (CheckpointError, check_weights_fit, read_state, read_weights, weight_group_names,
                         write_checkpoint)
from .distributed import DistributedContext, resolve_device
from .networks import NetworkSetup, TrainedNetwork, build_networks
from .optim import gradient_norm, set_lr, warmup_lr
from .settings import OptimizerConfig, TrainingConfig

_FULL_STATE = StateDictOptions(full_state_dict=True, cpu_offload=True)
_LOAD_FULL_STATE = StateDictOptions(full_state_dict=True)


class TrainingDiverged(RuntimeError):
    """Training stopped after a run of steps whose gradients were not finite."""


class Hook:
    """A callback run after every ``every``-th step (and after the last step of :meth:`Trainer.fit`)."""

    def __init__(self, every: int, callback: Callable[["Trainer"], None]):
        self.every = every
        self.callback = callback

    def __call__(self, trainer: "Trainer") -> None:
        self.callback(trainer)


class Trainer:
    """Trains ``method``'s networks on ``batches`` (a :class:`BatchSource` or a dataset with ``sample_batch``);
    knows nothing about the method beyond the :class:`~ucgm.methods.base.Method` protocol.

    ``networks``: the method's networks by role (:func:`~ucgm.training.networks.build_networks`). ``context``
    places the process in a ``torchrun`` job (default: one process on ``training.device``).
    """

    def __init__(self, method: Method, networks: Mapping[str, NetworkSetup], batches, training: TrainingConfig,
                 context: Optional[DistributedContext] = None):
        self.context = context or DistributedContext(device=resolve_device(training.device))
        self.training = training
        self.method = method.to(self.context.device)
        self.method.set_seed(training.seed)
        self.networks = {role: TrainedNetwork(role, setup, self.context, training.parallel)
                         for role, setup in networks.items()}
        self.schedule: list[Phase] = method.schedule()
        for phase in self.schedule:
            for role in phase.networks:
                if role not in self.networks or not self.networks[role].trainable:
                    raise ValueError(f"phase {phase.name!r} updates {role!r}, which is not a trainable network of "
                                     f"{type(method).__name__} (trainable: {self.trainable_roles})")
        self._tracking = [(network, self.networks[network.spec.tracks]) for network in self.networks.values()
                          if network.spec.tracks is not None]
        self._total_steps = training.total_steps()
        source: BatchSource = batches if hasattr(batches, "shard_batch") else dataset_batches(batches, training)
        self.plan = ShardPlan(source, training.batch_size, training.grad_accumulation, self.context.rank,
                              self.context.world_size, training.seed, self.context.device,
                              updates_per_step=sum(phase.repeats for phase in self.schedule))
        self.step = 0
        self.nonfinite_steps = 0
        self._nonfinite_run = 0
        self.last_stats: dict = {}
        self._loss_sums: dict[str, Tensor] = {}
        self._loss_count = 0
        self._gradients_on: Optional[frozenset] = None

    @classmethod
    def for_objective(cls, model: nn.Module, method: Method, batches, training: TrainingConfig,
                      optimizer: OptimizerConfig, context: Optional[DistributedContext] = None,
                      pretrained: bool = False) -> "Trainer":
        """A trainer for a method whose only built network is ``model`` (its other networks are copies, oracles or
        built by the method), with the run's ``optimizer`` and ``training.ema`` settings."""
        setups = build_networks(method, model, optimizer, training.ema, primary_pretrained=pretrained)
        return cls(method, setups, batches, training, context)

    # ------------------------------------------------------------------------------------------ views
    @property
    def trainable_roles(self) -> list[str]:
        return [role for role, network in self.networks.items() if network.trainable]

    @property
    def model(self) -> nn.Module:
        """The network of the method's sampling role."""
        return self.networks[self.method.sampling_role].module

    def sampling_modules(self) -> dict[str, nn.Module]:
        """The networks to sample with (evaluation EMA where kept), for ``method.sampling_model``."""
        return {role: (network.ema.module if network.ema is not None else network.module)
                for role, network in self.networks.items() if role in self.method.sampling_roles()}

    @property
    def sampling_module(self) -> nn.Module:
        """The sampling role's network to sample and evaluate with: its evaluation EMA, or the network."""
        return self.sampling_modules()[self.method.sampling_role]

    @property
    def lr(self) -> float:
        """The current learning rate of the first network the schedule trains."""
        return self.networks[self.schedule[0].networks[0]].optimizer.param_groups[0]["lr"]

    def _networks_view(self, phase: Phase) -> Networks:
        return Networks({role: network.module for role, network in self.networks.items()},
                        {role: self.networks[role].wrapper for role in phase.networks},
                        {role: network.ema.module for role, network in self.networks.items() if network.ema},
                        phase.name)

    # -------------------------------------------------------------------------------------- stepping
    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.training.precision == "bf16" and self.context.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    @contextlib.contextmanager
    def _gradient_sync(self, networks: Sequence[TrainedNetwork], enabled: bool) -> Iterator[None]:
        """Skip the cross-rank gradient reduction on all but the last micro-batch of an update."""
        if enabled or not self.context.is_distributed:
            yield
            return
        with contextlib.ExitStack() as stack:
            for network in networks:
                wrapper = network.wrapper
                if isinstance(wrapper, nn.parallel.DistributedDataParallel):
                    stack.enter_context(wrapper.no_sync())
                else:
                    wrapper.set_requires_gradient_sync(False)
                    stack.callback(wrapper.set_requires_gradient_sync, True)
            yield

    def _enable_gradients(self, roles: frozenset) -> None:
        """Let only the networks of ``roles`` take parameter gradients (others still pass input gradients)."""
        if roles == self._gradients_on:
            return
        for role in self.trainable_roles:
            self.networks[role].set_requires_grad(role in roles)
        self._gradients_on = roles

    def _update(self, phase: Phase, slot: int) -> Tensor:
        """One optimisation step of ``phase``'s networks on the batch of ``slot``; returns the detached loss."""
        networks = [self.networks[role] for role in phase.networks]
        self._enable_gradients(frozenset(phase.networks))
        view = self._networks_view(phase)
        rounds = self.plan.rounds
        total = None
        output = None
        for index, batch in enumerate(self.plan.micro_batches(self.step, slot)):
            with self._gradient_sync(networks, index == rounds - 1):
                with self._autocast():
                    output = self.method.loss(phase.name, view, batch)
                (output.loss if rounds == 1 else output.loss / rounds).backward()
            loss = output.loss.detach()
            total = loss if total is None else total + loss
        norms = [gradient_norm(network.parameters) for network in networks]
        finite = all(bool(torch.isfinite(norm)) for norm in norms)
        if finite:
            for network, norm in zip(networks, norms):
                self._optimizer_step(network, norm)
        else:
            self.nonfinite_steps += 1
        self._nonfinite_run = 0 if finite else self._nonfinite_run + 1
        for network in networks:
            network.optimizer.zero_grad(set_to_none=True)
        limit = self.training.max_nonfinite_steps
        if self._nonfinite_run >= limit:
            raise TrainingDiverged(
                f"training diverged at step {self.step}: {limit} consecutive updates of {'/'.join(phase.networks)} "
                f"had non-finite gradients (the updates were skipped; the last checkpoint holds finite weights); "
                f"lower optimizer.lr, set optimizer.grad_clip, or raise training.max_nonfinite_steps")
        self.last_stats.update(output.stats)
        return total if rounds == 1 else total / rounds

    def _optimizer_step(self, network: TrainedNetwork, norm: Tensor) -> None:
        settings = network.settings
        if settings.warmup_steps and network.updates <= settings.warmup_steps:
            set_lr(network.optimizer, warmup_lr(settings.lr, network.updates, settings.warmup_steps))
        if settings.grad_clip is not None:
            scale = torch.clamp(settings.grad_clip / (norm + 1e-6), max=1.0)
            torch._foreach_mul_([p.grad for p in network.parameters if p.grad is not None], scale)
        network.optimizer.step()
        if network.ema is not None:
            network.ema.update(network.updates)
        network.updates += 1

    def train_step(self) -> None:
        """One training step: target-network updates, then every phase of the schedule."""
        self.method.set_progress(self.step, self._total_steps)
        self.last_stats = {}
        for target, source in self._tracking:
            target.track(source, self.method.tracking_decay(target.role, self.step))
        slot = 0
        for phase in self.schedule:
            for _ in range(phase.repeats):
                loss = self._update(phase, slot)
                slot += 1
                previous = self._loss_sums.get(phase.name)
                self._loss_sums[phase.name] = loss if previous is None else previous + loss
        self._loss_count += 1
        self.step += 1

    def fit(self, until_step: int, hooks: Sequence[Hook] = ()) -> None:
        """Train until ``self.step == until_step``, running each hook after every ``hook.every``-th step and after
        the last one."""
        while self.step < until_step:
            self.train_step()
            for hook in hooks:
                if self.step % hook.every == 0 or self.step == until_step:
                    hook(self)

    def pop_mean_losses(self) -> dict[str, float]:
        """Per phase, the loss averaged over its updates since the previous call and over ranks (a collective:
        every rank must call it at the same step); ``"loss"`` is the last phase's. Resets the averages."""
        if self._loss_count == 0:
            return {"loss": float("nan")}
        means = {}
        for phase in self.schedule:
            total = self._loss_sums[phase.name].float() / (self._loss_count * phase.repeats)
            means[phase.name] = float(self.context.mean(total).item())
        self._loss_sums, self._loss_count = {}, 0
        losses = {"loss": means[self.schedule[-1].name]}
        if len(self.schedule) > 1:
            losses.update({f"loss/{name}": value for name, value in means.items()})
        return losses

    def pop_mean_loss(self) -> float:
        """The last phase's mean loss (see :meth:`pop_mean_losses`)."""
        return self.pop_mean_losses()["loss"]

    # ------------------------------------------------------------------------------------ checkpoints
    def weights(self) -> dict[str, dict[str, Tensor]]:
        """Full (unsharded) weights on the CPU of every network the checkpoint keeps, by weight group (a collective
        under FSDP): ``model`` / ``ema`` for the sampling role, ``ROLE`` / ``ROLE-ema`` for the others."""
        groups = {}
        for role, network in self.networks.items():
            if not network.owns_state:
                continue
            name, ema_name = weight_group_names(role, self.method.sampling_role)
            groups[name] = get_model_state_dict(network.module, options=_FULL_STATE)
            if network.ema is not None:
                groups[ema_name] = get_model_state_dict(network.ema.module, options=_FULL_STATE)
        return groups

    def resume_state(self) -> dict:
        """What ``state.pt`` holds: step, every optimizer and update count, the method's own state, RNG states,
        the loss accumulators and the non-finite counters."""
        optimizers = {role: get_optimizer_state_dict(network.module, network.optimizer, options=_FULL_STATE)
                      for role, network in self.networks.items() if network.trainable}
        state = {
            "step": self.step,
            "optimizers": optimizers,
            "updates": {role: network.updates for role, network in self.networks.items()},
            "method": self.method.state_dict(),
            "rng": {"cpu": torch.get_rng_state()},
            "loss_sums": {name: value.detach().cpu() for name, value in self._loss_sums.items()},
            "loss_count": self._loss_count,
            "nonfinite": {"total": self.nonfinite_steps, "run": self._nonfinite_run},
        }
        if torch.cuda.is_available():
            state["rng"]["cuda"] = torch.stack(torch.cuda.get_rng_state_all())
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
        if "optimizers" not in state:
            raise CheckpointError(f"{str(checkpoint)!r} was written by an older ucgm (no per-network state); it "
                                  f"can be sampled or used as init.checkpoint, not resumed")
        for role, network in self.networks.items():
            if not network.owns_state:
                continue
            name, ema_name = weight_group_names(role, self.method.sampling_role)
            for group, module in ((name, network.module), (ema_name, network.ema.module if network.ema else None)):
                if module is not None:
                    weights = read_weights(checkpoint, group)
                    check_weights_fit(weights, module, f"{str(checkpoint)!r}: the {group!r} weights")
                    set_model_state_dict(module, weights, options=_LOAD_FULL_STATE)
            if network.trainable:
                if role not in state["optimizers"]:
                    raise CheckpointError(f"{str(checkpoint)!r} holds no optimizer state for network {role!r}")
                set_optimizer_state_dict(network.module, network.optimizer, state["optimizers"][role],
                                         options=_LOAD_FULL_STATE)
            network.updates = int(state["updates"].get(role, 0))
        self.method.load_state_dict(state["method"])
        torch.set_rng_state(state["rng"]["cpu"])
        if "cuda" in state["rng"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(list(state["rng"]["cuda"]))
        self.step = int(state["step"])
        self._loss_count = int(state["loss_count"])
        self._loss_sums = {name: value.to(self.context.device) for name, value in state["loss_sums"].items()}
        self.nonfinite_steps = int(state["nonfinite"]["total"])
        self._nonfinite_run = int(state["nonfinite"]["run"])
