"""The method protocol: what every training method declares and provides to the (method-agnostic) trainer.

A :class:`Method` declares

* its **networks by role** (:meth:`Method.networks`): for each role a :class:`NetworkSpec` saying how the network
  is initialised (from scratch, a checkpoint, a copy of another role, an exact mixture oracle, or built by the
  method), whether it is trained, its optimizer and EMA settings (overrides of the run's), the model conditions it
  must accept, and whether it tracks another network by an exponential moving average (a target network);
* its **update schedule** (:meth:`Method.schedule`): ordered :class:`Phase` s per training step, each updating a
  subset of the trainable networks ``repeats`` times (e.g. "fake score x5, then generator x1");
* its **loss** per phase (:meth:`Method.loss`), given a :class:`Networks` view and a :class:`Batch`;
* its **own state** (:meth:`Method.state_dict`): curricula, per-sample buffers, fallback switches — anything the
  trainer must checkpoint besides the networks;
* its **sampler** (:meth:`Method.sampler`) and how its trained networks are sampled (:meth:`Method.sampling_model`).

A one-network method subclasses :class:`Objective` and only implements ``__call__(model, data, labels, ...)``.
"""

from __future__ import annotations

import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, ClassVar, Iterator, Mapping, NamedTuple, Optional

import torch
from torch import Tensor, nn

from ..transports import Transport
from ..validation import check_finite, check_same_shape

#: How a network starts: ``scratch`` (the run's initialisation), ``copy:ROLE`` (the weights of another role after
#: its own initialisation), ``checkpoint:PATH`` (a ucgm checkpoint's EMA weights, read as its method trained them),
#: ``oracle:MIXTURE`` (the exact Gaussian-mixture posterior, no parameters), ``method`` (built by
#: :meth:`Method.build_network`).
NETWORK_INITS = ("scratch", "copy:", "checkpoint:", "oracle:", "method")


def unwrap(model: Callable) -> Callable:
    """The module inside a DDP wrapper (no-gradient passes bypass the wrapper's gradient hooks)."""
    return getattr(model, "module", model)


def resolve_null_label(model: Callable, null_label: Optional[int]) -> Optional[int]:
    """The null (unconditional) label: ``null_label`` when given, else the model's ``num_classes``."""
    return null_label if null_label is not None else getattr(unwrap(model), "num_classes", None)


def drop_labels(labels: Optional[Tensor], probability: float, null_label: Optional[int],
                generator: Optional[torch.Generator] = None) -> Optional[Tensor]:
    """Replace each label by ``null_label`` with ``probability`` (classifier-free guidance training); labels pass
    unchanged when there are none or ``probability == 0``, and, with a warning, when there is no null label."""
    if labels is None or probability == 0:
        return labels
    if null_label is None:
        warnings.warn(f"label_dropout={probability} is ignored: the model has no null label (num_classes) and "
                      f"null_label is not set; set null_label, or label_dropout=0 to silence this warning",
                      RuntimeWarning, stacklevel=2)
        return labels
    keep = torch.rand(labels.shape[0], generator=generator).to(labels.device) >= probability
    return torch.where(keep, labels, torch.full_like(labels, null_label))


def draw_noise(data: Tensor, noise: Optional[Tensor], generator: Optional[torch.Generator] = None) -> Tensor:
    """``noise`` checked against ``data`` (same shape, finite), or fresh ``N(0, I)`` noise from ``generator``."""
    if noise is None:
        return torch.randn(data.shape, generator=generator, dtype=data.dtype).to(data.device)
    check_same_shape("noise", noise, "data", data)
    check_finite("noise", noise)
    return noise


def dropout_seed(generator: Optional[torch.Generator]) -> int:
    """The seed of a loss's network randomness (dropout), drawn from the batch ``generator``: the one randomness
    policy of every method (see :func:`shared_randomness`). Drawn after the loss's other draws, so that adding it
    leaves the times, noise and label dropout of a step unchanged."""
    return int(torch.randint(0, 2**62, (1,), generator=generator))


