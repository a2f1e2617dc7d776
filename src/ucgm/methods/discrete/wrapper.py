"""Wrapping a method: a method that runs another one unchanged except for what a subclass overrides (every protocol
call is forwarded to ``inner``), and a transport view through which the wrapper adds conditions to every network
call the inner method makes."""

from __future__ import annotations

import dataclasses
from dataclasses import replace
from typing import Callable, Mapping, Optional

import torch
from torch import nn

from ...transports import Transport
from ..base import Batch, Method, NetworkSpec, Networks, ObjectiveOutput, Phase


class MethodWrapper(Method):
    """Forwards the whole method protocol (:class:`~ucgm.methods.base.Method`) to ``inner``."""

    def __init__(self, inner: Method):
        self.inner = inner
        self.family = inner.family
        self.default_sampler = inner.default_sampler
        self.sampling_role = inner.sampling_role
        self.transport = inner.transport

    def networks(self) -> dict[str, NetworkSpec]:
        return self.inner.networks()

    def schedule(self) -> list[Phase]:
        return self.inner.schedule()

    def build_network(self, role: str) -> nn.Module:
        return self.inner.build_network(role)

    def set_progress(self, step: int, total_steps: Optional[int] = None) -> None:
        self.inner.set_progress(step, total_steps)

    def tracking_decay(self, role: str, step: int) -> float:
        return self.inner.tracking_decay(role, step)

    def loss(self, phase: str, networks: Networks, batch: Batch) -> ObjectiveOutput:
        return self.inner.loss(phase, networks, batch)

    def state_dict(self) -> dict:
        return self.inner.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.inner.load_state_dict(state)

    def to(self, device: torch.device | str) -> "MethodWrapper":
        self.inner.to(device)
        return self

    def sampler(self) -> tuple[str, dict]:
        return self.inner.sampler()

    def sampling_roles(self) -> tuple[str, ...]:
        return self.inner.sampling_roles()

    def sampling_model(self, modules: Mapping[str, nn.Module]) -> tuple[Callable, Transport]:
        return self.inner.sampling_model(modules)


def builds_from_run_model(spec: NetworkSpec) -> bool:
    """Whether a network is a backbone of the run's ``model`` section (fresh, a copy of one, or trainable
    checkpoint weights), so that it takes the model conditions a wrapper adds; oracles, frozen checkpoint
    teachers and networks the method builds do not."""
    return spec.init == "scratch" or spec.init.startswith("copy:") or (
        spec.init.startswith("checkpoint:") and spec.trainable)


def with_condition(specs: Mapping[str, NetworkSpec], condition: str) -> dict[str, NetworkSpec]:
    """``specs`` with ``condition`` added to every network built from the run's model."""
    return {role: replace(spec, conditions=tuple(dict.fromkeys(spec.conditions + (condition,))))
            if builds_from_run_model(spec) else spec for role, spec in specs.items()}


class TransportView(Transport):
    """A transport with the path, parameterisation and network time of ``base`` whose network calls go through
    ``base.network_output`` after a subclass has added conditions (views stack: ``View(View(plain))``)."""

    def __init__(self, base: Transport):
        super().__init__(**{field.name: getattr(base, field.name) for field in dataclasses.fields(Transport)})
        self.base = base


def plain_transport(transport: Transport) -> Transport:
    """The transport under any stack of :class:`TransportView` s."""
    while isinstance(transport, TransportView):
        transport = transport.base
    return transport
