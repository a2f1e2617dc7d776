"""UCGM-T: the unified training objective (Sun, Jiang, Lin 2025, arXiv 2505.07447).

One step, with ``t ~ clamp(k * Beta(a, b), 0, 1)``, ``z ~ N(0, I)`` and ``x_t = alpha z + gamma x``:

1. ``F = model(x_t, t, y)`` (with gradient); plain target ``T = alpha_hat z + gamma_hat x``.
2. Enhanced target (``enhanced_ratio`` zeta != 0): from a conditional prediction ``(x_c, z_c)`` and a reference
   ``(x_u, z_u)`` (see :data:`ENHANCED_STYLES`), per sample: conditional and ``r0 < t < r1``:
   ``x* = x + zeta (x_c - x_u)``; conditional outside the range: ``x* = (x + x_c) / 2``; label dropped:
   ``x* = (x + x_u) / 2`` (same for z), and ``T = alpha_hat z* + gamma_hat x*``.
3. Consistency (ratio lambda != 0), with ``X(r)`` the online model's data prediction at
   ``x_r = alpha(r) z* + gamma(r) x*`` (no gradient):
   lambda = 1: ``Delta = (X(t + eps) - X(t - eps)) / (2 eps)``;
   0 < lambda < 1: ``Delta = (x_hat_t - X(lambda t)) / ((1 - lambda) t)``;
   then ``T = F.detach() - (alpha / D) * (4 / sin(h t)) * clamp(Delta, -1, 1)``.
4. Per sample ``L = sqrt(mean((F - T)^2) + c^2) - c`` (+ ``mean(1 - cos(F, T))`` over channels when
   ``cosine_loss``), optionally weighted by ``cos(h t)``; the loss is the batch mean.

Randomness: every draw comes from ``generator``; every network pass of one loss (online, enhanced-target,
tangent) runs under the same seeded dropout RNG (:func:`~ucgm.methods.base.shared_randomness`), as the official code
restores the online pass's RNG state before its tangent passes and its ``ft-vs-fe`` pass. Deviation: the
``fc-vs-xz`` reference pass shares it too (the official code draws fresh dropout masks there). So the order of the
passes does not change a number: the no-gradient passes that do not read the online prediction (all but the tangent
passes after an ``ft-vs-fe`` enhanced pair) run before the online pass, which keeps their temporaries out of the
step's peak memory (the official code runs them after it).

Fast mode (``mode="fast"``, ucgm's own; the default ``mode="parity"`` is the official computation bit for bit):

* lambda = 1, finite-difference tangent: one-sided, ``Delta = (X(t) - X(t - eps)) / eps``, whose upper point is the
  online pass. Every enhanced pair ``(x*, z*)`` is an affine combination (weights summing to one) of pairs that each
  satisfy ``alpha z + gamma x = x_t`` (the truth ``(x, z)`` and every prediction recovered at ``x_t``), so the
  enhanced path ``x_r = alpha(r) z* + gamma(r) x*`` passes through ``x_t`` at ``r = t`` and ``X(t)`` there is the
  online prediction itself (same input, labels and dropout masks). One tangent pass instead of two; the target
  differs from the central difference by ``(eps / 2) X''(t)`` + O(eps^2) before the clamp.
* Reference passes run only on the rows that read them (the conditional pass on the kept labels, the unconditional
  one on rows in ``enhanced_range`` or dropped), under bfloat16 autocast where the device computes bfloat16
  natively (``reference_precision``: ``auto``, ``bfloat16`` or ``float32``); ``F`` is cast back to full precision
  before ``(x_c, z_c)`` are recovered, so the identity above still holds. The enhanced target moves by bfloat16
  rounding of the reference's output (about 2^-8 relative). With dropout in the reference network, a pass over a
  subset of rows draws masks of its own shape.

Argument names and the official ones:

| ucgm | official UCGM |
|---|---|
| ``consistency_ratio`` | ``consistc_ratio`` |
| ``enhanced_ratio`` / ``enhanced_style`` / ``enhanced_range`` | same names |
| ``label_dropout`` | ``lab_drop_ratio`` |
| ``huber_constant`` | ``scaled_cbl_eps`` |
| ``cosine_loss`` | ``wt_cosine_loss`` |
| ``time_weighting`` (``None`` / ``"cosine"``) | ``weight_funcion`` (``None`` / ``"Cosine"``) |
| ``time_distribution`` ``(a, b, k)`` | ``time_dist_ctrl`` |
| ``reference`` + ``reference_decay`` | ``ema_decay_rate`` (0 online, 1 frozen, otherwise EMA) |
| ``transport`` | ``transport_type`` |
"""