@contextmanager
def shared_randomness(seed: int, device: torch.device) -> Iterator[None]:
    """Run a block with the global RNG seeded by ``seed`` and restore the previous state after.

    Every network pass of one loss that must see the online pass's dropout masks (consistency targets, tangents,
    enhanced targets; the official codes replay the RNG state of the online pass) runs under the same
    ``shared_randomness(dropout_seed(generator), device)``; nothing a loss draws leaks into the global RNG."""
    on_cuda = device.type == "cuda"
    with torch.random.fork_rng(devices=[device] if on_cuda else []):
        torch.default_generator.manual_seed(seed)
        if on_cuda:
            with torch.cuda.device(device):
                torch.cuda.manual_seed(seed)
        yield


class ObjectiveOutput(NamedTuple):
    """``loss``: the scalar to differentiate; ``per_sample``: its per-sample terms; ``stats``: extra scalars to log."""

    loss: Tensor
    per_sample: Tensor
    stats: dict


@dataclass(frozen=True)
class NetworkSpec:
    """How the trainer builds, trains and keeps one network of a method.

    ``model`` holds backbone options merged over the run's ``model`` section (``None``: the run's model as it is);
    ``conditions`` names the model conditions the backbone must accept (``"s"``, ``"step"``, ``"self_condition"``,
    ...; see :mod:`ucgm.models.conditions`). ``optimizer`` and ``ema`` override the run's ``optimizer`` and
    ``training.ema`` sections for this network (``ema={"kind": "none"}`` keeps no EMA). A network with ``tracks``
    is not optimised: before every step it moves towards network ``tracks`` with the decay
    :meth:`Method.tracking_decay` returns (a target / reference network). ``requires_pretrained`` makes a
    ``copy:`` of the run's network an error unless that network was initialised from a checkpoint (a frozen
    reference of random weights is never what the user wants).
    """

    init: str = "scratch"
    trainable: bool = True
    model: Optional[dict] = None
    conditions: tuple[str, ...] = ()
    optimizer: dict = field(default_factory=dict)
    ema: Optional[dict] = None
    tracks: Optional[str] = None
    requires_pretrained: bool = False

    def __post_init__(self) -> None:
        if not self.init.startswith(NETWORK_INITS):
            raise ValueError(f"network init={self.init!r} is not allowed; allowed: 'scratch', 'copy:ROLE', "
                             f"'checkpoint:PATH', 'oracle:MIXTURE', 'method'")
        if self.tracks is not None and self.trainable:
            raise ValueError(f"a network that tracks {self.tracks!r} by EMA cannot also be trainable")


@dataclass(frozen=True)
class Phase:
    """One part of a training step: ``repeats`` optimisation steps of the networks ``networks`` on the loss
    :meth:`Method.loss` returns for phase ``name`` (each repeat on a fresh batch)."""

    name: str
    networks: tuple[str, ...]
    repeats: int = 1

    def __post_init__(self) -> None:
        if not self.networks:
            raise ValueError(f"phase {self.name!r} updates no network")
        if not isinstance(self.repeats, int) or self.repeats < 1:
            raise ValueError(f"phase {self.name!r}: repeats={self.repeats!r} must be an integer >= 1")


class Batch(NamedTuple):
    """A (micro-)batch: ``data`` in model space, ``labels`` or ``None``, the dataset ``indices`` of the samples
    (``None`` for datasets drawn afresh, e.g. mixtures), and the seeded ``generator`` for every draw of the loss."""

    data: Tensor
    labels: Optional[Tensor]
    indices: Optional[Tensor]
    generator: torch.Generator


