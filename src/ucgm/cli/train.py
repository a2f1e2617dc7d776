"""A training run in a directory: resume-or-start, the trainer, and its logging, checkpoint and sample hooks.

``DIR/config.yaml`` (the resolved config), ``DIR/stats.jsonl``, ``DIR/checkpoints/``, ``DIR/samples/`` and,
with tensorboard installed, ``DIR/tensorboard/``. Running the same command again on the same directory resumes
from the newest complete checkpoint and continues exactly as the uninterrupted run would have: the new start
first removes what an interrupted process left (unfinished checkpoint writes, temporary files of atomic writes),
cuts stats.jsonl and the TensorBoard logs back to the checkpoint's step, and says what it did; a run directory
without a resumable checkpoint says so before starting from step 0. A resumption refuses a config or a number of
processes other than the run's (naming the differing keys) unless ``allow_changes``.
"""

from __future__ import annotations

import dataclasses
import os
import time
from pathlib import Path
from typing import Optional

from torch import nn

from ..atomic import remove_temporaries
from ..training.checkpoint import (
    CHECKPOINTS_DIRECTORY,
    STATE_FILE,
    WEIGHTS_FILE,
    checkpoints_directory,
    latest_checkpoint,
    read_checkpoint_info,
    read_weights,
    remove_unfinished,
    step_directory_name,
    unfinished_writes,
)
from .components import (
    build_dataset,
    build_method,
    build_model,
    build_run_networks,
    with_data_defaults,
)
from .config import as_run_config, config_differences, save_config
from ..training.distributed import DistributedContext, distributed_session
from ..sampling.seeded import NonFiniteSamples, generate_samples
from ..training.loop import Hook, Trainer
from ..training.threads import choose_threads, intra_op_threads
from .run_log import STATS_FILE, TENSORBOARD_DIRECTORY, RunLog, read_stats, truncate_stats, truncate_tensorboard
from ..validation import ConfigError
from .schema import InitConfig, RunConfig
from ..models.conditions import CONDITIONS_PREFIX
from ..seeding import INIT_STREAM, derive_seed, seed_global_rngs

CONFIG_FILE = "config.yaml"
#: Settings that may change between a run and its resumption (duration, cadence, placement, sampling).
RESUMABLE_CHANGES = ("training.steps", "training.kimg", "training.log_every", "training.checkpoint_every",
                     "training.keep_last", "training.sample_every", "training.dist_timeout", "training.device",
                     "training.threads", "training.data_workers", "training.data_prefetch")
#: Sections that do not change a run once it has started: sampling defaults, the preset's defaults for other
#: objectives (the chosen one's are already merged into ``objective``) and the ``tune:`` / ``tune_recipes:`` recipes
#: for ``ucgm tune``.
RESUMABLE_SECTIONS = ("sampling.", "objectives.", "tune.", "tune_recipes.")
ALLOW_CHANGES_HINT = "resume with the same settings, choose a new --run-dir, or pass --allow-changes"


def _lookup(config: dict, key: str):
    value = config
    for part in key.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    return value


def resume_changes(saved: dict, config: dict, saved_world_size: Optional[int], world_size: int) -> list[str]:
    """``"KEY: OLD -> NEW"`` for every setting that differs from the run's (``saved``, the config of its
    checkpoint) beyond :data:`RESUMABLE_CHANGES` and :data:`RESUMABLE_SECTIONS`, and for a different number of
    processes."""
    changed = [f"{key}: {_lookup(saved, key)!r} -> {_lookup(config, key)!r}"
               for key in config_differences(saved, config)
               if key not in RESUMABLE_CHANGES and not key.startswith(RESUMABLE_SECTIONS)]
    if saved_world_size is not None and saved_world_size != world_size:
        changed.append(f"processes: {saved_world_size} -> {world_size} (the global batch is split otherwise)")
    return changed


def check_resumable(run_dir: Path, latest: Path, config: dict, world_size: int, allow_changes: bool) -> list[str]:
    """Raise :class:`ConfigError` naming the changes unless the run may resume from ``latest`` with ``config`` on
    ``world_size`` processes; returns the messages to show (the changes accepted with ``allow_changes``)."""
    info = read_checkpoint_info(latest)
    changed = resume_changes(info.config, config, info.run.get("world_size"), world_size)
    if not changed:
        return []
    details = "; ".join(changed[:8]) + ("; ..." if len(changed) > 8 else "")
    if not allow_changes:
        raise ConfigError(f"run directory {str(run_dir)!r} was started with other settings ({details}); "
                          f"{ALLOW_CHANGES_HINT}")
    return [f"resuming with changed settings (--allow-changes): {details}"]


