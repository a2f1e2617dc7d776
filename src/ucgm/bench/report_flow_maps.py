"""The flow_maps section of ``ucgm bench``: quality of the flow-map and direct few-step methods (CTM, Shortcut,
MeanFlow, IMM, Align Your Flow, CAF, DDDM) at NFE 1, 2, 4, 8, 16 against flow matching at NFE 64, and their
training-step cost.

JSON keys: ``flow_maps`` (records ``{dataset, method, sampler, nfe, metric, value}``; ``sliced_w2`` on the GMM,
``digits_fd`` on the digits), ``flow_maps_cost`` (``{method: GMM step time / flow-matching step time}``, measured
interleaved) and ``flow_maps_details`` (sizes, floors, digits costs, sample-seed spreads, trends, the targets'
verdicts). Every value is a mean over the sizes' sample seeds, the verdicts are on the means (protocol:
:mod:`ucgm.bench.flow_maps`); the table shows mean +- the seeds' standard deviation. Everything runs on one
intra-op thread.
"""

from __future__ import annotations

from . import register_section
from .consistency import FLOW_MATCHING, NFES
from .flow_maps import FULL, HOLD_TOLERANCE, MEANFLOW_COST_TARGET, ONE_STEP_TARGET, QUICK, REFERENCE_NFE, run_flow_maps
from .throughput import single_thread

METRIC_TEXT = {"sliced_w2": "sliced W2", "digits_fd": "digits FD"}


def run(quick: bool) -> dict:
    with single_thread():
        return run_flow_maps(QUICK if quick else FULL)


def _cell(value: float, spread: dict | None, best: bool) -> str:
    mean = f"**{value:.4g}**" if best else f"{value:.4g}"
    return mean if spread is None or len(spread["values"]) < 2 else f"{mean} ± {spread['std']:.2g}"


def _dataset_table(records: list[dict], trends: dict, dataset: str, costs: dict[str, float], spread: dict
                   ) -> list[str]:
    budgets = (*NFES, REFERENCE_NFE)
    lines = ["| method | sampler | " + " | ".join(f"NFE {nfe}" for nfe in budgets) +
             f" | NFE 16 <= {HOLD_TOLERANCE} x best | step cost / FM |",
             "|---|---|" + "---|" * len(budgets) + "---|---|"]
    methods = list(dict.fromkeys((record["method"], record["sampler"]) for record in records))
    for method, sampler in methods:
        values = {record["nfe"]: record["value"] for record in records if record["method"] == method}
        trend = trends.get(f"{dataset}/{method}")
        best = trend["best_nfe"] if trend else None
        cells = ["" if nfe not in values else _cell(values[nfe], spread.get(f"{dataset}/{method}/{nfe}"), nfe == best)
                 for nfe in budgets]
        holds = "" if trend is None else "yes" if trend["holds"] else "no"
        cost = f"{costs[method]:.2f}" if method in costs else ""
        lines.append(f"| {method} | {sampler} | " + " | ".join(cells) + f" | {holds} | {cost} |")
    return lines


def _target_lines(targets: dict) -> list[str]:
    holds = targets["holds_as_nfe_grows"]
    failing = [method for method, held in holds.items() if not held]
    one_step, cost = targets["best_one_step"], targets["meanflow_cost"]
    ratio = "not measured" if one_step["ratio"] is None else f"{one_step['ratio']:.2f}"
    cost_ratio = "not measured" if cost["ratio"] is None else f"{cost['ratio']:.2f}"
    return [f"- GMM, each of {', '.join(holds)} improves or holds as NFE grows (NFE-16 value <= {HOLD_TOLERANCE} x "
            f"its best): {'met' if targets['all_hold'] else 'missed by ' + ', '.join(failing)}.",
            f"- GMM, best NFE-1 value ({one_step['method']}, {one_step['value']:.4g}) / flow matching at NFE "
            f"{REFERENCE_NFE} ({one_step['reference']:.4g}): {ratio} (target <= {ONE_STEP_TARGET}): "
            f"{'met' if one_step['met'] else 'missed'}." if one_step["method"] else
            "- GMM, best NFE-1 value: no target method was run.",
            f"- MeanFlow step cost (JVP) / flow-matching step: {cost_ratio} (target <= {MEANFLOW_COST_TARGET}): "
            f"{'met' if cost['met'] else 'missed'}."]


def markdown(report: dict) -> str:
    if "flow_maps" not in report:
        return ""
    details, records = report["flow_maps_details"], report["flow_maps"]
    lines = ["## Flow maps and direct few-step models: quality against NFE and step cost", "",
             f"Produced by `{report['meta']['command']}` ({'quick' if report['meta']['quick'] else 'full'} size, "
             f"{details['seconds']:.0f} s, one thread). Models trained by ucgm's trainer from the presets' "
             f"`objectives:` defaults (`ucgm train PRESET objective=NAME`), the same steps for every method of a "
             f"dataset; EMA weights; each method's own sampler from the same seeded noise; reference: "
             f"{FLOW_MATCHING} with {details['reference']['sampler']} at NFE {REFERENCE_NFE}. Step cost: "
             f"like-for-like trainer step / flow-matching step, interleaved. Each value the mean over "
             f"{details['sizes']['sample_seeds']} sample seed(s) (± their standard deviation), the verdicts on the "
             f"means; best NFE in bold.", ""]
    costs = {"gmm": report["flow_maps_cost"], "digits": details["digits"]["cost"]}
    for dataset in ("gmm", "digits"):
        dataset_details = details[dataset]
        rows = [record for record in records if record["dataset"] == dataset]
        if not rows:
            continue
        floor = dataset_details["floor"]
        spread = f" ± {floor['std']:.2g}" if floor["std"] else ""
        lines += [f"**{dataset}** ({METRIC_TEXT[rows[0]['metric']]} of {dataset_details['num_samples']} samples, "
                  f"{dataset_details['steps']} training steps, overrides {', '.join(dataset_details['overrides'])}; "
                  f"floor of exact data {floor['mean']:.4g}{spread}; flow-matching step "
                  f"{dataset_details['flow_matching_step_seconds'] * 1e3:.1f} ms):", "",
                  *_dataset_table(rows, details["trends"], dataset, costs[dataset],
                                  dataset_details["sample_spread"]), ""]
    lines += _target_lines(details["targets"])
    if details["sizes"]["gmm_steps"] < 1000:
        lines.append("Quick size: the models are far from converged; the table checks the pipeline, not the methods.")
    return "\n".join(lines)


register_section("flow_maps", run, markdown)
