"""``ucgm evaluate``: records, determinism, sampler specs, clear errors; the metric suites; the quality bench at
toy size."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from training_fixtures import tiny_gmm_config

from ucgm.bench.quality import FEW_VS_MULTI_TARGET, QUALITY_NFES, QualitySizes, run_quality
from ucgm.bench.report_quality import markdown as quality_markdown
from ucgm.cli import main as cli_main
from ucgm.cli.evaluate import main
from ucgm.analysis.reports import find_value, jsonable_settings, markdown_tables, parse_nfe_list, parse_sampler_specs
from ucgm.metrics import sliced_wasserstein
from ucgm.metrics.fid import INCEPTION_WEIGHTS_ENV
from ucgm.metrics.suites import SlicedW2Against, build_metric_suite
from ucgm.cli.train import run_training
from ucgm.sampling.registry import SAMPLER_NAMES, UCGM_DEFAULTS

RECORD_KEYS = {"dataset", "model", "sampler", "nfe", "metric", "value"}


@pytest.fixture(scope="module")
def gmm_run(tmp_path_factory):
    """A tiny class-conditional gmm run of 50 steps, trained by ucgm's trainer."""
    run_dir = tmp_path_factory.mktemp("evaluate") / "tiny-gmm"
    run_training(tiny_gmm_config("training.steps=50", "training.checkpoint_every=50", "training.log_every=25"),
                 run_dir, progress=False)
    return run_dir


def _evaluate(run_dir, out, *arguments: str) -> int:
    return main([str(run_dir), "--out", str(out), "--num", "200", "--num-reference", "1000", *arguments])


def _values(out) -> list[float]:
    return [record["value"] for record in json.loads((out / "metrics.json").read_text())]


def test_writes_records_table_and_plot(gmm_run, tmp_path):
    assert _evaluate(gmm_run, tmp_path, "--nfe", "1,2,4", "--sampler", "ucgm,euler,heun") == 0
    records = json.loads((tmp_path / "metrics.json").read_text())
    measured = [record for record in records if record["nfe"] > 0]
    assert len(measured) == 3 * 3 * 4  # samplers x budgets x (sliced_w2, missing_modes, mode_tv, log_likelihood)
    for record in records:
        assert RECORD_KEYS <= set(record)
        assert isinstance(record["nfe"], int) and isinstance(record["value"], float)
        assert record["dataset"] == "gmm"
    assert {record["metric"] for record in records} == {"sliced_w2", "missing_modes", "mode_tv", "log_likelihood"}
    assert {record["model"] for record in measured} == {"tiny-gmm"}
    heun = [record for record in measured if record["sampler"] == "heun"]
    assert sorted({(record["budget"], record["nfe"]) for record in heun}) == [(1, 1), (2, 1), (4, 3)]
    baselines = [record for record in records if record["nfe"] == 0]
    assert {record["metric"] for record in baselines} == {"sliced_w2", "missing_modes", "mode_tv", "log_likelihood"}
    sliced = next(record for record in measured if record["metric"] == "sliced_w2")
    assert sliced["protocol"]["num_reference"] == 1000 and sliced["num_samples"] == 200
    table = (tmp_path / "metrics.md").read_text()
    assert "| model | sampler | NFE 1 | NFE 2 | NFE 4 |" in table and "(n=3)" in table
    assert "ucgm evaluate" in table and "--sampler ucgm,euler,heun" in table
    with Image.open(tmp_path / "nfe_quality.png") as image:
        assert image.size[0] > 400


def test_same_seed_same_numbers_whatever_the_batch_size(gmm_run, tmp_path):
    arguments = ("--nfe", "2,4", "--sampler", "ucgm,dpm++2m", "--seed", "3")
    assert _evaluate(gmm_run, tmp_path / "a", *arguments) == 0
    assert _evaluate(gmm_run, tmp_path / "again", *arguments) == 0
    assert _evaluate(gmm_run, tmp_path / "batched", *arguments, "--batch-size", "64") == 0
    assert _evaluate(gmm_run, tmp_path / "other", "--nfe", "2,4", "--sampler", "ucgm,dpm++2m", "--seed", "4") == 0
    first, again, batched, other = (_values(tmp_path / name) for name in ("a", "again", "batched", "other"))
    assert first == again
    assert first == pytest.approx(batched, rel=1e-6, abs=1e-9)
    assert first != other


