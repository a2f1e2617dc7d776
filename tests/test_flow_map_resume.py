"""The flow-map methods resume exactly: a run stopped after a checkpoint and started again logs the losses of the
uninterrupted run (the method state — CAF's teacher couplings, DDDM's estimate buffer with its staged writes,
MeanFlow's and AYF's tangent decision, the EMA target networks of CTM and Shortcut — restored, not regenerated); in
process by default, and ``ucgm train gmm objective=NAME --steps 30`` killed with SIGKILL (slow)."""

from __future__ import annotations

import signal
import subprocess

import pytest
from test_training_resume import _kill_after, _train_arguments
from training_fixtures import cli_command, losses, run_cli, subprocess_env, tiny_gmm_config

from ucgm.cli.train import run_training
from ucgm.cli.run_log import read_stats

STEPS, EVERY = 30, 10
#: Small enough to run in seconds (CAF: 1024 couplings of 16 Heun steps; DDDM: 512 indexed mixture draws).
OVERRIDES = {
    "imm": [],
    "caf": ["objective.num_couplings=1024", "objective.teacher_steps=16"],
    "dddm": ["data.num_samples=512"],
    "ctm": ["objective.num_scales=10", "objective.max_teacher_steps=4"],
    "shortcut": [],
    "meanflow": [],
    "ayf": ["objective.tangent_warmup_steps=4"],
}


@pytest.mark.parametrize("name", sorted(OVERRIDES))
def test_a_stopped_run_continues_exactly(tmp_path, name):
    def config(steps):
        return tiny_gmm_config(f"objective={name}", *OVERRIDES[name], f"training.steps={steps}",
                               "training.checkpoint_every=3", "training.log_every=1")

    run_training(config(6), tmp_path / "uninterrupted", progress=False)
    run_training(config(3), tmp_path / "stopped", progress=False)
    run_training(config(6), tmp_path / "stopped", progress=False)
    assert losses(tmp_path / "stopped") == losses(tmp_path / "uninterrupted")


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(OVERRIDES))
def test_flow_map_methods_resume_exactly_after_sigkill(tmp_path, name):
    overrides = [f"objective={name}", *OVERRIDES[name]]
    reference = run_cli(*_train_arguments(tmp_path / "uninterrupted", *overrides, steps=STEPS,
                                          checkpoint_every=EVERY))
    assert reference.returncode == 0, reference.stderr
    expected = read_stats(tmp_path / "uninterrupted" / "stats.jsonl")
    assert [record["step"] for record in expected] == list(range(1, STEPS + 1))

    run_dir = tmp_path / "interrupted"
    arguments = _train_arguments(run_dir, *overrides, steps=STEPS, checkpoint_every=EVERY)
    process = subprocess.Popen(cli_command(*arguments), env=subprocess_env(), stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE)
    killed_at = _kill_after(process, run_dir, EVERY + 2)
    assert process.returncode == -signal.SIGKILL and killed_at < STEPS
    finished = run_cli(*arguments)
    assert finished.returncode == 0, finished.stderr
    assert "resuming" in finished.stderr
    keys = [key for key in expected[0] if key != "sec_per_step"]
    assert [[record[key] for key in keys] for record in read_stats(run_dir / "stats.jsonl")] == \
        [[record[key] for key in keys] for record in expected]
