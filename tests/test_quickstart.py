"""The main job end to end at toy size (fast), and at full size with its target (slow)."""

import json

import pytest

from ucgm.analysis.reports import draw_samples, run_ucgm_settings
from ucgm.cli.quickstart import METRICS, RECIPES, Recipe, few_vs_multi, run_quickstart
from ucgm.cli.sample import load_checkpoint_model
from ucgm.sampling.registry import get_sampler

TINY = {
    "gmm": Recipe(
        preset="gmm",
        overrides=["data.conditional=false", "objective.enhanced_ratio=0", "model.hidden=16", "model.depth=1",
                   "training.steps=30", "training.batch_size=64", "optimizer.warmup_steps=0"],
        tune_overrides=["objective.enhanced_ratio=0", "training.steps=10"],
        num_samples=200,
        metric_name="sliced_w2",
        samplers=RECIPES["gmm"].samplers,
        tune_recipe=RECIPES["gmm"].tune_recipe,
    ),
    "digits": Recipe(
        preset="digits",
        overrides=["model.base_channels=8", "objective.enhanced_ratio=0.3", "training.steps=4",
                   "training.batch_size=8", "training.sample_every=0", "optimizer.warmup_steps=0"],
        tune_overrides=["training.steps=2", "training.sample_every=0"],
        num_samples=40,
        metric_name="digits_fd",
        samplers=RECIPES["digits"].samplers,
    ),
}


def test_quickstart_writes_report_metrics_grids_and_plot(tmp_path):
    records = run_quickstart(tmp_path, ["gmm", "digits"], nfes=(1, 2, 4), progress=False, recipes=TINY)
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved == records
    assert {tuple(sorted(record)) for record in saved} == {("dataset", "metric", "model", "nfe", "sampler", "value")}
    assert {(r["dataset"], r["model"], r["sampler"]) for r in saved} == {
        (dataset, model, sampler) for dataset in TINY for model in ("multi-step", "few-step")
        for sampler in ("ucgm", "euler")}
    assert all(r["value"] > 0 for r in saved)
    report = (tmp_path / "report.md").read_text()
    assert "## gmm (sliced_w2)" in report and "## digits (digits_fd)" in report
    assert "Few-step at NFE 2 / multi-step at NFE 64" not in report  # NFE 64 was not sampled
    assert (tmp_path / "nfe_quality.png").stat().st_size > 1000
    assert (tmp_path / "gmm" / "samples" / "few-step_ucgm_nfe2.png").is_file()
    assert (tmp_path / "digits" / "samples" / "multi-step_euler_nfe1.png").is_file()
    # the few-step model is tuned with the named recipe and samples with its run's UCGM-S settings (the recipe's),
    # not the sampler's defaults
    few = load_checkpoint_model(tmp_path / "gmm" / "few-step")
    settings = run_ucgm_settings(few.config)
    recipe = few.config["tune_recipes"]["long"]
    assert few.config["optimizer"]["lr"] == recipe["optimizer"]["lr"] and few.config["training"]["steps"] == 10
    assert settings["stochasticity"] == recipe["sampling"]["stochasticity"] > 0
    metric = METRICS["sliced_w2"](tmp_path / "gmm" / "multi-step", 200)
    value = {name: metric(draw_samples(few.model, few.transport, get_sampler("ucgm", chosen), 2, (2,), 0, 200,
                                       seed=0, batch_size=200).samples)
             for name, chosen in (("run", settings), ("defaults", {}))}
    recorded = [r["value"] for r in saved if (r["dataset"], r["model"], r["sampler"], r["nfe"]) ==
                ("gmm", "few-step", "ucgm", 2)]
    assert recorded == [pytest.approx(value["run"], rel=1e-6)] and value["run"] != value["defaults"]
    # re-running resumes the finished runs and reproduces the numbers
    assert run_quickstart(tmp_path, ["gmm"], nfes=(1, 2, 4), progress=False, recipes=TINY) == records[:12]


def test_quickstart_rejects_unknown_dataset(tmp_path):
    with pytest.raises(ValueError, match="unknown quickstart dataset.*allowed: gmm, digits"):
        run_quickstart(tmp_path, ["cifar"], progress=False)


@pytest.mark.slow
def test_full_quickstart_meets_the_few_step_target(tmp_path):
    records = run_quickstart(tmp_path, progress=False)
    assert few_vs_multi(records, "gmm") <= 1.5
