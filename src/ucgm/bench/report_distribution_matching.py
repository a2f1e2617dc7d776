"""The distribution_matching section of ``ucgm bench``: few-step quality of DMD, DMD2, MSD, SIM, CoSIM (and rows
other sections add through :data:`~ucgm.bench.distribution_matching.EXTRA_RECORDS`) and their step cost.

JSON keys: ``distribution_matching`` (records ``{dataset, method, sampler, nfe, metric, value}``),
``distribution_matching_cost`` (``{method: step time / flow-matching step time}``) and
``distribution_matching_details`` (sizes, floors, the targets). Protocol: :mod:`ucgm.bench.distribution_matching`;
everything runs on one intra-op thread.
"""

from __future__ import annotations

from . import register_section
from .distribution_matching import EXTRA_RECORDS, FULL, QUICK, run_distribution_matching
from .guided_distillation import claim_lines, guided_distillation_records
from .throughput import single_thread

METRIC_TEXT = {"sliced_w2": "sliced W2", "mode_coverage": "modes covered", "digits_fd": "digits FD"}


def run(quick: bool) -> dict:
    with single_thread():
        return run_distribution_matching(QUICK if quick else FULL)


def _table(records: list[dict]) -> list[str]:
    columns = sorted({(row["metric"], row["nfe"]) for row in records},
                     key=lambda column: (list(METRIC_TEXT).index(column[0]) if column[0] in METRIC_TEXT else 9,
                                         column[1]))
    lines = ["| dataset | method | sampler | " + " | ".join(f"{METRIC_TEXT.get(m, m)} NFE {n}" for m, n in columns)
             + " |", "|---|---|---|" + "---|" * len(columns)]
    keys = list(dict.fromkeys((row["dataset"], row["method"], row["sampler"]) for row in records))
    for dataset, method, sampler in keys:
        values = {(row["metric"], row["nfe"]): row["value"] for row in records
                  if (row["dataset"], row["method"], row["sampler"]) == (dataset, method, sampler)}
        cells = [f"{values[column]:.4g}" if column in values else "" for column in columns]
        lines.append(f"| {dataset} | {method} | {sampler} | " + " | ".join(cells) + " |")
    return lines


def _target_lines(details: dict) -> list[str]:
    targets = details["targets"]
    first = targets["dmd2_vs_flow_matching"]
    ratio = "not measured" if first["ratio"] is None else f"{first['ratio']:.2f}"
    students = targets["students"]
    return [f"- dmd2 at NFE 1 / flow matching at NFE 64 (sliced W2): {ratio} (target <= {first['target']}), "
            f"modes covered {first['mode_coverage']}: {'met' if first['met'] else 'missed'}.",
            f"- two-time-scale rule (sliced W2, modes covered at NFE 1): official ratio "
            f"{targets['two_time_scale']['official_ratio']['nfe1']}, 1:1 {targets['two_time_scale']['one_to_one']['nfe1']}.",
            f"- 4 students vs 1 ({students['parameters']} generator parameters): {students['four']['nfe1']} vs "
            f"{students['one']['nfe1']} at NFE 1."]


def markdown(report: dict) -> str:
    if "distribution_matching" not in report:
        return ""
    details = report["distribution_matching_details"]
    sizes, floors = details["sizes"], details["floors"]
    cost = ", ".join(f"{method} {value:.2f}" for method, value in report["distribution_matching_cost"].items())
    lines = ["## Distribution matching: one- and two-step quality and step cost", "",
             f"Produced by `{report['meta']['command']}` ({'quick' if report['meta']['quick'] else 'full'} size, "
             f"{details['seconds']:.0f} s, one thread). Trained by ucgm's trainer from the presets' `objectives:` "
             f"defaults, {sizes['gmm_steps']} steps per distribution-matching run on the GMM (exact oracle "
             f"teacher; flow matching {sizes['flow_matching_steps']} steps, whose EMA weights start both gmm dmd2 "
             f"generators), digits dmd2 {sizes['digits_steps']} "
             f"steps from a {sizes['digits_teacher_steps']}-step flow-matching teacher; EMA weights, each method's "
             f"own sampler. Floors (exact data): sliced W2 {floors['gmm']['mean']:.4g}, digits FD "
             f"{floors['digits']['mean']:.4g}. {details['mode_coverage']}.", "",
             *_table(report["distribution_matching"]), "",
             f"Step cost / flow-matching step (interleaved, flow matching "
             f"{details['flow_matching_step_seconds'] * 1e3:.1f} ms): {cost}.", "", *_target_lines(details),
             *claim_lines(report["distribution_matching"])]
    if sizes["gmm_steps"] < 1000:
        lines.append("Quick size: the models are far from converged; the table checks the pipeline, not the methods.")
    return "\n".join(lines)


EXTRA_RECORDS.append(guided_distillation_records)
register_section("distribution_matching", run, markdown)
