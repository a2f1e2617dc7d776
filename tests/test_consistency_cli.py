"""The consistency family from the command line: ``ucgm train gmm objective=NAME`` picks up the preset's
per-objective defaults (``objectives:`` in the YAML presets), trains, samples with ``ucgm sample`` and resumes
exactly; the presets agree with ``CONSISTENCY_PRESETS``."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from training_fixtures import TINY_GMM, losses

from ucgm.cli import main
from ucgm.methods.consistency.presets import CONSISTENCY_PRESETS
from ucgm.training.checkpoint import complete_checkpoints, read_weights
from ucgm.cli.components import accepted_keys
from ucgm.cli.config import load_config_source, read_yaml_mapping, resolve_config
from ucgm.validation import ConfigError

OBJECTIVES = ("cd", "ct", "ict", "ect", "mcm", "tcm", "scm")
#: A digits UNet small enough for a few CPU steps in well under a second.
TINY_DIGITS = ["model.base_channels=8", "model.max_groups=4", "training.batch_size=8", "sampling.num=4"]


def _train(run_dir: Path, preset: str, *arguments: str) -> None:
    assert main(["train", preset, "--run-dir", str(run_dir), "--no-progress", *arguments]) == 0


def _train_gmm(run_dir: Path, objective: str, *arguments: str) -> None:
    _train(run_dir, "gmm", f"objective={objective}", *TINY_GMM, *arguments)


def _sample(run_dir: Path, out: Path, *arguments: str) -> np.ndarray:
    assert main(["sample", str(run_dir), "--out", str(out), "--num", "16", *arguments]) == 0
    return np.load(out)["samples"]


@pytest.mark.parametrize("objective", OBJECTIVES)
def test_train_then_sample_every_consistency_objective(tmp_path, objective):
    run_dir = tmp_path / objective
    _train_gmm(run_dir, objective, "--steps", "3")
    saved = read_yaml_mapping(run_dir / "config.yaml")
    assert saved["objective"]["name"] == objective
    assert saved["training"]["steps"] == 3 and [step for step, _ in complete_checkpoints(run_dir)] == [3]
    samples = _sample(run_dir, tmp_path / "samples.npz")
    assert samples.shape == (16, 2) and np.isfinite(samples).all()


@pytest.mark.parametrize("objective", OBJECTIVES)
def test_rerunning_after_losing_the_last_checkpoint_resumes_exactly(tmp_path, objective):
    run_dir = tmp_path / "run"
    arguments = ("--steps", "4", "--checkpoint-every", "2", "--log-every", "1")
    _train_gmm(run_dir, objective, *arguments)
    expected_losses = losses(run_dir)
    final = dict(complete_checkpoints(run_dir))[4]
    expected_weights = read_weights(final, "model")
    shutil.rmtree(final)  # as if the run had been killed after its step-2 checkpoint

    _train_gmm(run_dir, objective, *arguments)
    assert losses(run_dir) == expected_losses
    resumed = read_weights(dict(complete_checkpoints(run_dir))[4], "model")
    assert all(torch.equal(resumed[name], value) for name, value in expected_weights.items())


def test_tcm_stage_two_and_ect_start_from_earlier_runs(tmp_path):
    _train_gmm(tmp_path / "flow", "flow_matching", "--steps", "2")
    _train_gmm(tmp_path / "ect", "ect", "--steps", "2", f"init.checkpoint={tmp_path / 'flow'}")
    _train_gmm(tmp_path / "stage2", "tcm", "objective.stage=2", f"init.checkpoint={tmp_path / 'ect'}", "--steps", "2")
    saved = read_yaml_mapping(tmp_path / "stage2" / "config.yaml")["objective"]
    assert saved == {"name": "tcm", "stage": 2, "transition_sigma": 1.0, "boundary_prob": 0.25, "boundary_weight": 0.1}
    assert np.isfinite(_sample(tmp_path / "stage2", tmp_path / "samples.npz")).all()


@pytest.mark.parametrize("objective", ("ct", "scm"))
def test_digits_consistency_objectives_train_and_sample(tmp_path, objective):
    run_dir = tmp_path / objective
    _train(run_dir, "digits", f"objective={objective}", *TINY_DIGITS, "--steps", "2")
    samples = _sample(run_dir, tmp_path / "samples.npz", "--num", "4")
    assert samples.shape == (4, 1, 8, 8) and np.isfinite(samples).all()


# ------------------------------------------------------------------------------------------ presets
@pytest.mark.parametrize("preset", ("gmm", "digits"))
def test_preset_objective_sections_are_the_consistency_presets(preset):
    entries = load_config_source(preset)["objectives"]
    compared = 0
    for key, section in CONSISTENCY_PRESETS.items():
        dataset, name = key.split("-", 1)
        if dataset != preset:
            continue
        name = name.split("-")[0]  # tcm-stage1 / tcm-stage2 share the tcm entry
        entry = {"name": name, **entries[name]["objective"]}
        if key.endswith("-stage2"):
            entry["stage"] = 2
        assert {option: entry.get(option) for option in section} == section, key
        compared += 1
    assert compared >= 3


def test_objective_shorthand_applies_the_entry_and_later_overrides_win():
    config = resolve_config("gmm", ["objective=scm", "objective.tangent_warmup_steps=7", "model.time_scale=2.0"],
                            accepted_keys)
    assert config["transport"]["name"] == "trigflow"
    assert config["objective"] == {"name": "scm", "tangent_warmup_steps": 7, "adaptive_weighting": False}
    assert config["model"]["time_scale"] == 2.0
    assert resolve_config("gmm", ["objective.name=ct"], accepted_keys)["objective"]["final_scales"] == 40
    flow = resolve_config("gmm", ["objective=flow_matching"], accepted_keys)
    assert flow["objective"] == {"name": "flow_matching"} and flow["transport"]["name"] == "linear"


def test_an_entry_setting_another_section_is_rejected():
    raw = load_config_source("gmm")
    raw["objectives"]["ct"]["init"] = {"checkpoint": "elsewhere"}
    with pytest.raises(ConfigError, match=r"objectives\.ct sets section\(s\) \['init'\]; allowed sections: data"):
        resolve_config(raw, ["objective=ct"], accepted_keys)


def test_cd_on_digits_without_a_teacher_is_a_clear_error(tmp_path, capsys):
    status = main(["train", "digits", "objective=cd", *TINY_DIGITS, "--steps", "1", "--run-dir", str(tmp_path / "r")])
    assert status == 2
    assert "cd needs a teacher" in capsys.readouterr().err
