"""NFE sweeps: every sampler of :mod:`ucgm.sampling.registry` at every budget, scored by one metric."""

from __future__ import annotations

from typing import Callable, Mapping, Optional, Sequence

import torch
from torch import Tensor

from ..sampling.registry import get_sampler
from ..sampling.seeded import fresh_noise_source
from ..transports import Transport
from ..validation import check_positive_int


def nfe_sweep(
    model: Callable,
    transport: Transport,
    noise: Tensor,
    labels: Optional[Tensor],
    samplers: Mapping[str, Optional[Mapping[str, object]]],
    nfes: Sequence[int],
    metric: Callable[[Tensor], float],
    generator_seed: int = 0,
    metric_name: Optional[str] = None,
) -> list[dict]:
    """Sample ``noise`` with every sampler at every budget and score the samples with ``metric``.

    ``samplers`` maps ``"name"`` or ``"name:tag"`` (several settings of one sampler) to its settings. Each run
    gets fresh per-sample noise streams seeded with ``generator_seed`` (batch-invariant) and runs without
    gradients. Returns one record per (sampler, budget), in the given order: ``{"sampler": key, "nfe": budget,
    "actual_nfe": true NFE, "metric": metric_name (default: the metric's ``__name__``), "value": metric(sample),
    "settings": settings}``.
    """
    if len(samplers) == 0 or len(nfes) == 0:
        raise ValueError("samplers and nfes must both be non-empty")
    for nfe in nfes:
        check_positive_int("nfe", nfe)
    bound = {key: get_sampler(key, settings) for key, settings in samplers.items()}
    name = metric_name or getattr(metric, "__name__", "metric")
    records = []
    for key, sampler in bound.items():
        for nfe in nfes:
            with torch.no_grad():
                result = sampler(model, transport, noise, labels, nfe,
                                 fresh_noise_source(generator_seed, range(noise.shape[0])))
            records.append({"sampler": key, "nfe": nfe, "actual_nfe": result.nfe, "metric": name,
                            "value": float(metric(result.sample)), "settings": dict(samplers[key] or {})})
    return records
