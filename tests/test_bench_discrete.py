"""The ``discrete``, ``cascade`` and ``search`` sections of ``ucgm bench`` at toy sizes: exact JSON keys."""

from __future__ import annotations

import json
import math

from ucgm.bench import main as bench_main
from ucgm.bench import report_cascade, report_discrete, report_search
from ucgm.bench.cascade import CascadeSizes, equal_compute_steps
from ucgm.bench.discrete import DIGITS_SAMPLING, SAMPLING, DiscreteSizes, sampler_settings
from ucgm.cli.components import accepted_keys
from ucgm.cli.config import resolve_config, resolve_run_config
from ucgm.cli.tune import tune_recipe
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


def test_discrete_rows_sample_with_their_measured_settings():
    """Each row's UCGM-S settings as the sampler gets them (the row's over the run's sampling section): lambda = 0
    without end gaps and with td 0.25, which is also the categorical-bits preset's own sampling (what ``ucgm
    sample`` / ``evaluate`` use on a user's run); lambda = 1 and the digits keep the official gaps and td 0, so the
    preset's sampling does not leak into them; the preset's few-step tune keeps td 0."""
    categorical = resolve_config("categorical-bits", ["objective.consistency_ratio=1.0"], accepted_keys)
    lambda0 = sampler_settings(resolve_config("categorical-bits", [], accepted_keys), SAMPLING[0.0][1])
    assert lambda0["gaps"] == (0.0, 0.0) and lambda0["time_difference"] == 0.25 and lambda0["stochasticity"] == 0
    preset = resolve_run_config("categorical-bits", [], accepted_keys).sampling
    assert (list(preset.gaps), preset.time_difference) == ([0.0, 0.0], 0.25)
    lambda1 = sampler_settings(categorical, SAMPLING[1.0][1])
    assert (lambda1["gaps"], lambda1["time_difference"], lambda1["stochasticity"]) == ((0.001, 0.001), 0.0, 1.0)
    digits = sampler_settings(resolve_config("digits-bits", [], accepted_keys), DIGITS_SAMPLING[1])
    assert (digits["gaps"], digits["time_difference"]) == ((0.001, 0.001), 0.0)
    assert tune_recipe(categorical)["sampling"]["time_difference"] == 0.0


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
