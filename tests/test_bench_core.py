"""The core bench section at toy size: the UCGM-T step-cost keys (with the fast mode against the parity mode), the
parity-vs-fast quality runs through the user path, and the markdown verdicts."""

import math

import pytest
import torch

from ucgm.bench import core
from ucgm.bench.core import FAST_MODE_KEY, OBJECTIVE_SETTINGS
from ucgm.bench.fast_mode import FastModeSizes, few_step_sliced_w2, train_parity_and_fast
from ucgm.bench.report_core import markdown
from ucgm.cli.config import read_yaml_mapping
from ucgm.cli.train import CONFIG_FILE
from ucgm.data.mixtures import make_mixture
from ucgm.methods import UCGMObjective
from ucgm.methods.diffusion.ucgm import native_bfloat16
from ucgm.metrics.suites import SlicedW2Against


def test_objective_cost_times_every_setting_and_the_fast_mode(monkeypatch):
    tiny = {"name": "dit", "input_size": 16, "patch_size": 4, "in_channels": 4, "num_classes": 10, "size": "S",
            "depth": 1, "hidden_size": 32, "num_heads": 2}
    monkeypatch.setattr(core, "_dit_config", lambda quick: tiny)
    ratios, details = core.objective_cost(quick=True)
    assert list(ratios) == [*OBJECTIVE_SETTINGS, FAST_MODE_KEY]
    assert all(value > 0 and math.isfinite(value) for value in ratios.values())
    # the fast key is the ratio to the parity-mode step, so its step over flow matching is the product
    assert details["fast_mode_vs_fm"] == pytest.approx(ratios[FAST_MODE_KEY] * ratios["lambda=1+enhanced"])
    # the default reference precision, auto, resolved on this CPU
    native = native_bfloat16(torch.device("cpu"))
    assert details["fast_mode_reference_precision"] == ("bfloat16" if native else "float32")


@pytest.mark.parametrize("precision, expected", [("bfloat16", "bfloat16"), ("float32", "float32")])
def test_reference_pass_precision_names_the_autocast_dtype(precision, expected):
    objective = UCGMObjective(mode="fast", reference_precision=precision)
    assert core.reference_pass_precision(objective, torch.device("cpu")) == expected


def test_parity_and_fast_runs_share_the_recipe_and_are_sampled_at_two_nfe(tmp_path):
    sizes = FastModeSizes(base_steps=20, tune_steps=4, num_samples=200, num_reference=1000)
    runs = train_parity_and_fast(tmp_path, sizes)
    configs = {mode: read_yaml_mapping(run_dir / CONFIG_FILE) for mode, run_dir in runs.items()}
    assert configs["parity"]["objective"].pop("mode") == "parity" and configs["fast"]["objective"].pop("mode") == "fast"
    assert configs["parity"] == configs["fast"]
    assert configs["fast"]["objective"]["consistency_ratio"] == 1.0 and configs["fast"]["objective"]["enhanced_ratio"]
    mixture = make_mixture("8gaussians")
    metric = SlicedW2Against(mixture.sample(sizes.num_reference, torch.Generator().manual_seed(0))[0])
    values = {mode: few_step_sliced_w2(run_dir, metric, sizes.num_samples) for mode, run_dir in runs.items()}
    assert all(0 < value < 10 for value in values.values()) and values["parity"] != values["fast"]


def test_markdown_reports_the_fast_mode_ratio_and_quality_with_verdicts():
    report = {"ucgm_t_vs_fm": {"lambda=0": 1.0, "lambda=1+enhanced": 1.9, FAST_MODE_KEY: 0.75},
              "ucgm_t_vs_fm_details": {"model": {"depth": 4, "hidden_size": 256}, "batch_size": 16,
                                       "fm_step_seconds": 0.3, "forward_seconds": 0.1, "fast_mode_vs_fm": 1.425,
                                       "fast_mode_reference_precision": "float32",
                                       "bounds": {"lambda=0": 1.0, "lambda=1+enhanced": 2.0},
                                       "extra_forward_passes": {"lambda=0": 0, "lambda=1+enhanced": 3}},
              "sampler_overhead": {"order1": 1.0}, "sampler_overhead_details": {"nfe": {"order1": 8}},
              "fast_mode_quality": {"parity": 0.06, "fast": 0.07},
              "fast_mode_quality_details": {"base_steps": 3000, "tune_steps": 300,
                                            "floor": {"mean": 0.03, "std": 0.004}}}
    text = markdown(report)
    assert "| lambda=1+enhanced | 3 | 1.900 | <= 2.060 | met |" in text
    assert ("(lambda=1+enhanced, `objective.mode=fast`, float32 reference passes): step time / parity-mode step "
            "time **0.750** (flow-matching step x 1.425); target <= 0.8: met") in text
    assert "| parity | 0.0600 |" in text and "| fast | 0.0700 |" in text
    assert "| floor (exact samples) | 0.0300 +- 0.0040 |" in text
    assert "fast <= parity + 2 floor std = 0.0680: MISSED" in text
