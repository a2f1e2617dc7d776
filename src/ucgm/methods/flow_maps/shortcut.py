"""Shortcut models (Frans, Hafner, Levine, Abbeel, ICLR 2025; official code kvfrans/shortcut-models
``targets_shortcut.py``, ``train.py``, ``helper_inference.py``).

**Units.** Shortcut's time ``t_m = 1 - t`` (``t_m = 0`` noise), ``x = (1 - (1 - 1e-5) t_m) z + t_m x_data``, network
``s_theta(x, t_m, k)`` with step size ``d = 2^-k`` given as the integer ``k``; ``s_theta(x, t_m, d) = -u(x, t, t - d)``
in ucgm units (``u`` the average velocity of :mod:`ucgm.methods.flow_maps.core`, ``t = 1 - t_m``). The network is the
core's flow map with ``second_time="log2_gap"`` (condition ``step = k = log2(1 / d)``, ``min_gap = 2^-levels``); on
the linear transport its output is ``u`` and a shortcut step is the jump ``x_{t - d} = x_t - d u``.

**Batch.** The first ``B / bootstrap_every`` rows bootstrap, the rest flow-match. Bootstrap rows: levels
``k = levels - 1, ..., 0`` (``d = 2^-k``), ``b // levels`` rows each, the remainder at ``k = 0``; ``t_m`` uniform on the
level's grid ``{0, d, ..., 1 - d}``; target from the **target network** (EMA of the model, ``tracks``, decay
``target_decay``) without gradient: ``u1 = u(x_t, t, t - d/2)``, ``x' = clip(x_t - (d/2) u1, +-clip)``,
``u2 = u(x', t - d/2, t - d)``, target ``clip((u1 + u2) / 2, +-clip)``. With ``bootstrap_cfg`` the finest bootstrap
level (the first ``b // levels`` rows, ``d = 2^-(levels-1)``) uses classifier-free guidance inside both calls,
``u_null + cfg_scale (u_c - u_null)`` (coarser levels inherit it by bootstrapping). Flow-matching rows: ``t_m`` uniform
on ``{0, 1/2^levels, ..., 1 - 1/2^levels}``, ``k = levels`` (``d = 2^-levels`` stands for ``d -> 0``), target the
velocity ``v``, labels dropped with probability ``label_dropout``; bootstrap rows keep their labels. Loss: the mean
squared error over all rows (flow-matching and bootstrap rows weigh the same).

**Sampler** (``shortcut``, :func:`~ucgm.sampling.flow_map_sampler.dyadic_grid`): ``N`` jumps of step sizes
``2^-k``, each conditioned on its own ``k``; for ``N`` a power of two the official uniform ``d = 1/N`` Euler chain.

**Official defaults** (``train.py``): ``denoise_timesteps`` 128 (``levels`` 7), ``bootstrap_every`` 8,
``bootstrap_ema`` 1 with ``target_update_rate`` 0.999, ``class_dropout_prob`` 0.1, ``bootstrap_cfg`` 0 (1 with
``cfg_scale`` 1.5 in the README's ImageNet-256 run; code default ``cfg_scale`` 4.0), clip 4, AdamW lr 1e-4,
weight decay 0.1; sampling without CFG by default (``inference_cfg_scale`` 1).

**Deviations.** (1) ucgm's linear path exactly (no ``1 - 1e-5`` factor). (2) Bootstrap and flow-matching rows are
disjoint rows of the batch with independent times and noise (the official code reuses the first data rows and the
same PRNG keys for both parts). (3) Any NFE samples: a budget that is not a power of two uses the dyadic grid
(the official sampler floors ``log2 N``, conditioning on a step it does not take).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ...transports import Transport, broadcast_time
from ...validation import check_positive_int, check_range
from ..base import Batch, NetworkSpec, Networks, ObjectiveOutput, drop_labels, resolve_null_label
from .base import MODEL_ROLE, FlowMapMethod, as_transport, check_number
from .core import FlowMapParameterisation

TARGET_ROLE = "target"


class ShortcutModel(FlowMapMethod):
    """Shortcut models (module docstring); options and the official names: ``levels`` = ``log2(denoise_timesteps)``,
    ``bootstrap_every``, ``target_decay`` = ``target_update_rate``, ``bootstrap_cfg``, ``cfg_scale``, ``clip`` (4),
    ``label_dropout`` = ``class_dropout_prob``."""

    default_sampler = "shortcut"

    def __init__(self, transport: Transport | str = "linear", levels: int = 7, bootstrap_every: int = 8,
                 target_decay: float = 0.999, bootstrap_cfg: bool = False, cfg_scale: float = 1.5,
                 clip: float = 4.0, label_dropout: float = 0.1, null_label: Optional[int] = None):
        check_positive_int("levels", levels)
        check_positive_int("bootstrap_every", bootstrap_every, minimum=2)
        check_range("target_decay", target_decay, 0.0, 1.0)
        check_number("cfg_scale", cfg_scale)
        check_range("clip", clip, 0.0, float("inf"))
        check_range("label_dropout", label_dropout, 0.0, 1.0)
        self.transport = as_transport(transport)
        self.levels = levels
        self.flow_map = FlowMapParameterisation(self.transport, "log2_gap", min_gap=2.0 ** -levels)
        self.bootstrap_every, self.target_decay = bootstrap_every, float(target_decay)
        self.bootstrap_cfg, self.cfg_scale, self.clip = bool(bootstrap_cfg), float(cfg_scale), float(clip)
        self.label_dropout, self.null_label = float(label_dropout), null_label

    def networks(self) -> dict[str, NetworkSpec]:
        """The model and its EMA target network (the bootstrap targets)."""
        return {**super().networks(),
                TARGET_ROLE: NetworkSpec(init=f"copy:{MODEL_ROLE}", trainable=False, ema={"kind": "none"},
                                         conditions=self.flow_map.conditions, tracks=MODEL_ROLE)}

    def tracking_decay(self, role: str, step: int) -> float:
        return self.target_decay

    def sampler(self) -> tuple[str, dict]:
        """Shortcut's step-size-conditioned sampler (dyadic step sizes)."""
        return "shortcut", {}

    # ------------------------------------------------------------------------------------------ pieces
    def bootstrap_levels(self, rows: int) -> Tensor:
        """The level ``k`` of each of ``rows`` bootstrap rows: ``levels - 1, ..., 0`` in blocks of
        ``rows // levels``, the remainder ``0``."""
        block = rows // self.levels
        levels = torch.arange(self.levels - 1, -1, -1).repeat_interleave(block)
        return torch.cat([levels, torch.zeros(rows - levels.numel(), dtype=torch.long)])

    @staticmethod
    def grid_times(levels: Tensor, generator: Optional[torch.Generator]) -> Tensor:
        """Float64 ``t = 1 - i / 2^k``, ``i ~ U{0, ..., 2^k - 1}`` per row."""
        sections = 2.0 ** levels.to(torch.float64)
        index = torch.floor(torch.rand(levels.shape, generator=generator, dtype=torch.float64) * sections)
        return 1.0 - index / sections

    def guided_velocity(self, target: torch.nn.Module, x_t: Tensor, t: Tensor, s: Tensor, labels: Optional[Tensor],
                        guided_rows: int) -> Tensor:
        """The target network's ``u(x_t, t, s)``; the first ``guided_rows`` rows with classifier-free guidance."""
        velocity = self.flow_map.average_velocity(target, x_t, t, s, labels)
        null = resolve_null_label(target, self.null_label)
        if guided_rows == 0 or labels is None or null is None:
            return velocity
        rows = slice(0, guided_rows)
        unconditional = self.flow_map.average_velocity(target, x_t[rows], t[rows], s[rows],
                                                       torch.full_like(labels[rows], null))
        velocity[rows] = torch.lerp(unconditional, velocity[rows], self.cfg_scale)
        return velocity

    @torch.no_grad()
    def bootstrap_target(self, target: torch.nn.Module, x_t: Tensor, t: Tensor, gap: Tensor,
                         labels: Optional[Tensor], guided_rows: int) -> Tensor:
        """``clip((u1 + u2) / 2)`` of two half jumps of the target network (module docstring)."""
        half = gap / 2
        first = self.guided_velocity(target, x_t, t, t - half, labels, guided_rows)
        middle = torch.clamp(x_t - broadcast_time(half, x_t) * first, -self.clip, self.clip)
        second = self.guided_velocity(target, middle, t - half, t - gap, labels, guided_rows)
        return torch.clamp((first + second) / 2, -self.clip, self.clip)

    # -------------------------------------------------------------------------------------------- loss
    def loss(self, phase: str, networks: Networks, batch: Batch) -> ObjectiveOutput:
        data, generator = batch.data, batch.generator
        batch_size = data.shape[0]
        bootstrap_rows = batch_size // self.bootstrap_every
        levels = torch.cat([self.bootstrap_levels(bootstrap_rows),
                            torch.full((batch_size - bootstrap_rows,), self.levels, dtype=torch.long)])
        t64 = self.grid_times(levels, generator)
        gap64 = 2.0 ** -levels.to(torch.float64)
        noise = self.noise_like(data, generator)
        model = networks[MODEL_ROLE]
        labels = batch.labels
        if labels is not None:
            dropped = drop_labels(labels[bootstrap_rows:], self.label_dropout,
                                  resolve_null_label(model, self.null_label), generator)
            labels = torch.cat([labels[:bootstrap_rows], dropped])
        t, gap = t64.to(data.device, data.dtype), gap64.to(data.device, data.dtype)
        s = t - gap
        x_t = self.transport.interpolate(data, noise, t)
        boot = slice(0, bootstrap_rows)
        guided_rows = bootstrap_rows // self.levels if self.bootstrap_cfg else 0
        bootstrap = self.bootstrap_target(networks.module(TARGET_ROLE), x_t[boot], t[boot], gap[boot],
                                          None if labels is None else labels[boot], guided_rows)
        velocity = self.transport.velocity(data[bootstrap_rows:], noise[bootstrap_rows:], t[bootstrap_rows:])
        target = torch.cat([bootstrap, velocity])
        average = self.flow_map.average_velocity(model, x_t, t, s, labels)
        per_sample = ((average - target) ** 2).flatten(1).mean(dim=1)
        stats = {"bootstrap_loss": per_sample[boot].detach().mean() if bootstrap_rows else 0.0,
                 "flow_matching_loss": per_sample[bootstrap_rows:].detach().mean()}
        return ObjectiveOutput(per_sample.mean(), per_sample.detach(), stats)
