"""CAF: Constant Acceleration Flow (Park et al., NeurIPS 2024; official code mlvlab/CAF ``flow/pipeline_caf.py``).

**Units.** CAF runs its own time ``tau = 1 - t`` (``tau = 0`` noise ``x0``, ``tau = 1`` data ``x1``); its networks
receive the library time ``t = 1 - tau``. Pairs ``(x0, x1)`` are *deterministic couplings*: ``x1`` is the teacher's
probability-flow ODE solution from the noise ``x0`` (:class:`~ucgm.methods.couplings.TeacherCouplings`, generated
once, kept in the method state, read by index).

**Kinematics.** ``x_tau = x0 + v0 tau + a tau^2 / 2`` with constant acceleration ``a``; ``x(1) = x1`` fixes
``a = 2 (x1 - x0) - 2 v0``, so ``x_tau = (1 - tau^2) x0 + tau^2 x1 + v0 (tau - tau^2)``.

* **Stage 1** (network ``velocity``, ``v_phi(x, tau)``): ``v0 = h (x1 - x0)``; regress ``v_phi(x_tau, tau)`` on it
  (``h`` = ``initial_velocity_scale``, official ``alpha`` = 1.5; ``h = 1`` is rectified flow, where ``a = 0``).
* **Stage 2** (network ``model``, ``a_theta(x, tau, v_hat0)`` with the model condition ``initial_velocity``):
  ``v_hat0 = sg v_phi(x0, 0)``; ``x_tau`` with ``v0 = v_hat0``; regress ``a_theta(x_tau, tau, v_hat0)`` on
  ``a* = 2 (x1 - x0) - 2 v_hat0``.
* **Stage 3** (optional: ``adversarial_weight > 0``; off by default and on the toys): a discriminator ``D``
  (network ``discriminator``: a backbone of the run's model section read at ``t = 0`` and averaged to one logit
  per sample) trained with the hinge loss ``relu(1 - D(x_real)) + relu(1 + D(x_hat1))`` on the data batch against the
  one-step estimate ``x_hat1 = x0 + v_hat0 + a_theta(x0, 0, v_hat0) / 2``; the acceleration loss adds
  ``lambda * adversarial_weight * (-D(x_hat1))`` from step ``adversarial_start`` on, with the official adaptive
  ``lambda = ||grad_W L_caf|| / (||grad_W L_gan|| + 1e-4)`` clipped to [0.01, 10] (``W``: the acceleration network's
  last parameter).

Times ``tau ~ U{0, 1/T, ..., 1}`` (``T = time_steps`` = 1000). Distance ``l2`` (mean squared error) or ``huber``
(``(sqrt(||d||^2 + c^2) - c) / D``, ``c = 0.00054 D``, official ``loss_func_huber``).

**Sampler** (``caf``, :func:`ucgm.sampling.caf_sampler.caf_sample`): ``v_hat0 = v_phi(x0, 0)``, then ``N`` steps
``x <- x + v_hat0 dt + (tau_k + dt / 2) a_theta(x, tau_k, v_hat0) dt`` (``tau_k = k / N``, ``dt = 1 / N``), ``N + 1``
network calls: CAF's "one step" costs 2 NFE.

**Official defaults** (``flow/script_util.py``): ``alpha`` (h) 1.5, ``num_timesteps`` 1000 (uniform discrete
``tau``), ``loss_norm`` ``lpips_huber`` (stages 1-2), ``huber`` (stage 3), lr 1e-4, weight decay 1e-5, EMA 0.9999,
batch 160 (CIFAR) / 400 (ImageNet-64), 1M steps per stage; couplings from EDM with 18 / 40 Heun steps (1M / 3M
pairs); stage 3 lr 2e-5 with a projected discriminator (DeiT + EfficientNet features), adaptive weight.

**Deviations.** (1) The stages run as two phases of every training step (``velocity`` then ``acceleration``) in
one run instead of two separate 1M-step runs; stage 2 reads ``v_hat0`` from the velocity network's evaluation
EMA (the weights the sampler uses), so the acceleration target follows the velocity model while it trains.
(2) No LPIPS term (``lpips_huber`` needs ImageNet features; ucgm loads no weights): ``l2`` or ``huber`` only.
(3) Stage 3's discriminator is a plain backbone on the samples, not the projected discriminator on frozen DeiT /
EfficientNet features (ucgm loads no weights); it runs as a third phase of the same run from
``adversarial_start``, G and D updated every step (official: a separate fine-tune with ``g_learning_period`` 2).
(4) ``teacher=None`` trains on independent pairs (fresh noise, a data batch) — CAF without
reflow, for data without a teacher (the digits preset); the official recipe always uses teacher couplings.
(5) The teacher couplings come from ucgm's probability-flow solver (Heun on a uniform grid from ``t = 1``), not
EDM's Karras-grid sampler; labels of a conditional teacher are uniform over the classes. (6) No output clamp by
default (``clip`` sampler setting; the official sampler clamps to [-1, 1]).
"""

