"""The ``ucgm`` command line: train / tune / sample end to end at toy size, errors, lazy dispatch."""

from __future__ import annotations

import types

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from training_fixtures import TINY_GMM, losses

from ucgm.cli import main
from ucgm.training.checkpoint import latest_checkpoint, read_checkpoint_info, read_state, read_weights
from ucgm.cli.config import read_yaml_mapping
from ucgm.cli.tune import recipe_for_steps


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """A tiny gmm run of 20 steps with checkpoints at 10 and 20."""
    run_dir = tmp_path_factory.mktemp("gmm") / "run"
    code = main(["train", "gmm", "--run-dir", str(run_dir), "--steps", "20", "--checkpoint-every", "10",
                 "--log-every", "5", *TINY_GMM])
    assert code == 0
    return run_dir


def test_train_writes_config_stats_and_checkpoints(trained_run):
    config = read_yaml_mapping(trained_run / "config.yaml")
    assert config["model"] == {"name": "mlp", "hidden": 16, "depth": 1, "data_dim": 2, "num_classes": 8}
    assert config["training"]["steps"] == 20
    assert [step for step, _ in losses(trained_run)] == [5, 10, 15, 20]
    info = read_checkpoint_info(trained_run)
    assert info.step == 20 and info.groups == ["ema", "model", "reference"] and info.num_classes == 8
    assert info.normalisation == {"kind": "affine", "scale": 1.0, "shift": 0.0}


def test_a_named_tune_recipe_is_merged_over_the_tune_section(trained_run, tmp_path, capsys):
    source = read_yaml_mapping(trained_run / "config.yaml")
    long = source["tune_recipes"]["long"]
    tuned = tmp_path / "tuned-long"
    assert main(["tune", str(trained_run), "--recipe", "long", "--run-dir", str(tuned), "--steps", "2",
                 "--checkpoint-every", "2"]) == 0
    config = read_yaml_mapping(tuned / "config.yaml")
    assert config["optimizer"]["lr"] == long["optimizer"]["lr"] != source["tune"]["optimizer"]["lr"]
    assert config["training"]["ema"]["decay"] == long["training"]["ema"]["decay"] != \
        source["tune"]["training"]["ema"]["decay"]
    assert config["optimizer"]["grad_clip"] == source["tune"]["optimizer"]["grad_clip"]  # from tune: itself
    assert config["objective"]["consistency_ratio"] == 1.0 and config["training"]["steps"] == 2
    assert main(["tune", str(trained_run), "--recipe", "lng", "--run-dir", str(tmp_path / "x")]) == 2
    assert "tune recipe 'lng' is not in the config's tune_recipes section (recipes: long)" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_the_recipe_for_a_tuning_length_is_the_one_stated_for_the_nearest_length():
    config = {"tune": {"training": {"steps": 300}}, "tune_recipes": {"long": {"training": {"steps": 3000}}}}
    assert [recipe_for_steps(config, steps) for steps in (100, 300, 900, 1000, 5000)] == \
        [None, None, None, "long", "long"]  # the boundary is the geometric mean, 949
    assert recipe_for_steps({"tune": {"optimizer": {"lr": 1e-3}}}, 3000) is None


def test_help_version_and_unknown_command(capsys):
    assert main(["--help"]) == 0
    assert "train" in capsys.readouterr().out
    assert main(["--version"]) == 0
    assert main(["trian"]) == 2
    assert "did you mean 'train'" in capsys.readouterr().err


def test_config_errors_exit_with_a_clear_message(tmp_path, capsys):
    assert main(["train", "gmm", "--run-dir", str(tmp_path / "r"), "optimizer.lrr=1e-3"]) == 2
    error = capsys.readouterr().err
    assert "unknown config key 'optimizer.lrr'; did you mean 'optimizer.lr'?" in error
    assert main(["train", "gmm", "--run-dir", str(tmp_path / "r"), "training.batch_size=0"]) == 2
    assert "training.batch_size=0" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_resuming_with_a_different_method_is_refused(trained_run, capsys):
    code = main(["train", "gmm", "--run-dir", str(trained_run), "--steps", "20", *TINY_GMM,
                 "objective.enhanced_ratio=0.3"])
    assert code == 2
    assert "objective.enhanced_ratio" in capsys.readouterr().err


def test_lazy_dispatch_to_other_modules(monkeypatch):
    calls = []
    fake = types.ModuleType("ucgm.cli.edit")
    fake.main = lambda argv: calls.append(argv) or 0
    monkeypatch.setitem(__import__("sys").modules, "ucgm.cli.edit", fake)
    assert main(["edit", "--flag", "value"]) == 0
    assert calls == [["--flag", "value"]]


def _sample(run_dir, out, *arguments: str) -> np.ndarray:
    assert main(["sample", str(run_dir), "--out", str(out), *arguments]) == 0
    return np.load(out)["samples"]


