"""Plain flow matching / denoising regression: ``L = mean ||F_theta(x_t, t) - (alpha_hat z + gamma_hat x)||^2``."""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor

from ...transports import Transport, make_transport
from ...validation import check_batch, check_finite, check_range
from ..base import Objective, ObjectiveOutput, draw_noise, drop_labels, resolve_null_label


class FlowMatchingObjective(Objective):
    """Regression of the network output on its transport target with ``t ~ U[0, 1]`` (optionally label dropout).

    On the linear transport this is conditional flow matching (target ``z - x``); UCGM-T with
    ``consistency_ratio = 0``, no enhanced target, no pseudo-Huber constant and no weighting minimises
    the square root of the same per-sample error.
    """

    def __init__(self, transport: Transport | str = "linear", label_dropout: float = 0.0, null_label: Optional[int] = None):
        check_range("label_dropout", label_dropout, 0.0, 1.0)
        self.transport = make_transport(transport) if isinstance(transport, str) else transport
        self.label_dropout = float(label_dropout)
        self.null_label = null_label

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
    ) -> ObjectiveOutput:
        check_finite("data", data)
        check_batch("labels", labels, data.shape[0])
        if time is None:
            time = torch.rand(data.shape[0], generator=generator, dtype=data.dtype).to(data.device)
        noise = draw_noise(data, noise, generator)
        labels = drop_labels(labels, self.label_dropout, resolve_null_label(model, self.null_label), generator)
        x_t = self.transport.interpolate(data, noise, time)
        output = self.transport.network_output(model, x_t, time, labels)
        per_sample = ((output - self.transport.target(data, noise, time)) ** 2).flatten(1).mean(dim=1)
        return ObjectiveOutput(per_sample.mean(), per_sample.detach(), {})
