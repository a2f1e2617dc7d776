"""Teachers for distillation: any model read through its transport, the exact mixture oracle, or a checkpoint.

A teacher is resolved to a :class:`TeacherODE`, which steps the probability-flow ODE in EDM noise levels
``sigma = alpha / gamma`` (``x_sigma = x_t / gamma``, ``dx_sigma / dsigma = (x_sigma - D(x_sigma; sigma)) / sigma``,
``D`` the teacher's data prediction), so teacher and student may live on different paths.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor, nn

from ..transports import Path, Transport, broadcast_time, make_transport
from ..validation import check_choice

TEACHER_SOLVERS = ("euler", "heun")
TEACHER_SPEC_PREFIXES = ("oracle:", "checkpoint:")


def resolve_teacher(teacher, teacher_transport: Optional[Transport | str], transport: Transport
                    ) -> tuple[Callable, Transport]:
    """``(model, transport)`` of a teacher given as a model or ``"oracle:<mixture>"`` (the exact posterior of
    :func:`~ucgm.data.mixtures.make_mixture` ``(<mixture>)``, e.g. ``oracle:8gaussians``). A model is read through
    ``teacher_transport`` (default: its own ``transport`` attribute, else the run's ``transport``).
    ``"checkpoint:<path>"`` teachers are networks the trainer loads (see :class:`Teacher`)."""
    if isinstance(teacher_transport, str):
        teacher_transport = make_transport(teacher_transport)
    if isinstance(teacher, str):
        if teacher.startswith("oracle:"):
            from ..data.mixtures import OracleModel, make_mixture

            oracle = OracleModel(make_mixture(teacher[len("oracle:"):]), teacher_transport or transport)
            return oracle, oracle.transport
        if teacher.startswith("checkpoint:"):
            raise ValueError(f"teacher={teacher!r}: checkpoint teachers are loaded by the trainer (the method "
                             f"declares them as its 'teacher' network); in Python, load the checkpoint with "
                             f"ucgm.training.load_checkpoint_model and pass the model")
        raise ValueError(f"teacher={teacher!r} is not allowed; allowed: a model, or a string starting with "
                         f"{' or '.join(map(repr, TEACHER_SPEC_PREFIXES))}")
    if not callable(teacher):
        raise ValueError(f"teacher={teacher!r} must be a model model(x, t, labels), 'oracle:<mixture>' or "
                         f"'checkpoint:<path>'")
    if isinstance(teacher, nn.Module):
        teacher.requires_grad_(False)
    return teacher, teacher_transport or getattr(teacher, "transport", None) or transport


class Teacher:
    """The teacher of a distillation method: a model or ``"oracle:<mixture>"`` (resolved at once), or
    ``"checkpoint:<path>"`` — a frozen network role ``teacher`` that the trainer loads (with the device and dtype of
    the other networks) and hands to the method's loss, read as its own method trained it."""

    ROLE = "teacher"

    def __init__(self, teacher, teacher_transport: Optional[Transport | str], transport: Transport):
        if teacher is None:
            raise ValueError("a teacher is required: a model, 'oracle:<mixture>' (e.g. 'oracle:8gaussians') or "
                             "'checkpoint:<path>'")
        self.transport = transport
        self.teacher_transport = make_transport(teacher_transport) if isinstance(teacher_transport, str) \
            else teacher_transport
        self.checkpoint = teacher if isinstance(teacher, str) and teacher.startswith("checkpoint:") else None
        self.model: Optional[Callable] = None
        self.model_transport: Optional[Transport] = None
        if self.checkpoint is None:
            self.model, self.model_transport = resolve_teacher(teacher, self.teacher_transport, transport)

    def network_specs(self) -> dict:
        """``{"teacher": NetworkSpec}`` for a checkpoint teacher, else ``{}``."""
        if self.checkpoint is None:
            return {}
        from .base import NetworkSpec

        return {self.ROLE: NetworkSpec(init=self.checkpoint, trainable=False, ema={"kind": "none"})}

    def bind(self, networks) -> None:
        """Take the trainer's loaded teacher network (a checkpoint teacher) from ``networks``."""
        if self.checkpoint is not None and self.ROLE in networks:
            module = networks.module(self.ROLE)
            if module is not self.model:
                self.model = module
                self.model_transport = self.teacher_transport or module.transport

    def to(self, device: torch.device | str) -> "Teacher":
        """Move a module teacher given as a model to ``device`` (checkpoint teachers are networks the trainer
        places; oracles compute on their input's device)."""
        if self.checkpoint is None and isinstance(self.model, nn.Module):
            self.model.to(device)
        return self

    def resolved(self) -> tuple[Callable, Transport]:
        """``(model, transport)``; a checkpoint teacher must have been bound by the trainer first."""
        if self.model is None:
            raise ValueError(f"teacher {self.checkpoint!r} is loaded by the trainer: train through "
                             f"ucgm.training (or pass a loaded model as the teacher)")
        return self.model, self.model_transport

    def ode(self, path: Path) -> "TeacherODE":
        """The teacher's probability-flow ODE on ``path``."""
        model, transport = self.resolved()
        return TeacherODE(model, transport, path)


class TeacherODE:
    """The teacher's probability-flow ODE on the student's ``path``, stepped in ``sigma``."""

    def __init__(self, teacher: Callable, teacher_transport: Transport, path: Path):
        self.teacher, self.teacher_transport, self.path = teacher, teacher_transport, path
        teacher_path = teacher_transport.path
        self._same_path = type(teacher_path) is type(path) and vars(teacher_path) == vars(path)

    def denoise(self, x_sigma: Tensor, sigma: Tensor, t: Tensor, labels: Optional[Tensor]) -> Tensor:
        """``D(x_sigma; sigma)``: the teacher's data prediction at its own time ``t' = time_for_sigma(sigma)`` and
        input ``gamma'(t') x_sigma`` (``t' = t`` when teacher and student share the path)."""
        path = self.teacher_transport.path
        teacher_time = t if self._same_path else path.time_for_sigma(sigma).to(sigma.dtype)
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
        sigma_t, sigma_r = self.path.sigma(t), self.path.sigma(r)
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
