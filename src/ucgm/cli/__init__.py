"""The ``ucgm`` command line: ``train``, ``tune`` and ``sample`` here; ``quickstart``, ``evaluate``, ``bench`` and
``edit`` are handed to their own modules (``ucgm.<command>.main(argv)``).

Distributed training: ``torchrun --nproc_per_node N -m ucgm train CONFIG --run-dir DIR``.

Every command runs inside one error path (:func:`ucgm.cli.errors.run_command`): expected failures print
``ucgm COMMAND: error: ...`` and exit with status 2, unexpected ones keep their traceback.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from pathlib import Path
from typing import Callable, Optional, Sequence

from .. import __version__

COMMANDS = {
    "train": "train a model from a preset or YAML config (re-run to resume)",
    "tune": "tune a multi-step checkpoint into a few-step model (the config's tune: section)",
    "sample": "draw samples from a checkpoint into PNG / .npz / .safetensors files",
    "quickstart": "train and evaluate a small model end to end",
    "evaluate": "evaluate a checkpoint",
    "bench": "measure speed and quality targets",
    "edit": "edit data with a trained model",
    "search": "search a run's sampling steps (AutoDiffusion) and save the schedule",
}
#: Commands with a module of their own: ``module.main(argv)``.
DISPATCHED = {"quickstart": "ucgm.cli.quickstart", "evaluate": "ucgm.cli.evaluate", "bench": "ucgm.bench",
              "edit": "ucgm.cli.edit", "search": "ucgm.cli.search"}



def _usage() -> str:
    lines = ["usage: ucgm COMMAND [ARGS]", "", "commands:"]
    lines += [f"  {name:<11} {text}" for name, text in COMMANDS.items()]
    lines += ["", "Run `ucgm COMMAND --help` for the arguments of a command.",
              "Overrides are dotted keys (optimizer.lr=1e-3); `objective=NAME` sets objective.name."]
    return "\n".join(lines)


def _report(text: str) -> None:
    """Print a closing message once per job (rank 0 of a torchrun job)."""
    if os.environ.get("RANK", "0") == "0":
        print(text, file=sys.stderr)


def _add_overrides(parser: argparse.ArgumentParser, example: str) -> None:
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help=f"config overrides, values parsed as YAML (e.g. {example})")


def _training_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--run-dir", required=True, type=Path, help="run directory (created; resumed if it exists)")
    parser.add_argument("--steps", type=int, help="total optimisation steps (training.steps)")
    parser.add_argument("--checkpoint-every", type=int, help="steps between checkpoints (training.checkpoint_every)")
    parser.add_argument("--log-every", type=int, help="steps between stats records (training.log_every)")
    parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                        help="progress bar on a terminal, else a plain line every few seconds (default); "
                             "--no-progress: neither")
    parser.add_argument("--allow-changes", action="store_true",
                        help="resume even if the config or the number of processes differs from the run's")
    _add_overrides(parser, "optimizer.lr=1e-3 training.batch_size=128 objective=flow_matching")


def _flag_overrides(args: argparse.Namespace) -> list[str]:
    """Overrides from the dedicated flags; they come after the key=value ones and so take precedence."""
    overrides = list(args.overrides)
    if args.steps is not None:
        overrides += [f"training.steps={args.steps}", "training.kimg=null"]
    if args.checkpoint_every is not None:
        overrides.append(f"training.checkpoint_every={args.checkpoint_every}")
    if args.log_every is not None:
        overrides.append(f"training.log_every={args.log_every}")
    return overrides


# ------------------------------------------------------------------------------------------ commands
def _train(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="ucgm train", description=COMMANDS["train"])
    parser.add_argument("config", help="YAML path or preset name (gmm, digits, images, latent-dit)")
    _training_flags(parser)
    args = parser.parse_intermixed_args(argv)
    from .components import accepted_keys
    from .config import resolve_run_config
    from .train import run_training

    config = resolve_run_config(args.config, _flag_overrides(args), accepted_keys)
    run_dir = run_training(config, args.run_dir, progress=args.progress, allow_changes=args.allow_changes)
    _report(f"ucgm: run finished in {run_dir}")
    return 0


def _tune(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="ucgm tune", description=COMMANDS["tune"])
    parser.add_argument("source", help="multi-step checkpoint: run directory, checkpoint directory or model.safetensors")
    parser.add_argument("--recipe", help="a named recipe of the config's tune_recipes: section, merged over tune: "
                                         "(e.g. long: the gmm and digits presets' recipe for longer tuning)")
    _training_flags(parser)
    args = parser.parse_intermixed_args(argv)
    from .train import run_training
    from .tune import tune_config

    run_dir = run_training(tune_config(args.source, _flag_overrides(args), args.recipe), args.run_dir,
                           progress=args.progress, allow_changes=args.allow_changes)
    _report(f"ucgm: tuning finished in {run_dir}")
    return 0


def _sample_overrides(args: argparse.Namespace) -> list[str]:
    """``key=value`` (a bare sampling key such as ``nfe=4`` means ``sampling.nfe``) then the flags."""
    from .schema import section_keys

    sampling_fields = {key.split(".", 1)[1] for key in section_keys("sampling")}
    overrides = [f"sampling.{text}" if text.partition("=")[0] in sampling_fields else text for text in args.overrides]
    flags = {"num": args.num, "sampler": args.sampler, "nfe": args.nfe, "seed": args.seed, "batch_size": args.batch_size,
             "cfg_scale": args.cfg_scale, "labels": args.labels, "schedule": args.schedule}
    if args.schedule is not None and args.nfe is None:
        from ..sampling.schedules import read_schedule

        flags["nfe"] = read_schedule(args.schedule).nfe
    overrides += [f"sampling.{key}={value}" for key, value in flags.items() if value is not None]
    return overrides


def _sample(argv: Sequence[str]) -> int:
    from ..sampling.registry import SAMPLER_NAMES

    parser = argparse.ArgumentParser(prog="ucgm sample", description=COMMANDS["sample"])
    parser.add_argument("checkpoint", help="run directory, checkpoint directory or model.safetensors")
    parser.add_argument("--out", required=True, type=Path, action="append",
                        help="output file (.png grid / scatter, .npz, .safetensors); repeat for several")
    parser.add_argument("--num", type=int, help="number of samples (sampling.num)")
    parser.add_argument("--sampler", choices=SAMPLER_NAMES, help="sampler (sampling.sampler)")
    parser.add_argument("--nfe", type=int, help="network evaluations per sample (sampling.nfe)")
    parser.add_argument("--seed", type=int, help="noise seed; sample i uses the generator seeded by (seed, i)")
    parser.add_argument("--batch-size", type=int, help="samples per batch (results do not depend on it)")
    parser.add_argument("--labels", type=int, nargs="+", help="class labels, cycled over the samples")
    parser.add_argument("--cfg-scale", type=float, help="classifier-free guidance scale")
    parser.add_argument("--schedule", help="a searched schedule (ucgm search's DIR or DIR/schedule.json): its "
                                           "sampler, times and NFE (sampling.schedule)")
    parser.add_argument("--weights", choices=("ema", "model"), default="ema", help="weights to sample (default ema)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                        help="progress bar on a terminal, else a plain line every few seconds (default); "
                             "--no-progress: neither")
    _add_overrides(parser, "sampling.extrapolation=0.5, or without the section: nfe=8 gaps=[0.001,0.5]")
    args = parser.parse_intermixed_args(argv)
    from .sample import run_sampling

    overrides = _sample_overrides(args)
    samples, settings = run_sampling(args.checkpoint, args.out, overrides, args.weights, args.device, args.progress)
    print(f"ucgm: wrote {samples.samples.shape[0]} samples ({settings.sampler}, {samples.nfe} NFE) to "
          f"{', '.join(map(str, args.out))}", file=sys.stderr)
    return 0


def _dispatched_main(command: str) -> Callable[[Sequence[str]], int]:
    """Import the module of a dispatched command and run its ``main(argv)``."""

    def run(argv: Sequence[str]) -> int:
        try:
            module = importlib.import_module(DISPATCHED[command])
        except ModuleNotFoundError as error:
            if error.name != DISPATCHED[command]:
                raise
            raise ValueError(f"`ucgm {command}` is not available in this installation (no module "
                             f"{DISPATCHED[command]})") from error
        return module.main(list(argv))

    return run


HANDLERS: dict[str, Callable[[Sequence[str]], int]] = {"train": _train, "tune": _tune, "sample": _sample}


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the ``ucgm`` console script and of ``python -m ucgm``; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0 if argv else 2
    if argv[0] == "--version":
        print(f"ucgm {__version__}")
        return 0
    command, rest = argv[0], argv[1:]
    if command not in HANDLERS and command not in DISPATCHED:
        import difflib

        close = difflib.get_close_matches(command, list(COMMANDS), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        print(f"ucgm: error: unknown command {command!r}{hint}\n\n{_usage()}", file=sys.stderr)
        return 2
    from .errors import run_command

    return run_command(command, HANDLERS.get(command) or _dispatched_main(command), rest)
