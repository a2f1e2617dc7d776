"""``ucgm evaluate RUN_DIR_OR_CHECKPOINT --out DIR``: sample a checkpoint at several NFE with several samplers and
measure its dataset's metrics.

Writes ``DIR/metrics.json`` (a list of records ``{dataset, model, sampler, nfe, metric, value}`` plus ``budget``,
``settings``, ``seed``, ``num_samples``, ``step``, ``weights`` and, for FID-style metrics, ``protocol``),
``DIR/metrics.md`` (one table per metric, rows sampler, columns NFE) and ``DIR/nfe_quality.png``, each atomically.
Baseline records (``nfe = 0``) hold the reference values, e.g. the sample-noise floor of exact mixture samples.

Samplers: ``--sampler NAME[:KEY=VALUE[:KEY=VALUE ...]],...`` (default: the run's own method sampler, e.g. ``cm-multistep`` for a consistency model), e.g.
``--sampler ucgm,euler,heun,ucgm:extrapolation=0.3:time_warp=[1.2,1,1]``. The ``ucgm`` family starts from the run's
own ``sampling`` settings (stochasticity, extrapolation, time_warp, gaps, time_difference: a tuned few-step run
samples as it was tuned to), which the spec's settings override; the records hold the effective settings.
``--schedule DIR`` evaluates a schedule found by ``ucgm search`` (its sampler, times and skipped blocks) at its NFE,
labelled ``schedule:DIR``, next to the ``--sampler`` ones. ``--match-euler`` also writes ``DIR/nfe_match.json``: the
smallest NFE at which ``ucgm`` (the run's settings) is at least as good as Euler at 250 NFE on the suite's first
metric (:func:`ucgm.analysis.nfe_match.match_reference`; keys ``smallest_nfe``, ``values``, ``reference_value``,
``metric``, ...), also stated in ``metrics.md``.

Metrics (see :mod:`ucgm.metrics.suites`): 2-D mixtures: sliced W2 against the exact mixture, mode statistics and
exact mean log-likelihood; digits: digits FD; other data: sliced W2 and MMD against the run's data (or the data
named by ``--reference-data KEY=VALUE``). ``--fid`` / ``--fd-dinov2`` add FID / FD-DINOv2 for image data, from
local weight files only (see :mod:`ucgm.metrics.fid`).
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

import torch

from ..analysis.reports import (
    SPEC_SYNTAX,
    SamplerSpec,
    draw_samples,
    effective_settings,
    jsonable_settings,
    markdown_tables,
    parse_nfe_list,
    parse_sampler_specs,
    plot_nfe_quality,
    run_ucgm_settings,
)
from ..analysis.nfe_match import REFERENCE_SAMPLER, match_reference
from ..metrics.fid import DINOv2Features, InceptionFeatures, MissingWeightsError
from ..metrics.suites import FeatureDistance, MetricSuite, build_metric_suite
from ..sampling.registry import get_sampler
from ..sampling.schedules import read_schedule
from ..atomic import atomic_write_text
from ..training.checkpoint import CheckpointError
from ..training.distributed import resolve_device
from .progress import Progress
from .help_text import plain_text
from .sample import LoadedCheckpoint, load_checkpoint_model
from ..validation import ConfigError
from ..yaml_io import parse_yaml
from ..validation import check_positive_int

DEFAULT_NFES = "1,2,4,8,16,32,64"


def default_model_name(checkpoint: Path | str) -> str:
    """The run directory's name (or the file's directory for a weights file)."""
    path = Path(checkpoint).resolve()
    return path.parent.name if path.is_file() else path.name


def _preflight(network, transport, samplers: dict, nfes: Sequence[int], shape: Sequence[int],
               num_classes: int, device: torch.device) -> None:
    """Run every sampler at every budget on one sample, so that bad settings fail before the long work."""
    for label, sampler in samplers.items():
        for nfe in nfes:
            draw_samples(network, transport, sampler, nfe, shape, num_classes, num=1, device=device, label=label)


def evaluate_checkpoint(loaded: LoadedCheckpoint, specs: Sequence[SamplerSpec], nfes: Sequence[int],
                        suite: MetricSuite, num: int, seed: int = 0, batch_size: int = 1000, model_name: str = "model",
                        weights: str = "ema", device: torch.device | str = "cpu", progress: Optional[bool] = False
                        ) -> list[dict]:
    """Records of every (sampler, NFE) on the same seeded noise, then the suite's baselines (``nfe = 0``);
    ``progress`` is the mode of :class:`~ucgm.cli.progress.Progress` (``None``: a bar on a terminal, else lines)."""
    info = loaded.info
    if info.data_shape is None:
        raise CheckpointError(f"{str(info.path)!r} does not record the data shape; cannot draw noise")
    network, transport = loaded.model, loaded.transport
    device = torch.device(device)
    num_classes = info.num_classes or 0
    run_settings = run_ucgm_settings(loaded.config)
    method_sampler = loaded.method.sampler()
    specs = specs or [SamplerSpec(method_sampler[0], method_sampler[0], {})]
    settings = {spec.label: effective_settings(spec, run_settings, method_sampler) for spec in specs}
    samplers = {spec.label: get_sampler(spec.name, settings[spec.label]) for spec in specs}
    _preflight(network, transport, samplers, nfes, info.data_shape, num_classes, device)
    common = {"dataset": suite.dataset, "model": model_name}
    extra = {"seed": seed, "num_samples": num, "step": info.step, "weights": weights}
    records = []
    jobs = [(spec, nfe) for spec in specs for nfe in nfes]
    bar = Progress("ucgm evaluate", len(jobs), "job", mode=progress)
    for spec, nfe in jobs:
        drawn = draw_samples(network, transport, samplers[spec.label], nfe, info.data_shape, num_classes, num, seed,
                             batch_size, device, spec.label)
        bar.update()
        for measured in suite.evaluate(drawn.samples, drawn.labels):
            if not math.isfinite(measured.value):
                raise ValueError(f"metric {measured.metric} of sampler {spec.label!r} at NFE budget {nfe} is "
                                 f"{measured.value}; no report was written")
            record = {**common, "sampler": spec.label, "nfe": drawn.nfe, "metric": measured.metric,
                      "value": measured.value, "budget": nfe, "settings": jsonable_settings(settings[spec.label]),
                      **extra}
            if measured.protocol is not None:
                record["protocol"] = measured.protocol
            records.append(record)
    bar.close()
    for measured in suite.baselines():
        records.append({"dataset": suite.dataset, "model": "reference data", "sampler": suite.baseline_name,
                        "nfe": 0, "metric": measured.metric, "value": measured.value, "budget": 0,
                        "num_samples": num, **({"protocol": measured.protocol} if measured.protocol else {})})
    return records


def match_euler(loaded: LoadedCheckpoint, suite: MetricSuite, num: int, seed: int, batch_size: int,
                device: torch.device | str = "cpu") -> dict:
    """The smallest NFE at which ``ucgm`` with the run's settings is at least as good as Euler at 250 NFE on the
    suite's first metric (lower is better), same seeded noise for every budget."""
    info = loaded.info
    settings = {"ucgm": effective_settings(SamplerSpec("ucgm", "ucgm", {}), run_ucgm_settings(loaded.config)),
                REFERENCE_SAMPLER: {}}
    metric_names = []

    def score(name: str, nfe: int) -> float:
        drawn = draw_samples(loaded.model, loaded.transport, get_sampler(name, settings[name]), nfe, info.data_shape,
                             info.num_classes or 0, num, seed, batch_size, device, name)
        first = suite.evaluate(drawn.samples, drawn.labels)[0]
        metric_names.append(first.metric)
        return first.value

    found = match_reference(score, "ucgm")
    return {**found, "metric": metric_names[0], "settings": jsonable_settings(settings["ucgm"])}


