"""The ``flow_maps`` section of ``ucgm bench`` at toy size: its JSON keys, records, costs, targets and markdown."""

from __future__ import annotations

import json
import statistics

import pytest

from ucgm.bench import flow_maps, report_flow_maps
from ucgm.bench import main as bench_main
from ucgm.bench.flow_maps import DIGITS_ENTRIES, GMM_ENTRIES, TARGET_METHODS, FlowMapSizes, targets, trends
from ucgm.methods.flow_maps import FLOW_MAP_METHODS
from ucgm.sampling.registry import SAMPLER_NAMES

TINY_SIZES = FlowMapSizes(gmm_steps=2, digits_steps=1, num_gmm=64, num_reference=256, num_digits=32,
                          floor_repeats=2, timing_block_steps=1, timing_rounds=1, sample_seeds=2)
RECORD_KEYS = {"dataset", "method", "sampler", "nfe", "metric", "value"}
NFES = (1, 2, 4, 8, 16)
OWN_SAMPLERS = {"shortcut": "shortcut", "meanflow": "flow-map", "ctm": "flow-map", "ayf": "flow-map"}


def _run_section(tmp_path, monkeypatch) -> tuple[dict, str]:
    monkeypatch.setattr(report_flow_maps, "QUICK", TINY_SIZES)
    out = tmp_path / "F.json"
    assert bench_main(["--quick", "--sections", "flow_maps", "--out", str(out)]) == 0
    return json.loads(out.read_text()), out.with_suffix(".md").read_text()


def _check_report(report: dict, markdown: str, gmm_methods: set[str], digits_methods: set[str]) -> None:
    records = report["flow_maps"]
    assert records and all(set(record) == RECORD_KEYS for record in records)
    gmm = {(record["method"], record["nfe"]) for record in records
           if record["dataset"] == "gmm" and record["metric"] == "sliced_w2"}
    assert {(method, nfe) for method in gmm_methods for nfe in NFES} | {("flow_matching", 64)} == gmm
    digits = {(record["method"], record["nfe"]) for record in records
              if record["dataset"] == "digits" and record["metric"] == "digits_fd"}
    assert {(method, nfe) for method in digits_methods for nfe in NFES} | {("flow_matching", 64)} == digits
    assert len(records) == len(gmm) + len(digits)
    samplers = {record["method"]: record["sampler"] for record in records}
    assert samplers["flow_matching"] == "euler" and set(samplers.values()) <= set(SAMPLER_NAMES)
    assert all(samplers[method] == OWN_SAMPLERS[method] for method in samplers if method in OWN_SAMPLERS)
    cost = report["flow_maps_cost"]
    assert set(cost) == gmm_methods | {"flow_matching"} and cost["flow_matching"] == 1.0
    assert all(value > 0 for value in cost.values())
    details = report["flow_maps_details"]
    assert set(details["digits"]["cost"]) == digits_methods | {"flow_matching"}
    assert set(details["targets"]) == {"holds_as_nfe_grows", "all_hold", "best_one_step", "meanflow_cost"}
    assert set(details["targets"]["holds_as_nfe_grows"]) == gmm_methods & set(TARGET_METHODS)
    for record in records:
        spread = details[record["dataset"]]["sample_spread"][f"{record['dataset']}/{record['method']}/{record['nfe']}"]
        assert record["value"] == statistics.fmean(spread["values"]) and spread["std"] == statistics.pstdev(
            spread["values"])
        assert len(set(spread["values"])) == TINY_SIZES.sample_seeds  # independent draws, not one seed repeated
    assert "## Flow maps" in markdown and "NFE 64" in markdown and " ± " in markdown


def test_flow_maps_section_at_toy_size(tmp_path, monkeypatch):
    """The pipeline on two GMM entries and one digits entry (each method's own sampler, costs, targets)."""
    monkeypatch.setattr(flow_maps, "GMM_ENTRIES", tuple(e for e in GMM_ENTRIES if e.method in ("shortcut", "meanflow")))
    monkeypatch.setattr(flow_maps, "DIGITS_ENTRIES", tuple(e for e in DIGITS_ENTRIES if e.method == "shortcut"))
    report, markdown = _run_section(tmp_path, monkeypatch)
    _check_report(report, markdown, {"shortcut", "meanflow"}, {"shortcut"})


@pytest.mark.slow
def test_flow_maps_section_with_every_entry_at_toy_size(tmp_path, monkeypatch):
    report, markdown = _run_section(tmp_path, monkeypatch)
    _check_report(report, markdown, {entry.method for entry in GMM_ENTRIES}, {entry.method for entry in DIGITS_ENTRIES})


def test_the_section_covers_every_method_of_the_family():
    """Every flow-map method on the GMM; meanflow, shortcut and at least one more on the digits."""
    assert {entry.method for entry in GMM_ENTRIES} == set(FLOW_MAP_METHODS)
    digits = {entry.method for entry in DIGITS_ENTRIES}
    assert {"meanflow", "shortcut"} < digits <= set(FLOW_MAP_METHODS)
    assert set(TARGET_METHODS) <= set(FLOW_MAP_METHODS)


def test_targets_and_trends_from_records():
    def record(method, nfe, value):
        return {"dataset": "gmm", "method": method, "sampler": "s", "nfe": nfe, "metric": "sliced_w2",
                "value": value}

    records = [record("flow_matching", 64, 0.04)] + \
        [record("ctm", nfe, value) for nfe, value in zip(NFES, (0.05, 0.045, 0.044, 0.046, 0.047))] + \
        [record("meanflow", nfe, value) for nfe, value in zip(NFES, (0.09, 0.07, 0.05, 0.05, 0.06))]
    found = trends(records)
    assert found["gmm/ctm"] == {"best_nfe": 8 // 2, "best": 0.044, "last": 0.047, "holds": True}
    assert found["gmm/meanflow"]["holds"] is False  # 0.06 > 1.1 x 0.05
    verdict = targets(records, {"meanflow": 2.6, "flow_matching": 1.0})
    assert verdict["holds_as_nfe_grows"] == {"ctm": True, "meanflow": False} and not verdict["all_hold"]
    assert verdict["best_one_step"]["method"] == "ctm" and abs(verdict["best_one_step"]["ratio"] - 1.25) < 1e-12
    assert verdict["best_one_step"]["met"] and not verdict["meanflow_cost"]["met"]
