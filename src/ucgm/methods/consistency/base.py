"""What the consistency-family objectives share: the consistency function, distances, progress and randomness.

Progress: curricula (discretisation ``N(k)``, ECT's stages, CT's adaptive EMA decay) read the step set by
``objective.set_progress(step, total_steps)``, which the trainer calls before every loss (resume-exact: the
objective keeps no other state). Without it the curricula stay at their start (``k = 0``).

Randomness: every draw comes from the ``generator`` argument; the online and target network calls of one loss run
under the same seeded global RNG (:func:`~ucgm.methods.base.shared_randomness`: same dropout masks), and the
global RNG is restored afterwards.
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import torch
from torch import Tensor, nn

from ...transports import Transport, make_transport
from ...validation import check_batch, check_choice, check_finite, check_positive_int, check_range
from ..base import Objective, draw_noise, drop_labels, dropout_seed, resolve_null_label, shared_randomness, unwrap
from .parameterisation import CONSISTENCY_PARAMETERISATIONS, ConsistencyModel, ConsistencyParameterisation, TimeRange

METRICS = ("l2", "l1", "pseudo_huber")
"""Per-sample distances ``d(a, b)``: ``l2`` = ``mean((a - b)^2)``, ``l1`` = ``mean(|a - b|)``,
``pseudo_huber`` = ``sqrt(||a - b||^2 + c^2) - c`` (sum over all values; iCT's ``c = 0.00054 sqrt(dim)``)."""
REFERENCES = ("ema", "online", "frozen")
WEIGHTINGS = ("uniform", "inverse_gap")
"""Per-sample loss weights: ``uniform`` (CM) or iCT's ``1 / (sigma_t - sigma_r)``."""
ICT_HUBER_SCALE = 0.00054


class ConsistencyObjectiveBase(Objective):
    """Shared configuration and helpers; subclasses implement ``__call__``. The target network follows the
    online model with the decay ``mu(k)`` of the method's schedule, applied at once (no warm-up)."""

    family = "consistency"
    default_sampler = "cm-multistep"

    def _configure(self, transport: Transport | str, parameterisation: str, sigma_min: float, sigma_max: float,
                   sigma_data: float, metric: str, huber_constant: Optional[float], label_dropout: float,
                   null_label: Optional[int], reference: Optional[str], reference_decay: float) -> None:
        check_choice("parameterisation", parameterisation, CONSISTENCY_PARAMETERISATIONS)
        check_choice("metric", metric, METRICS)
        check_choice("reference", reference, REFERENCES + (None,))
        check_range("label_dropout", label_dropout, 0.0, 1.0)
        check_range("reference_decay", reference_decay, 0.0, 1.0)
        if huber_constant is not None:
            check_range("huber_constant", huber_constant, 0.0, math.inf)
        if parameterisation == "consistency" and sigma_max == math.inf:
            raise ValueError("sigma_max=inf is not allowed with parameterisation='consistency' (x_t / gamma is "
                             "undefined at gamma = 0); allowed: a finite sigma_max, e.g. 80")
        self.transport = make_transport(transport) if isinstance(transport, str) else transport
        self.parameterisation = parameterisation
        self.time_range = TimeRange(self.transport.path, sigma_min, sigma_max)
        self.consistency = ConsistencyParameterisation(self.transport.path, sigma_min, sigma_data,
                                                       self.transport.network_time)
        self.metric, self.huber_constant = metric, huber_constant
        self.label_dropout, self.null_label = float(label_dropout), null_label
        self.reference_mode = reference
        self._reference_decay = float(reference_decay)
        self.step, self.total_steps = 0, None

    def networks(self) -> dict:
        """The online model, its target network and, for a checkpoint teacher, the ``teacher`` role."""
        teacher = getattr(self, "teacher", None)
        return {**super().networks(), **(teacher.network_specs() if teacher is not None else {})}

    def loss(self, phase, networks, batch):
        teacher = getattr(self, "teacher", None)
        if teacher is not None:
            teacher.bind(networks)
        return super().loss(phase, networks, batch)

    def to(self, device: torch.device | str) -> "ConsistencyObjectiveBase":
        """Move a module teacher to ``device`` (the trainer places its networks, checkpoint teachers included)."""
        teacher = getattr(self, "teacher", None)
        if teacher is not None:
            teacher.to(device)
        return self

    def sampler(self) -> tuple[str, dict]:
        """CM's multistep sampler on the trained noise range (Karras evaluation times)."""
        return "cm-multistep", {"sigma_min": self.time_range.sigma_min, "sigma_max": self.time_range.sigma_max}

    @property
    def reference_decay(self) -> float:
        """Decay of the ``ema`` reference (target network)."""
        return self._reference_decay

    def set_progress(self, step: int, total_steps: Optional[int] = None) -> None:
        """Training progress for the curricula: ``step`` k (0-based) of ``total_steps`` K."""
        check_positive_int("step", step, minimum=0)
        if total_steps is not None:
            check_positive_int("total_steps", total_steps)
        self.step, self.total_steps = step, total_steps

    # ------------------------------------------------------------------------------ consistency function
    def consistency_function(self, model: Callable, x_t: Tensor, t: Tensor, labels: Optional[Tensor]) -> Tensor:
        """``f(x_t, t)``: the boundary-condition wrapper around ``model`` or the transport's data prediction."""
        if self.parameterisation == "consistency":
            return self.consistency(model, x_t, t, labels)
        return self.transport.predict(model, x_t, t, labels).data

    def sampling_model(self, modules) -> tuple[nn.Module, Transport]:
        """``(model, transport)`` such that ``transport.predict(model, x_t, t).data`` is the trained ``f``
        (``modules["model"]`` is the backbone; a bare backbone is accepted too)."""
        backbone = modules["model"] if isinstance(modules, dict) else modules
        if self.parameterisation == "consistency":
            wrapped = ConsistencyModel(backbone, self.consistency, self.time_range.t_max)
            return wrapped, wrapped.transport
        return backbone, self.transport

    # -------------------------------------------------------------------------------------- pieces
    def distance(self, a: Tensor, b: Tensor) -> Tensor:
        """Per-sample ``d(a, b)`` of :data:`METRICS` (``b`` is the target)."""
        difference = (a - b).flatten(1)
        if self.metric == "l2":
            return (difference**2).mean(dim=1)
        if self.metric == "l1":
            return difference.abs().mean(dim=1)
        constant = self.huber_constant
        if constant is None:
            constant = ICT_HUBER_SCALE * math.sqrt(difference.shape[1])
        return torch.sqrt((difference**2).sum(dim=1) + constant**2) - constant

    def prepare(self, model: Callable, data: Tensor, labels: Optional[Tensor], noise: Optional[Tensor],
                generator: Optional[torch.Generator]) -> tuple[Tensor, Optional[Tensor], int]:
        """Check the batch; return ``(noise, labels after label dropout, seed of the shared network RNG)``."""
        check_finite("data", data)
        check_batch("labels", labels, data.shape[0])
        noise = draw_noise(data, noise, generator)
        labels = drop_labels(labels, self.label_dropout, resolve_null_label(model, self.null_label), generator)
        return noise, labels, dropout_seed(generator)

    def paired_predictions(self, model: Callable, reference_model: Optional[Callable], x_t: Tensor, t: Tensor,
                           x_r: Tensor, r: Tensor, labels: Optional[Tensor], seed: int) -> tuple[Tensor, Tensor]:
        """``f_theta(x_t, t)`` with gradient and ``f^-(x_r, r)`` without, under the same network RNG; ``f^-`` is the
        reference (target) network, or the online model when ``reference_model`` is ``None``."""
        target_model = model if reference_model is None else reference_model
        with shared_randomness(seed, x_t.device):
            online = self.consistency_function(model, x_t, t, labels)
        with torch.no_grad(), shared_randomness(seed, x_t.device):
            target = self.consistency_function(unwrap(target_model), x_r, r, labels)
        return online, target

    @staticmethod
    def given_times(time: Optional[Tensor], target_time: Optional[Tensor], data: Tensor
                    ) -> Optional[tuple[Tensor, Tensor]]:
        """Validated ``(t, r)`` when the caller fixes both (reproducibility, tests), ``None`` when neither."""
        if time is None and target_time is None:
            return None
        if time is None or target_time is None:
            raise ValueError("pass both time and target_time (the pair t > r) or neither")
        pair = []
        for name, value in (("time", time), ("target_time", target_time)):
            value = torch.as_tensor(value, dtype=data.dtype, device=data.device).reshape(-1)
            check_batch(name, value, data.shape[0])
            check_finite(name, value)
            pair.append(value)
        if bool((pair[1] > pair[0]).any()):
            raise ValueError("target_time must not exceed time (r <= t per sample)")
        return pair[0], pair[1]
