"""Core benchmark: the cost of UCGM-T relative to flow matching, and UCGM-S's overhead over its network calls.

``ucgm_t_vs_fm[v]`` = median time of one optimizer step with UCGM-T setting ``v`` / that of a plain
flow-matching step, same model, batch and optimizer, measured interleaved. The bound a setting may cost is
``1 + (extra no-grad forward passes, in batch units) * t_forward / t_fm_step``.
``ucgm_t_vs_fm["lambda=1+enhanced fast"]`` = median step time of the same setting in UCGM-T's fast mode
(``mode="fast"``) / that of its parity-mode step, measured interleaved with the others; its reference passes run in
``fast_mode_reference_precision`` (``reference_precision: auto`` resolved on this device: bfloat16 where native,
float32 elsewhere), which decides the ratio (docs/ucgm_fast_mode.md, "Fast-mode cost by host").
``sampler_overhead[order]`` = UCGM-S wall time / (its NFE * one bare forward of the same batch).
"""

from __future__ import annotations

import copy
from typing import Callable

import torch

from ..models import build_model
from ..methods import FlowMatchingObjective, UCGMObjective
from ..methods.diffusion.ucgm import reference_autocast_dtype
from ..sampling.ucgm_sampler import ucgm_sample
from ..transports import make_transport
from .timing import interleaved_medians

#: UCGM-T settings and their extra no-grad forward passes in units of one batch (see docs ucgm.md section 2).
OBJECTIVE_SETTINGS = {
    "lambda=0": ({"consistency_ratio": 0.0, "cosine_loss": True, "time_weighting": "cosine"}, 0),
    "lambda=0.5": ({"consistency_ratio": 0.5}, 1),
    "lambda=1": ({"consistency_ratio": 1.0}, 2),
    "lambda=1+enhanced": ({"consistency_ratio": 1.0, "enhanced_ratio": 2.0, "enhanced_style": "fc-vs-xz",
                           "reference": "frozen", "huber_constant": 0.5}, 3),
}
#: The fast-mode variant of a setting of :data:`OBJECTIVE_SETTINGS`, timed against its parity-mode step.
FAST_MODE_SETTING = "lambda=1+enhanced"
FAST_MODE_KEY = f"{FAST_MODE_SETTING} fast"


def _dit_config(quick: bool) -> dict:
    return {"name": "dit", "input_size": 16, "patch_size": 2, "in_channels": 4, "num_classes": 10,
            "size": "S", "depth": 2 if quick else 4, "hidden_size": 192 if quick else 256, "num_heads": 4}


def _training_step(model: torch.nn.Module, objective: Callable, data: torch.Tensor, labels: torch.Tensor,
                   reference: torch.nn.Module | None) -> Callable[[], None]:
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    generator = torch.Generator().manual_seed(0)

    def step() -> None:
        loss = objective(model, data, labels, reference_model=reference, generator=generator).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def reference_pass_precision(objective: UCGMObjective, device: torch.device) -> str:
    """The precision ``objective``'s fast-mode reference passes run in on ``device`` (``float32``: no autocast)."""
    dtype = reference_autocast_dtype(objective.reference_precision, device)
    return "float32" if dtype is None else str(dtype).removeprefix("torch.")


def objective_cost(quick: bool) -> tuple[dict, dict]:
    """Ratios of UCGM-T step time to a flow-matching step, and the bounds implied by extra forward passes."""
    torch.manual_seed(0)
    base = build_model(_dit_config(quick))
    batch = 16
    data = torch.randn(batch, 4, 16, 16)
    labels = torch.randint(0, 10, (batch,))
    transport = make_transport("linear")
    variants = {"fm": _training_step(copy.deepcopy(base), FlowMatchingObjective(transport), data, labels, None)}
    settings = {name: (kwargs, "parity") for name, (kwargs, _) in OBJECTIVE_SETTINGS.items()}
    settings[FAST_MODE_KEY] = (OBJECTIVE_SETTINGS[FAST_MODE_SETTING][0], "fast")
    for name, (kwargs, mode) in settings.items():
        model = copy.deepcopy(base)
        reference = copy.deepcopy(base).requires_grad_(False) if "enhanced_ratio" in kwargs else None
        objective = UCGMObjective(transport, label_dropout=0.1, mode=mode, **kwargs)
        variants[name] = _training_step(model, objective, data, labels, reference)
        if mode == "fast":
            fast_precision = reference_pass_precision(objective, data.device)
    forward_model = copy.deepcopy(base)
    times = torch.rand(batch)

    def forward() -> None:
        with torch.no_grad():
            forward_model(data, times, labels)

    variants["forward"] = forward
    medians = interleaved_medians(variants, repeats=25 if quick else 60)
    ratios = {name: medians[name] / medians["fm"] for name in OBJECTIVE_SETTINGS}
    ratios[FAST_MODE_KEY] = medians[FAST_MODE_KEY] / medians[FAST_MODE_SETTING]
    bounds = {name: 1 + extra * medians["forward"] / medians["fm"] for name, (_, extra) in OBJECTIVE_SETTINGS.items()}
    details = {"fm_step_seconds": medians["fm"], "forward_seconds": medians["forward"], "bounds": bounds,
               "extra_forward_passes": {name: extra for name, (_, extra) in OBJECTIVE_SETTINGS.items()},
               "fast_mode_vs_fm": medians[FAST_MODE_KEY] / medians["fm"],
               "fast_mode_reference_precision": fast_precision,
               "model": _dit_config(quick), "batch_size": batch}
    return ratios, details


def sampler_overhead(quick: bool) -> tuple[dict, dict]:
    """UCGM-S wall time divided by NFE times one bare forward, for order 1 and order 2."""
    torch.manual_seed(0)
    model = build_model(_dit_config(quick)).eval()
    batch, steps = 16, 8
    noise = torch.randn(batch, 4, 16, 16)
    labels = torch.randint(0, 10, (batch,))
    transport = make_transport("linear")
    times = torch.rand(batch)
    nfe = {}

    def run(order: int) -> Callable[[], None]:
        def sample() -> None:
            with torch.no_grad():
                nfe[order] = ucgm_sample(model, transport, noise, labels, steps=steps, order=order,
                                         extrapolation=0.5, time_warp=(1.17, 0.8, 1.1)).nfe
        return sample

    def forward() -> None:
        with torch.no_grad():
            model(noise, times, labels)

    medians = interleaved_medians({"order1": run(1), "order2": run(2), "forward": forward},
                                  repeats=7 if quick else 25)
    ratios = {name: medians[name] / (nfe[order] * medians["forward"]) for order, name in ((1, "order1"), (2, "order2"))}
    return ratios, {"nfe": {"order1": nfe[1], "order2": nfe[2]}, "forward_seconds": medians["forward"], "steps": steps}
