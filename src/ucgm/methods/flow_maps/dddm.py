"""DDDM: Directly Denoising Diffusion Models (Zhang, Wang, Luo, ICML 2024; official code TheLuoFengLab/DDDM
``DDDM/gaussian_diffusion.py``, ``DDDM/train_util.py``).

**Model.** ``f_theta(x_t, t, x_bar)``: the data prediction of the run's transport from the backbone called with the
model condition ``self_condition = x_bar`` (DDDM's VP form ``f = x_t - NN(x_t, t, x_bar)`` is the linear transport's
velocity parameterisation ``x_hat = x_t - t F``).

**Loss.** ``l = w d(f, x) + (1 - w) d(f, x_bar)`` with ``x_bar`` the example's entry of a per-example buffer
(:class:`~ucgm.methods.flow_maps.estimate_buffer.EstimateBuffer`, keyed by ``Batch.indices``, checkpointed in the
method state) holding **the model's own estimate** ``sg f`` from the example's previous visit (initially
``N(0, I)``), and ``w = 1 / (k + 1)`` for an example's ``k``-th visit (the paper's ``1 / (epoch + 1)``: an example is
visited once per epoch). Times (``time_distribution="vp"``, the official chain): an index ``i ~ U{0..N-1}`` of
DDDM's discrete VP chain, ``alpha_bar_i = prod_{j <= i} (1 - beta_j)`` with ``beta = linspace(b0, b1, N) / N``
(``beta_range = (b0, b1)``, official ``sigma_min``, ``sigma_max`` = 0.01, 50), becomes the time of the run's transport
with the same noise-to-signal ratio ``sqrt((1 - alpha_bar) / alpha_bar)``: on the linear path half the draws have
``t > 0.95``; ``"uniform"``: ``t ~ U(0, 1)``. ``d`` = ``l2`` (mean squared error, the default flags) or
``pseudo_huber`` (per value ``sqrt((a - b)^2 + c^2) - c``, ``c = 1.4e-4``, averaged).

**Sampler** (``dddm``, :func:`ucgm.sampling.dddm_sampler.dddm_sample`): a fixed ``x_T = alpha(1) z`` at ``t = 1``
and an independent ``x_bar^0 ~ N(0, I)``; ``x_bar^{n+1} = f(x_T, 1, x_bar^n)``. More NFE = more fixed-point
iterations at the same time.

**Official defaults.** VP with ``N`` = 1000 discrete steps (4000 in ``run_alone.sh``), ``beta`` from
``sigma_min/max`` = 0.01 / 50, ``t ~ U{0..N-1}``; MSE loss (``use_ph``: pseudo-Huber, ``c`` = 1.4e-4; ``use_pl``:
pseudo-LPIPS); lr 1e-4, batch 128, dropout 0.3 (``run_alone.sh``); ``x_bar`` through cross-attention.

**Deviations.** (1) The released code writes the **clean batch** into the buffer (``update_xbar(micro, ...)``; the
line storing the model output is commented out), so from the second epoch the network is conditioned on its own
target; ucgm stores the model's estimate, as the paper describes (``tests/test_dddm.py`` guards against the leak).
(2) ``w`` counts each example's visits rather than global epochs (batches draw indices with replacement, so
"epochs" are not defined; the mean visit count is the epoch count). (3) The VP chain's noise levels are used
on the run's transport (same noise-to-signal ratio), not the VP path itself. (4) The estimate enters through ucgm's input condition (an input layer
added to the first layer's output), not cross-attention; no pseudo-LPIPS. (5) Buffer writes of a step take effect
at the next step (the released code writes at once), so a step does not depend on its split into micro-batches.
(6) The released sampler passes ``(x_bar, T)`` in swapped order; ucgm passes them as the paper defines.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

from ...transports import Transport, make_transport
from ...validation import check_choice, check_positive_int, check_range
from ..base import Batch, Method, NetworkSpec, Networks, ObjectiveOutput, drop_labels, resolve_null_label
from .estimate_buffer import EstimateBuffer

DDDM_DISTANCES = ("l2", "pseudo_huber")
DDDM_TIME_DISTRIBUTIONS = ("vp", "uniform")
#: The official pseudo-Huber constant (``c`` of ``script_util.py``).
DDDM_HUBER_CONSTANT = 1.4e-4


def dddm_distance(prediction: Tensor, target: Tensor, distance: str, constant: float = DDDM_HUBER_CONSTANT
                  ) -> Tensor:
    """Per-sample mean over values of ``(a - b)^2`` (``l2``) or ``sqrt((a - b)^2 + c^2) - c`` (``pseudo_huber``)."""
    difference = (prediction - target).flatten(1)
    if distance == "l2":
        return (difference**2).mean(dim=1)
    return (torch.sqrt(difference**2 + constant**2) - constant).mean(dim=1)


def vp_chain_ratios(steps: int, beta_range: tuple[float, float]) -> Tensor:
    """Noise-to-signal ratios ``sqrt((1 - alpha_bar_i) / alpha_bar_i)`` of DDDM's VP chain, ``i = 0 .. N - 1``, with
    ``beta = linspace(b0 / N, b1 / N, N)`` (float64)."""
    betas = torch.linspace(beta_range[0] / steps, beta_range[1] / steps, steps, dtype=torch.float64)
    alpha_bar = torch.cumprod(1 - betas, dim=0)
    return torch.sqrt((1 - alpha_bar) / alpha_bar)


def visit_weight(visits: Tensor) -> Tensor:
    """``w = 1 / (k + 1)`` at an example's ``k``-th visit (``k = 0`` first): the weight of the clean target."""
    return 1.0 / (visits.to(torch.float64) + 1.0)


