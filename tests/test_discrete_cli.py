"""The presets of discrete data and cascades from the command line: each trains, samples, evaluates and resumes
exactly (after SIGKILL of ``ucgm train``: the categorical toy by default, every preset in the slow run)."""

from __future__ import annotations

import json
import signal
import subprocess

import numpy as np
import pytest
from training_fixtures import cli_command, losses, run_cli, subprocess_env

from ucgm.cli import main
from ucgm.cli.components import accepted_keys
from ucgm.cli.config import resolve_config
from ucgm.cli.train import run_training
from test_training_resume import _kill_after

UNET = ["model.base_channels=8", "training.batch_size=8", "optimizer.warmup_steps=2", "sampling.num=8",
        "sampling.nfe=4"]
TINY = {
    "categorical-bits": ["model.hidden=16", "model.depth=1", "training.batch_size=32", "optimizer.warmup_steps=5",
                         "sampling.num=64", "sampling.nfe=4"],
    "digits-bits": UNET,
    "digits-cascade": UNET,
}
METRICS = {"categorical-bits": {"tv", "kl"}, "digits-bits": {"digits_fd"}, "digits-cascade": {"digits_fd", "sliced_w2"}}


def _config(preset: str, steps: int, *extra: str) -> dict:
    return resolve_config(preset, TINY[preset] + [f"training.steps={steps}", "training.checkpoint_every=2",
                                                  "training.log_every=1", *extra], accepted_keys)


@pytest.mark.parametrize("preset", sorted(TINY))
def test_preset_trains_resumes_exactly_and_samples(tmp_path, preset):
    run_training(_config(preset, 4), tmp_path / "straight", progress=False)
    run_training(_config(preset, 2), tmp_path / "resumed", progress=False)
    run_training(_config(preset, 4), tmp_path / "resumed", progress=False)
    assert losses(tmp_path / "resumed") == losses(tmp_path / "straight") and len(losses(tmp_path / "straight")) == 4
    out = tmp_path / "evaluation"
    assert main(["evaluate", str(tmp_path / "straight"), "--out", str(out), "--nfe", "4", "--num", "16",
                 "--no-progress"]) == 0
    records = [r for r in json.loads((out / "metrics.json").read_text()) if r["nfe"] > 0]
    assert {r["metric"] for r in records} == METRICS[preset] and all(np.isfinite(r["value"]) for r in records)
    samples = tmp_path / "samples.npz"
    assert main(["sample", str(tmp_path / "straight"), "--out", str(samples), "--out", str(tmp_path / "grid.png"),
                 "--num", "8"]) == 0
    decoded = np.load(samples)["samples"]
    if preset != "digits-cascade":  # bits decode to integers
        assert np.array_equal(decoded, np.round(decoded)) and decoded.min() >= 0


def _sigkill_resume(tmp_path, preset: str, steps: int) -> None:
    arguments = ["train", preset, "--run-dir", "RUN", "--steps", str(steps), "--checkpoint-every", "10",
                 "--log-every", "1", "--no-progress", *TINY[preset]]
    reference, run_dir = tmp_path / "uninterrupted", tmp_path / "interrupted"
    run_training(_config(preset, steps, "training.checkpoint_every=10"), reference, progress=False)
    command = [str(run_dir) if argument == "RUN" else argument for argument in arguments]
    process = subprocess.Popen(cli_command(*command), env=subprocess_env(), stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE)
    killed_at = _kill_after(process, run_dir, 12)
    assert process.returncode == -signal.SIGKILL and killed_at < steps
    finished = run_cli(*command)
    assert finished.returncode == 0, finished.stderr
    assert "resuming" in finished.stderr
    assert losses(run_dir) == losses(reference)


def test_categorical_bits_resumes_exactly_after_sigkill(tmp_path):
    _sigkill_resume(tmp_path, "categorical-bits", 60)


@pytest.mark.slow
@pytest.mark.parametrize("preset", ["digits-bits", "digits-cascade"])
def test_image_presets_resume_exactly_after_sigkill(tmp_path, preset):
    _sigkill_resume(tmp_path, preset, 60)
