"""IMM: Inductive Moment Matching (Zhou, Ermon, Song 2025; official inference code lumalabs/imm
``training/preconds.py``, ``generate_images.py``; the training loss is not released).

**Units.** IMM writes ``y_t = alpha_t x + sigma_t sigma_d eps`` (``fm``: ``alpha_t = 1 - t``, ``sigma_t = t``) with data
of std ``sigma_d``; in ucgm units (data and noise of unit scale) that is the run's path with IMM's
``(alpha, sigma) = (gamma, alpha)`` of ucgm and ``sigma_d = 1``; ``eta(t) = sigma_t / alpha_t`` is ucgm's noise-to-signal
ratio ``alpha / gamma``.

**Map.** ``f_theta(y_t, t, s)`` is the flow-map core's jump (:mod:`ucgm.methods.flow_maps.core`): the DDIM step of the
data / noise pair the network output means under a parameterisation, with ``f(y, t, t) = y``. IMM's three f-types
are three parameterisations of the run's path (``f_type``): ``euler_fm`` = ``velocity`` (``f = y_t - (t - s) F``),
``identity`` = ``data`` (DDIM with ``F = x_hat``), ``simple_edm`` = ``edm`` with ``sigma_data = 1``
(``f = c_skip y_t + c_out F`` with the official ``c_skip = (a_t a_s + s_t s_s) / (a_t^2 + s_t^2)``,
``c_out = -(a_s s_t - a_t s_s) / sqrt(a_t^2 + s_t^2)``, up to the sign of ``F``); ``tests/test_imm.py`` checks all
three against the official formulas. The second time reaches the network as ``s`` (official ``temb_type
identity``) or as the gap ``t - s`` (``stride``): ``second_time`` ``s`` | ``gap``.

**Loss** (agreed by the re-implementations and lumalabs/imm PR #4; see docs/flow_maps.md). The batch is ``G`` groups
of ``M`` particles (``group_size``); each group shares ``(t, r, s)``: ``t ~ U(eps, T)``, ``s ~ U(eps, t)``,
``r = max(s, eta^-1(eta(t) - (eta(T) - eta(eps)) / 2^k))`` (``decrement_exponent`` k); particles have their own
``(x, z)``. ``y_t``, ``y_r`` share ``(x, z)`` (``y_r`` is DDIM of ``y_t`` with the true pair). ``f_st = f_theta(y_t, t,
s)`` with gradient, ``f_sr = f_theta(y_r, r, s)`` without gradient from the **online** weights under the same
dropout randomness. Per group the **V-statistic**
``MMD^2 = mean_{i,j} [k(f_st^i, f_st^j) + k(f_sr^i, f_sr^j) - 2 k(f_st^i, f_sr^j)]`` (diagonals included: the
particles are paired, and the U-statistic that drops the within-set diagonals is biased negative) with the Laplace
kernel ``k(a, b) = exp(-w max(||a - b||, eps_k) / D)``, ``w = 1 / |c_out(s, t)|`` (``c_out = -(t - s) B`` of the core's
``u = A y + B F``), ``D`` values per sample; weighted by
``1/2 sigmoid(b - lambda_t) (-d lambda_t / dt) alpha_t^a / (alpha_t^2 + sigma_t^2)``, ``lambda_t = 2 ln(alpha_t / sigma_t)``.
Groups never cross processes: the per-process batch must be a multiple of ``M``.

**Sampler**: the core's ``flow-map`` sampler on the uniform grid from ``T`` to ``eps`` (pushforward,
``x <- f(x, t_i, t_{i+1})``) or, ``sampler_grid=log_snr``, on times evenly spaced in ``log eta(t)`` (log-SNR; the
official sampler gives its CIFAR 2-step midpoint in ``eta``, its ImageNet grids uniform in ``t``); ``restart=True``:
jump to ``eps`` and re-noise to ``t_{i+1}`` with fresh noise (the official ``restart_generator_fn``; the core's
``gamma = 1``). ``sampler_gamma`` between the two: CTM's
gamma-sampling (jump to ``sigma' = sqrt(1 - gamma^2) (sigma_{i+1} - sigma_N) + sigma_N``, re-noise to
``sigma_{i+1}``; not in the IMM paper, measured in ``docs/flow_maps.md``).

**Official defaults.** CIFAR-10: ``simple_edm``, ``T = 0.994``, ``eps = 0.006``, ``M = 4``, ``a = 2`` (multi-step),
``b = 5`` (or 4), 2 sampling steps; ImageNet-256: ``euler_fm``, ``eps = 0``, checkpoints ``ts_a2`` and ``s_a1``, 1-8
uniform steps, CFG 1.5 (label dropout 0.1); ``k`` 12-15; network input ``c_in = 1 / (sigma_d sqrt(a_t^2 + s_t^2))``
and times ``1000 t``, ``1000 s``.

**Deviations.** (1) The loss is a re-implementation (no official training code). (2) Times ``t``, ``s`` uniform
(one re-implementation; another draws ``eta`` log-normally). (3) The backbone gets ``x_t`` and the times as the
run's model and transport give them (no ``c_in``, no 1000 scale unless ``model.time_scale`` says so). (4) The
sampler starts at ``alpha(T) z`` (the official sampler at ``sigma_d z``); restart re-noises in the core's
noise-level form (identical to the official one at ``eps = 0``). (5) Classifier-free guidance is not mixed into
the map at sampling. (6) ``sampler_gamma`` strictly between 0 and 1 and the ``log_snr`` grid are additions (the gmm
preset: gamma 0.7 on ``log_snr``).
"""

