"""Teachers for distillation: any model read through its transport, the exact mixture oracle, or a checkpoint.

A teacher is resolved to a :class:`TeacherODE`, which steps the probability-flow ODE in EDM noise levels
``sigma = alpha / gamma`` (``x_sigma = x_t / gamma``, ``dx_sigma / dsigma = (x_sigma - D(x_sigma; sigma)) / sigma``,
``D`` the teacher's data prediction), so teacher and student may live on different paths.
"""

from __future__ import annotations

from pathlib import Path as FilePath
from typing import Callable, Optional

import torch
from torch import Tensor, nn

from ..transports import Path, Transport, broadcast_time, make_transport
from ..validation import check_choice

TEACHER_SOLVERS = ("euler", "heun")
TEACHER_SPEC_PREFIXES = ("oracle:", "checkpoint:")


def load_checkpoint_teacher(checkpoint: str | FilePath, weights: str = "ema") -> tuple[nn.Module, Transport]:
    """``(model, transport)`` of a ucgm checkpoint, read as its objective trained it: the trainer's
    :func:`~ucgm.cli.sample.load_checkpoint_model` (backbone + run transport), wrapped by
    :func:`~.consistency_base.sampling_model_from_config` when a consistency objective trained it."""
    from ..cli.sample import load_checkpoint_model
    from .consistency.base import sampling_model_from_config

    loaded = load_checkpoint_model(checkpoint, weights)
    return sampling_model_from_config(loaded.model, loaded.transport, loaded.config.get("objective") or {})


def resolve_teacher(teacher, teacher_transport: Optional[Transport | str], transport: Transport
                    ) -> tuple[Callable, Transport]:
    """``(model, transport)`` of a teacher given as a model, ``"oracle:<mixture>"`` (the exact posterior of
    :func:`~ucgm.data.mixtures.make_mixture` ``(<mixture>)``, e.g. ``oracle:8gaussians``) or
    ``"checkpoint:<path>"``. A model is read through ``teacher_transport`` (default: the run's ``transport``)."""
    if isinstance(teacher_transport, str):
        teacher_transport = make_transport(teacher_transport)
    if isinstance(teacher, str):
        if teacher.startswith("oracle:"):
            from ..data.mixtures import OracleModel, make_mixture

            oracle = OracleModel(make_mixture(teacher[len("oracle:"):]), teacher_transport or transport)
            return oracle, oracle.transport
        if teacher.startswith("checkpoint:"):
            model, loaded_transport = load_checkpoint_teacher(teacher[len("checkpoint:"):])
            return model.requires_grad_(False), teacher_transport or loaded_transport
        raise ValueError(f"teacher={teacher!r} is not allowed; allowed: a model, or a string starting with "
                         f"{' or '.join(map(repr, TEACHER_SPEC_PREFIXES))}")
    if not callable(teacher):
        raise ValueError(f"teacher={teacher!r} must be a model model(x, t, labels), 'oracle:<mixture>' or "
                         f"'checkpoint:<path>'")
    if isinstance(teacher, nn.Module):
        teacher.requires_grad_(False)
    return teacher, teacher_transport or getattr(teacher, "transport", None) or transport


class TeacherODE:
    """The teacher's probability-flow ODE on the student's ``path``, stepped in ``sigma``."""

    def __init__(self, teacher: Callable, teacher_transport: Transport, path: Path):
        self.teacher, self.teacher_transport, self.path = teacher, teacher_transport, path
        teacher_path = teacher_transport.path
        self._same_path = type(teacher_path) is type(path) and vars(teacher_path) == vars(path)

    def denoise(self, x_sigma: Tensor, sigma: Tensor, t: Tensor, labels: Optional[Tensor]) -> Tensor:
        """``D(x_sigma; sigma)``: the teacher's data prediction at its own time ``t' = time_for_ratio(sigma)`` and
        input ``gamma'(t') x_sigma`` (``t' = t`` when teacher and student share the path)."""
        path = self.teacher_transport.path
        teacher_time = t if self._same_path else path.time_for_ratio(sigma)
        x_teacher = x_sigma * broadcast_time(path.gamma(teacher_time), x_sigma)
        return self.teacher_transport.predict(self.teacher, x_teacher, teacher_time, labels).data

    @torch.no_grad()
    def step(self, x_t: Tensor, t: Tensor, r: Tensor, labels: Optional[Tensor], solver: str = "heun") -> Tensor:
        """One solver step of the PF-ODE from ``x_t`` at ``t`` to time ``r`` (both ``(B,)``), returned as ``x_r``.

        Euler: ``x'_sigma = x_sigma + (sigma_r - sigma_t) d``, ``d = (x_sigma - D(x_sigma; sigma_t)) / sigma_t`` (this
        is the DDIM step ``x' = D + sigma_r z_hat``); Heun adds ``d' = (x' - D(x'; sigma_r)) / sigma_r`` and uses
        ``(d + d') / 2``, except where ``sigma_r = 0`` (Euler there). ``x_r = gamma(r) x'_sigma``.
        """
        check_choice("solver", solver, TEACHER_SOLVERS)
        sigma_t, sigma_r = self.path.alpha(t) / self.path.gamma(t), self.path.alpha(r) / self.path.gamma(r)
        x_sigma = x_t / broadcast_time(self.path.gamma(t), x_t)
        gap = broadcast_time(sigma_r - sigma_t, x_t)
        slope = (x_sigma - self.denoise(x_sigma, sigma_t, t, labels)) / broadcast_time(sigma_t, x_t)
        x_next = x_sigma + gap * slope
        if solver == "heun":
            positive = sigma_r > 0
            safe_sigma_r = torch.where(positive, sigma_r, torch.ones_like(sigma_r))
            corrected = (x_next - self.denoise(x_next, safe_sigma_r, r, labels)) / broadcast_time(safe_sigma_r, x_t)
            x_next = torch.where(broadcast_time(positive, x_t), x_sigma + gap * 0.5 * (slope + corrected), x_next)
        return x_next * broadcast_time(self.path.gamma(r), x_t)
