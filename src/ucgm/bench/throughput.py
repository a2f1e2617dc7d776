"""Training-step throughput on the trainer's real ``train_step`` path, for side-by-side benchmarks.

Shared by the ``trainer`` section (the trainer against :func:`~ucgm.bench.minimal_loop.minimal_training_loop`) and the
``consistency`` section (the step cost of each objective relative to flow matching). A *like-for-like* config
switches off what a minimal loop does not do: evaluation EMA, gradient clipping and learning-rate warm-up (no hooks
run, so nothing is logged, checkpointed or sampled), and uses the minimal loop's optimizer (AdamW with torch's
defaults, the config's learning rate); the trainer still seeds its per-step generators, reseeds the global RNG,
sanitises gradients and accumulates the loss on the device.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
from typing import Callable, Iterator, NamedTuple, Optional

import torch
from torch import Tensor, nn

from ..training.batches import CycledBatches, draw_shard
from ..cli.components import build_dataset, build_method, build_model, build_run_networks, with_data_defaults
from ..cli.config import apply_overrides, as_run_config, parse_run_config
from ..training.loop import Trainer
from ..cli.schema import RunConfig
from ..seeding import INIT_STREAM, derive_seed, seed_global_rngs

#: Overrides that reduce the trainer to what a minimal loop does (``training.device`` pinned to the CPU), with
#: ``torch.optim.AdamW``'s default hyper-parameters (those of the minimal loop's optimizer; only the lr is kept).
_ADAMW_DEFAULTS = inspect.signature(torch.optim.AdamW).parameters
LIKE_FOR_LIKE = ("training.ema.kind=none", "optimizer.warmup_steps=0", "optimizer.grad_clip=null",
                 "training.device=cpu", "optimizer.name=adamw",
                 f"optimizer.betas={list(_ADAMW_DEFAULTS['betas'].default)}",
                 f"optimizer.eps={_ADAMW_DEFAULTS['eps'].default}",
                 f"optimizer.weight_decay={_ADAMW_DEFAULTS['weight_decay'].default}")
#: Ready-made batches cycled through by the timed loops.
NUM_BATCHES = 4

Batch = tuple[Tensor, Optional[Tensor]]


@contextlib.contextmanager
def single_thread() -> Iterator[None]:
    """Run the block with one intra-op thread (restoring the previous count afterwards)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def like_for_like(config: RunConfig | dict) -> RunConfig:
    """``config`` (parsed or resolved) without EMA, clipping and warm-up, on the CPU."""
    return parse_run_config(apply_overrides(as_run_config(config).values, LIKE_FOR_LIKE))


class TrainingSetup(NamedTuple):
    """What a timed loop needs: the config with data-derived model options, initial weights and fixed batches."""

    config: RunConfig
    model: nn.Module
    batches: list[Batch]


def training_setup(config: RunConfig | dict, num_batches: int = NUM_BATCHES) -> TrainingSetup:
    """The model of ``config`` initialised as a run would initialise it, and ``num_batches`` batches of
    ``training.batch_size``: the run's first shards (:func:`~ucgm.training.batches.draw_shard`)."""
    config = as_run_config(config)
    training = config.training
    dataset = build_dataset(config)
    config = with_data_defaults(config, dataset.shape, dataset.num_classes)
    seed_global_rngs(derive_seed(training.seed, INIT_STREAM), torch.device("cpu"))
    method = build_method(config)
    model = build_model(config, method.networks()[method.sampling_role])  # with the conditions it declares
    generator = torch.Generator()
    batches = [draw_shard(dataset, training.seed, (step, 0), training.batch_size, generator)
               for step in range(num_batches)]  # the run's first batches, with indices for indexed datasets
    return TrainingSetup(config, model, batches)


def make_trainer(config: RunConfig | dict, model: nn.Module, batches: Optional[list[Batch]] = None) -> Trainer:
    """A trainer of ``config`` on a copy of ``model``: fed the ready-made ``batches`` in turn, or, without them,
    drawing every step's batch from the config's dataset as a run does."""
    config = as_run_config(config)
    source = CycledBatches(batches) if batches is not None else build_dataset(config)
    method = build_method(config)
    networks = build_run_networks(config, method, copy.deepcopy(model), bool(config.init.checkpoint))
    return Trainer(method, networks, source, config.training)


def trainer_block(trainer: Trainer, steps: int) -> Callable[[], None]:
    """A callable running ``steps`` training steps of ``trainer``."""

    def run() -> None:
        for _ in range(steps):
            trainer.train_step()

    return run
