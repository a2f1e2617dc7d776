"""The ``discrete``, ``cascade`` and ``search`` sections of ``ucgm bench`` at toy sizes: exact JSON keys."""

from __future__ import annotations

import json
import math

from ucgm.bench import main as bench_main
from ucgm.bench import report_cascade, report_discrete, report_search
from ucgm.bench.cascade import CascadeSizes, equal_compute_steps
from ucgm.bench.discrete import DiscreteSizes
from ucgm.bench.search import SearchSizes


def _run(tmp_path, section: str) -> tuple[dict, str]:
    out = tmp_path / "bench.json"
    assert bench_main(["--quick", "--sections", section, "--out", str(out)]) == 0
    return json.loads(out.read_text()), out.with_suffix(".md").read_text()


def test_discrete_section(tmp_path, monkeypatch):
    monkeypatch.setattr(report_discrete, "QUICK", DiscreteSizes(categorical_steps=2, digits_steps=1, hidden=8,
                                                                num_categorical=64, num_digits=32))
    report, table = _run(tmp_path, "discrete")
    records = report["discrete"]
    assert all(set(r) >= {"dataset", "method", "sampler", "nfe", "metric", "value"} for r in records)
    tv = [r for r in records if r["metric"] == "tv"]
    assert {(r["consistency_ratio"], r["self_conditioning"]) for r in tv} == {(0.0, False), (0.0, True),
                                                                             (1.0, False), (1.0, True)}
    assert all(0 <= r["value"] <= 1 for r in tv)
    fd = [r for r in records if r["dataset"] == "quantised_digits"]
    assert {r["metric"] for r in fd} == {"digits_fd"} and all(math.isfinite(r["value"]) for r in fd)
    assert set(report["discrete_details"]["verdicts"]) == {"categorical lambda=0", "categorical lambda=1",
                                                           "quantised_digits lambda=0"}
    assert "Analog Bits" in table


def test_cascade_section(tmp_path, monkeypatch):
    monkeypatch.setattr(report_cascade, "QUICK", CascadeSizes(steps=2, num=16, single_nfe=4, cascade_nfes=(2, 4),
                                                              timing_batch=2, timing_rounds=1, refine_times=(1.0, 0.5)))
    report, table = _run(tmp_path, "cascade")
    result = report["cascade"]
    assert set(result) == {"throughput_ratio", "quality"} and set(result["quality"]) == {"cascade", "single"}
    assert result["throughput_ratio"] > 0 and all(math.isfinite(v) for v in result["quality"].values())
    rows = report["cascade_details"]["rows"]
    assert [row["sampler"] for row in rows] == ["single", "single (stage sampler)", "cascade@2", "cascade@4",
                                                "cascade@2,t_r=0.5", "cascade@4,t_r=0.5"]
    assert rows[3]["steps_per_level"] == [3, 1]
    steps = report["cascade_details"]["training_steps"]
    assert steps == equal_compute_steps(2) and steps["single"] == 2 < steps["cascade"]
    assert "Throughput ratio" in table


def test_search_section(tmp_path, monkeypatch):
    monkeypatch.setattr(report_search, "QUICK", SearchSizes(
        gmm_steps=2, digits_steps=1, num_search={"gmm": 32, "digits": 16}, num_evaluation={"gmm": 48, "digits": 24},
        population=4, generations=1, elite=1, num_reference=500))
    report, table = _run(tmp_path, "search")
    records = report["search"]
    keys = {(r["dataset"], r["schedule"], r["nfe"]) for r in records}
    assert keys == {(d, s, n) for d in ("gmm", "digits") for n in (4, 8)
                    for s in ("uniform", "ucgm-default", "kumaraswamy-search", "autodiffusion")}
    assert all(set(r) >= {"dataset", "schedule", "nfe", "metric", "value"} for r in records)
    assert {r["metric"] for r in records} == {"sliced_w2", "digits_fd"}
    for r in records:
        if r["schedule"] == "autodiffusion":
            uniform = next(u for u in records if (u["dataset"], u["nfe"], u["schedule"]) ==
                           (r["dataset"], r["nfe"], "uniform"))
            assert r["search_value"] <= uniform["search_value"]
    assert set(report["search_details"]["nfe4_beats_uniform"]) == {"gmm", "digits"}
    assert "| gmm | sliced_w2 | autodiffusion |" in table
