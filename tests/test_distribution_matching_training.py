"""DMD2 through the trainer: killed with SIGKILL at random points and re-run with the same command, a run logs the
uninterrupted run's stats.jsonl and ends with its weights (generator and its EMA, fake score with its classifier
head; every optimizer restored, or the losses would differ); under a 2-process gloo torchrun job it logs every step
exactly once. A fake score started from a teacher checkpoint holds the teacher's weights plus a fresh head."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch
from training_fixtures import TINY_GMM, cli_command, run_cli, subprocess_env, tiny_gmm_config

from ucgm.cli.components import build_method, build_run_networks
from ucgm.cli.run_log import read_stats
from ucgm.cli.train import run_training
from ucgm.training.checkpoint import complete_checkpoints, read_checkpoint_info, read_weights
from ucgm.training.loading import load_checkpoint_model

DMD2 = ["objective=dmd2"]
#: Keys that differ between runs by nature (wall time).
TIMING_KEYS = ("sec_per_step",)


def _arguments(run_dir, steps: int, every: int) -> list[str]:
    return ["train", "gmm", "objective=dmd2", "--run-dir", str(run_dir), "--steps", str(steps),
            "--checkpoint-every", str(every), "--log-every", "1", *TINY_GMM]


def _rows(run_dir) -> list[dict]:
    return [{key: value for key, value in record.items() if key not in TIMING_KEYS}
            for record in read_stats(run_dir / "stats.jsonl")]


def _kill_after(process: subprocess.Popen, run_dir, step: int, kill=None, timeout: float = 240) -> None:
    """SIGKILL ``process`` (or run ``kill``) once the run has a checkpoint and has logged ``step``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and process.poll() is None:
        records = read_stats(run_dir / "stats.jsonl")
        if complete_checkpoints(run_dir) and records and records[-1]["step"] >= step:
            (kill or (lambda: process.send_signal(signal.SIGKILL)))()
            process.wait()
            return
        time.sleep(0.005)
    process.kill()
    pytest.fail(f"the run ended (code {process.poll()}) before it could be killed at step {step}")


def _resumes_exactly(tmp_path, steps: int, every: int, kills: int, seed: int) -> None:
    reference, run_dir = tmp_path / "uninterrupted", tmp_path / "interrupted"
    run_training(tiny_gmm_config(*DMD2, f"training.steps={steps}", f"training.checkpoint_every={every}",
                                 "training.log_every=1"), reference, progress=False)
    expected = _rows(reference)
    assert [row["step"] for row in expected] == list(range(1, steps + 1))
    assert {"loss/fake_score", "loss/generator", "gan_real_logit", "gan_generator_loss"} <= set(expected[0])
    chooser = random.Random(seed)
    kill_steps = sorted(chooser.sample(range(every + 2, steps - 5), kills))
    for kill_step in kill_steps:
        process = subprocess.Popen(cli_command(*_arguments(run_dir, steps, every)), env=subprocess_env(),
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        _kill_after(process, run_dir, kill_step)
        assert process.returncode == -signal.SIGKILL
    finished = run_cli(*_arguments(run_dir, steps, every))
    assert finished.returncode == 0, finished.stderr
    assert "resuming" in finished.stderr
    assert _rows(run_dir) == expected  # exact equality, no gaps or repeats
    groups = read_checkpoint_info(reference).groups
    assert {"model", "ema", "fake_score"} <= set(groups)
    fake_weights = read_weights(reference, "fake_score")
    assert any(name.startswith("classifier_head.") for name in fake_weights)
    for group in groups:
        interrupted = read_weights(run_dir, group)
        for name, value in read_weights(reference, group).items():
            assert torch.equal(interrupted[name], value), f"{group}.{name}"


def test_dmd2_killed_and_rerun_logs_the_uninterrupted_stats(tmp_path):
    _resumes_exactly(tmp_path, steps=40, every=10, kills=1, seed=11)


@pytest.mark.slow
def test_dmd2_200_steps_killed_at_random_points_resumes_exactly(tmp_path):
    """The issue's command: ``ucgm train gmm objective=dmd2 --steps 200 --checkpoint-every 20 --log-every 1``."""
    _resumes_exactly(tmp_path, steps=200, every=20, kills=3, seed=random.randrange(10**6))


def _torchrun(run_dir, steps: int, every: int) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "ucgm",
            *_arguments(run_dir, steps, every)[:1], *_arguments(run_dir, steps, every)[1:]]


