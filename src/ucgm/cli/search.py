"""``ucgm search RUN --nfe N --out DIR``: AutoDiffusion's training-free search of a run's N sampling steps (and,
with ``--skip-budget``, of the blocks its backbone skips per step), judged on a separate evaluation set.

Writes ``DIR/schedule.json`` (the searched schedule: ``ucgm sample RUN --schedule DIR`` and ``ucgm evaluate RUN
--schedule DIR`` sample with it), ``DIR/search.json`` (records ``{schedule, nfe, metric, value}`` on the
evaluation set for ``uniform``, the sampler's default grid, ``kumaraswamy-search`` with ``--kumaraswamy`` and
``autodiffusion``; every evaluated candidate; the best value per generation) and ``DIR/search.md``, atomically.
Protocol: :mod:`ucgm.analysis.schedule_search` (sets and metrics) and :mod:`ucgm.analysis.autodiffusion`.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path
from typing import Optional

from ..analysis.autodiffusion import DEFAULT_LEVELS
from ..analysis.evolution import EvolutionSettings
from ..analysis.reports import run_ucgm_settings
from ..analysis.schedule_search import compare_schedules, search_sets
from ..atomic import atomic_write_text
from ..sampling.schedules import GRID_SAMPLERS, write_schedule
from ..sampling.seeded import UCGM_FAMILY
from ..training.distributed import resolve_device
from ..validation import check_positive_int
from .help_text import plain_text
from .sample import load_checkpoint_model


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ucgm search", description=plain_text(__doc__),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", help="run directory, checkpoint directory or model.safetensors")
    parser.add_argument("--nfe", type=int, required=True, help="network evaluations of the schedule")
    parser.add_argument("--out", type=Path, required=True, help="output directory (schedule.json, search.json/md)")
    parser.add_argument("--sampler", choices=GRID_SAMPLERS,
                        help="sampler whose steps are searched (default: the run's own when it takes a grid, "
                             "else ucgm)")
    parser.add_argument("--skip-budget", type=float,
                        help="also search skipped blocks: fraction of block evaluations allowed, e.g. 0.8")
    parser.add_argument("--kumaraswamy", action="store_true", help="also search UCGM-S's warp and kappa")
    parser.add_argument("--population", type=int, default=16, help="candidates per generation (default 16)")
    parser.add_argument("--generations", type=int, default=10, help="generations (default 10)")
    parser.add_argument("--elite", type=int, default=4, help="best candidates kept (top-k, default 4)")
    parser.add_argument("--mutation-probability", type=float, default=0.25, help="per-step mutation probability")
    parser.add_argument("--levels", type=int, default=DEFAULT_LEVELS, help="time levels t = k / levels (1000)")
    parser.add_argument("--num-search", type=int, default=1000, help="samples of the search set (default 1000)")
    parser.add_argument("--num-eval", type=int, default=2000, help="samples of the evaluation set (default 2000)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the search")
    parser.add_argument("--num-reference", type=int, default=20000,
                        help="exact mixture samples per reference (mixture runs; default 20000)")
    parser.add_argument("--eval-seed", type=int, default=0, help="noise seed of the evaluation set (ucgm evaluate's)")
    parser.add_argument("--weights", choices=("ema", "model"), default="ema", help="weights to sample (default ema)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto (default cpu)")
    return parser


def render_markdown(result: dict, header: dict) -> str:
    records = result["records"]
    lines = ["# ucgm search", "", f"Run `{header['run']}`, sampler `{header['sampler']}` at NFE {header['nfe']}; "
             f"search set {header['num_search']} samples, evaluation set {header['num_eval']} samples (seed "
             f"{header['eval_seed']}); {result['autodiffusion']['steps']} steps over "
             f"{result['autodiffusion']['levels']} time levels.", "", f"Command: `{header['command']}`", "",
             f"| schedule | {records[0]['metric']} (evaluation set) | search set |", "|---|---|---|"]
    for record in records:
        search = record.get("search_value")
        lines.append(f"| {record['schedule']} | {record['value']:.4g} | "
                     f"{'–' if search is None else f'{search:.4g}'} |")
    schedule = result["autodiffusion"]["schedule"]
    lines += ["", f"Searched times: {[round(t, 4) for t in schedule.times]}"]
    if schedule.skip_blocks is not None:
        lines.append(f"Skipped blocks per step: {schedule.skip_blocks}")
    return "\n".join(lines) + "\n"


def run_search(args: argparse.Namespace, command: str) -> dict:
    """Validate, search, write the three outputs; returns the comparison (:func:`compare_schedules`)."""
    check_positive_int("--nfe", args.nfe)
    check_positive_int("--num-search", args.num_search, minimum=2)
    check_positive_int("--num-eval", args.num_eval, minimum=2)
    check_positive_int("--num-reference", args.num_reference, minimum=2)
    settings = EvolutionSettings(population=args.population, generations=args.generations, elite=args.elite,
                                 mutation_probability=args.mutation_probability, seed=args.seed)
    device = resolve_device(args.device)
    loaded = load_checkpoint_model(args.run, args.weights, device)
    own_name, own_settings = loaded.method.sampler()
    sampler = args.sampler or (own_name if own_name in GRID_SAMPLERS else "ucgm")
    base = dict(own_settings) if sampler == own_name else {}
    if sampler in UCGM_FAMILY:
        base.update(run_ucgm_settings(loaded.config))
    info = loaded.info
    search, evaluation, metric = search_sets(loaded.config, info.data_shape, info.num_classes or 0,
                                             args.num_search, args.num_eval, args.eval_seed, device,
                                             args.num_reference)
    result = compare_schedules(loaded.model, loaded.transport, args.nfe, search, evaluation, metric, sampler, base,
                               settings, args.levels, args.skip_budget, args.kumaraswamy, args.eval_seed)
    report = result["autodiffusion"]
    report["schedule"].search.update(run=str(info.path), step=info.step, weights=args.weights, metric=metric)
    args.out.mkdir(parents=True, exist_ok=True)
    write_schedule(report["schedule"], args.out / "schedule.json")
    payload = {"records": result["records"], "candidates": report["candidates"], "history": report["history"],
               "schedule": report["schedule"].to_dict(), "command": command}
    atomic_write_text(args.out / "search.json", json.dumps(payload, indent=2, default=list) + "\n")
    header = {"run": str(info.path), "sampler": sampler, "nfe": args.nfe, "num_search": args.num_search,
              "num_eval": args.num_eval, "eval_seed": args.eval_seed, "command": command}
    atomic_write_text(args.out / "search.md", render_markdown(result, header))
    return result


def main(argv: Optional[list[str]] = None) -> int:
    argv = list(sys.argv[2:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    result = run_search(args, "ucgm search " + shlex.join(argv))
    values = ", ".join(f"{record['schedule']} {record['value']:.4g}" for record in result["records"])
    print(f"ucgm search: wrote {args.out / 'schedule.json'} ({result['records'][0]['metric']} on the evaluation "
          f"set: {values})", file=sys.stderr)
    return 0