class Networks:
    """The networks of a method as the trainer hands them to :meth:`Method.loss` for one phase.

    ``networks[role]`` is the network to call: for a network the phase updates, the (DDP) training wrapper, to be
    called once per loss with gradient; for every other network, the plain module with frozen parameters
    (gradients still flow through its input). ``networks.module(role)`` is always the plain module (no-gradient
    passes of a trained network); ``networks.ema(role)`` its evaluation EMA (or ``None``).
    """

    def __init__(self, modules: Mapping[str, Callable], wrappers: Optional[Mapping[str, Callable]] = None,
                 emas: Optional[Mapping[str, Optional[nn.Module]]] = None, phase: Optional[str] = None):
        self._modules = dict(modules)
        self._wrappers = dict(wrappers or {})
        self._emas = dict(emas or {})
        self.phase = phase

    def __getitem__(self, role: str) -> Callable:
        if role in self._wrappers:
            return self._wrappers[role]
        return self.module(role)

    def module(self, role: str) -> Callable:
        if role not in self._modules:
            raise KeyError(f"no network {role!r}; this method has {sorted(self._modules)}")
        return self._modules[role]

    def ema(self, role: str) -> Optional[nn.Module]:
        return self._emas.get(role)

    def get(self, role: str, default: Optional[Callable] = None) -> Optional[Callable]:
        return self[role] if role in self._modules else default

    def __contains__(self, role: str) -> bool:
        return role in self._modules

    def roles(self) -> list[str]:
        return list(self._modules)


class Method:
    """A training method: networks by role, an update schedule, losses, its own state and its sampler.

    Class attributes: ``family`` (``diffusion``, ``consistency``, ``flow_maps``, ``distribution_matching``,
    ``distillation``, ``discrete``), ``default_sampler`` (a name of :mod:`ucgm.sampling.registry`) and
    ``sampling_role`` (the network that is sampled; its weights are the checkpoint's ``model`` / ``ema`` groups).
    """

    family: ClassVar[str] = "diffusion"
    default_sampler: ClassVar[str] = "ucgm"
    sampling_role: ClassVar[str] = "model"
    transport: Transport

    # ------------------------------------------------------------------------------------ declaration
    def networks(self) -> dict[str, NetworkSpec]:
        """The networks by role (default: one trainable network ``model``)."""
        return {self.sampling_role: NetworkSpec()}

    def schedule(self) -> list[Phase]:
        """The phases of one training step (default: one phase updating every trainable network once)."""
        trainable = tuple(role for role, spec in self.networks().items() if spec.trainable)
        return [Phase("train", trainable)]

    def build_network(self, role: str) -> nn.Module:
        """The module of a network declared with ``init="method"``."""
        raise NotImplementedError(f"{type(self).__name__} declares no network built by the method ({role!r})")

    # --------------------------------------------------------------------------------------- training
    def set_progress(self, step: int, total_steps: Optional[int] = None) -> None:
        """Tell the method the training step it is at (curricula, warm-ups); called before every step."""

    def set_seed(self, seed: int) -> None:
        """Tell the method the run seed (``training.seed``); called once by the trainer before training. State a
        method draws once (fixed teacher couplings, initial buffer values) is derived from it, so it is the same
        on every process and in every run with that seed."""

    def tracking_decay(self, role: str, step: int) -> float:
        """EMA decay with which network ``role`` (declared with ``tracks``) follows its source before ``step``."""
        raise NotImplementedError(f"{type(self).__name__} declares no tracking network ({role!r})")

    def loss(self, phase: str, networks: Networks, batch: Batch) -> ObjectiveOutput:
        """The loss of phase ``phase`` on ``batch``."""
        raise NotImplementedError

    def state_dict(self) -> dict:
        """The method's own state (tensors and plain containers), checkpointed and restored exactly."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        if state:
            raise ValueError(f"{type(self).__name__} has no state of its own, but the checkpoint holds {sorted(state)}")

    def to(self, device: torch.device | str) -> "Method":
        """Move the method's own tensors (buffers, teachers it built) to ``device``."""
        return self

    # --------------------------------------------------------------------------------------- sampling
    def sampler(self) -> tuple[str, dict]:
        """The method's own sampler: a registry name and its settings."""
        return self.default_sampler, {}

    def sampling_roles(self) -> tuple[str, ...]:
        """The networks :meth:`sampling_model` needs."""
        return (self.sampling_role,)

    def sampling_model(self, modules: Mapping[str, nn.Module]) -> tuple[Callable, Transport]:
        """``(model, transport)`` to sample: the trained network read through the run's transport (methods that
        train a re-parameterised network wrap it here)."""
        return modules[self.sampling_role], self.transport