from __future__ import annotations

from typing import Callable, Mapping, Optional

import torch
from torch import Tensor, nn

from ...transports import Transport, broadcast_time, make_transport
from ...validation import check_choice, check_positive_int, check_range
from ..base import Batch, Method, NetworkSpec, Networks, ObjectiveOutput, Phase, drop_labels, resolve_null_label, unwrap
from ..couplings import TeacherCouplings
from ..probability_flow import PROBABILITY_FLOW_SOLVERS
from ..teachers import Teacher

CAF_DISTANCES = ("l2", "huber")
#: The official pseudo-Huber constant per data dimension (``loss_func_huber``: ``c = 0.00054 D``).
HUBER_CONSTANT_PER_DIMENSION = 0.00054
VELOCITY_ROLE = "velocity"
DISCRIMINATOR_ROLE = "discriminator"
#: Official clip of stage 3's adaptive weight (``get_GAN_loss``).
ADAPTIVE_WEIGHT_RANGE = (0.01, 10.0)


def caf_distance(prediction: Tensor, target: Tensor, distance: str) -> Tensor:
    """Per-sample distance: ``l2`` = mean squared error; ``huber`` = ``(sqrt(||d||^2 + c^2) - c) / D`` with
    ``c = 0.00054 D`` (``D`` values per sample)."""
    squared = ((prediction - target) ** 2).flatten(1)
    if distance == "l2":
        return squared.mean(dim=1)
    values = squared.shape[1]
    constant = HUBER_CONSTANT_PER_DIMENSION * values
    return (torch.sqrt(squared.sum(dim=1) + constant**2) - constant) / values


def caf_state(noise: Tensor, data: Tensor, initial_velocity: Tensor, tau: Tensor) -> Tensor:
    """``x_tau = (1 - tau^2) x0 + tau^2 x1 + v0 (tau - tau^2)`` (``tau`` per sample)."""
    tau = broadcast_time(tau, noise)
    return (1 - tau**2) * noise + tau**2 * data + initial_velocity * (tau - tau**2)


def caf_acceleration_target(noise: Tensor, data: Tensor, initial_velocity: Tensor) -> Tensor:
    """``a* = 2 (x1 - x0) - 2 v0``: the constant acceleration that carries ``x0`` with velocity ``v0`` to ``x1`` at
    ``tau = 1``."""
    return 2 * (data - noise) - 2 * initial_velocity