def test_dmd2_under_two_process_ddp_logs_every_step_once(tmp_path):
    job = subprocess.run(_torchrun(tmp_path / "ddp", 12, 6), capture_output=True, text=True, timeout=240,
                         env=subprocess_env(), check=False)
    assert job.returncode == 0, job.stderr[-3000:]
    assert [row["step"] for row in _rows(tmp_path / "ddp")] == list(range(1, 13))


@pytest.mark.slow
def test_dmd2_under_two_process_ddp_killed_and_rerun_logs_every_step_once(tmp_path):
    steps, every = 40, 10
    run_dir = tmp_path / "ddp"
    job = subprocess.Popen(_torchrun(run_dir, steps, every), env=subprocess_env(), stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL, start_new_session=True)
    _kill_after(job, run_dir, random.randint(every + 2, steps - 5), kill=lambda: os.killpg(job.pid, signal.SIGKILL))
    resumed = subprocess.run(_torchrun(run_dir, steps, every), capture_output=True, text=True, timeout=240,
                             env=subprocess_env(), check=False)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert [row["step"] for row in _rows(run_dir)] == list(range(1, steps + 1))


def test_a_fake_score_from_a_teacher_checkpoint_holds_its_weights_and_a_fresh_head(tmp_path):
    teacher_dir = tmp_path / "teacher"
    run_training(tiny_gmm_config("objective=flow_matching", "training.steps=3"), teacher_dir, progress=False)
    config = tiny_gmm_config(*DMD2, f"objective.teacher=checkpoint:{teacher_dir}")
    method = build_method(config)
    assert method.fake_score_init == "teacher"
    primary = load_checkpoint_model(teacher_dir).networks["model"]
    fake = build_run_networks(config, method, primary, True)["fake_score"].module
    teacher = load_checkpoint_model(teacher_dir).model
    assert fake.classifier_head is not None
    for name, value in teacher.state_dict().items():
        assert torch.equal(fake.state_dict()[name], value), name
    assert all(parameter.requires_grad for parameter in fake.parameters())


def test_msd_students_all_start_from_the_initial_checkpoint(tmp_path):
    teacher_dir = tmp_path / "teacher"
    conditional = ("data.conditional=true",)
    run_training(tiny_gmm_config("objective=flow_matching", "training.steps=3", *conditional), teacher_dir,
                 progress=False)
    config = tiny_gmm_config("objective=msd", "objective.num_students=4", *conditional,
                             f"objective.teacher=checkpoint:{teacher_dir}", f"init.checkpoint={teacher_dir}")
    method = build_method(config)
    primary = load_checkpoint_model(teacher_dir).networks["model"]
    networks = build_run_networks(config, method, primary, True)
    teacher = load_checkpoint_model(teacher_dir).networks["model"].state_dict()
    for role in ("student_1", "student_2", "student_3"):
        student = networks[role].module.state_dict()
        assert all(torch.equal(student[name], value) for name, value in teacher.items()), role
        assert networks[role].module is not primary  # a copy, trained on its own labels


def test_a_fake_score_ema_is_trained_checkpointed_and_read_by_ucgm_train(tmp_path):
    run_dir = tmp_path / "run"
    run_training(tiny_gmm_config(*DMD2, "objective.fake_score_ema=0.5", "training.steps=2"), run_dir,
                 progress=False)
    trained, averaged = read_weights(run_dir, "fake_score"), read_weights(run_dir, "fake_score-ema")
    assert set(trained) == set(averaged)
    assert any(not torch.equal(trained[name], averaged[name]) for name in trained)
    assert all(torch.isfinite(value).all() for value in averaged.values())