from __future__ import annotations

import contextlib
import functools
import math
import warnings
from typing import Callable, ContextManager, Optional, Sequence

import torch
import torch.nn.functional as functional
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel

from ...transports import Prediction, Transport, broadcast_time, make_transport
from ...validation import check_batch, check_choice, check_finite, check_range
from ..base import Objective, ObjectiveOutput, draw_noise, dropout_seed, resolve_null_label, shared_randomness, unwrap
from ..base import drop_labels as drop_labels_with

ENHANCED_STYLES = ("ft-vs-fe", "fc-vs-fe", "fc-vs-xz")
"""Where the two predictions of the enhanced target come from:
``ft-vs-fe`` (multi-step training): conditional = the online prediction, reference = reference model with the null label;
``fc-vs-fe`` (tuning a pretrained model): both from the reference model, with the label and with the null label;
``fc-vs-xz`` (few-step training): conditional = reference model with the label, reference = the true ``(x, z)``."""

REFERENCE_MODES = ("ema", "online", "frozen")
#: The numerator of UCGM's tangent weight ``4 / sin(h t)`` (:func:`tangent_weight`).
TANGENT_WEIGHT_SCALE = 4.0
TIME_WEIGHTINGS = (None, "cosine")
TANGENTS = ("finite_difference", "jvp")
#: ``parity``: the official passes, bit for bit; ``fast``: fewer passes, same target up to O(eps) (see the class).
MODES = ("parity", "fast")
#: Precision of fast mode's reference passes: ``auto`` is bfloat16 where the device computes it natively (CUDA with
#: bf16 support, a CPU with AVX512-BF16 / AMX through oneDNN) and full precision elsewhere, where emulated bfloat16
#: makes a pass slower than float32 (measured on an AVX2-only CPU: the fast step 1.62x the parity step).
REFERENCE_PRECISIONS = ("auto", "bfloat16", "float32")

#: Official UCGM argument names and their ucgm equivalents (``ema_decay_rate`` maps to ``reference``).
OFFICIAL_NAMES = {
    "transport_type": "transport", "consistc_ratio": "consistency_ratio", "enhanced_ratio": "enhanced_ratio",
    "enhanced_style": "enhanced_style", "enhanced_range": "enhanced_range", "lab_drop_ratio": "label_dropout",
    "scaled_cbl_eps": "huber_constant", "wt_cosine_loss": "cosine_loss", "weight_funcion": "time_weighting",
    "time_dist_ctrl": "time_distribution",
}


def sample_beta_time(batch_size: int, shape: Sequence[float], generator: Optional[torch.Generator] = None,
                     device: torch.device | str = "cpu") -> Tensor:
    """``t = clamp(k * Beta(a, b), 0, 1)`` for ``shape = (a, b, k)``; reproducible from ``generator``."""
    a, b, scale = (float(v) for v in shape)
    if a == 1.0 and b == 1.0:
        draw = torch.rand(batch_size, generator=generator, dtype=torch.float64)
    else:
        seed = int(torch.randint(0, 2**62, (1,), generator=generator))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            draw = torch.distributions.Beta(torch.tensor(a, dtype=torch.float64),
                                            torch.tensor(b, dtype=torch.float64)).sample((batch_size,))
    return torch.clamp(draw * scale, 0, 1).to(device)


