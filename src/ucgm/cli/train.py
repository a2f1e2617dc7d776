"""A training run in a directory: resume-or-start, the trainer, and its logging, checkpoint and sample hooks.

``DIR/config.yaml`` (the resolved config), ``DIR/stats.jsonl``, ``DIR/checkpoints/``, ``DIR/samples/`` and,
with tensorboard installed, ``DIR/tensorboard/``. Running the same command again on the same directory resumes
from the newest checkpoint and continues exactly as the uninterrupted run would have.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Optional

from torch import nn

from ..training.checkpoint import (
    latest_checkpoint,
    read_checkpoint_info,
    read_weights,
    remove_unfinished,
    step_directory_name,
)
from .components import (
    build_dataset,
    build_method,
    build_model,
    build_run_networks,
    with_data_defaults,
)
from .config import config_differences, read_yaml_mapping, save_config
from ..training.distributed import DistributedContext, distributed_session
from ..sampling.seeded import generate_samples
from ..training.loop import Hook, Trainer
from .run_log import RunLog, truncate_stats
from ..validation import ConfigError
from .schema import typed_section
from ..models.conditions import CONDITIONS_PREFIX
from ..seeding import INIT_STREAM, derive_seed, seed_global_rngs

CONFIG_FILE = "config.yaml"
#: Settings that may change between a run and its resumption (duration, cadence, placement, sampling).
RESUMABLE_CHANGES = ("training.steps", "training.kimg", "training.log_every", "training.checkpoint_every",
                     "training.keep_last", "training.sample_every", "training.dist_timeout", "training.device",
                     "training.data_workers", "training.data_prefetch")


def check_resumable(saved: dict, config: dict, run_dir: Path) -> None:
    """Raise unless ``config`` differs from the run's saved config only in :data:`RESUMABLE_CHANGES` / sampling."""
    changed = [key for key in config_differences(saved, config)
               if key not in RESUMABLE_CHANGES and not key.startswith("sampling.")]
    if changed:
        details = ", ".join(f"{key}" for key in changed[:8])
        raise ConfigError(f"run directory {str(run_dir)!r} was started with a different config (changed: "
                          f"{details}); resume with the same settings or choose a new --run-dir")


def load_initial_weights(model: nn.Module, init: dict) -> int:
    """Load ``init.weights`` (``ema`` or ``model``) of checkpoint ``init.checkpoint`` into ``model``; returns
    the source step. The model may have condition layers the source lacks (they start at zero)."""
    info = read_checkpoint_info(init["checkpoint"])
    group = init["weights"] if init["weights"] in info.groups else "model"
    missing, unexpected = model.load_state_dict(read_weights(info.path, group), strict=False)
    missing = [name for name in missing if not name.startswith(CONDITIONS_PREFIX)]
    if missing or unexpected:
        raise ConfigError(f"init.checkpoint {init['checkpoint']!r} does not fit the model (missing: "
                          f"{missing[:5]}, unexpected: {unexpected[:5]}); the model section must match the source")
    return info.step


