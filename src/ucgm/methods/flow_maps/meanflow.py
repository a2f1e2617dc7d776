"""MeanFlow (Geng, Deng, Bai, Kolter, He 2025; official code Gsunshine/meanflow ``meanflow.py`` (JAX),
Gsunshine/py-meanflow ``meanflow/models/meanflow.py``).

**Units.** MeanFlow's are ucgm's: ``z_t = (1 - t) x + t e``, ``v = e - x``, the average velocity
``u(z_t, r, t) = (t - r)^-1 int_r^t v dtau`` and ``z_r = z_t - (t - r) u``. The network is the flow map of
:mod:`ucgm.methods.flow_maps.core` with ``second_time="gap"`` (it receives ``(t, h = t - r)``, MeanFlow's input); on
the linear transport its raw output *is* ``u``; on another transport ``u = A z_t + B F`` (the core's jump formula).

**Loss.** ``(u, du/dt) = jvp(u_theta, (z_t, t, r), (v_g, 1, 0))`` (``r`` held fixed, ``h = t - r`` formed inside, so
``dh/dt = 1``: the tangent pitfall of flow_maps.md section 0), ``u_tgt = sg(v_g - clip(t - r, 0, 1) du/dt)``,
``l = sum_dims (u - u_tgt)^2``, loss ``= mean l / sg((l + c)^p)``. Times: two logit-normal draws, ``t`` the larger,
``r`` the smaller; a fraction ``equal_times_fraction`` of the rows gets ``r = t`` (plain flow matching).
**Guidance folded into training** (``t`` inside ``guidance_interval``, rows whose label was not dropped):
``v_g = w v + (1 - w - k) u(z_t, t, t | null) + k u(z_t, t, t | c)`` (``w = guidance_scale``,
``k = guidance_mix``; the net itself without gradient); ``v_g = v`` elsewhere (``w = 1, k = 0``: no guidance).
``v_g`` is both the target velocity and the JVP tangent. The sampler has no CFG: ``x_r = x_t - (t - r) u`` on the
uniform grid from 1 to 0 (``flow-map``), one jump for 1 NFE.

**Official defaults** (JAX, ImageNet-256 DiT-B/4): both times ``LN(-0.4, 1.0)``, ``data_proportion = 0.75`` (75% of
the rows ``r = t``), ``p = 1``, ``c = 0.01``, class drop 0.1, ``w = 1``, ``k = 0.5`` for the best 1-NFE FID (11.35),
Adam lr 1e-4 (beta2 0.95), EMA 0.9999, batch 256. py-meanflow CIFAR-10: ``t ~ LN(-0.6, 1.6)``, ``r ~ LN(-4, 1.6)``,
``ratio = 0.75`` (75% of the rows ``r != t``; ``ratio`` and ``data_proportion`` have opposite meanings),
``p = 0.75``, ``c = 1e-3``. The defaults below are the JAX ones with ``k = 0`` (no guidance: the toys have few
classes); the presets state what they change and why.

**Deviations.** (1) The derivative ``du/dt`` is taken **without gradient** on the plain module, and only for the
rows with ``r != t`` (where ``clip(t - r) > 0``; the others multiply it by 0, so the target is the same), and the
gradient comes from a separate forward pass of the training wrapper: FastGen's scheme and py-meanflow's README
alternative, instead of one ``jvp`` whose primal carries the gradient. It is what makes DDP work (``torch.func.jvp``
cannot pass through the DDP wrapper, pytorch#182661) and costs one extra forward of the ``r != t`` rows. The
two passes see different dropout masks when the backbone has dropout (the toys have none). (2) ``tangent_method
= "auto"`` falls back to central differences (``finite_difference_step``) for models without forward-mode AD.
(3) On a transport other than linear, ``v`` is its velocity ``dx_t/dt`` and ``u`` the core's average velocity.
"""

from __future__ import annotations

import functools
from typing import Optional, Sequence