def data_prediction_tangent(
    model: Callable,
    transport: Transport,
    data: Tensor,
    noise: Tensor,
    t: Tensor,
    labels: Optional[Tensor],
    method: str = "finite_difference",
    step: float = 0.005,
    same_dropout: Callable[[], ContextManager] = contextlib.nullcontext,
) -> Tensor:
    """``d/dt X(t)``, the time derivative of the data prediction along the straight path
    ``x_t = alpha(t) z + gamma(t) x`` (fixed ``x``, ``z``).

    ``finite_difference``: ``(X(t + eps) - X(t - eps)) / (2 eps)``, one call per time, each under ``same_dropout``
    (the official code restores the online pass's RNG state before each); ``jvp``: exact forward-mode derivative
    with ``torch.func.jvp`` along ``(dx_t/dt, 1)``.
    """
    check_choice("method", method, TANGENTS)
    if method == "jvp":
        def data_prediction(time: Tensor) -> Tensor:
            x_t = transport.interpolate(data, noise, time)
            return transport.predict(model, x_t, time, labels).data

        with same_dropout(), sdpa_kernel([SDPBackend.MATH]):  # fused attention has no forward derivative
            return torch.func.jvp(data_prediction, (t,), (torch.ones_like(t),))[1]
    inv_width = 1 / (2 * step)
    upper, lower = (_data_prediction_at(model, transport, data, noise, time, labels, same_dropout)
                    for time in (t + step, t - step))
    return upper * inv_width - lower * inv_width


def _data_prediction_at(model: Callable, transport: Transport, data: Tensor, noise: Tensor, t: Tensor,
                        labels: Optional[Tensor], same_dropout: Callable[[], ContextManager]) -> Tensor:
    """``X(t)``: the data prediction at ``x_t = alpha(t) z + gamma(t) x``, under ``same_dropout``."""
    with same_dropout():
        return transport.predict(model, transport.interpolate(data, noise, t), t, labels).data


@functools.lru_cache(maxsize=None)
def native_bfloat16(device: torch.device) -> bool:
    """Whether ``device`` computes bfloat16 natively (CUDA with bf16 support; a CPU whose oneDNN has bf16 kernels).
    Asked once per device: fast mode reads it on every reference pass."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return False


def reference_autocast_dtype(precision: str, device: torch.device) -> Optional[torch.dtype]:
    """The autocast dtype of fast mode's reference passes (``None``: full precision), :data:`REFERENCE_PRECISIONS`."""
    check_choice("reference_precision", precision, REFERENCE_PRECISIONS)
    if precision == "bfloat16" or (precision == "auto" and native_bfloat16(device)):
        return torch.bfloat16
    return None


def _row_subset_prediction(model: Callable, transport: Transport, x_t: Tensor, t: Tensor,
                           labels: Optional[Tensor], rows: Tensor, same_dropout: Callable[[], ContextManager],
                           dtype: Optional[torch.dtype]) -> Prediction:
    """:func:`_reference_prediction` computed on the rows where ``rows`` is true (one pass of that many rows), zeros
    on the others."""
    if bool(rows.all()):
        return _reference_prediction(model, transport, x_t, t, labels, same_dropout, dtype)
    index = rows.nonzero().squeeze(1)
    filled = [torch.zeros_like(x_t) for _ in Prediction._fields]
    if index.numel():
        part = _reference_prediction(model, transport, x_t[index], t[index],
                                     None if labels is None else labels[index], same_dropout, dtype)
        for full, rows_part in zip(filled, part):
            full.index_copy_(0, index, rows_part)
    return Prediction(*filled)


