"""torchrun jobs on CPU (gloo): 2-process DDP equals 1 process with the same global batch; a failing rank ends
the job with an error instead of a hang; FSDP (slow) agrees with DDP."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch
from training_fixtures import TINY_GMM, TWO_NETWORK, losses, subprocess_env, tiny_gmm_config

from ucgm.cli.run_log import read_stats
from ucgm.training.checkpoint import complete_checkpoints, read_weights
from ucgm.cli.train import run_training

STEPS = 12


def _torchrun(*arguments: str, timeout: float = 240) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *arguments]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=subprocess_env(), check=False)


def _train_job(run_dir, *overrides: str, steps: int = STEPS, checkpoint_every: int = 6
               ) -> subprocess.CompletedProcess:
    return _torchrun("-m", "ucgm", "train", "gmm", "--run-dir", str(run_dir), "--steps", str(steps),
                     "--log-every", "1", "--checkpoint-every", str(checkpoint_every), *TINY_GMM, *overrides)


def _single_process_reference(run_dir) -> list:
    """One process, two accumulation rounds: the same 2 shards of the same global batch of 32."""
    run_training(tiny_gmm_config(f"training.steps={STEPS}", "training.log_every=1", "training.checkpoint_every=6",
                                 "training.grad_accumulation=2"), run_dir, progress=False)
    return losses(run_dir)


def test_two_process_ddp_matches_one_process(tmp_path):
    job = _train_job(tmp_path / "ddp")
    assert job.returncode == 0, job.stderr[-3000:]
    assert job.stderr.count("run finished") == 1  # rank 0 alone reports
    expected = _single_process_reference(tmp_path / "single")
    got = losses(tmp_path / "ddp")
    assert [step for step, _ in got] == list(range(1, STEPS + 1))  # one record per step: rank 0 alone logs
    # Stated tolerance: the two runs differ only in the order of float32 gradient reductions.
    assert [loss for _, loss in got] == pytest.approx([loss for _, loss in expected], rel=1e-5)
    single, ddp = (read_weights(tmp_path / name, "ema") for name in ("single", "ddp"))
    for name in single:
        torch.testing.assert_close(ddp[name], single[name], rtol=1e-4, atol=1e-5)


FAILING_JOB = """
import os, torch
from ucgm.methods.base import Objective, ObjectiveOutput
from ucgm.training.distributed import distributed_session
from ucgm.training.loop import Trainer
from ucgm.training.settings import OptimizerConfig, TrainingConfig

class Data:
    def sample_batch(self, size, generator):
        return torch.randn(size, 2, generator=generator), None

class FailsOnRankOne(Objective):
    def __call__(self, model, data, labels=None, *, reference_model=None, generator=None):
        if int(os.environ["RANK"]) == 1 and os.environ.get("STEP_SEEN"):
            raise RuntimeError("injected failure on rank 1")
        os.environ["STEP_SEEN"] = "1"
        return ObjectiveOutput(model(data).pow(2).mean(), data[:, 0], {})

with distributed_session("cpu", timeout_seconds=30) as context:
    trainer = Trainer.for_objective(torch.nn.Linear(2, 2), FailsOnRankOne(), Data(),
                                    TrainingConfig(steps=50, batch_size=8), OptimizerConfig(), context)
    trainer.fit(50)
"""


def test_a_failing_rank_ends_the_job_with_an_error(tmp_path):
    script = tmp_path / "failing_job.py"
    script.write_text(textwrap.dedent(FAILING_JOB))
    job = _torchrun(str(script), timeout=120)  # a hanging job fails the test by the timeout
    assert job.returncode != 0
    assert "injected failure on rank 1" in job.stderr
    assert "rank 1/2 failed" in job.stderr


@pytest.mark.slow
def test_fsdp_matches_ddp(tmp_path):
    for name, parallel in (("ddp", "ddp"), ("fsdp", "fsdp")):
        job = _train_job(tmp_path / name, f"training.parallel={parallel}")
        assert job.returncode == 0, job.stderr[-3000:]
    ddp, fsdp = losses(tmp_path / "ddp"), losses(tmp_path / "fsdp")
    # FSDP reduce-scatters gradients in another order; Adam's first steps amplify the rounding differences.
    assert [loss for _, loss in fsdp] == pytest.approx([loss for _, loss in ddp], rel=2e-3)
    resumed = _train_job(tmp_path / "fsdp", "training.parallel=fsdp", steps=16)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert [step for step, _ in losses(tmp_path / "fsdp")] == list(range(1, 17))


def test_two_network_method_under_two_process_ddp_resumes_exactly_after_sigkill(tmp_path):
    """The whole job (launcher and both ranks) is killed after its first checkpoint; the same command resumes it,
    and stats.jsonl equals the uninterrupted job's: one row per step, none duplicated or missing."""
    steps, every = 24, 6
    reference = _train_job(tmp_path / "uninterrupted", *TWO_NETWORK, steps=steps, checkpoint_every=every)
    assert reference.returncode == 0, reference.stderr[-3000:]
    expected = read_stats(tmp_path / "uninterrupted" / "stats.jsonl")
    assert [record["step"] for record in expected] == list(range(1, steps + 1))

    run_dir = tmp_path / "interrupted"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "ucgm",
               "train", "gmm", "--run-dir", str(run_dir), "--steps", str(steps), "--log-every", "1",
               "--checkpoint-every", str(every), *TINY_GMM, *TWO_NETWORK]
    job = subprocess.Popen(command, env=subprocess_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                           start_new_session=True)
    deadline = time.monotonic() + 240
    while job.poll() is None and time.monotonic() < deadline:
        records = read_stats(run_dir / "stats.jsonl")
        if complete_checkpoints(run_dir) and records and records[-1]["step"] >= every + 2:
            os.killpg(job.pid, signal.SIGKILL)
            break
        time.sleep(0.01)
    job.wait()
    assert job.returncode == -signal.SIGKILL, "the job ended before it could be killed"
    resumed = _torchrun("-m", "ucgm", "train", "gmm", "--run-dir", str(run_dir), "--steps", str(steps),
                        "--log-every", "1", "--checkpoint-every", str(every), *TINY_GMM, *TWO_NETWORK)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    keys = ("step", "loss", "loss/critic", "loss/generator", "lr")
    got = read_stats(run_dir / "stats.jsonl")
    assert [[record[key] for key in keys] for record in got] == [[record[key] for key in keys] for record in expected]
