"""The consistency section of ``ucgm bench``: the consistency family's quality at NFE 1-16 and step cost.

JSON keys: ``consistency`` (one record per dataset and method: ``{dataset, method, objective, origin, overrides,
sampler, steps, values: {nfe: value}, ratio_16_over_1, best_nfe, degrades_with_steps, step_cost_vs_fm,
train_seconds}``; sliced W2 on the GMM, digits FD on the digits) and ``consistency_details`` (sizes, floors,
flow-matching step time, seconds). Protocol: :mod:`ucgm.bench.consistency`; everything runs on one intra-op thread.
"""

from __future__ import annotations

from . import register_section
from .consistency import DEGRADATION_TOLERANCE, FULL, NFES, QUICK, run_consistency
from .throughput import single_thread

METRIC_NAMES = {"gmm": "sliced W2", "digits": "digits FD"}


def run(quick: bool) -> dict:
    with single_thread():
        return run_consistency(QUICK if quick else FULL)


def _dataset_table(rows: list[dict]) -> list[str]:
    lines = ["| method | start | sampler | " + " | ".join(f"NFE {nfe}" for nfe in NFES) +
             " | NFE 16 / NFE 1 | best NFE | degrades with steps | step cost / FM |",
             "|---|---|---|" + "---|" * len(NFES) + "---|---|---|---|"]
    for row in rows:
        values = row["values"]
        best = str(row["best_nfe"])
        cells = [f"**{values[str(nfe)]:.4g}**" if str(nfe) == best else f"{values[str(nfe)]:.4g}" for nfe in NFES]
        start = row["origin"] + (f" ({', '.join(row['overrides'])})" if row["overrides"] else "")
        lines.append(f"| {row['method']} | {start} | {row['sampler']} | " + " | ".join(cells) +
                     f" | {row['ratio_16_over_1']:.2f} | {best} | {'yes' if row['degrades_with_steps'] else 'no'} | "
                     f"{row['step_cost_vs_fm']:.2f} |")
    return lines


def _summary(rows: list[dict]) -> str:
    methods = [row for row in rows if row["method"] != "flow_matching"]
    degrading = [f"{row['dataset']} {row['method']}" for row in methods if row["degrades_with_steps"]]
    improving = [f"{row['dataset']} {row['method']}" for row in methods if not row["degrades_with_steps"]]
    return (f"Quality degrades as steps grow (NFE-16 value > best value by more than {DEGRADATION_TOLERANCE:.0%} "
            f"and 2 floor std) for "
            f"{len(degrading)} of {len(methods)} few-step models: {', '.join(degrading) or 'none'}; "
            f"it does not for {', '.join(improving) or 'none'}.")


def markdown(report: dict) -> str:
    if "consistency" not in report:
        return ""
    details, rows = report["consistency_details"], report["consistency"]
    sizes = details["sizes"]
    gmm, digits = details["gmm"], details["digits"]
    lines = ["## Consistency family: quality against NFE and training-step cost", "",
             f"Produced by `{report['meta']['command']}` ({'quick' if report['meta']['quick'] else 'full'} size, "
             f"{details['seconds']:.0f} s, one thread). Models trained by ucgm's trainer from the presets' "
             f"`objectives:` defaults (`ucgm train PRESET objective=NAME`), {gmm['steps']} steps on the GMM "
             f"(8 Gaussians, unconditional) and {digits['steps']} on the digits (conditional, "
             f"{', '.join(digits['overrides'])}); EMA weights; each method's own sampler from the same seeded noise. "
             f"Step cost: like-for-like trainer step / flow-matching step, interleaved "
             f"(flow matching: {gmm['flow_matching_step_seconds'] * 1e3:.1f} ms GMM, "
             f"{digits['flow_matching_step_seconds'] * 1e3:.1f} ms digits). Best NFE in bold.", ""]
    for dataset, dataset_details in (("gmm", gmm), ("digits", digits)):
        floor = dataset_details["floor"]
        spread = f" ± {floor['std']:.2g}" if floor["std"] else ""
        lines += [f"**{dataset}** ({METRIC_NAMES[dataset]} of {dataset_details['num_samples']} samples; "
                  f"floor of exact data {floor['mean']:.4g}{spread}):", "",
                  *_dataset_table([row for row in rows if row["dataset"] == dataset]), ""]
    lines.append(_summary(rows))
    if sizes["gmm_steps"] < 1000:
        lines.append("Quick size: the models are far from converged; the table checks the pipeline, not the methods.")
    return "\n".join(lines)


register_section("consistency", run, markdown)