class ConstantAccelerationFlow(nn.Module):
    """A trained CAF as its sampler calls it: ``initial_velocity(x0, labels) = v_phi(x0, tau=0)`` and
    ``acceleration(x, tau, labels, v0) = a_theta(x, tau, v0)`` (both networks get the library time ``1 - tau``).
    It is not a velocity or data-prediction model: only the ``caf`` sampler can sample it."""

    def __init__(self, velocity: nn.Module, acceleration: nn.Module):
        super().__init__()
        self.velocity, self.acceleration_network = velocity, acceleration
        self.num_classes = getattr(acceleration, "num_classes", None)

    def initial_velocity(self, noise: Tensor, labels: Optional[Tensor] = None) -> Tensor:
        return self.velocity(noise, torch.ones(noise.shape[0], dtype=noise.dtype, device=noise.device), labels)

    def acceleration(self, x: Tensor, tau: Tensor | float, labels: Optional[Tensor], initial_velocity: Tensor
                     ) -> Tensor:
        tau = torch.as_tensor(tau, dtype=x.dtype, device=x.device).expand(x.shape[0])
        return self.acceleration_network(x, 1 - tau, labels, initial_velocity=initial_velocity)

    def forward(self, *args, **kwargs):
        raise TypeError("a constant acceleration flow (CAF) is sampled by its own sampler 'caf' (an initial "
                        "velocity and an acceleration network), not as a velocity or data-prediction model; "
                        "choose --sampler caf")


