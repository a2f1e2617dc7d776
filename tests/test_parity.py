"""Parity with numbers computed by the official UCGM code.

Replays every case of the fixture folder named by ``UCGM_PARITY_FIXTURES`` (default: the public cases copied into
``tests/fixtures/ucgm_official``, with their license notice), one test id per case name. A relative
``UCGM_PARITY_FIXTURES`` is read from the project root.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ucgm.methods.diffusion.ucgm import UCGMObjective
from ucgm.sampling.ucgm_sampler import sampler_kwargs_from_official, ucgm_sample
from ucgm.transports import OFFICIAL_HALF_PI, make_transport

PROJECT_ROOT = Path(__file__).resolve().parents[1]
FIXTURES = Path(os.environ.get("UCGM_PARITY_FIXTURES", PROJECT_ROOT / "tests" / "fixtures" / "ucgm_official"))
if not FIXTURES.is_absolute():
    FIXTURES = PROJECT_ROOT / FIXTURES
MANIFEST_PATH = FIXTURES / "manifest.json"


def _load_manifest() -> dict:
    if not MANIFEST_PATH.is_file():
        return {"cases": []}
    return json.loads(MANIFEST_PATH.read_text())


MANIFEST = _load_manifest()
CASES = MANIFEST["cases"]


def test_fixture_folder_present():
    """A missing or empty fixture folder must fail, never pass silently."""
    assert MANIFEST_PATH.is_file(), f"no parity manifest at {MANIFEST_PATH} (set UCGM_PARITY_FIXTURES)"
    assert CASES, f"{MANIFEST_PATH} lists no cases"


def _model_class():
    module_name, class_name = MANIFEST.get("model_class", "toymlp.ToyMLP").rsplit(".", 1)
    spec = importlib.util.spec_from_file_location(f"parity_{module_name}", FIXTURES / f"{module_name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return getattr(module, class_name)


def _load_tensors(case: dict) -> dict:
    tensors = dict(load_file(str(FIXTURES / case["tensors"])))
    for weights in case.get("weights", []):
        tensors.update(load_file(str(FIXTURES / weights)))
    return tensors


def _build(tensors: dict, prefix: str):
    if not any(key.startswith(prefix) for key in tensors):
        return None
    model = _model_class().from_tensors(tensors, prefix, **MANIFEST["model_config"])
    return model.eval()


def _within(value: float, expected: dict) -> bool:
    if "rtol" in expected:
        return abs(value - expected["value"]) <= expected["rtol"] * abs(expected["value"])
    return abs(value - expected["value"]) <= expected["atol"]


def _transport(case: dict):
    return make_transport(case["transport"], half_pi=OFFICIAL_HALF_PI)


def _run_loss_case(case: dict, tensors: dict):
    model = _build(tensors, "model.")
    reference_model = _build(tensors, "ref_model.")
    official = dict(case["official_kwargs"])
    official.pop("transport_type", None)
    objective = UCGMObjective.from_official(
        official, transport=_transport(case), half_pi=OFFICIAL_HALF_PI, null_label=case.get("null_label")
    )
    if reference_model is None and objective.reference_mode == "online":
        reference_model = model  # ema_decay_rate = 0: the official reference is the online model itself
    output = objective(
        model,
        tensors["x"],
        tensors["labels"],
        reference_model=reference_model,
        time=tensors["t"].flatten(),
        noise=tensors["z"],
        drop_labels=False,
    )
    output.loss.backward()
    grad_norm = math.sqrt(sum(float((p.grad.double() ** 2).sum()) for p in model.parameters() if p.grad is not None))
    measured = {"loss": float(output.loss.detach()), "grad_norm": grad_norm}
    for key, expected in case["expected"].items():
        assert key in measured, f"unknown expected quantity {key!r} in case {case['name']}"
        assert _within(measured[key], expected), (
            f"{case['name']}: {key} = {measured[key]!r}, expected {expected['value']!r} "
            f"(tolerance {expected.get('rtol', expected.get('atol'))})"
        )


def _sample(case: dict, tensors: dict):
    model = _build(tensors, "model.")
    kwargs = sampler_kwargs_from_official(case["official_kwargs"])
    if case.get("cfg"):
        kwargs.update(cfg_scale=case["cfg"]["cfg_scale"], cfg_interval=case["cfg"]["cfg_interval"])
    generator = torch.Generator().manual_seed(0)
    return ucgm_sample(model, _transport(case), tensors["z"], tensors["labels"], generator=generator, **kwargs)


def _mixture_statistics(samples: torch.Tensor) -> dict:
    points = samples.reshape(samples.shape[0], -1)[:, :2].double()
    angles = 2 * math.pi * torch.arange(8, dtype=torch.float64) / 8
    centres = torch.stack([torch.cos(angles), torch.sin(angles)], dim=1)
    nearest = torch.cdist(points, centres).min(dim=1).values
    return {
        "mean_x": float(points[:, 0].mean()),
        "mean_y": float(points[:, 1].mean()),
        "std_x": float(points[:, 0].std(unbiased=False)),
        "std_y": float(points[:, 1].std(unbiased=False)),
        "frac_within_3std": float((nearest < 3 * 0.05).double().mean()),
    }


@pytest.mark.parametrize("case", CASES, ids=[case["name"] for case in CASES])
def test_official_case(case: dict):
    tensors = _load_tensors(case)
    kind = case["kind"]
    if kind == "loss":
        _run_loss_case(case, tensors)
        return
    assert kind in ("sample", "sample_stat"), f"unknown case kind {kind!r}"
    result = _sample(case, tensors)
    expected = case["expected"]
    if "nfe" in expected:
        assert result.nfe == expected["nfe"], f"{case['name']}: {result.nfe} network calls, expected {expected['nfe']}"
    if kind == "sample":
        reference = tensors[expected["samples"]["tensor"]]
        deviation = float((result.sample.double() - reference.double()).abs().max())
        assert deviation <= expected["samples"]["max_abs"], f"{case['name']}: max |diff| = {deviation}"
        return
    statistics = _mixture_statistics(result.sample)
    targets = expected.get("stats", {key: value for key, value in expected.items() if key != "nfe"})
    assert targets, f"{case['name']}: no statistic to compare"
    for key, target in targets.items():
        assert key in statistics, f"unknown statistic {key!r} in case {case['name']}"
        assert _within(statistics[key], target), (
            f"{case['name']}: {key} = {statistics[key]:.5f}, expected {target}"
        )
