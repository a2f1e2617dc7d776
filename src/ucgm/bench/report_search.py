"""The search section of ``ucgm bench``: four sampling schedules of UCGM-S at NFE 4 and 8 on the evaluation set.

JSON keys: ``search`` (records ``{dataset, schedule, nfe, metric, value, ...}``) and ``search_details`` (sizes,
evolution settings, searched times, whether the searched NFE-4 schedule beats the uniform one). Protocol:
:mod:`ucgm.bench.search`.
"""

from __future__ import annotations

from . import register_section
from .search import FULL, NFES, QUICK, run_search_bench
from .throughput import single_thread

SCHEDULES = ("uniform", "ucgm-default", "kumaraswamy-search", "autodiffusion")


def run(quick: bool) -> dict:
    with single_thread():
        return run_search_bench(QUICK if quick else FULL)


def markdown(report: dict) -> str:
    if "search" not in report:
        return ""
    records, details = report["search"], report["search_details"]
    sizes = details["sizes"]
    lines = ["## Sampling-schedule search (AutoDiffusion, Kumaraswamy)", "",
             f"Produced by `{report['meta']['command']}` ({'quick' if report['meta']['quick'] else 'full'} size, "
             f"{details['seconds']:.0f} s). UCGM-S; evolution: population {sizes['population']}, "
             f"{sizes['generations']} generations, top {sizes['elite']}; values on the evaluation set (search set "
             "in brackets).", "",
             "| dataset | metric | schedule | " + " | ".join(f"NFE {n}" for n in NFES) + " |",
             "|---|---|---|" + "---|" * len(NFES)]
    for dataset in dict.fromkeys(r["dataset"] for r in records):
        for schedule in SCHEDULES:
            rows = {r["nfe"]: r for r in records if (r["dataset"], r["schedule"]) == (dataset, schedule)}
            metric = next(iter(rows.values()))["metric"]
            cells = [f"{rows[n]['value']:.4g}" + (f" ({rows[n]['search_value']:.4g})" if rows[n].get("search_value")
                                                  is not None else "") for n in NFES]
            lines.append(f"| {dataset} | {metric} | {schedule} | " + " | ".join(cells) + " |")
    wins = details["nfe4_beats_uniform"]
    lines += ["", "Searched NFE-4 schedule beats uniform on the evaluation set: " +
              ", ".join(f"{dataset} {'yes' if won else 'no'}" for dataset, won in wins.items()) + "."]
    return "\n".join(lines)


register_section("search", run, markdown)