def check_run_directory(run_dir: Path) -> None:
    """Raise :class:`ConfigError` when ``run_dir`` exists but is not a directory."""
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"--run-dir {str(run_dir)!r} is an existing file; a run directory must be a directory "
                          f"(it is created when missing)")


def _no_resume_reason(run_dir: Path, unfinished: list[str]) -> Optional[str]:
    """Why a run directory that holds something has no resumable checkpoint (``None`` when it is new)."""
    records = read_stats(run_dir / STATS_FILE)
    root = checkpoints_directory(run_dir)
    stateless = sorted(entry.name for entry in root.iterdir() if (entry / WEIGHTS_FILE).is_file()
                       and not (entry / STATE_FILE).is_file()) if root.is_dir() else []
    if stateless:
        return (f"{CHECKPOINTS_DIRECTORY}/{stateless[-1]} has no {STATE_FILE} (it can be sampled, not resumed); it "
                f"will be replaced when training reaches its step")
    if unfinished:
        return f"the write of its first checkpoint, {unfinished[0]}, was interrupted"
    if records:
        return f"it was stopped before its first checkpoint (stats.jsonl reached step {records[-1]['step']})"
    return None


def clean_run_directory(run_dir: Path, step: int, latest: Optional[Path]) -> list[str]:
    """Remove what an interrupted process left and cut the logs back to ``step``; returns what to say."""
    messages = []
    unfinished = unfinished_writes(run_dir)
    if latest is None:
        reason = _no_resume_reason(run_dir, unfinished)
        if reason is not None:
            messages.append(f"no resumable checkpoint in {run_dir}: {reason}; starting from step 0")
    elif unfinished:
        messages.append(f"the write of checkpoint {', '.join(unfinished)} was interrupted and is removed; "
                        f"resuming from the previous complete checkpoint, {latest.name}")
    remove_unfinished(run_dir)
    leftovers = [path for directory in (run_dir, checkpoints_directory(run_dir), run_dir / "samples",
                                        run_dir / TENSORBOARD_DIRECTORY) for path in remove_temporaries(directory)]
    if leftovers:
        messages.append(f"removed {len(leftovers)} temporary file(s) of interrupted writes "
                        f"({', '.join(path.name for path in leftovers[:3])})")
    truncate_stats(run_dir / STATS_FILE, step)
    dropped = truncate_tensorboard(run_dir / TENSORBOARD_DIRECTORY, step)
    if dropped:
        messages.append(f"removed {dropped} TensorBoard event(s) after step {step}")
    return messages


def load_initial_weights(model: nn.Module, init: InitConfig) -> int:
    """Load ``init.weights`` (``ema`` or ``model``) of checkpoint ``init.checkpoint`` into ``model``; returns
    the source step. The model may have condition layers the source lacks (they start at zero)."""
    info = read_checkpoint_info(init.checkpoint)
    group = init.weights if init.weights in info.groups else "model"
    missing, unexpected = model.load_state_dict(read_weights(info.path, group), strict=False)
    missing = [name for name in missing if not name.startswith(CONDITIONS_PREFIX)]
    if missing or unexpected:
        raise ConfigError(f"init.checkpoint {init.checkpoint!r} does not fit the model (missing: "
                          f"{missing[:5]}, unexpected: {unexpected[:5]}); the model section must match the source")
    return info.step


class RunHooks:
    """The hooks of a run: progress bar, stats records, checkpoints and sample grids."""

    def __init__(self, trainer: Trainer, config: RunConfig, run_dir: Path, metadata: dict, log: RunLog):
        self.trainer, self.config, self.run_dir, self.metadata, self.log = trainer, config, run_dir, metadata, log
        self.training = config.training
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

        settings = self.config.sampling
        grid = dataclasses.replace(settings, num=min(settings.num, 64))
        network, transport = trainer.method.sampling_model(trainer.sampling_modules())
        try:
            samples = generate_samples(network, transport, grid, self.metadata["data_shape"],
                                       self.metadata["num_classes"], trainer.context.device, trainer.method.sampler())
        except NonFiniteSamples as error:
            self.log.message(f"step {trainer.step}: no sample grid written: {error}")
            return
        if trainer.context.is_main:
            write_png(samples.samples, samples.labels,
                      self.run_dir / "samples" / f"{step_directory_name(trainer.step)}.png")


