"""CTM: Consistency Trajectory Models (Kim et al., ICLR 2024; official code sony/ctm ``code/cm/karras_diffusion.py``,
``cm/resample.py``, ``cm/sample_util.py``; CIFAR-10 settings Kim-Dongjun/ctm-cifar10 ``cm/script_util.py``).

**Units.** CTM works in EDM noise levels ``sigma`` (``x_sigma = x + sigma eps``) with
``G_theta(x_t, t, s) = (sigma_s / sigma_t) x_t + (1 - sigma_s / sigma_t) g_theta(x_t, t, s)``; in ucgm this is the
core's jump (:mod:`ucgm.methods.flow_maps.core`, ``second_time="s"``) of the network read through the run's
transport (``g_theta`` = its data prediction; the ``data`` / ``edm`` parameterisations are CTM's own), the same
formula in every unit (flow_maps.md section 0). ``sigma = alpha / gamma`` of the run's path maps noise levels to
ucgm times.

**Loss** (``ctm_losses``). Karras grid ``sigma_0 = sigma_max > ... > sigma_{N-1} = sigma_min`` (``num_scales`` N,
``rho``). Per step one ``k in {1..K}`` for the batch with ``P(k) ~ k``; per sample ``n ~ U{0..N-1-k}``,
``t = sigma_n``, ``u = sigma_{n+k}``, ``s = sigma_m``, ``m ~ U{n+k..N-1}``. ``x_t = alpha(t) z + gamma(t) x``; ``x_u`` =
``k`` teacher ODE steps (Heun) along the grid without gradient. With ``theta^-`` the target network (EMA of the
model, decay ``target_decay``, ``tracks``):

    estimate = G_{theta^-}(G_theta(x_t, t, s), s, sigma_min)      (inner with gradient; outer: gradient through its input)
    target   = G_{theta^-}(G_{sg theta}(x_u, u, s), s, sigma_min)  (inner: the online weights without gradient)

``L_CTM = d(estimate, target)`` (``distance``). **DSM term** (``get_DSM_loss``): half the rows ``ln sigma ~
N(-1.2, 1.2^2)``, half ``sigma = Karras(0.7 U)`` (``sigma in [0.32, 80]``), ``L_DSM = lambda(sigma) mean ||g_theta(x_sigma,
sigma, sigma) - x||^2``, ``lambda = (sigma^2 + sigma_d^2) / (sigma sigma_d)^2``; total ``L_CTM + w L_DSM`` with
``w = ||grad_W L_CTM|| / (||grad_W L_DSM|| + 1e-4)`` clamped to ``[0, 1e4]`` (``W``: the backbone's last weight;
``dsm_weight="adaptive"``) or a fixed number. Both passes with gradient are one call of the network on the
concatenated batch.

**Sampler** (``flow-map``, grid ``karras`` from ``sigma_max`` to ``sigma_min``): ``x <- G(x, sigma_i, sigma_{i+1})``
(``gamma = 0``, CTM's exact sampler) or CTM's gamma-sampling (``sampler_gamma``; ``gamma = 1`` is CM's multistep).
``sample_on_training_grid`` (default): ``n`` jumps visit ``n + 1`` points ``round(i (N - 1) / n)`` of the training
grid, the only times the loss trains (the official sampler's ``ts`` indices of its ``steps``-point grid); budgets
above ``N - 1`` jumps use the Karras grid of ``n + 1`` points. Measured in ``docs/flow_maps.md``.

**Official defaults** (CIFAR-10): EDM-VP teacher, ``N = 18``, ``K = 17``, ``rho = 7``, ``sigma`` in
``[0.002, 80]``, ``sigma_d = 0.5``, EMA 0.999 for the target (0.9999 for evaluation), LPIPS distance, lr 4e-4,
batch 128 (released commands 384, then 528 with the GAN), the student initialised from the teacher; ImageNet-64
``N = 40``, ``K = 39`` (fine-tune ``K = 20``). GAN term (projected discriminator on DeiT / EfficientNet features,
hinge loss, gradient-norm weight clipped to ``[0.01, 10]``, alternating updates): headline 1-step FID CIFAR-10 1.73,
ImageNet-64 1.92. CTM always distils (``teacher``); without one ucgm uses CT's one-sample estimate
``x_u = alpha(u) z + gamma(u) x`` (the same ``(x, z)`` as ``x_t``; consistency-training style, not in the paper).

**Deviations.** (1) No GAN term: it needs pretrained feature networks ucgm does not load; the toys run CTM + DSM,
as the issue allows. (2) ``distance`` ``l2`` (mean squared error) or ``pseudo_huber`` instead of LPIPS (ImageNet
features). (3) The student starts from scratch unless ``init.checkpoint`` names the teacher's run. (4) The teacher
steps in the run path's noise levels (:class:`~ucgm.methods.teachers.TeacherODE`), its time converted from the
teacher's own path. (5) Labels may be dropped (``label_dropout``, default 0 as CTM's unconditional CIFAR model).
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import torch
from torch import Tensor, nn

from ...timegrids import karras_sigmas
from ...transports import EDM_SIGMA_DATA, EDM_SIGMA_MAX, EDM_SIGMA_MIN, Transport
from ...validation import check_choice, check_positive_int, check_range
from ..base import Batch, NetworkSpec, Networks, ObjectiveOutput, unwrap
from ..teachers import TEACHER_SOLVERS, Teacher
from .base import MODEL_ROLE, FlowMapMethod, as_transport
from .core import FlowMapParameterisation, jump

TARGET_ROLE = "target"
CTM_DISTANCES = ("l2", "pseudo_huber")
#: CTM's DSM noise law: ``ln sigma ~ N(-1.2, 1.2^2)`` for half the rows, ``Karras(0.7 U)`` for the other half.
DSM_LOG_SIGMA_MEAN, DSM_LOG_SIGMA_STD, DSM_KARRAS_RANGE = -1.2, 1.2, 0.7
ADAPTIVE_WEIGHT_MAX = 1e4
ADAPTIVE_WEIGHT_EPS = 1e-4
PSEUDO_HUBER_SCALE = 0.00054


def last_weight(module: nn.Module) -> nn.Parameter:
    """The backbone's last registered weight with at least two dimensions (its output layer; CTM's ``W``)."""
    weights = [parameter for parameter in module.parameters() if parameter.ndim >= 2 and parameter.requires_grad]
    if not weights:
        raise ValueError(f"{type(module).__name__} has no trainable weight matrix for CTM's adaptive DSM weight; "
                         f"set dsm_weight to a number")
    return weights[-1]


class ConsistencyTrajectoryModel(FlowMapMethod):
    """CTM with its DSM term (module docstring). ``teacher``: a model, ``"oracle:<mixture>"`` or
    ``"checkpoint:<path>"`` (:class:`~ucgm.methods.teachers.Teacher`), read through ``teacher_transport``; ``None``
    trains without one (the one-sample estimate)."""

    def __init__(self, transport: Transport | str = "linear", teacher=None,
                 teacher_transport: Optional[Transport | str] = None, solver: str = "heun", num_scales: int = 18,
                 max_teacher_steps: int = 17, rho: float = 7.0, sigma_min: float = EDM_SIGMA_MIN,
                 sigma_max: float = EDM_SIGMA_MAX, sigma_data: float = EDM_SIGMA_DATA, target_decay: float = 0.999,
                 distance: str = "l2", huber_constant: Optional[float] = None, dsm_weight: float | str = "adaptive",
                 sampler_gamma: float = 0.0, sample_on_training_grid: bool = True, label_dropout: float = 0.0,
                 null_label: Optional[int] = None):
        check_choice("solver", solver, TEACHER_SOLVERS)
        check_positive_int("num_scales", num_scales, minimum=2)
        check_positive_int("max_teacher_steps", max_teacher_steps)
        if max_teacher_steps > num_scales - 1:
            raise ValueError(f"max_teacher_steps={max_teacher_steps} must be at most num_scales - 1 = {num_scales - 1}")
        check_range("rho", rho, 1e-6, math.inf)
        if not 0 < sigma_min < sigma_max:
            raise ValueError(f"sigma_min={sigma_min!r}, sigma_max={sigma_max!r}: allowed 0 < sigma_min < sigma_max")
        check_range("sigma_data", sigma_data, 1e-12, math.inf)
        check_range("target_decay", target_decay, 0.0, 1.0)
        check_choice("distance", distance, CTM_DISTANCES)
        if not (dsm_weight == "adaptive" or (isinstance(dsm_weight, (int, float)) and not isinstance(dsm_weight, bool)
                                             and dsm_weight >= 0)):
            raise ValueError(f"dsm_weight={dsm_weight!r}: allowed 'adaptive' or a number >= 0")
        check_range("sampler_gamma", sampler_gamma, 0.0, 1.0)
        check_choice("sample_on_training_grid", sample_on_training_grid, (True, False))
        check_range("label_dropout", label_dropout, 0.0, 1.0)
        self.transport = as_transport(transport)
        self.flow_map = FlowMapParameterisation(self.transport, "s")
        if teacher_transport is not None and teacher is None:
            raise ValueError("teacher_transport is only used with a teacher")
        self.teacher = None if teacher is None else Teacher(teacher, teacher_transport, self.transport)
        self.solver, self.num_scales, self.max_teacher_steps, self.rho = solver, num_scales, max_teacher_steps, rho
        self.sigma_min, self.sigma_max, self.sigma_data = float(sigma_min), float(sigma_max), float(sigma_data)
        self.target_decay, self.distance, self.huber_constant = float(target_decay), distance, huber_constant
        self.dsm_weight, self.sampler_gamma = dsm_weight, float(sampler_gamma)
        self.sample_on_training_grid = bool(sample_on_training_grid)
        self.label_dropout, self.null_label = float(label_dropout), null_label
        self.grid = self.transport.path.time_for_sigma(karras_sigmas(num_scales, sigma_min, sigma_max, rho))

    def networks(self) -> dict[str, NetworkSpec]:
        """The model, its EMA target network and a checkpoint teacher."""
        return {**super().networks(),
                TARGET_ROLE: NetworkSpec(init=f"copy:{MODEL_ROLE}", trainable=False, ema={"kind": "none"},
                                         conditions=self.flow_map.conditions, tracks=MODEL_ROLE)}

    def tracking_decay(self, role: str, step: int) -> float:
        return self.target_decay

    def sampler(self) -> tuple[str, dict]:
        """CTM's sampler: jumps on the Karras grid from ``sigma_max`` to ``sigma_min`` (gamma-sampling); with
        ``sample_on_training_grid`` the times are points of the ``num_scales``-point training grid (up to
        ``num_scales - 1`` jumps; the official ``ts`` indices)."""
        settings = {"grid": "karras", "sigma_min": self.sigma_min, "sigma_max": self.sigma_max, "rho": self.rho,
                    "gamma": self.sampler_gamma}
        if self.sample_on_training_grid:
            settings["karras_points"] = self.num_scales
        return "flow-map", settings

    # ------------------------------------------------------------------------------------------ pieces
    def sample_indices(self, batch_size: int, generator: Optional[torch.Generator]) -> tuple[int, Tensor, Tensor]:
        """``(k, n, m)``: teacher steps (``P(k) ~ k``), start index ``n`` and target index ``m >= n + k`` per row."""
        weights = torch.arange(1, self.max_teacher_steps + 1, dtype=torch.float64)
        k = int(torch.multinomial(weights, 1, generator=generator)) + 1
        n = torch.randint(0, self.num_scales - k, (batch_size,), generator=generator)
        span = (self.num_scales - (n + k)).to(torch.float64)
        m = n + k + torch.floor(torch.rand(batch_size, generator=generator, dtype=torch.float64) * span).long()
        return k, n, m

    def dsm_sigmas(self, batch_size: int, generator: Optional[torch.Generator]) -> Tensor:
        """CTM's DSM noise levels (float64): the first half log-normal, the rest ``Karras(0.7 U)``."""
        half = batch_size // 2
        lognormal = torch.exp(DSM_LOG_SIGMA_MEAN + DSM_LOG_SIGMA_STD *
                              torch.randn(half, generator=generator, dtype=torch.float64))
        fraction = DSM_KARRAS_RANGE * torch.rand(batch_size - half, generator=generator, dtype=torch.float64)
        top, bottom = self.sigma_max ** (1 / self.rho), self.sigma_min ** (1 / self.rho)
        return torch.cat([lognormal, (top + fraction * (bottom - top)) ** self.rho])

    @torch.no_grad()
    def teacher_point(self, x_t: Tensor, n: Tensor, k: int, labels: Optional[Tensor], data: Tensor, noise: Tensor
                      ) -> Tensor:
        """``x_u``: ``k`` teacher ODE steps from ``x_t`` along the grid (row ``i`` from index ``n_i``); without a
        teacher the one-sample estimate ``alpha(u) z + gamma(u) x`` with the same ``(x, z)``."""
        grid = self.grid.to(x_t.device)
        if self.teacher is None:
            return self.transport.interpolate(data, noise, grid[n + k].to(x_t.dtype))
        ode = self.teacher.ode(self.transport.path)
        for step in range(k):
            x_t = ode.step(x_t, grid[n + step].to(x_t.dtype), grid[n + step + 1].to(x_t.dtype), labels, self.solver)
        return x_t

    def per_sample_distance(self, estimate: Tensor, target: Tensor) -> Tensor:
        difference = (estimate - target).flatten(1)
        if self.distance == "l2":
            return (difference**2).mean(dim=1)
        constant = PSEUDO_HUBER_SCALE * math.sqrt(difference.shape[1]) if self.huber_constant is None \
            else self.huber_constant
        return torch.sqrt((difference**2).sum(dim=1) + constant**2) - constant

    def dsm_weighting(self, sigma: Tensor) -> Tensor:
        """``lambda(sigma) = (sigma^2 + sigma_d^2) / (sigma sigma_d)^2``."""
        return (sigma**2 + self.sigma_data**2) / (sigma * self.sigma_data) ** 2

    def balance(self, ctm_loss: Tensor, dsm_loss: Tensor, model: Callable) -> Tensor:
        """The DSM weight: fixed, or ``||grad_W L_CTM|| / (||grad_W L_DSM|| + 1e-4)`` clamped to ``[0, 1e4]``."""
        if self.dsm_weight != "adaptive":
            return torch.tensor(float(self.dsm_weight), device=ctm_loss.device)
        if not ctm_loss.requires_grad:  # evaluation without gradient: the weight is not needed
            return torch.tensor(1.0, device=ctm_loss.device)
        weight = last_weight(unwrap(model))
        ctm_grad = torch.autograd.grad(ctm_loss, weight, retain_graph=True)[0]
        dsm_grad = torch.autograd.grad(dsm_loss, weight, retain_graph=True)[0]
        ratio = ctm_grad.norm() / (dsm_grad.norm() + ADAPTIVE_WEIGHT_EPS)
        return torch.clamp(ratio, 0.0, ADAPTIVE_WEIGHT_MAX).detach()

    # -------------------------------------------------------------------------------------------- loss
    def loss(self, phase: str, networks: Networks, batch: Batch) -> ObjectiveOutput:
        if self.teacher is not None:
            self.teacher.bind(networks)
        data, generator = batch.data, batch.generator
        batch_size, device, dtype = data.shape[0], data.device, data.dtype
        k, n, m = self.sample_indices(batch_size, generator)
        dsm_sigma = self.dsm_sigmas(batch_size, generator)
        noise, dsm_noise = self.noise_like(data, generator), self.noise_like(data, generator)
        model = networks[MODEL_ROLE]
        labels = self.prepared_labels(model, batch)
        n, m = n.to(device), m.to(device)
        grid = self.grid.to(device)
        t, u, s = grid[n].to(dtype), grid[n + k].to(dtype), grid[m].to(dtype)
        end = grid[-1].to(dtype).expand(batch_size)
        dsm_time = self.transport.path.time_for_sigma(dsm_sigma).to(device, dtype)
        x_t = self.transport.interpolate(data, noise, t)
        x_sigma = self.transport.interpolate(data, dsm_noise, dsm_time)
        x_u = self.teacher_point(x_t, n, k, labels, data, noise)

        both_labels = None if labels is None else torch.cat([labels, labels])
        outputs = self.flow_map.output(model, torch.cat([x_t, x_sigma]), torch.cat([t, dsm_time]),
                                       torch.cat([s, dsm_time]), both_labels)
        ctm_output, dsm_output = outputs[:batch_size], outputs[batch_size:]
        target_network = networks.module(TARGET_ROLE)
        estimate = self.flow_map.jump(target_network, jump(self.transport, ctm_output, x_t, t, s), s, end, labels)
        with torch.no_grad():
            inner = self.flow_map.jump(unwrap(model), x_u, u, s, labels)
            target = self.flow_map.jump(target_network, inner, s, end, labels)
        ctm_terms = self.per_sample_distance(estimate, target)
        denoised = self.transport.recover(dsm_output, x_sigma, dsm_time)[0]
        dsm_terms = self.dsm_weighting(dsm_sigma.to(device, dtype)) * ((denoised - data) ** 2).flatten(1).mean(dim=1)
        weight = self.balance(ctm_terms.mean(), dsm_terms.mean(), model)
        per_sample = ctm_terms + weight * dsm_terms
        stats = {"ctm_loss": ctm_terms.detach().mean(), "dsm_loss": dsm_terms.detach().mean(),
                 "dsm_weight": weight, "teacher_steps": float(k)}
        return ObjectiveOutput(per_sample.mean(), per_sample.detach(), stats)