def render_markdown(records: Sequence[dict], header: dict) -> str:
    """The tables with a header naming the checkpoint, the protocol and the command."""
    lines = ["# ucgm evaluate", "",
             f"Checkpoint `{header['checkpoint']}` (step {header['step']}, {header['weights']} weights); "
             f"{header['num']} samples per cell, noise seed {header['seed']}; {header['seconds']:.0f} s.", "",
             f"Command: `{header['command']}`", "",
             "Columns are NFE budgets; `(n=...)` marks a sampler that spends fewer calls than its budget. "
             "Baselines are reference values, e.g. exact samples against the reference (the sample-noise floor).",
             "", markdown_tables(records), "![quality against NFE](nfe_quality.png)", ""]
    return "\n".join(lines)


def feature_distances(args: argparse.Namespace) -> list[FeatureDistance]:
    """The opt-in FID / FD-DINOv2 extractors (their files must exist; see ``ucgm.metrics.fid``)."""
    chosen = []
    if args.fid:
        chosen.append(FeatureDistance("fid", InceptionFeatures(args.inception_weights, device=str(args.device))))
    if args.fd_dinov2:
        chosen.append(FeatureDistance("fd_dinov2", DINOv2Features(args.dinov2_repo, args.dinov2_weights,
                                                                  device=str(args.device))))
    return chosen


