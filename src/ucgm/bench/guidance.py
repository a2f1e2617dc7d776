"""Classifier-free guidance vs autoguidance on a class-conditional model (written by the ``quality`` section).

Autoguidance (Karras et al. 2024) guides a model with a *weaker* model of the same task, ``F = F_g + w (F_m - F_g)``,
instead of with its own unconditional prediction (CFG, ``F = F_u + w (F_c - F_u)``); its claim is better quality
per class without the loss of variation CFG causes. Both use the same conditional model (trained by ucgm's trainer
with label dropout 0.1, so that it has a null label for CFG), the guide is a smaller model trained for fewer steps
on the same data and labels, and every sample is drawn by UCGM-S (``ucgm``, ucgm's defaults) at
:data:`GUIDANCE_NFE` from the same seeded noise, sample ``i`` with label ``i % num_classes``.

Records ``{dataset, guidance, scale, metric, value}`` (plus ``nfe``, ``num_samples``): ``guidance`` ``cfg`` or
``autoguidance``, ``scale`` w (1: the conditional model alone, the same samples for both), metrics
(:mod:`ucgm.metrics.per_class`): ``per_class_sliced_w2`` against the reference data of each class, lower is
better; ``within_class_spread``, the samples' spread per class relative to the data's (1 = as varied as the data);
``class_mode_coverage`` (GMM: covered share of each class's mixture components) or ``class_accuracy`` (digits: the
share of samples the digits classifier assigns to their label).
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor

from ..analysis.reports import draw_samples
from ..metrics.per_class import class_mode_coverage, per_class_sliced_w2, within_class_spread
from ..sampling.guidance import AutoGuidance, ClassifierFreeGuidance
from ..sampling.registry import get_sampler

GUIDANCE_NFE = 16
GUIDANCE_SCALES = (1.0, 1.5, 2.0, 3.0)
GUIDANCE_KINDS = ("cfg", "autoguidance")


def guided_network(kind: str, network: torch.nn.Module, guide: torch.nn.Module, scale: float) -> torch.nn.Module:
    """``network`` under classifier-free guidance (``cfg``) or autoguidance by ``guide`` at ``scale``."""
    if kind == "cfg":
        return ClassifierFreeGuidance(network, scale)
    if kind == "autoguidance":
        return AutoGuidance(network, guide, scale)
    raise ValueError(f"guidance {kind!r}; allowed: {', '.join(GUIDANCE_KINDS)}")


def class_metrics(reference: Tensor, reference_labels: Tensor,
                  coverage: Callable[[Tensor, Tensor], tuple[str, float]]) -> Callable[[Tensor, Tensor], dict]:
    """``(samples, labels) -> {metric: value}`` against the labelled reference; ``coverage`` names and computes
    the dataset's coverage metric."""

    def measure(samples: Tensor, labels: Tensor) -> dict:
        flat = samples.reshape(samples.shape[0], -1)
        name, value = coverage(samples, labels)
        return {"per_class_sliced_w2": per_class_sliced_w2(flat, labels, reference, reference_labels),
                "within_class_spread": within_class_spread(flat, labels, reference, reference_labels), name: value}

    return measure


def mixture_coverage(mixture) -> Callable[[Tensor, Tensor], tuple[str, float]]:
    return lambda samples, labels: ("class_mode_coverage", class_mode_coverage(samples, labels, mixture))


def digits_class_accuracy(samples: Tensor, labels: Tensor) -> tuple[str, float]:
    from ..metrics.digits_fd import get_digits_feature_extractor

    predicted = get_digits_feature_extractor().logits(samples).argmax(dim=1)
    return "class_accuracy", float((predicted == labels).double().mean())


def guidance_records(dataset: str, network: torch.nn.Module, guide: torch.nn.Module, transport, shape: tuple,
                     num_classes: int, num: int, measure: Callable[[Tensor, Tensor], dict],
                     scales: tuple = GUIDANCE_SCALES, nfe: int = GUIDANCE_NFE,
                     sampler_settings: Optional[dict] = None) -> list[dict]:
    """Records of both guidance kinds at every scale on ``num`` samples (seed 0)."""
    sampler = get_sampler("ucgm", sampler_settings)
    records = []
    for kind in GUIDANCE_KINDS:
        for scale in scales:
            drawn = draw_samples(guided_network(kind, network, guide, scale), transport, sampler, nfe, shape,
                                 num_classes, num, seed=0, batch_size=num, label=f"ucgm with {kind} {scale}")
            for metric, value in measure(drawn.samples, drawn.labels).items():
                records.append({"dataset": dataset, "guidance": kind, "scale": scale, "metric": metric,
                                "value": value, "nfe": drawn.nfe, "num_samples": num})
    return records