def test_samples_do_not_depend_on_batch_size(trained_run, tmp_path):
    whole = _sample(trained_run, tmp_path / "a.npz", "--num", "24", "--batch-size", "24", "--nfe", "4")
    pieces = _sample(trained_run, tmp_path / "b.npz", "--num", "24", "--batch-size", "5", "--nfe", "4")
    assert whole.shape == (24, 2)
    np.testing.assert_allclose(pieces, whole, rtol=0, atol=1e-6)
    prefix = _sample(trained_run, tmp_path / "c.npz", "--num", "7", "--batch-size", "3", "--nfe", "4")
    np.testing.assert_allclose(prefix, whole[:7], rtol=0, atol=1e-6)
    other_seed = _sample(trained_run, tmp_path / "d.npz", "--num", "24", "--nfe", "4", "--seed", "1")
    assert not np.allclose(other_seed, whole)
    labels = np.load(tmp_path / "a.npz")["labels"]
    assert labels.tolist() == [i % 8 for i in range(24)]


def test_sample_writers_and_samplers(trained_run, tmp_path):
    png, tensors = tmp_path / "scatter.png", tmp_path / "s.safetensors"
    assert main(["sample", str(trained_run), "--out", str(png), "--out", str(tensors), "--num", "16",
                 "--sampler", "heun", "--nfe", "5", "--labels", "1", "2", "--cfg-scale", "2"]) == 0
    assert Image.open(png).size[0] > 100
    saved = load_file(str(tensors))
    assert saved["samples"].shape == (16, 2) and saved["labels"].tolist() == [1, 2] * 8
    for sampler in ("euler", "dpm++2m", "edm"):
        assert main(["sample", str(trained_run), "--out", str(tmp_path / f"{sampler}.npz"), "--num", "4",
                     "--sampler", sampler, "--nfe", "3"]) == 0
    stochastic = _sample(trained_run, tmp_path / "st.npz", "--num", "4", "stochasticity=1.0", "nfe=2")
    assert np.isfinite(stochastic).all()


def test_image_grid_png(tmp_path):
    run_dir = tmp_path / "digits"
    assert main(["train", "digits", "--run-dir", str(run_dir), "--steps", "2", "--checkpoint-every", "2",
                 "model.base_channels=8", "model.channel_mults=[1]", "training.batch_size=8",
                 "training.sample_every=2", "sampling.nfe=2", "sampling.num=4"]) == 0
    assert Image.open(run_dir / "samples" / "step_0000002.png").size == (65, 65)  # 2x2 tiles of 32 + gap
    assert main(["sample", str(run_dir), "--out", str(tmp_path / "grid.png"), "--num", "9", "--nfe", "2"]) == 0
    assert Image.open(tmp_path / "grid.png").size == (98, 98)


def test_sample_errors(trained_run, tmp_path, capsys):
    assert main(["sample", str(tmp_path / "missing"), "--out", str(tmp_path / "x.npz")]) == 2
    assert "does not exist" in capsys.readouterr().err
    broken = tmp_path / "model.safetensors"
    broken.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    assert main(["sample", str(broken), "--out", str(tmp_path / "x.npz")]) == 2
    assert "corrupt or not a safetensors file" in capsys.readouterr().err
    assert main(["sample", str(trained_run), "--out", str(tmp_path / "x.jpg")]) == 2
    assert "allowed extensions" in capsys.readouterr().err
    assert main(["sample", str(trained_run), "--out", str(tmp_path / "x.npz"), "--labels", "9"]) == 2
    assert "outside [0, 8]" in capsys.readouterr().err


def test_tune_from_a_checkpoint_end_to_end(trained_run, tmp_path):
    tuned = tmp_path / "tuned"
    arguments = ["tune", str(trained_run), "--run-dir", str(tuned), "--checkpoint-every", "3", "--log-every", "2"]
    assert main([*arguments, "--steps", "4"]) == 0
    config = read_yaml_mapping(tuned / "config.yaml")
    objective = config["objective"]
    assert (objective["consistency_ratio"], objective["enhanced_style"], objective["reference"]) == \
        (1.0, "fc-vs-fe", "frozen")
    assert config["optimizer"]["name"] == "radam" and config["optimizer"]["grad_clip"] == 0.1
    assert (config["training"]["ema"]["decay"], config["training"]["batch_size"]) == (0.995, 1024)
    assert config["init"]["checkpoint"] == str(latest_checkpoint(trained_run).resolve())
    source_ema = read_weights(trained_run, "ema")
    reference = read_weights(tuned, "reference")
    for name, tensor in source_ema.items():  # the frozen reference is the source's EMA
        assert torch.equal(reference[name], tensor)
    assert main([*arguments, "--steps", "6"]) == 0  # re-running resumes the tuning run, no re-initialisation
    assert [step for step, _ in losses(tuned)] == [2, 4, 6]
    assert main(["sample", str(tuned), "--out", str(tmp_path / "few.npz"), "--num", "8"]) == 0
    assert np.load(tmp_path / "few.npz")["samples"].shape == (8, 2)