def _reference_prediction(model: Callable, transport: Transport, x_t: Tensor, t: Tensor, labels: Optional[Tensor],
                          same_dropout: Callable[[], ContextManager], dtype: Optional[torch.dtype]) -> Prediction:
    """The network output ``F`` at ``(x_t, t, labels)`` under ``dtype`` autocast (none when ``None``) and
    ``same_dropout``, cast back to ``x_t``'s dtype before ``x_hat, z_hat`` are recovered, so that
    ``alpha z_hat + gamma x_hat = x_t`` holds at ``x_t``'s precision."""
    autocast = (torch.autocast(x_t.device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext())
    with same_dropout(), autocast:
        output = transport.network_output(model, x_t, t, labels)
    output = output.to(x_t.dtype)
    return Prediction(output, *transport.recover(output, x_t, t))


def tangent_weight(t: Tensor, half_pi: float) -> Tensor:
    """UCGM's weight of the clamped tangent in the consistency target, ``4 / sin(h t)``."""
    return TANGENT_WEIGHT_SCALE / torch.sin(t * half_pi)


class UCGMObjective(Objective):
    """UCGM-T. ``consistency_ratio`` 0 trains a multi-step (flow-matching/diffusion) model, 1 a few-step one.
    Its ``ema`` reference warms its decay up from 0 (the official rule)."""

    reference_warmup = True

    def __init__(
        self,
        transport: Transport | str = "linear",
        consistency_ratio: float = 0.0,
        enhanced_ratio: float = 0.0,
        enhanced_style: Optional[str] = None,
        enhanced_range: Sequence[float] = (0.0, 0.75),
        label_dropout: float = 0.1,
        null_label: Optional[int] = None,
        huber_constant: float = 0.0,
        cosine_loss: bool = False,
        time_weighting: Optional[str] = None,
        time_distribution: Sequence[float] = (1.0, 1.0, 1.0),
        reference: str = "ema",
        reference_decay: float = 0.999,
        finite_difference_step: float = 0.005,
        tangent: str = "finite_difference",
        tangent_clip: float = 1.0,
        half_pi: float = math.pi / 2,
        mode: str = "parity",
        reference_precision: str = "auto",
    ):
        check_choice("mode", mode, MODES)
        check_choice("reference_precision", reference_precision, REFERENCE_PRECISIONS)
        check_range("consistency_ratio", consistency_ratio, 0.0, 1.0)
        check_range("label_dropout", label_dropout, 0.0, 1.0)
        check_range("huber_constant", huber_constant, 0.0, math.inf)
        check_range("reference_decay", reference_decay, 0.0, 1.0)
        if not isinstance(enhanced_ratio, (int, float)) or not math.isfinite(enhanced_ratio):
            raise ValueError(f"enhanced_ratio={enhanced_ratio!r} must be a finite number")
        check_choice("enhanced_style", enhanced_style, (None,) + ENHANCED_STYLES)
        check_choice("time_weighting", time_weighting, TIME_WEIGHTINGS)
        check_choice("reference", reference, REFERENCE_MODES)
        check_choice("tangent", tangent, TANGENTS)
        if len(time_distribution) != 3 or min(time_distribution) <= 0:
            raise ValueError(f"time_distribution={tuple(time_distribution)!r} must be three positive numbers (a, b, k)")
        if len(enhanced_range) != 2 or enhanced_range[0] > enhanced_range[1]:
            raise ValueError(f"enhanced_range={tuple(enhanced_range)!r} must be (low, high) with low <= high")
        self.transport = make_transport(transport, half_pi=half_pi) if isinstance(transport, str) else transport
        self.consistency_ratio = float(consistency_ratio)
        # A multi-step ratio of 1 or more is read as (r - 1) / r, as the official code does.
        if enhanced_ratio >= 1.0 and consistency_ratio == 0.0:
            remapped = (enhanced_ratio - 1.0) / enhanced_ratio
            warnings.warn(f"enhanced_ratio={enhanced_ratio} >= 1 with consistency_ratio=0 is read as (r - 1) / r = "
                          f"{remapped:.6g}, as the official UCGM code does (a guidance scale r); pass "
                          f"enhanced_ratio={remapped:.6g} to silence this warning", UserWarning, stacklevel=2)
            enhanced_ratio = remapped
        self.enhanced_ratio = float(enhanced_ratio)
        if enhanced_style is None and self.enhanced_ratio != 0.0:
            enhanced_style = "ft-vs-fe" if self.consistency_ratio == 0.0 else "fc-vs-xz"
        self.enhanced_style = enhanced_style
        self.enhanced_range = (float(enhanced_range[0]), float(enhanced_range[1]))
        self.label_dropout = float(label_dropout)
        self.null_label = null_label
        self.huber_constant = float(huber_constant)
        self.cosine_loss = bool(cosine_loss)
        self.time_weighting = time_weighting
        self.time_distribution = tuple(float(v) for v in time_distribution)
        self.finite_difference_step = float(finite_difference_step)
        self.tangent = tangent
        self.tangent_clip = float(tangent_clip)
        self.half_pi = float(half_pi)
        self.reference_decay = float(reference_decay)
        self.reference_mode = reference if self.enhanced_ratio != 0.0 else None
        self.mode = mode
        self.reference_precision = reference_precision

    @classmethod
    def from_official(cls, official: dict, **overrides) -> "UCGMObjective":
        """Build from the official argument names (``consistc_ratio``, ``ema_decay_rate``, ...; see the module
        table); ``overrides`` are ucgm keyword arguments (e.g. ``half_pi=OFFICIAL_HALF_PI``)."""
        official = dict(official)
        decay = float(official.pop("ema_decay_rate", 0.999))
        unknown = sorted(set(official) - set(OFFICIAL_NAMES))
        if unknown:
            raise ValueError(f"unknown official UCGM arguments {unknown}; "
                             f"allowed: {sorted(OFFICIAL_NAMES) + ['ema_decay_rate']}")
        kwargs = {OFFICIAL_NAMES[key]: value for key, value in official.items()}
        if kwargs.get("time_weighting") is not None:
            kwargs["time_weighting"] = str(kwargs["time_weighting"]).lower()
        if isinstance(kwargs.get("transport"), str) and "transport" not in overrides:
            kwargs["transport"] = make_transport(kwargs["transport"], half_pi=overrides.get("half_pi", math.pi / 2))
        reference = "online" if decay == 0.0 else "frozen" if decay == 1.0 else "ema"
        return cls(**{"reference": reference, "reference_decay": decay, **kwargs, **overrides})

    # ------------------------------------------------------------------------------------ helpers
    def sample_time(self, batch_size: int, generator: Optional[torch.Generator] = None,
                    device: torch.device | str = "cpu") -> Tensor:
        """Training times ``t = clamp(k Beta(a, b), 0, 1)``."""
        return sample_beta_time(batch_size, self.time_distribution, generator, device)

    def _enhance(self, value: Tensor, conditional: Tensor, reference: Tensor, in_range: Tensor,
                 dropped: Tensor) -> Tensor:
        """Per-sample enhanced target of step 2 (applied to x and to z alike)."""
        in_range = broadcast_time(in_range, value)
        dropped = broadcast_time(dropped, value)
        guided = value + self.enhanced_ratio * (conditional - reference)
        conditional_mix = torch.where(in_range, guided, (value + conditional) * 0.5)
        return torch.where(dropped, (value + reference) * 0.5, conditional_mix)

    def _reference_predictions(self, reference_model, x_t, t, labels, null_label, in_range, dropped, same_dropout
                               ) -> tuple[Optional[Prediction], Optional[Prediction]]:
        """The reference network's passes of step 2, ``(conditional, unconditional)``, each under ``same_dropout``;
        ``None`` where the style reads the online prediction (``ft-vs-fe``'s conditional) or the truth
        (``fc-vs-xz``'s reference). In ``fast`` mode a pass runs only on the rows :meth:`_enhance` reads from it (the
        conditional one on the kept labels, the unconditional one in range or dropped) and holds zeros on the others."""
        transport = self.transport
        nulls = torch.full_like(labels, null_label)

        def reference_prediction(conditioning, rows):
            if self.mode == "fast":
                dtype = reference_autocast_dtype(self.reference_precision, x_t.device)
                return _row_subset_prediction(reference_model, transport, x_t, t, conditioning, rows, same_dropout,
                                              dtype)
            with same_dropout():
                return transport.predict(reference_model, x_t, t, conditioning)

        conditional = None if self.enhanced_style == "ft-vs-fe" else reference_prediction(labels, ~dropped)
        unconditional = None if self.enhanced_style == "fc-vs-xz" else reference_prediction(nulls, in_range | dropped)
        return conditional, unconditional

    def _enhanced_pair(self, references: tuple[Optional[Prediction], Optional[Prediction]],
                       online: Optional[Prediction], data: Tensor, noise: Tensor, in_range: Tensor, dropped: Tensor
                       ) -> tuple[Tensor, Tensor]:
        """``(x*, z*)`` of step 2 from the :meth:`_reference_predictions` and, for ``ft-vs-fe``, the online
        prediction (the conditional one; ``fc-vs-xz``'s reference is the truth ``(x, z)``)."""
        conditional, unconditional = references
        data_c, noise_c = ((online.data.detach(), online.noise.detach()) if conditional is None
                           else (conditional.data, conditional.noise))
        data_u, noise_u = (data, noise) if unconditional is None else (unconditional.data, unconditional.noise)
        return (self._enhance(data, data_c, data_u, in_range, dropped),
                self._enhance(noise, noise_c, noise_u, in_range, dropped))

    def per_sample_loss(self, output: Tensor, target: Tensor) -> Tensor:
        """``sqrt(mean((F - T)^2) + c^2) - c`` (+ ``mean over positions of 1 - cos(F, T)`` over channels)."""
        dims = tuple(range(1, output.ndim))
        loss = torch.sqrt(((output - target) ** 2).mean(dim=dims) + self.huber_constant**2) - self.huber_constant
        if self.cosine_loss:
            cosine = 1 - functional.cosine_similarity(output, target, dim=1)
            loss = loss + (cosine.mean(dim=tuple(range(1, cosine.ndim))) if cosine.ndim > 1 else cosine)
        return loss

    # -------------------------------------------------------------------------------------- step
    def __call__(
        self,
        model: Callable,
        data: Tensor,
        labels: Optional[Tensor] = None,
        *,
        reference_model: Optional[Callable] = None,
        generator: Optional[torch.Generator] = None,
        time: Optional[Tensor] = None,
        noise: Optional[Tensor] = None,
        drop_labels: bool = True,
    ) -> ObjectiveOutput:
        """One UCGM-T loss. ``time`` (B,), ``noise`` and already-dropped ``labels`` (with ``drop_labels=False``)
        may be given to make the step exactly reproducible; otherwise they are drawn from ``generator``."""
        batch_size = data.shape[0]
        check_finite("data", data)
        check_batch("labels", labels, batch_size)
        if time is None:
            time = self.sample_time(batch_size, generator, data.device).to(data.dtype)
        else:
            time = torch.as_tensor(time, dtype=data.dtype, device=data.device).reshape(-1)
            check_batch("time", time, batch_size)
            check_finite("time", time)
        noise = draw_noise(data, noise, generator)
        null_label = resolve_null_label(model, self.null_label)
        if drop_labels:
            labels = drop_labels_with(labels, self.label_dropout, null_label, generator)

        same_dropout = functools.partial(shared_randomness, dropout_seed(generator), data.device)
        transport = self.transport
        x_t = transport.interpolate(data, noise, time)
        enhanced, consistency = self.enhanced_ratio != 0.0, self.consistency_ratio != 0.0
        if enhanced:
            self._check_enhanced_inputs(labels, null_label, reference_model)
            low, high = self.enhanced_range
            in_range = (time > low) & (time < high)
            dropped = labels == null_label
        # The no-gradient passes that do not read the online prediction run before it (all of them unless the
        # enhanced pair is ft-vs-fe's): their temporaries are freed before the online pass builds its graph, instead
        # of raising the step's peak memory on top of it (docs/ucgm_fast_mode.md, "Parity-mode cost"). Every pass
        # runs under the same seeded dropout RNG, so the order leaves every number unchanged.
        pair, passes = (data, noise), None
        with torch.no_grad():
            if enhanced:
                references = self._reference_predictions(reference_model, x_t, time, labels, null_label, in_range,
                                                         dropped, same_dropout)
                pair = None if self.enhanced_style == "ft-vs-fe" else self._enhanced_pair(
                    references, None, data, noise, in_range, dropped)
            if consistency and pair is not None:
                passes = self._consistency_passes(model, time, labels, *pair, same_dropout)
        with same_dropout():
            online = transport.predict(model, x_t, time, labels)
        with torch.no_grad():
            if pair is None:
                pair = self._enhanced_pair(references, online, data, noise, in_range, dropped)
                if consistency:
                    passes = self._consistency_passes(model, time, labels, *pair, same_dropout)
        target = transport.target(*pair, time)
        if consistency:
            with torch.no_grad():
                target = self._consistency_target(online.output, time, *pair, passes)

        per_sample = self.per_sample_loss(online.output, target)
        if self.time_weighting == "cosine":
            per_sample = per_sample * torch.cos(time * self.half_pi)
        return ObjectiveOutput(per_sample.mean(), per_sample.detach(), {})

    def _check_enhanced_inputs(self, labels: Optional[Tensor], null_label: Optional[int],
                               reference_model: Optional[Callable]) -> None:
        """The enhanced target needs class labels, a null label and a reference network."""
        if labels is None or null_label is None:
            raise ValueError("enhanced_ratio != 0 needs class labels and a null label (num_classes); "
                             "set enhanced_ratio=0 for unconditional data")
        if reference_model is None:
            raise ValueError(f"enhanced_style={self.enhanced_style!r} needs a reference_model "
                             f"({self.reference_mode} copy of the model)")

    def _central_tangent(self) -> bool:
        """Whether step 3 takes the two-sided tangent at lambda = 1 (always but in fast mode's finite difference)."""
        return self.consistency_ratio == 1.0 and not (self.mode == "fast" and self.tangent == "finite_difference")

    def _consistency_gap(self, time: Tensor) -> Tensor | float:
        """The gap of the one-sided difference: ``(1 - lambda) t`` for lambda < 1, ``eps`` for fast lambda = 1."""
        return self.finite_difference_step if self.consistency_ratio == 1.0 else time - self.consistency_ratio * time

    def _consistency_passes(self, model, time, labels, data, noise, same_dropout) -> Tensor:
        """The no-gradient passes of step 3 on the enhanced path ``x_r = alpha(r) z* + gamma(r) x*``: the tangent
        ``Delta`` itself (lambda = 1, central difference or jvp), else ``X(t - gap)``, which
        :meth:`_consistency_target` differences with the online prediction."""
        transport, online = self.transport, unwrap(model)
        if self._central_tangent():
            return data_prediction_tangent(online, transport, data, noise, time, labels, self.tangent,
                                           self.finite_difference_step, same_dropout)
        return _data_prediction_at(online, transport, data, noise, time - self._consistency_gap(time), labels,
                                   same_dropout)

    def _consistency_target(self, output: Tensor, time: Tensor, data: Tensor, noise: Tensor, passes: Tensor
                            ) -> Tensor:
        """``T = F.detach() - (alpha / D) (4 / sin(h t)) clamp(Delta, -1, 1)`` (step 3), ``passes`` from
        :meth:`_consistency_passes`."""
        transport = self.transport
        if self._central_tangent():
            delta = passes
        else:
            # lambda < 1: the gap (1 - lambda) t; fast lambda = 1: the one-sided difference over eps, whose upper
            # point X(t) is the online pass (the enhanced path passes through x_t, see the class docstring).
            gap = self._consistency_gap(time)
            x_t = transport.interpolate(data, noise, time)
            current = transport.recover(output.detach(), x_t, time)[0]
            inv_gap = broadcast_time(1 / gap, output)
            delta = current * inv_gap - passes * inv_gap
        delta = torch.clamp(delta, -self.tangent_clip, self.tangent_clip)
        tb = broadcast_time(time, output)
        weight = tangent_weight(tb, self.half_pi)
        return output.detach() - (transport.alpha(tb) / transport.denominator(tb) * weight) * delta
