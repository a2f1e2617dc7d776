"""Self-conditioning (Chen, Zhang, Hinton, Analog Bits, ICLR 2023) for any method and any sampler.

The network takes a second input, an estimate ``x_tilde`` of the data (model condition ``self_condition``,
:mod:`ucgm.models.conditions`), and computes ``F(x_t, t, x_tilde)``.

* **Training** (pix2seq ``add_self_cond_estimate``, verified): the first ``floor(rate * B)`` samples of each batch
  (a deterministic split, pix2seq's ``self_cond_rate`` 0.5) get ``x_tilde = sg(clip(x_hat(x_t, t, 0)))`` from a
  first pass of the online network with a zero estimate, without gradient; the others get ``x_tilde = 0``. Every
  call the method makes through its transport is conditioned so (UCGM-T's reference and tangent calls included;
  a call on ``k`` concatenated copies of the batch splits each copy alike); networks that do not accept the
  condition (oracles, checkpoint teachers) are called as they are.
* **Sampling** (pix2seq ``SelfCondEstimateContext``, momentum 0): ``x_tilde`` is the previous network call's
  clipped data prediction, zero at the first call of a trajectory. Every sampler calls the network through its
  transport, so every sampler carries the estimate. A trajectory starts when a sampler from
  :func:`ucgm.sampling.registry.get_sampler` starts (:meth:`SelfConditionedSampling.begin_sampling`), when the
  batch shape changes, or when a call is at least as noisy as the trajectory's first call.
* ``clip`` (pix2seq ``x0_clip='auto'`` = ``[-b, b]`` for bit scale ``b``): the estimate is ``x_hat`` clipped to
  ``[-clip, clip]``; when sampling, the network output is also re-derived from the clipped ``x_hat`` and the noise
  ``z_hat = (x_t - gamma x_hat) / alpha`` (pix2seq ``truncate_noise``), so the sampler steps with clipped
  predictions. ``None`` clips nothing (continuous data).

The estimate is the data prediction whatever the transport's parameterisation (pix2seq's ``self_cond='x'``).
Only calls through the method's transport of networks that accept the condition are conditioned: a method that
calls its backbone directly (the consistency family's boundary-condition parameterisation) trains and samples as
without the wrapper.
"""

from __future__ import annotations

from typing import Callable, Mapping, Optional

import torch
from torch import Tensor, nn

from ...models.fixed_conditions import accepts_condition
from ...transports import Transport, broadcast_time
from ..base import Batch, Method, NetworkSpec, Networks, ObjectiveOutput, unwrap
from .wrapper import MethodWrapper, TransportView, plain_transport, with_condition

CONDITION = "self_condition"


def _rows(value, rows: Tensor):
    """The ``rows`` of a per-sample tensor (scalars and ``None`` pass through)."""
    if isinstance(value, Tensor) and value.ndim and value.shape[0] == rows.shape[0]:
        return value[rows]
    return value


def clip_data(data: Tensor, clip: Optional[float]) -> Tensor:
    """``data`` clipped to ``[-clip, clip]`` (unchanged for ``clip = None``)."""
    return data if clip is None else data.clamp(-clip, clip)


class SelfConditioningTransport(TransportView):
    """The method's transport during training: every network call gets the self-conditioning estimate of the
    first ``floor(rate * batch_size)`` samples of each copy of the batch (module docstring)."""

    def __init__(self, base: Transport, rate: float, clip: Optional[float]):
        super().__init__(base)
        self.rate, self.clip = rate, clip
        self.batch_size: Optional[int] = None

    def estimated_rows(self, rows: int, device: torch.device) -> Tensor:
        """Boolean mask of the rows that get an estimate: the first ``floor(rate * B)`` of every ``B`` rows
        (``B`` the loss's batch size; the whole call when it is not a multiple of it)."""
        period = self.batch_size if self.batch_size and rows % self.batch_size == 0 else rows
        return (torch.arange(rows, device=device) % period) < int(self.rate * period)

    def network_output(self, model: Callable, x_t: Tensor, t: Tensor, labels: Optional[Tensor] = None,
                       **conditions: Optional[Tensor]) -> Tensor:
        if CONDITION in conditions or not accepts_condition(model, CONDITION):
            return self.base.network_output(model, x_t, t, labels, **conditions)
        t = self.per_sample_time(t, x_t)
        rows = self.estimated_rows(x_t.shape[0], x_t.device)
        estimate = torch.zeros_like(x_t)
        if rows.any():
            with torch.no_grad():
                selected = {name: _rows(value, rows) for name, value in conditions.items()}
                selected[CONDITION] = torch.zeros_like(x_t[rows])
                first = self.base.network_output(unwrap(model), x_t[rows], t[rows], _rows(labels, rows), **selected)
                estimate[rows] = clip_data(self.recover(first, x_t[rows], t[rows])[0], self.clip).to(x_t.dtype)
        return self.base.network_output(model, x_t, t, labels, **conditions, self_condition=estimate)