class RunHooks:
    """The hooks of a run: progress bar, stats records, checkpoints and sample grids."""

    def __init__(self, trainer: Trainer, config: dict, run_dir: Path, metadata: dict, log: RunLog):
        self.trainer, self.config, self.run_dir, self.metadata, self.log = trainer, config, run_dir, metadata, log
        self.training = typed_section(config, "training")
        self._clock = time.perf_counter()
        self._clock_step = trainer.step

    def hooks(self) -> list[Hook]:
        training = self.training
        hooks = [Hook(1, lambda trainer: self.log.advance())] if self.log.has_progress_bar else []
        hooks += [Hook(training.log_every, self.record), Hook(training.checkpoint_every, self.checkpoint)]
        if training.sample_every:
            hooks.append(Hook(training.sample_every, self.sample_grid))
        return hooks

    def record(self, trainer: Trainer) -> None:
        losses = trainer.pop_mean_losses()
        now = time.perf_counter()
        seconds = (now - self._clock) / max(1, trainer.step - self._clock_step)
        self._clock, self._clock_step = now, trainer.step
        values = {"step": trainer.step, **losses, "lr": trainer.lr, "sec_per_step": seconds,
                  "kimg": trainer.step * self.training.batch_size / 1000,
                  "nonfinite_steps": trainer.nonfinite_steps}
        for key, value in trainer.last_stats.items():
            values.setdefault(key, float(value))
        self.log.record(values)

    def checkpoint(self, trainer: Trainer) -> None:
        trainer.save_checkpoint(self.run_dir, self.metadata, self.training.keep_last)

    def sample_grid(self, trainer: Trainer) -> None:
        sharded = trainer.context.is_distributed and self.training.parallel == "fsdp"
        if not (trainer.context.is_main or sharded):
            return
        from .artifacts import write_png

        settings = typed_section(self.config, "sampling")
        grid = dataclasses.replace(settings, num=min(settings.num, 64))
        network, transport = trainer.method.sampling_model(trainer.sampling_modules())
        samples = generate_samples(network, transport, grid, self.metadata["data_shape"],
                                   self.metadata["num_classes"], trainer.context.device, trainer.method.sampler())
        if trainer.context.is_main:
            write_png(samples.samples, samples.labels,
                      self.run_dir / "samples" / f"{step_directory_name(trainer.step)}.png")


def _build_trainer(config: dict, dataset, latest: Optional[Path], context: DistributedContext
                   ) -> tuple[Trainer, list[str]]:
    """The trainer of a run, resumed from ``latest`` or started (from ``init.checkpoint`` when set); also the
    messages to show."""
    training = typed_section(config, "training")
    seed_global_rngs(derive_seed(training.seed, INIT_STREAM), context.device)
    method = build_method(config)
    model = build_model(config, method.networks()[method.sampling_role])
    messages = []
    if training.precision == "bf16" and context.device.type != "cuda":
        messages.append(f"training.precision=bf16 applies on CUDA only; training in fp32 on {context.device}")
    pretrained = bool(config["init"]["checkpoint"])
    if latest is None and pretrained:
        source_step = load_initial_weights(model, config["init"])
        messages.append(f"initialised from {config['init']['checkpoint']} ({config['init']['weights']} weights, "
                        f"step {source_step})")
    networks = build_run_networks(config, method, model, pretrained)
    trainer = Trainer(method, networks, dataset, training, context)
    if latest is not None:
        trainer.load_checkpoint(latest)
        messages.append(f"resuming {latest.parent.parent} from {latest.name}")
    return trainer, messages


def _train(config: dict, run_dir: Path, context: DistributedContext, progress: Optional[bool]) -> Path:
    training = typed_section(config, "training")
    dataset = build_dataset(config)
    config = with_data_defaults(config, dataset.shape, dataset.num_classes)
    latest = latest_checkpoint(run_dir)
    config_path = run_dir / CONFIG_FILE
    if latest is not None and config_path.is_file():
        check_resumable(read_yaml_mapping(config_path), config, run_dir)
    trainer, messages = _build_trainer(config, dataset, latest, context)
    if context.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        remove_unfinished(run_dir)
        truncate_stats(run_dir / "stats.jsonl", trainer.step)
        save_config(config, config_path)
    context.barrier()
    metadata = {"config": config, "normalisation": dataset.normalisation, "data_shape": list(dataset.shape),
                "num_classes": dataset.num_classes}
    total = training.total_steps()
    log = RunLog(run_dir, total, trainer.step, enabled=context.is_main, progress=progress)
    try:
        for message in messages:
            log.message(message)
        hooks = RunHooks(trainer, config, run_dir, metadata, log)
        trainer.fit(total, hooks.hooks())
    finally:
        log.close()
    return run_dir


def run_training(config: dict, run_dir: Path | str, progress: Optional[bool] = None) -> Path:
    """Train (or resume) the resolved ``config`` in ``run_dir``; joins the ``torchrun`` job when launched by it.

    ``progress`` forces the progress bar on or off (default: on when stderr is a terminal).
    """
    run_dir = Path(run_dir)
    training = typed_section(config, "training")
    with distributed_session(training.device, training.dist_timeout) as context:
        return _train(config, run_dir, context, progress)