from __future__ import annotations

from typing import Callable, Mapping, Optional

import torch
from torch import Tensor, nn

from ...transports import Transport, make_transport
from ...validation import check_choice, check_positive_int, check_range
from ..base import (
    Batch,
    Method,
    NetworkSpec,
    Networks,
    ObjectiveOutput,
    drop_labels,
    dropout_seed,
    resolve_null_label,
    shared_randomness,
)
from .core import FlowMapModel, FlowMapParameterisation, jump_coefficients

#: IMM's f-types and the ucgm parameterisation of the run's path each one is.
IMM_F_TYPES = {"euler_fm": "velocity", "identity": "data", "simple_edm": "edm"}
IMM_SECOND_TIMES = ("s", "gap")
#: The time grids of IMM's sampler (:func:`~ucgm.sampling.flow_map_sampler.flow_map_grid`).
IMM_SAMPLER_GRIDS = ("uniform", "log_snr")


def imm_transport(transport: Transport, f_type: str) -> Transport:
    """The run's path with the parameterisation of IMM's ``f_type`` (``simple_edm``: ``edm`` with
    ``sigma_data = 1``, IMM's ``sigma_d`` in ucgm units); network time, sign and input scale stay the run's."""
    check_choice("f_type", f_type, IMM_F_TYPES)
    sigma_data = 1.0 if f_type == "simple_edm" else transport.sigma_data
    return Transport(transport.path, IMM_F_TYPES[f_type], transport.network_time, transport.output_sign,
                     transport.input_scale, sigma_data, f"{transport.name}-imm-{f_type}")


def laplace_kernel(a: Tensor, b: Tensor, weight: Tensor, epsilon: float = 1e-8) -> Tensor:
    """``k(a_i, b_j) = exp(-w max(||a_i - b_j||_2, epsilon) / D)`` for groups ``a, b`` of shape ``(G, M, D)``
    and per-group ``w`` ``(G,)``: ``(G, M, M)``."""
    distances = torch.cdist(a, b).clamp_min(epsilon)
    return torch.exp(-weight[:, None, None] * distances / a.shape[-1])


def mmd_v_statistic(first: Tensor, second: Tensor, weight: Tensor, epsilon: float = 1e-8) -> Tensor:
    """Per-group ``mean_{i,j} [k(x_i, x_j) + k(y_i, y_j) - 2 k(x_i, y_j)]`` (diagonals included), ``(G,)``."""
    within_first = laplace_kernel(first, first, weight, epsilon).mean(dim=(1, 2))
    within_second = laplace_kernel(second, second, weight, epsilon).mean(dim=(1, 2))
    across = laplace_kernel(first, second, weight, epsilon).mean(dim=(1, 2))
    return within_first + within_second - 2 * across


