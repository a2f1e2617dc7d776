"""The ``trainer`` and ``consistency`` sections of ``ucgm bench`` at toy sizes: JSON keys, numbers, markdown."""

from __future__ import annotations

import json
import math

import pytest

from ucgm.bench import main as bench_main
from ucgm.bench import report_consistency, report_trainer
from ucgm.bench.consistency import (
    FLOW_MATCHING,
    GMM_METHODS,
    GMM_OVERRIDES,
    NFES,
    ConsistencySizes,
    benchmark_dataset,
    gmm_metric,
    step_trend,
)
from ucgm.bench.report_trainer import BlockSizes
from ucgm.bench.throughput import like_for_like, make_trainer, training_setup
from ucgm.cli.components import accepted_keys
from ucgm.cli.config import resolve_config

TINY_SIZES = ConsistencySizes(gmm_steps=2, digits_steps=1, num_gmm=64, num_reference=256, num_digits=64,
                              floor_repeats=2, timing_block_steps=1, timing_rounds=1)


def test_trainer_section_reports_the_ratio_and_details(tmp_path, monkeypatch):
    monkeypatch.setattr(report_trainer, "QUICK", {"gmm": BlockSizes(block_steps=2, rounds=2, warmup_rounds=0)})
    out = tmp_path / "bench.json"
    assert bench_main(["--quick", "--sections", "trainer", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    ratio = report["trainer_vs_minimal_loop"]
    details = report["trainer_vs_minimal_loop_details"]
    assert isinstance(ratio, float) and 0.3 < ratio < 3
    gmm = details["presets"]["gmm"]
    assert gmm["ratio"] == ratio and details["met"] == (ratio >= report_trainer.TARGET)
    assert set(gmm["steps_per_second"]) == {"trainer", "minimal", "default_features", "dataset_batches"}
    assert gmm["objective"] == "ucgm" and gmm["batch_size"] == 256
    assert "| gmm |" in out.with_suffix(".md").read_text()


def test_like_for_like_trainer_has_no_ema_clipping_or_warmup():
    setup = training_setup(like_for_like(resolve_config("gmm", ["training.batch_size=8"], accepted_keys)))
    trainer = make_trainer(setup.config, setup.model, setup.batches)
    network = trainer.networks["model"]
    assert network.ema is None and network.settings.warmup_steps == 0
    assert network.settings.grad_clip is None and len(setup.batches[0][0]) == 8
    trainer.train_step()
    assert math.isfinite(trainer.pop_mean_loss())


def test_step_trend_flags_quality_that_degrades_with_more_steps():
    degrading = step_trend({1: 0.10, 2: 0.09, 4: 0.12, 8: 0.15, 16: 0.20})
    assert degrading == {"ratio_16_over_1": pytest.approx(2.0), "best_nfe": 2, "degrades_with_steps": True}
    improving = step_trend({1: 0.4, 2: 0.2, 4: 0.1, 8: 0.1, 16: 0.102})
    assert improving["best_nfe"] == 4 and not improving["degrades_with_steps"]
    assert not step_trend({1: 0.10, 2: 0.09, 4: 0.12, 8: 0.15, 16: 0.20}, noise=0.06)["degrades_with_steps"]


def test_consistency_rows_for_a_few_gmm_methods(tmp_path):
    methods = tuple(method for method in GMM_METHODS if method.label in (FLOW_MATCHING, "ct", "scm", "tcm", "ect"))
    metric, floor = gmm_metric(TINY_SIZES)
    rows, details = benchmark_dataset("gmm", "gmm", GMM_OVERRIDES, methods, 2, metric, floor["std"], 64, TINY_SIZES,
                                      tmp_path)
    assert [row["method"] for row in rows] == [method.label for method in methods]
    for row in rows:
        assert list(row["values"]) == [str(nfe) for nfe in NFES]
        assert all(math.isfinite(value) and value > 0 for value in row["values"].values())
        assert row["step_cost_vs_fm"] > 0 and isinstance(row["degrades_with_steps"], bool)
    by_method = {row["method"]: row for row in rows}
    assert by_method[FLOW_MATCHING]["step_cost_vs_fm"] == 1.0
    assert by_method["tcm"]["objective"]["stage"] == 2 and by_method["tcm"]["origin"] == "init from ect"
    assert floor["mean"] > 0 and details["steps"] == 2


def test_consistency_section_at_toy_size(tmp_path, monkeypatch):
    monkeypatch.setattr(report_consistency, "QUICK", TINY_SIZES)
    out = tmp_path / "bench.json"
    assert bench_main(["--quick", "--sections", "consistency", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    rows = report["consistency"]
    assert {(row["dataset"], row["method"]) for row in rows} >= {("gmm", "cd"), ("gmm", "scm"), ("digits", "ct"),
                                                                 ("digits", "scm")}
    assert len(rows) == 12
    table = out.with_suffix(".md").read_text()
    assert "Consistency family" in table and "| ucgm (lambda=1) |" in table
