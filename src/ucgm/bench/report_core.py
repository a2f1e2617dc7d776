"""The core section of ``ucgm bench``: UCGM-T step cost vs flow matching, UCGM-S overhead."""

from __future__ import annotations

from . import register_section
from .core import objective_cost, sampler_overhead

OBJECTIVE_TARGET = 1.03
SAMPLER_TARGET = 1.03


def run(quick: bool) -> dict:
    ratios, details = objective_cost(quick)
    overhead, sampler_details = sampler_overhead(quick)
    return {"ucgm_t_vs_fm": ratios, "ucgm_t_vs_fm_details": details,
            "sampler_overhead": overhead, "sampler_overhead_details": sampler_details}


def _verdict(ok: bool) -> str:
    return "met" if ok else "MISSED"


def markdown(report: dict) -> str:
    if "ucgm_t_vs_fm" not in report:
        return ""
    details = report["ucgm_t_vs_fm_details"]
    lines = ["## UCGM-T step time / flow-matching step time", "",
             f"Model: DiT-like, {details['model']['depth']} blocks, width {details['model']['hidden_size']}, "
             f"batch {details['batch_size']}; flow-matching step {details['fm_step_seconds'] * 1e3:.1f} ms, "
             f"bare forward {details['forward_seconds'] * 1e3:.1f} ms.", "",
             "| setting | extra no-grad forward passes (batch units) | ratio | allowed | target |",
             "|---|---|---|---|---|"]
    for name, ratio in report["ucgm_t_vs_fm"].items():
        extra = details["extra_forward_passes"][name]
        bound = OBJECTIVE_TARGET if extra == 0 else details["bounds"][name] * OBJECTIVE_TARGET
        lines.append(f"| {name} | {extra} | {ratio:.3f} | <= {bound:.3f} | {_verdict(ratio <= bound)} |")
    sampler = report["sampler_overhead"]
    nfe = report["sampler_overhead_details"]["nfe"]
    lines += ["", "## UCGM-S time / (NFE x bare forward)", "", "| order | NFE | ratio | target |", "|---|---|---|---|"]
    for name, ratio in sampler.items():
        lines.append(f"| {name} | {nfe[name]} | {ratio:.3f} | {_verdict(ratio <= SAMPLER_TARGET)} (<= {SAMPLER_TARGET}) |")
    return "\n".join(lines)


register_section("core", run, markdown)