def parse_data_overrides(assignments: Sequence[str]) -> dict:
    """``["root=data/val", "image_size=32"]`` -> ``{"root": "data/val", "image_size": 32}`` (values as YAML)."""
    overrides = {}
    for assignment in assignments:
        key, equals, value = assignment.partition("=")
        if not equals or not key.strip():
            raise ValueError(f"--reference-data {assignment!r} must be KEY=VALUE, e.g. root=data/heldout")
        overrides[key.strip()] = parse_yaml(value)
    return overrides


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ucgm evaluate", description=plain_text(__doc__),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="run directory, checkpoint directory or model.safetensors")
    parser.add_argument("--out", required=True, type=Path, help="output directory (metrics.json, metrics.md, png)")
    parser.add_argument("--nfe", default=None, help=f"comma-separated NFE budgets (default {DEFAULT_NFES}, or the "
                                                   f"schedule's NFE with --schedule)")
    parser.add_argument("--schedule", action="append", default=[], metavar="FILE",
                        help="evaluate a searched schedule (ucgm search's DIR or DIR/schedule.json), labelled "
                             "schedule:FILE, next to the --sampler ones; repeat for several")
    parser.add_argument("--sampler", default=None, help=f"samplers: {SPEC_SYNTAX} (default: the run's own "
                                                       f"method sampler)")
    parser.add_argument("--num", type=int, default=5000, help="samples per sampler and NFE (default 5000)")
    parser.add_argument("--seed", type=int, default=0, help="noise seed; sample i starts from generator (seed, i)")
    parser.add_argument("--weights", choices=("ema", "model"), default="ema", help="weights to sample (default ema)")
    parser.add_argument("--batch-size", type=int, default=1000, help="samples per batch (default 1000)")
    parser.add_argument("--num-reference", type=int, default=20000,
                        help="reference samples (exact mixture draws or data rows; default 20000)")
    parser.add_argument("--reference-data", nargs="+", default=[], metavar="KEY=VALUE",
                        help="override options of the run's data section for the reference set (file-based data), "
                             "e.g. root=data/heldout")
    parser.add_argument("--model-name", help="model name in the records (default: the run directory's name)")
    parser.add_argument("--fid", action="store_true", help="add FID (image data; needs the Inception file)")
    parser.add_argument("--inception-weights", help="TorchScript inception-2015-12-05.pt "
                                                    "(default $UCGM_INCEPTION_WEIGHTS)")
    parser.add_argument("--fd-dinov2", action="store_true", help="add FD-DINOv2 (image data; needs local DINOv2)")
    parser.add_argument("--dinov2-repo", help="local facebookresearch/dinov2 clone (default $UCGM_DINOV2_REPO)")
    parser.add_argument("--dinov2-weights", help="dinov2_vitl14_pretrain.pth (default $UCGM_DINOV2_WEIGHTS)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto (default cpu)")
    parser.add_argument("--match-euler", action="store_true",
                        help="also find the smallest NFE at which ucgm matches Euler at 250 NFE (nfe_match.json)")
    parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                        help="progress bar on a terminal, else a plain line every few seconds (default); "
                             "--no-progress: neither")
    return parser


