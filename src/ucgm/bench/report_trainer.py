"""The trainer section of ``ucgm bench``: the trainer's throughput against a minimal hand-written loop.

JSON keys: ``trainer_vs_minimal_loop`` = trainer steps/s / :func:`~ucgm.bench.minimal_loop.minimal_training_loop`
steps/s with the ``gmm`` preset's model, batch and objective (residual MLP, batch 256, UCGM-T with the enhanced
target and an EMA reference network), target >= :data:`TARGET`; ``trainer_vs_minimal_loop_details`` per preset.

Protocol: one process, one intra-op thread, the same initial weights and the same ready-made batches for both
loops, run in alternating blocks of ``block_steps`` steps; a block's throughput is steps / seconds and each loop's
throughput is the median over its blocks. The trainer runs its real ``train_step`` with the like-for-like config
of :mod:`ucgm.bench.throughput` (no EMA, clipping or warm-up; no hooks, so nothing is logged or saved).
``minimal_training_loop`` builds its optimizer and reference copy on every call, so a minimal block is timed as a
call of ``block_steps + 1`` steps minus a call of one step (set-up and first step cancel). For information, in the
same rounds: the trainer with the preset's own training features (evaluation EMA, warm-up, clipping as
configured) on the same batches, and that trainer drawing every batch from the dataset as a run does.
"""

from __future__ import annotations

import copy
import statistics
import time
from dataclasses import dataclass
from typing import Callable

from . import register_section
from ..cli.components import accepted_keys, build_method
from ..cli.config import resolve_config
from .minimal_loop import minimal_training_loop
from .throughput import like_for_like, make_trainer, single_thread, trainer_block, training_setup

TARGET = 0.97
#: The preset whose ratio is the headline number.
HEADLINE_PRESET = "gmm"


@dataclass(frozen=True)
class BlockSizes:
    """Steps per timed block, timed rounds and untimed warm-up rounds for one preset."""

    block_steps: int
    rounds: int
    warmup_rounds: int = 1


QUICK = {"gmm": BlockSizes(block_steps=10, rounds=15)}
FULL = {"gmm": BlockSizes(block_steps=20, rounds=25, warmup_rounds=2),
        "digits": BlockSizes(block_steps=4, rounds=11)}


def _seconds(run: Callable[[], object]) -> float:
    start = time.perf_counter()
    run()
    return time.perf_counter() - start


def measure_preset(preset: str, sizes: BlockSizes) -> dict:
    """Median block throughputs (steps/s) of the trainer, the minimal loop and the trainer with default features."""
    default_config = resolve_config(preset, ["training.device=cpu"], accepted_keys)
    setup = training_setup(default_config)
    config = like_for_like(setup.config)
    lr = config.optimizer.lr
    minimal_model = copy.deepcopy(setup.model)
    minimal_objective = build_method(config)
    steps = sizes.block_steps

    def minimal_block() -> float:
        setup_seconds = _seconds(lambda: minimal_training_loop(minimal_model, minimal_objective, setup.batches, 1, lr))
        total_seconds = _seconds(lambda: minimal_training_loop(minimal_model, minimal_objective, setup.batches,
                                                               steps + 1, lr))
        return total_seconds - setup_seconds

    blocks = {
        "trainer": trainer_block(make_trainer(config, setup.model, setup.batches), steps),
        "default_features": trainer_block(make_trainer(setup.config, setup.model, setup.batches), steps),
        "dataset_batches": trainer_block(make_trainer(setup.config, setup.model), steps),
    }
    throughputs: dict[str, list[float]] = {name: [] for name in ("trainer", "minimal", *list(blocks)[1:])}
    with single_thread():
        for round_index in range(sizes.warmup_rounds + sizes.rounds):
            seconds = {"trainer": _seconds(blocks["trainer"]), "minimal": minimal_block()}
            seconds.update({name: _seconds(block) for name, block in blocks.items() if name != "trainer"})
            if round_index >= sizes.warmup_rounds:
                for name, value in seconds.items():
                    throughputs[name].append(steps / value)
    medians = {name: statistics.median(values) for name, values in throughputs.items()}
    paired = [trainer / minimal for trainer, minimal in zip(throughputs["trainer"], throughputs["minimal"])]
    training = setup.config.values["training"]
    return {
        "ratio": medians["trainer"] / medians["minimal"],
        "paired_ratio_median": statistics.median(paired),
        "steps_per_second": medians,
        "overhead_microseconds_per_step": 1e6 * (1 / medians["trainer"] - 1 / medians["minimal"]),
        "default_features_vs_minimal": medians["default_features"] / medians["minimal"],
        "dataset_batches_vs_minimal": medians["dataset_batches"] / medians["minimal"],
        "default_features": {"ema": training["ema"], "warmup_steps": setup.config.optimizer.warmup_steps,
                             "grad_clip": setup.config.optimizer.grad_clip},
        "model": setup.config.section("model"), "batch_size": training["batch_size"],
        "objective": setup.config.section("objective")["name"], "block_steps": steps, "rounds": sizes.rounds,
        "threads": 1,
    }


def run(quick: bool) -> dict:
    presets = {preset: measure_preset(preset, sizes) for preset, sizes in (QUICK if quick else FULL).items()}
    ratio = presets[HEADLINE_PRESET]["ratio"]
    return {"trainer_vs_minimal_loop": ratio,
            "trainer_vs_minimal_loop_details": {"target": TARGET, "met": ratio >= TARGET,
                                                "headline_preset": HEADLINE_PRESET, "presets": presets}}


def _model_text(result: dict) -> str:
    model = result["model"]
    shape = {key: value for key, value in model.items() if key in ("hidden", "depth", "base_channels")}
    return f"{model['name']} {shape}, batch {result['batch_size']}, objective {result['objective']}"


def markdown(report: dict) -> str:
    if "trainer_vs_minimal_loop" not in report:
        return ""
    details = report["trainer_vs_minimal_loop_details"]
    lines = ["## Trainer throughput / minimal hand-written loop", "",
             "Same model, batch, objective, initial weights and ready-made batches; alternating blocks, one thread, "
             "median block throughput. Trainer: real `train_step`, no EMA / clipping / warm-up / hooks. "
             "Default features: the preset's EMA, warm-up and clipping; + dataset: every batch drawn from the "
             "dataset as in a run (information only).", "",
             "| preset | model | trainer steps/s | minimal loop steps/s | ratio | target | overhead / step | "
             "default features (ratio) | + dataset batches (ratio) |", "|---|---|---|---|---|---|---|---|---|"]
    for preset, result in details["presets"].items():
        rates = result["steps_per_second"]
        verdict = ("met" if result["ratio"] >= TARGET else "MISSED") if preset == details["headline_preset"] else "info"
        lines.append(f"| {preset} | {_model_text(result)} | {rates['trainer']:.1f} | {rates['minimal']:.1f} | "
                     f"**{result['ratio']:.3f}** | {verdict} (>= {TARGET}) | "
                     f"{result['overhead_microseconds_per_step']:.0f} µs | {rates['default_features']:.1f} "
                     f"({result['default_features_vs_minimal']:.3f}) | {rates['dataset_batches']:.1f} "
                     f"({result['dataset_batches_vs_minimal']:.3f}) |")
    return "\n".join(lines)


register_section("trainer", run, markdown)