def test_sampler_settings_syntax_and_run_settings(gmm_run, tmp_path):
    spec = "ucgm:extrapolation=0.3:time_warp=[1.2,1,1]"
    assert _evaluate(gmm_run, tmp_path, "--nfe", "4", "--sampler", f"{spec},euler", "--weights", "model") == 0
    records = json.loads((tmp_path / "metrics.json").read_text())
    ucgm = next(record for record in records if record["sampler"] == spec)
    # the run's sampling section (stochasticity) is the base, the spec's settings override it, the sampler's
    # defaults fill the rest
    assert ucgm["settings"] == {**jsonable_settings(UCGM_DEFAULTS), "stochasticity": 0.0, "extrapolation": 0.3,
                                "time_warp": [1.2, 1, 1]}
    assert ucgm["weights"] == "model"
    assert next(record for record in records if record["sampler"] == "euler")["settings"] == {}


def test_match_euler_finds_the_first_budget_as_good_as_euler_at_250(gmm_run, tmp_path):
    assert _evaluate(gmm_run, tmp_path, "--nfe", "4", "--sampler", "euler", "--match-euler") == 0
    match = json.loads((tmp_path / "nfe_match.json").read_text())
    assert (match["sampler"], match["reference_sampler"], match["reference_nfe"], match["metric"]) == (
        "ucgm", "euler", 250, "sliced_w2")
    values = {int(nfe): value for nfe, value in match["values"].items()}
    found = match["smallest_nfe"]
    if found is None:  # every scanned budget is worse than the reference
        assert min(values.values()) > match["reference_value"] and max(values) == 250
    else:  # the scan stops at the first budget as good as the reference; every smaller one is worse
        assert values[found] <= match["reference_value"] and max(values) == found
        assert all(value > match["reference_value"] for nfe, value in values.items() if nfe < found)
    # the reference value is Euler's at 250 NFE on the same noise, as the records of a plain evaluation give it
    assert _evaluate(gmm_run, tmp_path / "euler", "--nfe", "250", "--sampler", "euler") == 0
    euler = json.loads((tmp_path / "euler" / "metrics.json").read_text())
    assert match["reference_value"] == find_value(euler, sampler="euler", budget=250, metric="sliced_w2")
    assert "matches Euler at 250 NFE" in (tmp_path / "metrics.md").read_text()


def test_cli_dispatch_and_clear_errors(gmm_run, tmp_path, capsys, monkeypatch):
    assert cli_main(["evaluate", str(tmp_path / "missing"), "--out", str(tmp_path / "o")]) == 2
    assert "does not exist" in capsys.readouterr().err
    cases = {
        ("--sampler", "ucgm,eulr"): f"unknown sampler 'eulr'; allowed: {', '.join(SAMPLER_NAMES)}",
        ("--sampler", "ucgm:kappa=0.3"): "unknown settings ['kappa'] for sampler 'ucgm'",
        ("--sampler", "ucgm:extrapolation"): "is not KEY=VALUE",
        ("--sampler", "ucgm:stochasticity=2"): "stochasticity=2 is outside the allowed range",
        ("--nfe", "1,x"): "must be comma-separated positive integers",
        ("--nfe", "0"): "must be comma-separated positive integers",
        ("--num", "1"): "--num=1 must be an integer >= 2",
        ("--reference-data", "root=elsewhere"): "apply to file-based data only",
    }
    for arguments, message in cases.items():
        assert _evaluate(gmm_run, tmp_path / "o", *arguments) == 2, arguments
        assert message in capsys.readouterr().err, arguments
    monkeypatch.delenv(INCEPTION_WEIGHTS_ENV, raising=False)
    assert _evaluate(gmm_run, tmp_path / "o", "--fid") == 2
    assert "inception-2015-12-05.pt" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        _evaluate(gmm_run, tmp_path / "o", "--weights", "best")
    assert exit_info.value.code == 2
    assert not (tmp_path / "o" / "metrics.json").exists()


