"""The reliability section of ``ucgm bench`` (not part of ``--quick`` unless named): fault drills.

JSON keys: ``reliability`` = ``{"sigkill_trials", "sigkill_exact", "checkpoint_write_kills",
"resumed_from_previous", "rank_death_exit_seconds", "shared_machine_slowdown", "batch_invariant_samplers"}``
(``shared_machine_slowdown``: a 400-step gmm run beside one busy process / alone, both with the default
``training.threads=auto``; ``batch_invariant_samplers``: the registry samplers whose samples are identical for batch
sizes 1, 7 and 64 up to the rounding of batched kernels, :data:`~ucgm.bench.reliability.ROUNDING_UNITS`) and ``reliability_details`` (every trial, the rank-death message, the shared-machine
timings with torch's default thread count for comparison, each sampler's largest difference). Protocol:
:mod:`ucgm.bench.reliability`. Targets: every SIGKILL trial exact (>= 10 trials, some during checkpoint writes),
the job ends within :data:`RANK_DEATH_TARGET` seconds of a rank's death, slowdown <= :data:`SLOWDOWN_TARGET`
and alone no slower than the default, every sampler batch-invariant.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from . import register_section
from .reliability import (FULL, QUICK, ROUNDING_UNITS, batch_invariance, rank_death_drill, shared_machine_drill,
                          sigkill_drill)

RANK_DEATH_TARGET = 60.0
SLOWDOWN_TARGET = 1.5


def run(quick: bool) -> dict:
    sizes = QUICK if quick else FULL
    with tempfile.TemporaryDirectory(prefix="ucgm-reliability-") as directory:
        workdir = Path(directory)
        kills = sigkill_drill(sizes, workdir / "sigkill")
        death = rank_death_drill(workdir / "rank-death")
        shared = shared_machine_drill(sizes, workdir / "shared")
        invariance = batch_invariance(workdir / "invariance")
    summary = {key: kills[key] for key in ("sigkill_trials", "sigkill_exact", "checkpoint_write_kills",
                                          "resumed_from_previous")}
    summary.update(rank_death_exit_seconds=death["exit_seconds"], shared_machine_slowdown=shared["slowdown_auto"],
                   batch_invariant_samplers=[name for name, value in invariance.items()
                                             if isinstance(value, float) and value <= ROUNDING_UNITS])
    details = {"sigkill": kills, "rank_death": death, "shared_machine": shared, "batch_differences": invariance,
               "sizes": vars(sizes)}
    return {"reliability": summary, "reliability_details": details}


def _verdict(met: bool) -> str:
    return "met" if met else "**missed**"


def markdown(report: dict) -> str:
    if "reliability" not in report:
        return ""
    summary, details = report["reliability"], report["reliability_details"]
    shared, death = details["shared_machine"], details["rank_death"]
    differences = details["batch_differences"]
    invariant = summary["batch_invariant_samplers"]
    rows = [
        ("SIGKILL trials, resumed stats.jsonl exact and no temporary files",
         f"{summary['sigkill_exact']} / {summary['sigkill_trials']}",
         _verdict(summary["sigkill_trials"] >= 10 and summary["sigkill_exact"] == summary["sigkill_trials"])),
        ("kills during a checkpoint write, resumed from the previous checkpoint (and said so)",
         f"{summary['resumed_from_previous']} / {summary['checkpoint_write_kills']}",
         _verdict(summary["checkpoint_write_kills"] > 0
                  and summary["resumed_from_previous"] == summary["checkpoint_write_kills"])),
        ("2-process gloo job, rank 1 killed: seconds until the job ended",
         f"{summary['rank_death_exit_seconds']:.1f} s",
         _verdict(summary["rank_death_exit_seconds"] <= RANK_DEATH_TARGET and death["names_the_rank"])),
        ("400-step gmm run beside a busy process / alone (threads auto)",
         f"{summary['shared_machine_slowdown']:.2f}", _verdict(summary["shared_machine_slowdown"] <= SLOWDOWN_TARGET)),
        (f"same with torch's default {shared['default_threads']} threads (before auto)",
         f"{shared['slowdown_default']:.2f}", "for comparison"),
        ("alone: auto / torch's default threads", f"{shared['alone_auto_vs_default']:.2f}",
         _verdict(shared["alone_auto_vs_default"] <= 1.05)),
        (f"samplers identical for batch sizes 1, 7, 64 (up to {ROUNDING_UNITS:g} rounding units)",
         f"{len(invariant)} / {len(differences)}",
         _verdict(len(invariant) == len(differences))),
    ]
    lines = ["## reliability", "", "| drill | result | target |", "|---|---|---|"]
    lines += [f"| {name} | {value} | {verdict} |" for name, value, verdict in rows]
    lines += ["", f"Methods of the SIGKILL trials: {', '.join(details['sigkill']['methods'])}. "
                  f"Rank-death message: `{death['message']}`. Shared machine: median training-loop seconds "
                  f"{ {key: round(value, 2) for key, value in shared['median_seconds'].items()} } over "
                  f"{shared['rounds']} interleaved round(s), load average at the end {shared['load_average']}."]
    others = {name: value for name, value in differences.items() if value != 0.0}
    if others:
        lines += ["", "Samplers not bitwise batch-invariant (largest difference in rounding units, or the error): " +
                  ", ".join(f"{name} ({value})" for name, value in others.items()) + "."]
    return "\n".join(lines)


register_section("reliability", run, markdown, in_quick=False)