class ConstantAccelerationFlowMethod(Method):
    """CAF stages 1 and 2 (see the module docstring) as two phases of each step.

    ``teacher``: ``"oracle:<mixture>"``, ``"checkpoint:<path>"`` or a model (:class:`~ucgm.methods.teachers.Teacher`)
    whose ODE makes ``num_couplings`` pairs with ``teacher_steps`` steps of ``teacher_solver``; ``None`` pairs fresh
    noise with the data batch. ``initial_velocity_scale`` = h; ``time_steps`` = T of the discrete ``tau`` grid;
    ``distance`` ``l2`` | ``huber``; ``label_dropout`` drops labels to the null label (classifier-free guidance);
    ``clip`` clamps the samples of its sampler (official: 1 for images in [-1, 1]); ``adversarial_weight`` > 0 adds
    stage 3 from step ``adversarial_start``.
    """

    family = "flow_maps"
    default_sampler = "caf"

    def __init__(
        self,
        transport: Transport | str = "linear",
        teacher: Optional[Callable | str] = None,
        teacher_transport: Optional[Transport | str] = None,
        num_couplings: int = 20000,
        teacher_steps: int = 64,
        teacher_solver: str = "heun",
        initial_velocity_scale: float = 1.5,
        time_steps: int = 1000,
        distance: str = "l2",
        label_dropout: float = 0.0,
        null_label: Optional[int] = None,
        clip: Optional[float] = None,
        adversarial_weight: float = 0.0,
        adversarial_start: int = 0,
    ):
        self.transport = make_transport(transport) if isinstance(transport, str) else transport
        if clip is not None:
            check_range("clip", clip, 0.0, float("inf"))
        self.clip = clip
        check_range("adversarial_weight", adversarial_weight, 0.0, float("inf"))
        check_positive_int("adversarial_start", adversarial_start, minimum=0)
        self.adversarial_weight, self.adversarial_start = float(adversarial_weight), adversarial_start
        self.step = 0
        check_positive_int("num_couplings", num_couplings)
        check_positive_int("teacher_steps", teacher_steps)
        check_choice("teacher_solver", teacher_solver, PROBABILITY_FLOW_SOLVERS)
        check_range("initial_velocity_scale", initial_velocity_scale, 0.0, 100.0)
        check_positive_int("time_steps", time_steps)
        check_choice("distance", distance, CAF_DISTANCES)
        check_range("label_dropout", label_dropout, 0.0, 1.0)
        if teacher is None and teacher_transport is not None:
            raise ValueError("teacher_transport is only used with a teacher")
        self.teacher = None if teacher is None else Teacher(teacher, teacher_transport, self.transport)
        self.couplings = None if teacher is None else TeacherCouplings(num_couplings, teacher_steps, teacher_solver)
        self.initial_velocity_scale = float(initial_velocity_scale)
        self.time_steps = time_steps
        self.distance = distance
        self.label_dropout = float(label_dropout)
        self.null_label = null_label
        self.seed = 0

    # ------------------------------------------------------------------------------------ declaration
    def networks(self) -> dict[str, NetworkSpec]:
        specs = {"model": NetworkSpec(conditions=("initial_velocity",)), VELOCITY_ROLE: NetworkSpec()}
        if self.adversarial_weight > 0:
            specs[DISCRIMINATOR_ROLE] = NetworkSpec(ema={"kind": "none"})
        if self.teacher is not None:
            specs.update(self.teacher.network_specs())
        return specs

    def schedule(self) -> list[Phase]:
        phases = [Phase("velocity", (VELOCITY_ROLE,)), Phase("acceleration", ("model",))]
        if self.adversarial_weight > 0:
            phases.append(Phase("discriminator", (DISCRIMINATOR_ROLE,)))
        return phases

    def set_progress(self, step: int, total_steps: Optional[int] = None) -> None:
        self.step = step

    def set_seed(self, seed: int) -> None:
        self.seed = int(seed)

    def to(self, device: torch.device | str) -> "ConstantAccelerationFlowMethod":
        if self.couplings is not None:
            self.couplings.to(device)
        return self

    def state_dict(self) -> dict:
        return {} if self.couplings is None else {"couplings": self.couplings.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        if self.couplings is None:
            super().load_state_dict(state)
        else:
            self.couplings.load_state_dict(state.get("couplings", {}))

    # --------------------------------------------------------------------------------------- training
    def pairs(self, networks: Networks, batch: Batch) -> tuple[Tensor, Tensor, Optional[Tensor]]:
        """``(x0, x1, labels)`` of the batch: teacher couplings at indices drawn from the batch generator
        (generated on first use), or fresh noise with the data batch without a teacher."""
        data = batch.data
        if self.couplings is None:
            noise = torch.randn(data.shape, generator=batch.generator, dtype=data.dtype).to(data.device)
            return noise, data, batch.labels
        if not self.couplings.generated:
            self.teacher.bind(networks)
            teacher, teacher_transport = self.teacher.resolved()
            num_classes = getattr(unwrap(networks.module("model")), "num_classes", None)
            self.couplings.generate(teacher, teacher_transport, data.shape[1:], num_classes, self.seed, data.device,
                                    data.dtype)
        return self.couplings.batch(self.couplings.draw_indices(data.shape[0], batch.generator))

    def draw_tau(self, batch_size: int, generator: torch.Generator, like: Tensor) -> Tensor:
        """``tau ~ U{0, 1/T, ..., 1}``."""
        steps = torch.randint(self.time_steps + 1, (batch_size,), generator=generator)
        return (steps.to(torch.float64) / self.time_steps).to(like.dtype).to(like.device)

    def one_step_estimate(self, networks: Networks, noise: Tensor, labels: Optional[Tensor],
                          acceleration: Callable) -> Tensor:
        """``x_hat1 = x0 + v_hat0 + a(x0, tau=0, v_hat0) / 2`` (``v_hat0`` from the velocity EMA, no gradient)."""
        initial_velocity = self.initial_velocity(networks, noise, labels)
        ones = torch.ones(noise.shape[0], dtype=noise.dtype, device=noise.device)
        return noise + initial_velocity + 0.5 * acceleration(noise, ones, labels, initial_velocity=initial_velocity)

    def initial_velocity(self, networks: Networks, noise: Tensor, labels: Optional[Tensor]) -> Tensor:
        """``v_hat0 = sg v_phi(x0, tau=0)`` from the velocity network's evaluation EMA (else the network)."""
        velocity = networks.ema(VELOCITY_ROLE)
        velocity = networks.module(VELOCITY_ROLE) if velocity is None else velocity
        with torch.no_grad():
            return velocity(noise, torch.ones(noise.shape[0], dtype=noise.dtype, device=noise.device), labels)

    def loss(self, phase: str, networks: Networks, batch: Batch) -> ObjectiveOutput:
        if phase == "discriminator":
            return self.discriminator_loss(networks, batch)
        noise, data, labels = self.pairs(networks, batch)
        tau = self.draw_tau(data.shape[0], batch.generator, data)
        null = resolve_null_label(networks.module("model"), self.null_label)
        labels = drop_labels(labels, self.label_dropout, null, batch.generator)
        time = 1 - tau
        if phase == "velocity":
            target = self.initial_velocity_scale * (data - noise)
            prediction = networks[VELOCITY_ROLE](caf_state(noise, data, target, tau), time, labels)
        else:
            initial_velocity = self.initial_velocity(networks, noise, labels)
            target = caf_acceleration_target(noise, data, initial_velocity)
            prediction = networks["model"](caf_state(noise, data, initial_velocity, tau), time, labels,
                                           initial_velocity=initial_velocity)
        per_sample = caf_distance(prediction, target, self.distance)
        if phase == "acceleration" and self.adversarial_weight > 0 and self.step >= self.adversarial_start:
            return self.with_adversarial_term(networks, per_sample, noise, labels)
        return ObjectiveOutput(per_sample.mean(), per_sample.detach(), {})

    def discriminate(self, networks: Networks, x: Tensor, labels: Optional[Tensor]) -> Tensor:
        """One logit per sample: the discriminator backbone at ``t = 0`` averaged over values."""
        zeros = torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)
        return networks[DISCRIMINATOR_ROLE](x, zeros, labels).flatten(1).mean(dim=1)

    def discriminator_loss(self, networks: Networks, batch: Batch) -> ObjectiveOutput:
        """Stage 3's hinge loss ``relu(1 - D(real)) + relu(1 + D(fake))``, real = the data batch, fake = the
        one-step estimate from fresh coupling noise (no gradient to the generator)."""
        noise, _, labels = self.pairs(networks, batch)
        with torch.no_grad():
            fake = self.one_step_estimate(networks, noise, labels, networks.module("model"))
        per_sample = torch.relu(1 - self.discriminate(networks, batch.data, batch.labels)) + \
            torch.relu(1 + self.discriminate(networks, fake, labels))
        return ObjectiveOutput(per_sample.mean(), per_sample.detach(), {})

    def with_adversarial_term(self, networks: Networks, per_sample: Tensor, noise: Tensor,
                              labels: Optional[Tensor]) -> ObjectiveOutput:
        """``L_caf + adversarial_weight * lambda * L_gan`` with ``L_gan = -mean D(x_hat1)`` and the adaptive ``lambda``
        (module docstring)."""
        caf_loss = per_sample.mean()
        fake = self.one_step_estimate(networks, noise, labels, networks["model"])
        generator_loss = -self.discriminate(networks, fake, labels).mean()
        last = [parameter for parameter in networks["model"].parameters() if parameter.requires_grad][-1]
        caf_gradient = torch.autograd.grad(caf_loss, last, retain_graph=True)[0]
        gan_gradient = torch.autograd.grad(generator_loss, last, retain_graph=True)[0]
        adaptive = (caf_gradient.norm() / (gan_gradient.norm() + 1e-4)).clamp(*ADAPTIVE_WEIGHT_RANGE).detach()
        loss = caf_loss + self.adversarial_weight * adaptive * generator_loss
        return ObjectiveOutput(loss, per_sample.detach(), {"caf_adaptive_weight": adaptive})

    # --------------------------------------------------------------------------------------- sampling
    def sampler(self) -> tuple[str, dict]:
        """The ``caf`` sampler, clamping samples to ``[-clip, clip]`` when ``clip`` is set."""
        return "caf", {} if self.clip is None else {"clip": self.clip}

    def sampling_roles(self) -> tuple[str, ...]:
        return ("model", VELOCITY_ROLE)

    def sampling_model(self, modules: Mapping[str, nn.Module]) -> tuple[Callable, Transport]:
        return ConstantAccelerationFlow(modules[VELOCITY_ROLE], modules["model"]), self.transport