class SelfConditionedSampling(TransportView):
    """The transport a self-conditioned network is sampled through: it carries the previous call's clipped data
    prediction into the next call (module docstring)."""

    def __init__(self, base: Transport, clip: Optional[float]):
        super().__init__(base)
        self.clip = clip
        self.estimate: Optional[Tensor] = None
        self.start_time = float("inf")

    def begin_sampling(self) -> None:
        """Forget the estimate: the next call starts a trajectory (with a zero estimate)."""
        self.estimate, self.start_time = None, float("inf")

    def network_output(self, model: Callable, x_t: Tensor, t: Tensor, labels: Optional[Tensor] = None,
                       **conditions: Optional[Tensor]) -> Tensor:
        if not accepts_condition(model, CONDITION):
            return self.base.network_output(model, x_t, t, labels, **conditions)
        t = self.per_sample_time(t, x_t)
        noisiest = float(t.max())
        if self.estimate is None or self.estimate.shape != x_t.shape or noisiest >= self.start_time:
            self.estimate, self.start_time = torch.zeros_like(x_t), noisiest
        output = self.base.network_output(model, x_t, t, labels, **conditions,
                                        self_condition=self.estimate.to(x_t.dtype))
        data = clip_data(self.recover(output, x_t, t)[0], self.clip)
        self.estimate = data.detach()
        if self.clip is None:
            return output
        alpha = self.alpha(broadcast_time(t, x_t))
        if bool((alpha == 0).any()):
            return output
        noise = (x_t - self.gamma(broadcast_time(t, x_t)) * data) / alpha
        return self.output_from_predictions(data, noise, t).to(output.dtype)


class SelfConditioned(MethodWrapper):
    """Any method with self-conditioning: its networks built from the run's model take the ``self_condition``
    condition, its calls go through a :class:`SelfConditioningTransport`, and it samples through a
    :class:`SelfConditionedSampling` transport (built by :func:`ucgm.methods.discrete.wrapped_method`)."""

    def __init__(self, inner: Method, conditioning: SelfConditioningTransport):
        super().__init__(inner)
        self.conditioning = conditioning

    def networks(self) -> dict[str, NetworkSpec]:
        return with_condition(self.inner.networks(), CONDITION)

    def loss(self, phase: str, networks: Networks, batch: Batch) -> ObjectiveOutput:
        self.conditioning.batch_size = batch.data.shape[0]
        return self.inner.loss(phase, networks, batch)

    def sampling_model(self, modules: Mapping[str, nn.Module]) -> tuple[Callable, Transport]:
        model, transport = self.inner.sampling_model(modules)
        return model, SelfConditionedSampling(plain_transport(transport), self.conditioning.clip)


def check_self_conditioning(options: Mapping) -> tuple[float, Optional[float]]:
    """``(rate, clip)`` of the ``self_conditioning`` option ``{rate: 0.5, clip: null}`` (clear errors)."""
    if not isinstance(options, Mapping):
        raise ValueError(f"self_conditioning={options!r} must be a mapping such as {{rate: 0.5, clip: 1.0}}")
    unknown = sorted(set(options) - {"rate", "clip"})
    if unknown:
        raise ValueError(f"unknown self_conditioning option(s) {unknown}; allowed: rate, clip")
    rate, clip = options.get("rate", 0.5), options.get("clip")
    if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0 < rate <= 1:
        raise ValueError(f"self_conditioning.rate={rate!r} must lie in (0, 1] (pix2seq: 0.5)")
    if clip is not None and (isinstance(clip, bool) or not isinstance(clip, (int, float)) or clip <= 0):
        raise ValueError(f"self_conditioning.clip={clip!r} must be null or a positive number (the bit scale)")
    return float(rate), None if clip is None else float(clip)