def test_spec_and_nfe_parsing():
    specs = parse_sampler_specs("ucgm, euler ,ucgm:gaps=[0.001,0.5]:stochasticity=auto")
    assert [spec.label for spec in specs] == ["ucgm", "euler", "ucgm:gaps=[0.001,0.5]:stochasticity=auto"]
    assert specs[2].settings == {"gaps": [0.001, 0.5], "stochasticity": "auto"}
    for text, message in {"ucgm:gaps=[0.1,0.2": "unbalanced", "euler,euler": "more than once", ",": "no sampler",
                          "heun:t_max=0.5:": "is not KEY=VALUE"}.items():
        with pytest.raises(ValueError, match=message):
            parse_sampler_specs(text)
    assert parse_nfe_list("1, 2,8") == [1, 2, 8]
    with pytest.raises(ValueError, match="repeats"):
        parse_nfe_list("2,2")


def test_sliced_w2_against_a_fixed_reference_equals_the_metric():
    generator = torch.Generator().manual_seed(0)
    reference, samples = torch.randn(3000, 3, generator=generator), torch.randn(700, 3, generator=generator) + 0.1
    assert SlicedW2Against(reference, 64, seed=5)(samples) == sliced_wasserstein(samples, reference, 64, seed=5)
    with pytest.raises(ValueError, match="samples has 2 features per sample but reference has 3"):
        SlicedW2Against(reference)(torch.zeros(4, 2))


def test_file_data_suite_measures_against_the_run_data(tmp_path):
    from safetensors.torch import save_file

    generator = torch.Generator().manual_seed(0)
    save_file({"latents": torch.randn(600, 2, 2, 2, generator=generator)}, str(tmp_path / "latents.safetensors"))
    config = {"data": {"name": "latents", "path": str(tmp_path / "latents.safetensors"), "scaling": "none"}}
    suite = build_metric_suite(config, num_samples=100, num_classes=0, num_reference=400)
    close, far = suite.evaluate(torch.randn(100, 2, 2, 2, generator=generator), None), \
        suite.evaluate(torch.randn(100, 2, 2, 2, generator=generator) + 2, None)
    assert [value.metric for value in close] == ["sliced_w2", "mmd"]
    assert close[0].value < far[0].value and close[1].value < far[1].value
    assert [value.metric for value in suite.baselines()] == ["sliced_w2", "mmd"]
    assert close[1].protocol["bandwidths"][1] > 0
    with pytest.raises(ValueError, match="FID / FD-DINOv2 need image data"):
        build_metric_suite(config, 100, 0, feature_distances=[object()])


def test_markdown_tables_mark_spent_nfe_and_baselines():
    records = [{"dataset": "gmm", "model": "m", "sampler": "heun", "nfe": 3, "budget": 4, "metric": "sliced_w2",
                "value": 0.25},
               {"dataset": "gmm", "model": "reference data", "sampler": "floor", "nfe": 0, "metric": "sliced_w2",
                "value": 0.01}]
    text = markdown_tables(records)
    assert "| m | heun | 0.25 (n=3) |" in text and "Baseline, reference data (floor): 0.01" in text
    assert find_value(records, sampler="heun", budget=4) == 0.25 and find_value(records, sampler="x") is None