class DirectlyDenoisingMethod(Method):
    """DDDM on the run's transport (see the module docstring). Needs a finite dataset whose batches carry dataset
    indices (``data.num_samples=N`` on the mixture presets). ``label_dropout`` drops labels to the null label;
    ``clip`` clamps the sampler's estimates (official: 1 for images in [-1, 1])."""

    family = "flow_maps"
    default_sampler = "dddm"

    def __init__(self, transport: Transport | str = "linear", time_distribution: str = "vp",
                 diffusion_steps: int = 1000, beta_range: Sequence[float] = (0.01, 50.0), distance: str = "l2",
                 huber_constant: float = DDDM_HUBER_CONSTANT, label_dropout: float = 0.0,
                 null_label: Optional[int] = None, clip: Optional[float] = None):
        self.transport = make_transport(transport) if isinstance(transport, str) else transport
        if clip is not None:
            check_range("clip", clip, 0.0, float("inf"))
        self.clip = clip
        check_choice("time_distribution", time_distribution, DDDM_TIME_DISTRIBUTIONS)
        check_positive_int("diffusion_steps", diffusion_steps)
        if len(beta_range) != 2 or not 0 < beta_range[0] <= beta_range[1] < diffusion_steps:
            raise ValueError(f"beta_range={list(beta_range)} must be two numbers 0 < b0 <= b1 < diffusion_steps")
        check_choice("distance", distance, DDDM_DISTANCES)
        check_range("huber_constant", huber_constant, 0.0, 1.0)
        check_range("label_dropout", label_dropout, 0.0, 1.0)
        self.distance, self.huber_constant = distance, float(huber_constant)
        self.label_dropout, self.null_label = float(label_dropout), null_label
        self.time_distribution = time_distribution
        self.chain_times = self.transport.path.time_for_sigma(vp_chain_ratios(diffusion_steps, tuple(beta_range)))
        self.buffer = EstimateBuffer()

    def networks(self) -> dict[str, NetworkSpec]:
        return {"model": NetworkSpec(conditions=("self_condition",))}

    def set_seed(self, seed: int) -> None:
        self.buffer.seed = int(seed)

    def set_progress(self, step: int, total_steps: Optional[int] = None) -> None:
        """Apply the buffer writes of the previous step."""
        self.buffer.apply_pending()

    def to(self, device: torch.device | str) -> "DirectlyDenoisingMethod":
        self.buffer.to(device)
        return self

    def state_dict(self) -> dict:
        return {"buffer": self.buffer.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.buffer.load_state_dict(state.get("buffer", {}))

    def draw_time(self, batch_size: int, generator: torch.Generator) -> Tensor:
        """Training times: a VP chain index's time (``vp``) or ``U(0, 1)`` (float64)."""
        if self.time_distribution == "uniform":
            return torch.rand(batch_size, generator=generator, dtype=torch.float64)
        return self.chain_times[torch.randint(self.chain_times.shape[0], (batch_size,), generator=generator)]

    def loss(self, phase: str, networks: Networks, batch: Batch) -> ObjectiveOutput:
        if batch.indices is None:
            raise ValueError("dddm keeps a per-example estimate buffer keyed by dataset index, but this dataset draws "
                             "fresh samples without indices; train on a finite dataset (for the mixture presets: "
                             "data.num_samples=N, e.g. data.num_samples=4096)")
        data, generator = batch.data, batch.generator
        context, visits = self.buffer.read(batch.indices, data.shape[1:], data.dtype)
        context, weight = context.to(data.device), visit_weight(visits).to(data.dtype).to(data.device)
        time = self.draw_time(data.shape[0], generator).to(data.dtype).to(data.device)
        noise = torch.randn(data.shape, generator=generator, dtype=data.dtype).to(data.device)
        labels = drop_labels(batch.labels, self.label_dropout,
                             resolve_null_label(networks.module("model"), self.null_label), generator)
        x_t = self.transport.interpolate(data, noise, time)
        estimate = self.transport.predict(networks["model"], x_t, time, labels, self_condition=context).data
        self.buffer.stage(batch.indices, estimate)
        guide = dddm_distance(estimate, data, self.distance, self.huber_constant)
        iterate = dddm_distance(estimate, context, self.distance, self.huber_constant)
        per_sample = weight * guide + (1 - weight) * iterate
        return ObjectiveOutput(per_sample.mean(), per_sample.detach(),
                               {"dddm_guide_weight": weight.mean().detach()})

    def sampler(self) -> tuple[str, dict]:
        """The ``dddm`` sampler, clamping every estimate to ``[-clip, clip]`` when ``clip`` is set."""
        return "dddm", {} if self.clip is None else {"clip": self.clip}