def imm_weight(transport: Transport, t: Tensor, bias: float, power: float) -> Tensor:
    """``1/2 sigmoid(b - lambda_t) (-d lambda_t / dt) alpha_t^a / (alpha_t^2 + sigma_t^2)`` in IMM's ``(alpha, sigma)``
    = ucgm's ``(gamma, alpha)``; ``lambda_t = 2 ln(gamma / alpha)``, ``-d lambda / dt = 2 (alpha' / alpha - gamma' /
    gamma)`` (float64)."""
    t = t.to(torch.float64)
    path = transport.path
    noise, signal = path.alpha(t), path.gamma(t)
    log_snr = 2 * torch.log(signal / noise)
    slope = 2 * (path.alpha_dot(t) / noise - path.gamma_dot(t) / signal)
    return 0.5 * torch.sigmoid(bias - log_snr) * slope * signal**power / (signal**2 + noise**2)


class InductiveMomentMatching(Method):
    """IMM (see the module docstring). ``group_size`` = M; ``t_max`` / ``t_min`` = T / eps;
    ``decrement_exponent`` = k; ``weighting_bias`` / ``weighting_power`` = b / a (``weighting=False``: weight 1);
    ``kernel_epsilon`` the distance floor; ``kernel_scale`` multiplies ``w`` (official 1); ``restart`` selects the
    restart sampler (``sampler_gamma`` the gamma-sampler between pushforward and restart); ``sampler_grid`` its times
    (``uniform`` in ``t``, official; ``log_snr``: even in ``log eta``); ``label_dropout`` drops labels to the null
    label."""

    family = "flow_maps"
    default_sampler = "flow-map"

    def __init__(
        self,
        transport: Transport | str = "linear",
        f_type: str = "euler_fm",
        second_time: str = "s",
        group_size: int = 4,
        t_max: float = 0.994,
        t_min: float = 0.006,
        decrement_exponent: int = 12,
        weighting: bool = True,
        weighting_bias: float = 5.0,
        weighting_power: float = 2.0,
        kernel_epsilon: float = 1e-8,
        kernel_scale: float = 1.0,
        restart: bool = False,
        sampler_gamma: float = 0.0,
        sampler_grid: str = "uniform",
        label_dropout: float = 0.0,
        null_label: Optional[int] = None,
    ):
        transport = make_transport(transport) if isinstance(transport, str) else transport
        check_choice("second_time", second_time, IMM_SECOND_TIMES)
        check_positive_int("group_size", group_size)
        check_range("t_max", t_max, 0.0, 1.0)
        check_range("t_min", t_min, 0.0, t_max)
        if not t_min < t_max:
            raise ValueError(f"t_min={t_min} must be below t_max={t_max}")
        check_positive_int("decrement_exponent", decrement_exponent, minimum=0)
        check_range("weighting_power", weighting_power, 0.0, 10.0)
        check_range("kernel_epsilon", kernel_epsilon, 0.0, 1.0)
        check_range("kernel_scale", kernel_scale, 1e-6, 1e6)
        check_range("sampler_gamma", sampler_gamma, 0.0, 1.0)
        if restart and sampler_gamma not in (0.0, 1.0):
            raise ValueError(f"restart=True is sampler_gamma=1; got sampler_gamma={sampler_gamma}: set one of them")
        check_choice("sampler_grid", sampler_grid, IMM_SAMPLER_GRIDS)
        check_range("label_dropout", label_dropout, 0.0, 1.0)
        self.f_type = f_type
        self.transport = imm_transport(transport, f_type)
        self.flow_map = FlowMapParameterisation(self.transport, second_time)
        self.group_size, self.t_max, self.t_min = group_size, float(t_max), float(t_min)
        self.decrement_exponent = decrement_exponent
        self.weighting, self.weighting_bias, self.weighting_power = weighting, float(weighting_bias), \
            float(weighting_power)
        self.kernel_epsilon, self.kernel_scale = float(kernel_epsilon), float(kernel_scale)
        self.sampler_gamma = 1.0 if restart else float(sampler_gamma)
        self.sampler_grid = sampler_grid
        self.label_dropout, self.null_label = float(label_dropout), null_label

    def networks(self) -> dict[str, NetworkSpec]:
        return {"model": NetworkSpec(conditions=self.flow_map.conditions)}

    # --------------------------------------------------------------------------------------- training
    def eta(self, t: Tensor) -> Tensor:
        """``eta(t) = sigma(t) = alpha / gamma`` (IMM's ``sigma_t / alpha_t``)."""
        return self.transport.path.sigma(t)

    def group_times(self, groups: int, generator: torch.Generator) -> tuple[Tensor, Tensor, Tensor]:
        """``(t, r, s)`` per group (float64 ``(G,)``): ``t ~ U(eps, T)``, ``s ~ U(eps, t)``, ``r = max(s,
        eta^-1(eta(t) - (eta(T) - eta(eps)) / 2^k))``."""
        low, high = self.t_min, self.t_max
        t = low + (high - low) * torch.rand(groups, generator=generator, dtype=torch.float64)
        s = low + (t - low) * torch.rand(groups, generator=generator, dtype=torch.float64)
        limits = torch.tensor([high, low], dtype=torch.float64)
        eta_high, eta_low = self.eta(limits).tolist()
        decrement = (eta_high - eta_low) / 2**self.decrement_exponent
        r = self.transport.path.time_for_sigma((self.eta(t) - decrement).clamp_min(0.0))
        return t, torch.maximum(r, s), s

    def kernel_weight(self, t: Tensor, s: Tensor) -> Tensor:
        """``w = kernel_scale / |c_out(s, t)|`` with ``c_out = -(t - s) B(t, s)`` (float64; official scale 1)."""
        _, b = jump_coefficients(self.transport, t, s)
        return self.kernel_scale / ((t - s) * b).abs()

    def loss(self, phase: str, networks: Networks, batch: Batch) -> ObjectiveOutput:
        data, generator = batch.data, batch.generator
        size, group = data.shape[0], self.group_size
        if size % group:
            raise ValueError(f"imm: the per-process batch of {size} samples (training.batch_size / (processes x "
                             f"gradient-accumulation rounds)) is not a multiple of group_size={group}; particle "
                             f"groups must stay inside one process: choose a batch size divisible by {group} per "
                             f"process")
        groups = size // group
        t, r, s = self.group_times(groups, generator)
        noise = torch.randn(data.shape, generator=generator, dtype=data.dtype).to(data.device)
        labels = drop_labels(batch.labels, self.label_dropout,
                             resolve_null_label(networks.module("model"), self.null_label), generator)
        per_particle = lambda values: values.repeat_interleave(group).to(data.dtype).to(data.device)  # noqa: E731
        t_p, r_p, s_p = per_particle(t), per_particle(r), per_particle(s)
        y_t = self.transport.interpolate(data, noise, t_p)
        y_r = self.transport.interpolate(data, noise, r_p)
        seed = dropout_seed(generator)
        with shared_randomness(seed, data.device):
            f_st = self.flow_map.jump(networks["model"], y_t, t_p, s_p, labels)
        with shared_randomness(seed, data.device), torch.no_grad():
            f_sr = self.flow_map.jump(networks.module("model"), y_r, r_p, s_p, labels)
        weight = self.kernel_weight(t, s).to(data.dtype).to(data.device)
        mmd = mmd_v_statistic(f_st.reshape(groups, group, -1), f_sr.reshape(groups, group, -1), weight,
                              self.kernel_epsilon)
        if self.weighting:
            mmd = mmd * imm_weight(self.transport, t, self.weighting_bias, self.weighting_power).to(mmd)
        per_sample = mmd.repeat_interleave(group)
        return ObjectiveOutput(mmd.mean(), per_sample.detach(), {})

    # --------------------------------------------------------------------------------------- sampling
    def sampler(self) -> tuple[str, dict]:
        """The core's flow-map chain from ``T`` to ``eps`` on ``sampler_grid`` with CTM's ``gamma`` (``restart``:
        ``gamma = 1``)."""
        return "flow-map", {"grid": self.sampler_grid, "t_max": self.t_max, "t_min": self.t_min,
                            "gamma": self.sampler_gamma}

    def sampling_model(self, modules: Mapping[str, nn.Module]) -> tuple[Callable, Transport]:
        model = FlowMapModel(modules["model"], self.flow_map)
        return model, model.transport