def _check_quality_report(report: dict) -> None:
    records = report["quality"]
    for record in records:
        assert RECORD_KEYS <= set(record)
    gmm = [record for record in records if record["dataset"] == "gmm" and record["budget"] in QUALITY_NFES]
    samplers = {record["sampler"] for record in gmm}
    assert {"ucgm", "ucgm-o2", "ucgm-official", "ucgm-o2-official", "ucgm (searched)", "euler", "heun",
            "dpm++2m"} <= samplers
    ucgm = next(record for record in gmm if record["sampler"] == "ucgm")
    assert ucgm["settings"] == jsonable_settings(UCGM_DEFAULTS)  # the defaults it ran with are recorded
    assert {record["metric"] for record in records if record["dataset"] == "digits"} == {"digits_fd"}
    ratio = report["few_vs_multi_details"]
    assert report["few_vs_multi"] == ratio["ratio"]
    assert ratio["ratio"] == pytest.approx(ratio["few_step"] / ratio["multi_step"])
    assert ratio["target"] == FEW_VS_MULTI_TARGET and ratio["met"] == (ratio["ratio"] <= FEW_VS_MULTI_TARGET)
    assert set(report["quality_details"]["gmm"]["searches"]) == set(QUALITY_NFES)
    paired = report["quality_details"]["gmm"]["paired_nfe8"]
    assert set(paired["difference_to_euler"]) == {"ucgm (searched)", "ucgm", "ucgm-official"}
    assert len(paired["values"]["euler"]) == len(paired["seeds"])
    assert set(report["ucgm_vs_euler_250"]) == {"gmm", "digits"}
    for dataset, smallest in report["ucgm_vs_euler_250"].items():
        match = report["quality_details"][dataset]["match_euler"]
        assert match["reference_nfe"] == 250 and smallest == match["smallest_nfe"]
        if smallest is not None:  # the scan stops at the first budget at least as good as Euler at 250
            assert match["values"][smallest] <= match["reference_value"] and max(match["values"]) == smallest
    guidance = report["guidance"]
    assert {(r["dataset"], r["guidance"]) for r in guidance} == {(d, g) for d in ("gmm", "digits")
                                                                 for g in ("cfg", "autoguidance")}
    assert {"dataset", "guidance", "scale", "metric", "value"} <= set(guidance[0])
    assert {r["metric"] for r in guidance if r["dataset"] == "gmm"} == {"per_class_sliced_w2", "within_class_spread",
                                                                         "class_mode_coverage"}
    for metric in ("per_class_sliced_w2", "within_class_spread"):  # at scale 1 both are the conditional model alone
        at_one = {r["guidance"]: r["value"] for r in guidance if r["scale"] == 1.0 and r["metric"] == metric
                  and r["dataset"] == "gmm"}
        assert at_one["cfg"] == pytest.approx(at_one["autoguidance"])
    json.dumps(report)
    text = quality_markdown({**report, "meta": {"command": "ucgm bench --sections quality", "quick": True}})
    assert "`ucgm bench --sections quality`" in text and "UCGM-S vs Euler at NFE 8" in text
    assert "Sample-noise floor" in text and "Few-step vs multi-step" in text and "autoguidance" in text
    assert "matches Euler at 250 NFE" in text


def test_quality_bench_at_toy_size():
    sizes = QualitySizes(gmm_steps=20, tune_steps=5, digits_steps=5, num_gmm=200, num_reference=500, num_search=200,
                         num_digits=40, floor_repeats=2, paired_repeats=2, search_population=4, search_generations=1,
                         guide_gmm_steps=10, guide_digits_steps=3, num_guidance=200)
    _check_quality_report(run_quality(sizes))


@pytest.mark.slow
def test_quality_bench_at_small_size():
    sizes = QualitySizes(gmm_steps=600, tune_steps=100, digits_steps=100, num_gmm=2000, num_reference=5000,
                         num_search=2000, num_digits=200, floor_repeats=2, paired_repeats=2, search_population=6,
                         search_generations=2, guide_gmm_steps=100, guide_digits_steps=30, num_guidance=2000)
    report = run_quality(sizes)
    _check_quality_report(report)
    floor = report["quality_details"]["gmm"]["floor"]["mean"]
    best = min(record["value"] for record in report["quality"] if record["dataset"] == "gmm")
    assert floor < best < 10 * floor and np.isfinite(report["few_vs_multi"])
