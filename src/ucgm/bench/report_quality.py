"""The quality section of ``ucgm bench``: samplers at equal NFE on flow-matching models, few-step vs multi-step,
UCGM-S vs Euler at 250 NFE, guidance.

JSON keys: ``quality`` (records ``{dataset, model, sampler, nfe, metric, value, budget, settings}``),
``few_vs_multi`` (the ratio) and ``few_vs_multi_details`` (``{ratio, few_step, multi_step, target, met, ...}``),
``ucgm_vs_euler_250`` (``{dataset: smallest NFE}``), ``guidance`` (records ``{dataset, guidance, scale, metric,
value}``) and ``quality_details`` (sample-noise floors, the UCGM-S searches, the NFE scans, sizes, seconds).
Protocol: :mod:`ucgm.bench.quality`.
"""

from __future__ import annotations

from . import register_section
from ..analysis.reports import find_value, markdown_tables
from .guidance import GUIDANCE_KINDS, GUIDANCE_NFE
from .quality import (COMPARISON_NFE, FULL, MULTI_STEP, QUALITY_NFES, QUICK, UCGM_DEFAULTS, UCGM_OFFICIAL,
                      UCGM_SEARCHED, run_quality)

#: Relative differences below this are reported as a tie.
TIE_TOLERANCE = 5e-4
#: Stable order 2 at NFE 8 must reach this fraction of the official order 1's sliced W2 on the GMM.
ORDER2_TARGET = 0.8


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


def _verdict(ok: bool) -> str:
    return "met" if ok else "MISSED"


def target_lines(records: list[dict]) -> list[str]:
    """The issue's targets: ``ucgm`` below Euler at NFE 4, 8, 16 on both datasets; ``ucgm-o2`` at NFE 8 within
    :data:`ORDER2_TARGET` of ``ucgm-official`` on the GMM."""
    lines = []
    for dataset in ("gmm", "digits"):
        cells = []
        for nfe in QUALITY_NFES:
            ucgm = find_value(records, dataset=dataset, model=MULTI_STEP, sampler=UCGM_DEFAULTS, budget=nfe)
            euler = find_value(records, dataset=dataset, model=MULTI_STEP, sampler="euler", budget=nfe)
            if ucgm is not None and euler is not None:
                cells.append(f"NFE {nfe}: {ucgm:.4g} vs {euler:.4g} ({_verdict(ucgm < euler)})")
        lines.append(f"- {dataset}: `ucgm` (ucgm's defaults, no search) below Euler: " + "; ".join(cells))
    order2 = find_value(records, dataset="gmm", model=MULTI_STEP, sampler="ucgm-o2", budget=COMPARISON_NFE)
    official = find_value(records, dataset="gmm", model=MULTI_STEP, sampler=UCGM_OFFICIAL, budget=COMPARISON_NFE)
    if order2 is not None and official is not None:
        lines.append(f"- gmm: `ucgm-o2` at NFE {COMPARISON_NFE} / `ucgm-official` = {order2:.4g} / {official:.4g} = "
                     f"**{order2 / official:.3f}** (target <= {ORDER2_TARGET}: {_verdict(order2 <= ORDER2_TARGET * official)})")
    return lines


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


def match_lines(details: dict) -> list[str]:
    """The smallest NFE at which ``ucgm`` is at least as good as Euler at 250, per dataset."""
    lines = []
    for dataset in ("gmm", "digits"):
        match = details[dataset]["match_euler"]
        scanned = ", ".join(f"{nfe}: {value:.4g}" for nfe, value in match["values"].items())
        found = match["smallest_nfe"]
        lines.append(f"- {dataset}: Euler at {match['reference_nfe']} NFE {match['reference_value']:.4g}; `ucgm` "
                     f"matches it at **{'no scanned NFE' if found is None else f'NFE {found}'}** ({scanned}).")
    return lines


def guidance_lines(records: list[dict]) -> list[str]:
    """One table per dataset: rows (guidance, scale), columns the metrics."""
    lines = []
    for dataset in dict.fromkeys(record["dataset"] for record in records):
        rows = [record for record in records if record["dataset"] == dataset]
        metrics = list(dict.fromkeys(record["metric"] for record in rows))
        lines += [f"**{dataset}** ({rows[0]['num_samples']} samples, `ucgm` at NFE {rows[0]['nfe']}):", "",
                  "| guidance | scale | " + " | ".join(metrics) + " |", "|---|---|" + "---|" * len(metrics)]
        for kind in GUIDANCE_KINDS:
            for scale in dict.fromkeys(record["scale"] for record in rows if record["guidance"] == kind):
                values = [find_value(rows, guidance=kind, scale=scale, metric=metric) for metric in metrics]
                lines.append(f"| {kind} | {scale:g} | " + " | ".join(f"{value:.4g}" for value in values) + " |")
        lines.append("")
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
        f"{sizes['num_digits']} samples against the held-out split. `(n=...)`: calls actually spent. `ucgm`, "
        "`ucgm-o2`: ucgm's defaults; `ucgm-official`, `ucgm-o2-official`: the official ones.", "",
        markdown_tables(table_records),
        f"Sample-noise floor (GMM): {sizes['num_gmm']} exact samples against the reference give sliced W2 "
        f"{floor['mean']:.4g} ± {floor['std']:.2g} (mean ± std over {len(floor['values'])} draws). "
        f"Digits floor: {sizes['num_digits']} training-split digits give digits FD {details['digits']['floor']:.4g}.",
        "", "**Targets:**", "", *target_lines(records), "",
        f"**UCGM-S vs Euler at NFE {COMPARISON_NFE}, same multi-step flow-matching GMM model (sliced W2):**", "",
        *(comparison_sentence(records, sampler, details["gmm"]["paired_nfe8"])
          for sampler in (UCGM_DEFAULTS, UCGM_SEARCHED, UCGM_OFFICIAL)), "",
        "Official UCGM-S searched settings (gaps from {(0.001, 0.001), (0.001, 0)}, Kumaraswamy warp and kappa chosen "
        "on separate search noise and reference samples; the evaluation-set values are the table's):", "",
        *_search_lines(details["gmm"]["searches"]), "",
        f"**Few-step vs multi-step (GMM):** few-step UCGM-S at NFE {ratio['few_step_nfe']} "
        f"{ratio['few_step']:.4g} / multi-step `ucgm` at NFE {ratio['multi_step_nfe']} {ratio['multi_step']:.4g} = "
        f"**{ratio['ratio']:.3f}** (target <= {ratio['target']}: {_verdict(ratio['met'])}); the few-step settings "
        f"{ratio['few_step_settings']} were chosen on the search set. With the run's tuned settings "
        f"{ratio['run_settings']} unchanged the ratio is {ratio['ratio_with_run_settings']:.3f}.", "",
        f"**Smallest NFE at which `ucgm` matches Euler at 250 NFE** (`ucgm_vs_euler_250` = "
        f"{report['ucgm_vs_euler_250']}; same models and metrics):", "", *match_lines(details), "",
        f"## Classifier-free guidance vs autoguidance", "",
        f"Same conditional model, guided by its own unconditional prediction (cfg) or by a smaller, shorter-trained "
        f"model (autoguidance); scale 1 is the model alone. `per_class_sliced_w2`: lower is better; "
        f"`within_class_spread`: samples' spread per class / the data's (1 = as varied as the data); coverage: GMM "
        f"covered share of each class's modes, digits share classified as their label.", "",
        *guidance_lines(report["guidance"]),
    ]
    return "\n".join(lines)


register_section("quality", run, markdown)
