"""The ``distribution_matching`` section of ``ucgm bench`` at toy size: its JSON keys, records and markdown."""

from __future__ import annotations

import json

from ucgm.bench import main as bench_main
from ucgm.bench import distribution_matching, report_distribution_matching
from ucgm.bench.distribution_matching import COST_METHODS, DistributionMatchingSizes, record

TINY_SIZES = DistributionMatchingSizes(gmm_steps=2, flow_matching_steps=2, digits_teacher_steps=1, digits_steps=1,
                                       num_gmm=64, num_reference=256, num_digits=32, floor_repeats=2,
                                       timing_block_steps=1, timing_rounds=1)
RECORD_KEYS = {"dataset", "method", "sampler", "nfe", "metric", "value"}


def test_distribution_matching_section_at_toy_size(tmp_path, monkeypatch):
    monkeypatch.setattr(report_distribution_matching, "QUICK", TINY_SIZES)
    seen = []

    def provider(context):
        seen.append((context.digits_teacher / "checkpoints").is_dir() and context.sizes == TINY_SIZES)
        return [record("digits", "extra", "ddim", 4, "digits_fd", 1.0)]

    monkeypatch.setattr(distribution_matching, "EXTRA_RECORDS", [provider])
    out = tmp_path / "D.json"
    assert bench_main(["--quick", "--sections", "distribution_matching", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    records = report["distribution_matching"]
    assert all(set(row) == RECORD_KEYS for row in records)
    gmm = {(row["method"], row["nfe"], row["metric"]) for row in records if row["dataset"] == "gmm"}
    for method in ("dmd", "dmd2", "sim", "cosim", "dmd2 (update_ratio=1)"):
        assert {(method, nfe, metric) for nfe in (1, 2) for metric in ("sliced_w2", "mode_coverage")} <= gmm
    assert ("flow_matching", 64, "sliced_w2") in gmm and ("flow_matching", 64, "mode_coverage") in gmm
    conditional = {(row["method"], row["nfe"]) for row in records if row["dataset"] == "gmm-conditional"}
    assert {("msd", 1), ("msd", 2), ("msd (1 student)", 1), ("flow_matching", 64)} <= conditional
    digits = {(row["method"], row["nfe"]) for row in records if row["metric"] == "digits_fd"}
    assert {("dmd2", 1), ("dmd2", 2), ("flow_matching", 64), ("extra", 4)} <= digits
    assert {row["sampler"] for row in records if row["method"] == "dmd2"} == {"generator"}
    coverage = [row["value"] for row in records if row["metric"] == "mode_coverage"]
    assert all(0.0 <= value <= 1.0 for value in coverage)
    assert set(report["distribution_matching_cost"]) == set(COST_METHODS)
    assert all(value > 0 for value in report["distribution_matching_cost"].values())
    assert seen == [True]  # the provider ran once, with the trained digits teacher
    targets = report["distribution_matching_details"]["targets"]
    assert set(targets) == {"dmd2_vs_flow_matching", "two_time_scale", "students"}
    assert "Distribution matching" in out.with_suffix(".md").read_text()


def test_dmd2_runs_start_from_the_flow_matching_run(tmp_path, monkeypatch):
    calls = {}

    def fake_train(preset, overrides, steps, run_dir):
        calls[run_dir.name] = overrides
        return run_dir

    monkeypatch.setattr(distribution_matching, "train", fake_train)
    run_dirs = distribution_matching.train_runs(distribution_matching.GMM_RUNS, ("data.conditional=false",),
                                                TINY_SIZES, tmp_path)
    flow_matching = run_dirs["flow_matching"]
    for label, run_dir in run_dirs.items():
        overrides = calls[run_dir.name]
        initialised = f"init.checkpoint={flow_matching}" in overrides and "init.weights=ema" in overrides
        assert initialised == label.startswith("dmd2"), (label, overrides)
    assert not any(value.startswith("init.") for value in calls[flow_matching.name])