import torch
from torch import Tensor

from ...transports import Transport, broadcast_time
from ...validation import check_range
from ..base import Batch, Networks, ObjectiveOutput, dropout_seed, resolve_null_label, shared_randomness, unwrap
from .base import MODEL_ROLE, FlowMapMethod, as_transport, check_number, logit_normal
from .core import FlowMapParameterisation
from .tangent import TangentEstimator


class MeanFlow(FlowMapMethod):
    """MeanFlow (module docstring). Options and the official names: ``time_mean``/``time_std`` (``P_mean_t``,
    ``P_std_t``), ``target_time_mean``/``target_time_std`` (``P_mean_r``, ``P_std_r``), ``equal_times_fraction``
    (JAX ``data_proportion``; py-meanflow ``1 - ratio``), ``weight_power`` / ``weight_constant`` (``norm_p`` /
    ``norm_eps``), ``guidance_scale`` / ``guidance_mix`` / ``guidance_interval`` (``omega`` / ``kappa`` /
    ``[t_start, t_end]``), ``label_dropout`` (``class_dropout_prob``)."""

    def __init__(
        self,
        transport: Transport | str = "linear",
        time_mean: float = -0.4,
        time_std: float = 1.0,
        target_time_mean: float = -0.4,
        target_time_std: float = 1.0,
        equal_times_fraction: float = 0.75,
        weight_power: float = 1.0,
        weight_constant: float = 0.01,
        guidance_scale: float = 1.0,
        guidance_mix: float = 0.0,
        guidance_interval: Sequence[float] = (0.0, 1.0),
        tangent_method: str = "auto",
        finite_difference_step: float = 1e-3,
        label_dropout: float = 0.1,
        null_label: Optional[int] = None,
    ):
        self.transport = as_transport(transport)
        self.flow_map = FlowMapParameterisation(self.transport, "gap")
        for name, value in (("time_mean", time_mean), ("target_time_mean", target_time_mean),
                            ("guidance_scale", guidance_scale), ("guidance_mix", guidance_mix)):
            check_number(name, value)
        check_range("time_std", time_std, 0.0, float("inf"))
        check_range("target_time_std", target_time_std, 0.0, float("inf"))
        check_range("equal_times_fraction", equal_times_fraction, 0.0, 1.0)
        check_range("weight_power", weight_power, 0.0, float("inf"))
        check_range("weight_constant", weight_constant, 1e-12, float("inf"))
        check_range("label_dropout", label_dropout, 0.0, 1.0)
        interval = tuple(float(value) for value in guidance_interval)
        if len(interval) != 2 or not 0.0 <= interval[0] <= interval[1] <= 1.0:
            raise ValueError(f"guidance_interval={list(guidance_interval)!r} must be [t_start, t_end] with "
                             f"0 <= t_start <= t_end <= 1")
        self.time_law = (float(time_mean), float(time_std), float(target_time_mean), float(target_time_std))
        self.equal_times_fraction = float(equal_times_fraction)
        self.weight_power, self.weight_constant = float(weight_power), float(weight_constant)
        self.guidance_scale, self.guidance_mix, self.guidance_interval = float(guidance_scale), float(guidance_mix), \
            interval
        self.label_dropout, self.null_label = float(label_dropout), null_label
        self.tangent = TangentEstimator(tangent_method, finite_difference_step, "MeanFlow")

    # -------------------------------------------------------------------------------------------- state
    def state_dict(self) -> dict:
        return self.tangent.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.tangent.load_state_dict(state)

    # ------------------------------------------------------------------------------------------ pieces
    def sample_times(self, batch_size: int, generator: Optional[torch.Generator]) -> tuple[Tensor, Tensor]:
        """Float64 ``(t, r)``: ``t = max``, ``r = min`` of two logit-normal draws; ``r = t`` on a random fraction
        ``equal_times_fraction`` of the rows."""
        time_mean, time_std, target_mean, target_std = self.time_law
        first = logit_normal(batch_size, time_mean, time_std, generator)
        second = logit_normal(batch_size, target_mean, target_std, generator)
        t, r = torch.maximum(first, second), torch.minimum(first, second)
        equal = torch.rand(batch_size, generator=generator, dtype=torch.float64) < self.equal_times_fraction
        return t, torch.where(equal, t, r)

    @property
    def guided(self) -> bool:
        return self.guidance_scale != 1.0 or self.guidance_mix != 0.0

    @torch.no_grad()
    def guided_velocity(self, model, velocity: Tensor, x_t: Tensor, t: Tensor, labels: Optional[Tensor]) -> Tensor:
        """``v_g`` (module docstring) from the plain module ``model`` without gradient."""
        null = resolve_null_label(model, self.null_label)
        if not self.guided or labels is None or null is None:
            return velocity
        low, high = self.guidance_interval
        active = (labels != null) & (t >= low) & (t <= high)
        unconditional = self.flow_map.average_velocity(model, x_t, t, t, torch.full_like(labels, null))
        guided = self.guidance_scale * velocity + (1 - self.guidance_scale - self.guidance_mix) * unconditional
        if self.guidance_mix != 0.0:
            guided = guided + self.guidance_mix * self.flow_map.average_velocity(model, x_t, t, t, labels)
        return torch.where(broadcast_time(active, x_t), guided, velocity)

    def time_derivative(self, model, x_t: Tensor, t: Tensor, r: Tensor, tangent: Tensor, labels: Optional[Tensor]
                        ) -> Tensor:
        """``du_theta/dt`` along ``(tangent, 1, 0)`` on ``(z_t, t, r)`` (without gradient; zeros where ``r = t``,
        which are not evaluated)."""
        derivative = torch.zeros_like(x_t)
        rows = (t != r).nonzero(as_tuple=True)[0]
        if rows.numel() == 0:
            return derivative
        row_labels = None if labels is None else labels[rows]
        target_times = r[rows]

        def velocity_at(network, point: Tensor, time: Tensor) -> Tensor:
            return self.flow_map.average_velocity(network, point, time, target_times, row_labels)

        derivative[rows] = self.tangent(velocity_at, model, (x_t[rows], t[rows]),
                                        (tangent[rows], torch.ones_like(t[rows])))
        return derivative

    # -------------------------------------------------------------------------------------------- loss
    def loss(self, phase: str, networks: Networks, batch: Batch) -> ObjectiveOutput:
        data, generator = batch.data, batch.generator
        t64, r64 = self.sample_times(data.shape[0], generator)
        t, r = t64.to(data.device, data.dtype), r64.to(data.device, data.dtype)
        noise = self.noise_like(data, generator)
        model = networks[MODEL_ROLE]
        labels = self.prepared_labels(model, batch)
        same_dropout = functools.partial(shared_randomness, dropout_seed(generator), data.device)
        x_t = self.transport.interpolate(data, noise, t)
        velocity = self.transport.velocity(data, noise, t)
        plain = unwrap(model)
        with same_dropout():
            guided = self.guided_velocity(plain, velocity, x_t, t, labels)
            derivative = self.time_derivative(plain, x_t, t, r, guided, labels)
        target = guided - broadcast_time(torch.clamp(t - r, 0.0, 1.0), x_t) * derivative
        with same_dropout():
            average = self.flow_map.average_velocity(model, x_t, t, r, labels)
        error = ((average - target) ** 2).flatten(1).sum(dim=1)
        weight = 1.0 / (error.detach() + self.weight_constant) ** self.weight_power
        per_sample = weight * error
        stats = {"squared_error": error.detach().mean(), "equal_times": (t == r).float().mean(),
                 "derivative_norm": derivative.flatten(1).norm(dim=1).mean()}
        return ObjectiveOutput(per_sample.mean(), per_sample.detach(), stats)