def _build_trainer(config: RunConfig, dataset, latest: Optional[Path], context: DistributedContext
                   ) -> tuple[Trainer, list[str]]:
    """The trainer of a run, resumed from ``latest`` or started (from ``init.checkpoint`` when set); also the
    messages to show."""
    training = config.training
    seed_global_rngs(derive_seed(training.seed, INIT_STREAM), context.device)
    method = build_method(config)
    model = build_model(config, method.networks()[method.sampling_role])
    messages = []
    if training.precision == "bf16" and context.device.type != "cuda":
        messages.append(f"training.precision=bf16 applies on CUDA only; training in fp32 on {context.device}")
    pretrained = bool(config.init.checkpoint)
    if latest is None and pretrained:
        source_step = load_initial_weights(model, config.init)
        messages.append(f"initialised from {config.init.checkpoint} ({config.init.weights} weights, "
                        f"step {source_step})")
    networks = build_run_networks(config, method, model, pretrained)
    trainer = Trainer(method, networks, dataset, training, context)
    if latest is not None:
        trainer.load_checkpoint(latest)
        messages.append(f"resuming {latest.parent.parent} from {latest.name}")
    return trainer, messages


def _fit(trainer: Trainer, total: int, hooks: list[Hook], dataset) -> None:
    """Train to ``total`` steps; a ``ValueError`` of a step (data the method cannot train on) becomes a
    :class:`ConfigError` naming the step and the data."""
    try:
        trainer.fit(total, hooks)
    except ConfigError:
        raise
    except ValueError as error:
        raise ConfigError(f"training step {trainer.step + 1} failed: {error} (the data have shape "
                          f"{tuple(dataset.shape)} and {dataset.num_classes or 'no'} classes)") from error


def _train(config: RunConfig, run_dir: Path, context: DistributedContext, progress: Optional[bool],
           allow_changes: bool) -> Path:
    training = config.training
    check_run_directory(run_dir)
    dataset = build_dataset(config)
    config = with_data_defaults(config, dataset.shape, dataset.num_classes)
    latest = latest_checkpoint(run_dir)
    messages = [] if latest is None else check_resumable(run_dir, latest, config.values, context.world_size,
                                                         allow_changes)
    resumed_threads = read_checkpoint_info(latest).run.get("threads") if latest is not None else None
    threads = choose_threads(training.threads, int(os.environ.get("LOCAL_WORLD_SIZE", "1")), resumed_threads)
    hint = "" if threads.reason == "training.threads" else "; training.threads sets it"
    messages.append(f"{threads.threads} intra-op thread(s) per process ({threads.reason}{hint})")
    with intra_op_threads(threads.threads):
        trainer, build_messages = _build_trainer(config, dataset, latest, context)
        if context.is_main:
            run_dir.mkdir(parents=True, exist_ok=True)
            messages = clean_run_directory(run_dir, trainer.step, latest) + messages + build_messages
            save_config(config.values, run_dir / CONFIG_FILE)
        context.barrier()
        metadata = {"config": config.values, "normalisation": dataset.normalisation, "data_shape": list(dataset.shape),
                    "num_classes": dataset.num_classes,
                    "run": {"world_size": context.world_size, "threads": threads.threads}}
        total = training.total_steps()
        log = RunLog(run_dir, total, trainer.step, enabled=context.is_main, progress=progress,
                     label=f"train {Path(*run_dir.parts[-2:])}")
        try:
            for message in messages:
                log.message(message)
            hooks = RunHooks(trainer, config, run_dir, metadata, log)
            _fit(trainer, total, hooks.hooks(), dataset)
        finally:
            log.close()
    return run_dir


def run_training(config: RunConfig | dict, run_dir: Path | str, progress: Optional[bool] = None,
                 allow_changes: bool = False) -> Path:
    """Train (or resume) ``config`` (parsed, or a resolved dict parsed here, once) in ``run_dir``; joins the
    ``torchrun`` job when launched by it.

    ``progress``: ``None`` shows a progress bar on a terminal and plain progress lines otherwise, ``True`` forces
    the bar, ``False`` shows neither. ``allow_changes`` resumes even when the config or the number of processes
    differs from the run's.
    """
    run_dir = Path(run_dir)
    config = as_run_config(config)
    training = config.training
    with distributed_session(training.device, training.dist_timeout) as context:
        return _train(config, run_dir, context, progress, allow_changes)
