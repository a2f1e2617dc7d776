"""The core section of ``ucgm bench``: UCGM-T step cost vs flow matching, UCGM-S overhead."""

from __future__ import annotations

from . import register_section
from .core import FAST_MODE_KEY, FAST_MODE_SETTING, objective_cost, sampler_overhead
from .fast_mode import FULL, QUICK, fast_mode_quality

OBJECTIVE_TARGET = 1.03
SAMPLER_TARGET = 1.03
#: Fast-mode step time / parity-mode step time (issue 13).
FAST_MODE_TARGET = 0.80


def run(quick: bool) -> dict:
    ratios, details = objective_cost(quick)
    overhead, sampler_details = sampler_overhead(quick)
    quality, quality_details = fast_mode_quality(QUICK if quick else FULL)
    return {"ucgm_t_vs_fm": ratios, "ucgm_t_vs_fm_details": details,
            "sampler_overhead": overhead, "sampler_overhead_details": sampler_details,
            "fast_mode_quality": quality, "fast_mode_quality_details": quality_details}


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
        if name == FAST_MODE_KEY:
            continue
        extra = details["extra_forward_passes"][name]
        bound = OBJECTIVE_TARGET if extra == 0 else details["bounds"][name] * OBJECTIVE_TARGET
        lines.append(f"| {name} | {extra} | {ratio:.3f} | <= {bound:.3f} | {_verdict(ratio <= bound)} |")
    lines += _fast_mode_lines(report)
    sampler = report["sampler_overhead"]
    nfe = report["sampler_overhead_details"]["nfe"]
    lines += ["", "## UCGM-S time / (NFE x bare forward)", "", "| order | NFE | ratio | target |", "|---|---|---|---|"]
    for name, ratio in sampler.items():
        lines.append(f"| {name} | {nfe[name]} | {ratio:.3f} | {_verdict(ratio <= SAMPLER_TARGET)} (<= {SAMPLER_TARGET}) |")
    return "\n".join(lines)


def _fast_mode_lines(report: dict) -> list[str]:
    """The fast mode's step time against the parity mode's and its 2-NFE quality against the parity run's."""
    fast = report["ucgm_t_vs_fm"].get(FAST_MODE_KEY)
    if fast is None:
        return []
    details = report["ucgm_t_vs_fm_details"]
    precision = details.get("fast_mode_reference_precision")
    references = f", {precision} reference passes" if precision else ""
    lines = ["", f"Fast mode ({FAST_MODE_SETTING}, `objective.mode=fast`{references}): step time / parity-mode step "
             f"time **{fast:.3f}** (flow-matching step x {details['fast_mode_vs_fm']:.3f}); target <= "
             f"{FAST_MODE_TARGET}: {_verdict(fast <= FAST_MODE_TARGET)}."]
    quality = report.get("fast_mode_quality")
    if quality:
        details = report["fast_mode_quality_details"]
        lines += ["", f"2-NFE sliced W2 on the class-conditional GMM, the preset's tune recipe ({details['tune_steps']} "
                  f"steps from a {details['base_steps']}-step base run, same seed) in each mode:", "",
                  "| mode | sliced W2 |", "|---|---|"]
        lines += [f"| {mode} | {value:.4f} |" for mode, value in quality.items()]
        floor = details["floor"]
        allowed = quality["parity"] + 2 * floor["std"]
        lines += [f"| floor (exact samples) | {floor['mean']:.4f} +- {floor['std']:.4f} |", "",
                  f"fast <= parity + 2 floor std = {allowed:.4f}: {_verdict(quality['fast'] <= allowed)}"]
    return lines


register_section("core", run, markdown)
