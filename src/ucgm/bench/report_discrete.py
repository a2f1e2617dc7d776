"""The discrete section of ``ucgm bench``: Analog Bits' total variation / FD with and without self-conditioning.

JSON keys: ``discrete`` (records ``{dataset, method, sampler, nfe, metric, value, consistency_ratio,
self_conditioning}``) and ``discrete_details`` (sizes, floors, training seconds, verdicts). Protocol:
:mod:`ucgm.bench.discrete`; one intra-op thread.
"""

from __future__ import annotations

from . import register_section
from .discrete import FULL, QUICK, run_discrete
from .throughput import single_thread

METRICS = {"categorical": "tv", "quantised_digits": "digits_fd"}


def run(quick: bool) -> dict:
    with single_thread():
        return run_discrete(QUICK if quick else FULL)


def _table(records: list[dict], dataset: str) -> list[str]:
    rows = [r for r in records if r["dataset"] == dataset and r["metric"] == METRICS[dataset]]
    lines = ["| method | sampler | " + " | ".join(f"NFE {n}" for n in sorted({r["nfe"] for r in rows})) + " |"]
    nfes = sorted({r["nfe"] for r in rows})
    lines.append("|---|---|" + "---|" * len(nfes))
    for method, sampler in dict.fromkeys((r["method"], r["sampler"]) for r in rows):
        values = {r["nfe"]: r["value"] for r in rows if (r["method"], r["sampler"]) == (method, sampler)}
        lines.append(f"| {method} | {sampler} | " + " | ".join(f"{values[n]:.4g}" if n in values else "–"
                                                               for n in nfes) + " |")
    return lines


def markdown(report: dict) -> str:
    if "discrete" not in report:
        return ""
    details, records = report["discrete_details"], report["discrete"]
    sizes, floors = details["sizes"], details["floors"]
    lines = ["## Analog Bits: discrete data with continuous models", "",
             f"Produced by `{report['meta']['command']}` ({'quick' if report['meta']['quick'] else 'full'} size, "
             f"{details['seconds']:.0f} s). Presets `categorical-bits` ({sizes['categorical_steps']} steps, MLP "
             f"width {sizes['hidden']}) and `digits-bits` ({sizes['digits_steps']} steps); EMA weights; UCGM-S.", "",
             f"**categorical** (8x8 cells, exact TV of {sizes['num_categorical']} decoded samples; floor of exact "
             f"draws {floors['categorical']['tv']:.4g}):", "", *_table(records, "categorical"), "",
             f"**quantised digits** (8 grey levels, digits FD of {sizes['num_digits']} decoded samples; floor "
             f"{floors['quantised_digits']['digits_fd']:.4g}):", "", *_table(records, "quantised_digits"), ""]
    for name, verdict in details["verdicts"].items():
        lines.append(f"- {name}: mean {verdict['metric']} {verdict['without']:.4g} without, {verdict['with']:.4g} "
                     f"with self-conditioning ({'lower' if verdict['self_conditioning_lowers'] else 'not lower'}).")
    return "\n".join(lines)


register_section("discrete", run, markdown)