class Objective(Method):
    """A one-network method: ``objective(model, data, labels, reference_model=..., generator=...)``.

    ``reference_mode`` asks for a reference network next to the online model: ``None`` (none), ``"ema"`` (a copy
    tracking the model with :meth:`tracking_decay`), ``"online"`` (the online model itself, without gradient) or
    ``"frozen"`` (a copy of the model the run started from, which must come from a checkpoint).
    """

    reference_mode: Optional[str] = None
    reference_decay: float = 0.0
    #: Whether the reference EMA warms its decay up from 0 (UCGM's rule) or applies ``reference_decay`` at once.
    reference_warmup: bool = False

    def networks(self) -> dict[str, NetworkSpec]:
        specs = {"model": NetworkSpec()}
        if self.reference_mode == "ema":
            specs["reference"] = NetworkSpec(init="copy:model", trainable=False, ema={"kind": "none"},
                                             tracks="model")
        elif self.reference_mode == "frozen":
            specs["reference"] = NetworkSpec(init="copy:model", trainable=False, ema={"kind": "none"},
                                             requires_pretrained=True)
        return specs

    def schedule(self) -> list[Phase]:
        return [Phase("train", ("model",))]

    def tracking_decay(self, role: str, step: int) -> float:
        """``reference_decay`` (read every step: curricula may change it), or with ``reference_warmup`` the
        warm-up ``d_0 = 0``, ``d_{k+1} = d_k + (1 - d_k)(mu - d_k) / 2`` towards ``mu = reference_decay``."""
        target = float(self.reference_decay)
        if not self.reference_warmup:
            return target
        cached_target, cached_step, cached_decay = getattr(self, "_warmup_cache", (None, 0, 0.0))
        start = (cached_step, cached_decay) if cached_target == target else (0, 0.0)
        decay = warmed_up_decay(target, step, start)
        self._warmup_cache = (target, step, decay)
        return decay

    def loss(self, phase: str, networks: Networks, batch: Batch) -> ObjectiveOutput:
        reference = None
        if self.reference_mode == "online":
            reference = networks.module("model")
        elif self.reference_mode is not None:
            reference = networks.module("reference")
        return self(networks["model"], batch.data, batch.labels, reference_model=reference,
                    generator=batch.generator)

    def __call__(
        self,
        model: Callable,
        data: Tensor,
        labels: Optional[Tensor] = None,
        *,
        reference_model: Optional[Callable] = None,
        generator: Optional[torch.Generator] = None,
    ) -> ObjectiveOutput:
        raise NotImplementedError

    def parameters(self) -> Iterator[nn.Parameter]:
        """Trainable parameters the objective owns besides the model's (none by default)."""
        return iter(())


def warmed_up_decay(target: float, step: int, start: tuple[int, float] = (0, 0.0)) -> float:
    """``d_step`` of the warm-up ``d_0 = 0``, ``d_{k+1} = d_k + (1 - d_k)(mu - d_k) / 2`` (``mu = target``),
    iterated from ``start = (k, d_k)`` (a value computed before) when ``k <= step``."""
    first, decay = start if start[0] <= step else (0, 0.0)
    for _ in range(first, step):
        following = decay + (1.0 - decay) * (target - decay) / 2.0
        if following == decay:  # the fixed point: later steps keep it
            break
        decay = following
    return decay