def run_evaluate(args: argparse.Namespace, command: str) -> list[dict]:
    """Validate the arguments, evaluate, write the three outputs; returns the records."""
    started = time.perf_counter()
    if args.out.exists() and not args.out.is_dir():
        raise ValueError(f"--out {str(args.out)!r} is an existing file; --out names a directory (metrics.json, "
                         f"metrics.md and nfe_quality.png are written into it, created when missing)")
    schedules = {f"schedule:{path}": read_schedule(path) for path in args.schedule}
    nfes = parse_nfe_list(args.nfe or ",".join(dict.fromkeys(str(s.nfe) for s in schedules.values()))
                          or DEFAULT_NFES)
    specs = parse_sampler_specs(args.sampler) if args.sampler else []
    specs += [SamplerSpec(label, schedule.sampler, schedule.sampler_settings()) for label, schedule in schedules.items()]
    check_positive_int("--num", args.num, minimum=2)
    check_positive_int("--batch-size", args.batch_size)
    check_positive_int("--num-reference", args.num_reference, minimum=2)
    overrides = parse_data_overrides(args.reference_data)
    args.device = resolve_device(args.device)
    loaded = load_checkpoint_model(args.checkpoint, args.weights, args.device)
    suite = build_metric_suite(loaded.config, args.num, loaded.info.num_classes or 0, args.num_reference,
                               overrides, feature_distances(args))
    progress = args.progress
    model_name = args.model_name or default_model_name(args.checkpoint)
    records = evaluate_checkpoint(loaded, specs, nfes, suite, args.num, args.seed, args.batch_size, model_name,
                                  args.weights, args.device, progress)
    match = match_euler(loaded, suite, args.num, args.seed, args.batch_size, args.device) if args.match_euler else None
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out / "metrics.json", json.dumps(records, indent=2) + "\n")
    if match is not None:
        atomic_write_text(args.out / "nfe_match.json", json.dumps(match, indent=2) + "\n")
    plot_nfe_quality(records, args.out / "nfe_quality.png")
    header = {"checkpoint": str(loaded.info.path), "step": loaded.info.step, "weights": args.weights, "num": args.num,
              "seed": args.seed, "seconds": time.perf_counter() - started,
              "command": command}
    text = render_markdown(records, header)
    if match is not None:
        found = match["smallest_nfe"]
        text += (f"\nSmallest NFE at which `ucgm` matches Euler at {match['reference_nfe']} NFE ({match['metric']} "
                 f"{match['reference_value']:.4g}): **{'none scanned' if found is None else found}** "
                 f"(scanned: {json.dumps(match['values'])}).\n")
    atomic_write_text(args.out / "metrics.md", text)
    return records


def main(argv: Optional[list[str]] = None) -> int:
    argv = list(sys.argv[2:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    try:
        records = run_evaluate(args, "ucgm evaluate " + shlex.join(argv))
    except (ValueError, ConfigError, CheckpointError, MissingWeightsError) as error:
        print(f"ucgm evaluate: error: {error}", file=sys.stderr)
        return 2
    print(f"ucgm evaluate: wrote {len(records)} records to {args.out / 'metrics.json'}, metrics.md and "
          "nfe_quality.png", file=sys.stderr)
    return 0
