"""The quality section of ``ucgm bench``: samplers at equal NFE on one flow-matching model, few-step vs multi-step.

JSON keys: ``quality`` (records ``{dataset, model, sampler, nfe, metric, value, budget, settings}``),
``few_vs_multi`` (``{ratio, few_step, multi_step, target, met, ...}``) and ``quality_details`` (sample-noise
floors, the UCGM-S searches, sizes, seconds). Protocol: :mod:`ucgm.bench.quality`.
"""

from __future__ import annotations

from . import register_section
from ..analysis.reports import find_value, markdown_tables
from .quality import COMPARISON_NFE, FULL, MULTI_STEP, QUALITY_NFES, QUICK, UCGM_DEFAULTS, UCGM_SEARCHED, run_quality

#: Relative differences below this are reported as a tie.
TIE_TOLERANCE = 5e-4


def run(quick: bool) -> dict:
    return run_quality(QUICK if quick else FULL)


def comparison_sentence(records: list[dict], sampler: str, paired: dict) -> str:
    """``sampler`` vs Euler at NFE 8 on the multi-step GMM model, with the paired differences over further seeds."""
    ucgm = find_value(records, dataset="gmm", model=MULTI_STEP, sampler=sampler, budget=COMPARISON_NFE)
    euler = find_value(records, dataset="gmm", model=MULTI_STEP, sampler="euler", budget=COMPARISON_NFE)
    if ucgm is None or euler is None:
        return f"- {sampler}: not measured."
    relative = (euler - ucgm) / euler
    if abs(relative) < TIE_TOLERANCE:
        verdict = "**ties with** Euler"
    elif ucgm < euler:
        verdict = f"**beats** Euler by {100 * relative:.1f}%"
    else:
        verdict = f"**does not beat** Euler: it is {100 * -relative:.1f}% worse"
    difference = paired["difference_to_euler"][sampler]
    return (f"- {sampler}: {ucgm:.4g} vs Euler {euler:.4g}: {verdict}. On {len(paired['seeds'])} further noise "
            f"seeds, sliced W2 minus Euler's: {difference['mean']:+.4g} ± {difference['std']:.2g} (mean ± std).")


def _search_lines(searches: dict) -> list[str]:
    lines = ["| NFE | gaps | warp (a, b, c) | kappa | search set: default -> searched | evaluation set: default -> "
             "searched |", "|---|---|---|---|---|---|"]
    for nfe, found in searches.items():
        settings = found["settings"]
        chosen = found["searches"][str(settings["gaps"])]
        warp = ", ".join(f"{value:.3g}" for value in settings["time_warp"])
        lines.append(f"| {nfe} | {settings['gaps']} | ({warp}) | {settings['extrapolation']:.3g} | "
                     f"{chosen['default_search_value']:.4g} -> {chosen['search_value']:.4g} | "
                     f"{chosen['default_heldout_value']:.4g} -> {chosen['heldout_value']:.4g} |")
    return lines


def markdown(report: dict) -> str:
    if "quality" not in report:
        return ""
    records, details, ratio = report["quality"], report["quality_details"], report["few_vs_multi_details"]
    floor = details["gmm"]["floor"]
    sizes = details["sizes"]
    table_records = [record for record in records if record["budget"] in QUALITY_NFES]
    command = report["meta"]["command"]
    lines = [
        "## Sample quality at equal NFE", "",
        f"Produced by `{command}` ({'quick' if report['meta']['quick'] else 'full'} size; models trained by ucgm's "
        f"trainer: GMM flow matching {sizes['gmm_steps']} steps, few-step tuning {sizes['tune_steps']} steps, "
        f"digits flow matching {sizes['digits_steps']} steps; {details['training_seconds']:.0f} s training, "
        f"{details['evaluation_seconds']:.0f} s evaluation). Same seeded noise for every sampler. GMM: sliced W2 of "
        f"{sizes['num_gmm']} samples against {sizes['num_reference']} exact mixture samples; digits: digits FD of "
        f"{sizes['num_digits']} samples against the held-out split. `(n=...)`: calls actually spent.", "",
        markdown_tables(table_records),
        f"Sample-noise floor (GMM): {sizes['num_gmm']} exact samples against the reference give sliced W2 "
        f"{floor['mean']:.4g} ± {floor['std']:.2g} (mean ± std over {len(floor['values'])} draws). "
        f"Digits floor: {sizes['num_digits']} training-split digits give digits FD {details['digits']['floor']:.4g}.",
        "", f"**UCGM-S vs Euler at NFE {COMPARISON_NFE}, same multi-step flow-matching GMM model (sliced W2):**", "",
        comparison_sentence(records, UCGM_SEARCHED, details["gmm"]["paired_nfe8"]),
        comparison_sentence(records, UCGM_DEFAULTS, details["gmm"]["paired_nfe8"]), "",
        "UCGM-S searched settings (gaps from {(0.001, 0.001), (0.001, 0)}, Kumaraswamy warp and kappa chosen on "
        "separate search noise and reference samples; the evaluation-set values are the table's):", "",
        *_search_lines(details["gmm"]["searches"]), "",
        f"**Few-step vs multi-step (GMM):** few-step UCGM-S at NFE {ratio['few_step_nfe']} "
        f"{ratio['few_step']:.4g} / multi-step UCGM-S at NFE {ratio['multi_step_nfe']} {ratio['multi_step']:.4g} = "
        f"**{ratio['ratio']:.3f}** (target <= {ratio['target']}: {'met' if ratio['met'] else 'MISSED'}); the "
        f"few-step settings {ratio['few_step_settings']} were chosen on the search set. With the run's tuned "
        f"settings {ratio['run_settings']} unchanged the ratio is {ratio['ratio_with_run_settings']:.3f}.",
    ]
    return "\n".join(lines)


register_section("quality", run, markdown)
