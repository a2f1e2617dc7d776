"""Shared helpers of the training-system tests: tiny configs, stand-in model/objective, subprocess runs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from ucgm.methods.base import Objective, ObjectiveOutput
from ucgm.cli.components import accepted_keys
from ucgm.cli.config import resolve_config
from ucgm.cli.run_log import read_stats

#: Overrides that shrink the gmm preset to a model and batch that train in milliseconds per step.
TINY_GMM = ["model.hidden=16", "model.depth=1", "training.batch_size=32", "optimizer.warmup_steps=5",
            "sampling.nfe=4", "sampling.num=64"]


def tiny_gmm_config(*overrides: str) -> dict:
    """The resolved gmm preset at toy size, plus ``overrides``."""
    return resolve_config("gmm", TINY_GMM + list(overrides), accepted_keys)


def cli_command(*arguments: str) -> list[str]:
    return [sys.executable, "-m", "ucgm", *arguments]


def subprocess_env() -> dict:
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")
    env["PYTHONUNBUFFERED"] = "1"
    return env


def run_cli(*arguments: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """``python -m ucgm ARGUMENTS`` in a subprocess (text output captured)."""
    return subprocess.run(cli_command(*arguments), capture_output=True, text=True, timeout=timeout,
                          env=subprocess_env(), check=False)


def losses(run_dir: Path) -> list[tuple[int, float]]:
    """``(step, loss)`` of every record of a run's stats.jsonl."""
    return [(record["step"], record["loss"]) for record in read_stats(Path(run_dir) / "stats.jsonl")]


class TinyMLP(nn.Module):
    """A 2-layer stand-in model ``model(x, t, labels)`` for vectors."""

    def __init__(self, dim: int = 2, hidden: int = 16, num_classes: Optional[int] = None):
        super().__init__()
        self.num_classes = num_classes
        self.net = nn.Sequential(nn.Linear(dim + 1, hidden), nn.SiLU(), nn.Linear(hidden, dim))

    def forward(self, x, t, labels=None):
        return self.net(torch.cat([x, t[:, None].to(x.dtype)], dim=1))


class TinyFlowMatching(Objective):
    """A stand-in flow-matching objective drawing everything from the given generator."""

    def __init__(self, reference_mode: Optional[str] = None, reference_decay: float = 0.0):
        self.reference_mode = reference_mode
        self.reference_decay = reference_decay
        self.reference_calls = []

    def __call__(self, model, data, labels=None, *, reference_model=None, generator=None):
        self.reference_calls.append(reference_model)
        t = torch.rand(data.shape[0], generator=generator)
        noise = torch.randn(data.shape, generator=generator)
        x_t = (1 - t[:, None]) * data + t[:, None] * noise
        per_sample = ((model(x_t, t, labels) - (noise - data)) ** 2).mean(dim=1)
        return ObjectiveOutput(per_sample.mean(), per_sample.detach(), {"mean_t": t.mean()})


class GaussianBatches:
    """A stand-in dataset: ``sample_batch`` draws standard normal vectors from the generator."""

    shape = (2,)
    num_classes = 0

    def sample_batch(self, batch_size, generator):
        return torch.randn(batch_size, 2, generator=generator) * 0.5 + 1.0, None
