"""End-to-end resume: ``python -m ucgm train`` killed with SIGKILL after its first checkpoint, then re-run with the
same command, logs exactly the losses of the uninterrupted run."""

from __future__ import annotations

import random
import signal
import subprocess
import time

import pytest
from training_fixtures import TINY_GMM, TWO_NETWORK, cli_command, losses, run_cli, subprocess_env, tiny_gmm_config

from ucgm.training.checkpoint import complete_checkpoints, latest_checkpoint, read_checkpoint_info, read_state
from ucgm.cli.train import run_training
from ucgm.cli.run_log import read_stats

STEPS, CHECKPOINT_EVERY = 300, 50


def _train_arguments(run_dir, *overrides: str, steps: int = STEPS, checkpoint_every: int = CHECKPOINT_EVERY
                     ) -> list[str]:
    return ["train", "gmm", "--run-dir", str(run_dir), "--steps", str(steps), "--checkpoint-every",
            str(checkpoint_every), "--log-every", "1", *TINY_GMM, *overrides]


def _kill_after(process: subprocess.Popen, run_dir, step: int, timeout: float = 240) -> int:
    """SIGKILL ``process`` once it has a checkpoint and has logged ``step``; returns the last logged step."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and process.poll() is None:
        records = read_stats(run_dir / "stats.jsonl")
        if complete_checkpoints(run_dir) and records and records[-1]["step"] >= step:
            process.send_signal(signal.SIGKILL)
            process.wait()
            return records[-1]["step"]
        time.sleep(0.005)
    process.kill()
    pytest.fail(f"the run ended (code {process.poll()}) before it could be killed at step {step}")


def _config(*overrides: str, steps: int = STEPS, checkpoint_every: int = CHECKPOINT_EVERY) -> dict:
    return tiny_gmm_config(f"training.steps={steps}", f"training.checkpoint_every={checkpoint_every}",
                           "training.log_every=1", *overrides)


def test_sigkill_then_rerun_gives_the_uninterrupted_losses(tmp_path):
    reference_dir, run_dir = tmp_path / "uninterrupted", tmp_path / "interrupted"
    run_training(_config(), reference_dir, progress=False)
    expected = losses(reference_dir)
    assert [step for step, _ in expected] == list(range(1, STEPS + 1))

    kill_step = random.Random(0).randint(CHECKPOINT_EVERY + 5, STEPS - 80)  # seeded: a failure can be replayed
    process = subprocess.Popen(cli_command(*_train_arguments(run_dir)), env=subprocess_env(),
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    killed_at = _kill_after(process, run_dir, kill_step)
    assert process.returncode == -signal.SIGKILL and killed_at < STEPS

    finished = run_cli(*_train_arguments(run_dir))
    assert finished.returncode == 0, finished.stderr
    assert "resuming" in finished.stderr
    assert losses(run_dir) == expected  # exact equality, no gaps or repeats
    run_training(_config(), run_dir, progress=False)  # re-running a finished run changes nothing
    assert losses(run_dir) == expected
    record = read_stats(run_dir / "stats.jsonl")[-1]
    assert {"step", "loss", "lr", "sec_per_step"} <= set(record)


@pytest.mark.slow
def test_sigkill_during_a_checkpoint_write_keeps_the_previous_checkpoint(tmp_path):
    """A model large enough that writing a checkpoint takes a while; the process is killed while the temporary
    directory of its second checkpoint exists."""
    run_dir = tmp_path / "run"
    arguments = ["train", "gmm", "--run-dir", str(run_dir), "--steps", "6", "--checkpoint-every", "2",
                 "--log-every", "1", "model.hidden=768", "model.depth=4", "training.batch_size=8"]
    process = subprocess.Popen(cli_command(*arguments), env=subprocess_env(), stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 240
    while process.poll() is None and time.monotonic() < deadline:
        checkpoints = run_dir / "checkpoints"
        writing = checkpoints.is_dir() and any(p.name.startswith(".tmp-") for p in checkpoints.iterdir())
        if complete_checkpoints(run_dir) and writing:
            process.send_signal(signal.SIGKILL)
            break
        time.sleep(0.001)
    process.wait()
    assert process.returncode == -signal.SIGKILL, "the run was not killed during a checkpoint write"
    previous = latest_checkpoint(run_dir)
    assert previous.name == "step_0000002"
    assert read_checkpoint_info(previous).step == 2 and read_state(previous)["step"] == 2
    finished = run_cli(*arguments)
    assert finished.returncode == 0, finished.stderr
    assert [step for step, _ in losses(run_dir)] == list(range(1, 7))
    assert not [p for p in (run_dir / "checkpoints").iterdir() if p.name.startswith(".")]


def test_a_two_network_method_on_a_five_to_one_schedule_resumes_exactly_after_sigkill(tmp_path):
    """Generator and critic with their own learning rates, EMA and optimizer states, and the method's own state."""
    steps, every = 60, 10
    reference_dir, run_dir = tmp_path / "uninterrupted", tmp_path / "interrupted"
    run_training(_config(*TWO_NETWORK, steps=steps, checkpoint_every=every), reference_dir, progress=False)
    expected = read_stats(reference_dir / "stats.jsonl")
    assert [record["step"] for record in expected] == list(range(1, steps + 1))
    assert {"loss", "loss/critic", "loss/generator"} <= set(expected[0])
    assert read_checkpoint_info(reference_dir).groups == ["critic", "critic-ema", "ema", "model"]

    arguments = _train_arguments(run_dir, *TWO_NETWORK, steps=steps, checkpoint_every=every)
    process = subprocess.Popen(cli_command(*arguments), env=subprocess_env(), stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE)
    killed_at = _kill_after(process, run_dir, random.Random(2).randint(every + 3, steps - 15))
    assert process.returncode == -signal.SIGKILL and killed_at < steps
    finished = run_cli(*arguments)
    assert finished.returncode == 0, finished.stderr
    got = read_stats(run_dir / "stats.jsonl")
    keys = ("step", "loss", "loss/critic", "loss/generator", "lr", "nonfinite_steps")
    assert [[record[key] for key in keys] for record in got] == [[record[key] for key in keys] for record in expected]
