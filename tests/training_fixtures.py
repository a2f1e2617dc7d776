"""Shared helpers of the training-system tests: tiny configs, stand-in model/objective, subprocess runs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from ucgm.methods.base import Method, NetworkSpec, Objective, ObjectiveOutput, Phase
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


#: Overrides selecting the stand-in two-network method (:class:`TwoNetworkMethod`, by its import path).
TWO_NETWORK = ["objective=training_fixtures:TwoNetworkMethod"]


def subprocess_env() -> dict:
    """The environment of CLI subprocesses: one intra-op thread, unbuffered output, and this folder importable
    (for the stand-in methods named by import path)."""
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")
    env["PYTHONUNBUFFERED"] = "1"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(Path(__file__).resolve().parent),
                                                      env.get("PYTHONPATH")]))
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


class TwoNetworkMethod(Method):
    """A stand-in two-network method: a ``critic`` (own learning rate 1e-3) trained 5 times per step to predict the
    generator's (detached) output, then the ``model`` (generator) trained once through the frozen critic. Its own
    state counts the critic losses."""

    def __init__(self, transport=None, critic_lr: float = 1e-3):
        from ucgm.transports import make_transport

        self.transport = transport or make_transport("linear")
        self.critic_lr = critic_lr
        self.calls, self.grad_flags = [], []
        self.critic_losses = torch.zeros((), dtype=torch.long)

    def networks(self):
        return {"model": NetworkSpec(), "critic": NetworkSpec(optimizer={"lr": self.critic_lr})}

    def schedule(self):
        return [Phase("critic", ("critic",), repeats=5), Phase("generator", ("model",))]

    def loss(self, phase, networks, batch):
        self.calls.append(phase)
        critic_grad = next(networks.module("critic").parameters()).requires_grad
        generator_grad = next(networks.module("model").parameters()).requires_grad
        self.grad_flags.append((phase, critic_grad, generator_grad))
        t = torch.rand(batch.data.shape[0], generator=batch.generator)
        if phase == "critic":
            self.critic_losses += 1
            with torch.no_grad():
                fake = networks.module("model")(batch.data, t, batch.labels)
            per_sample = ((networks["critic"](batch.data, t, batch.labels) - fake) ** 2).mean(dim=1)
        else:
            fake = networks["model"](batch.data, t, batch.labels)
            per_sample = ((networks["critic"](fake, t, batch.labels) - batch.data) ** 2).mean(dim=1)
        return ObjectiveOutput(per_sample.mean(), per_sample.detach(), {f"{phase}_t": t.mean()})

    def state_dict(self):
        return {"critic_losses": self.critic_losses.clone()}

    def load_state_dict(self, state):
        self.critic_losses = state["critic_losses"].clone()


class DivergingFlowMatching(TinyFlowMatching):
    """The stand-in flow-matching loss, made non-finite from training step ``diverge_at`` on (by import path:
    ``objective=training_fixtures:DivergingFlowMatching``)."""

    def __init__(self, transport=None, diverge_at: int = 6):
        from ucgm.transports import make_transport

        super().__init__()
        self.transport = transport or make_transport("linear")
        self.diverge_at, self.step = diverge_at, 0

    def set_progress(self, step, total_steps=None):
        self.step = step

    def __call__(self, model, data, labels=None, **kwargs):
        output = super().__call__(model, data, labels, **kwargs)
        if self.step < self.diverge_at:
            return output
        return ObjectiveOutput(output.loss * float("nan"), output.per_sample, output.stats)
