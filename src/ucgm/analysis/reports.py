"""Pieces shared by ``ucgm evaluate``, the quickstart and the quality bench: sampler specs, seeded batched
sampling, metric records, the NFE-quality plot and the markdown tables.

**Sampler specs.** ``NAME[:KEY=VALUE[:KEY=VALUE ...]]``, several separated by commas, e.g.
``ucgm,euler,ucgm:extrapolation=0.3:time_warp=[1.2,1,1],heun``. ``NAME`` is a registry sampler
(:data:`~ucgm.sampling.registry.SAMPLER_NAMES`, plus ``fm-euler`` / ``fm-midpoint`` with ``flow_matching``), each
``KEY`` one of its settings, ``VALUE`` read as YAML (numbers, ``[a, b]`` lists, ``auto``). Commas and colons inside
``[...]`` do not split. The spec text is the sampler's label in records and tables.

**Records** (the quickstart contract, plus extra keys): ``{"dataset", "model", "sampler", "nfe", "metric",
"value"}`` with ``nfe`` the network evaluations actually spent; extra keys here: ``budget`` (the requested NFE),
``settings``, ``seed``, ``num_samples`` and ``protocol`` (for metrics that have one). Baselines (reference values
such as the sample-noise floor) are records with ``nfe = 0``.

**Sampling.** Sample ``i`` starts from the noise of generator ``(seed, i)`` (:func:`~ucgm.sampling.seeded.
initial_noise`) with label ``i % num_classes``; stochastic samplers draw their fresh noise from per-sample streams
(:func:`~ucgm.sampling.seeded.fresh_noise_source`), the scheme of ``ucgm sample``, so every sampler gives the same
samples (up to floating-point rounding) whatever the batch size.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Callable, Iterable, NamedTuple, Optional, Sequence

import torch
from torch import Tensor

from ..sampling.registry import BudgetedSampler, SAMPLER_NAMES, get_sampler, ucgm_settings
from ..atomic import atomic_path
from ..sampling.seeded import (UCGM_FAMILY, UCGM_SAMPLING_SETTINGS, check_finite_samples, fresh_noise_source,
                               initial_noise, sample_labels)
from ..yaml_io import parse_yaml

SPEC_SYNTAX = "NAME[:KEY=VALUE[:KEY=VALUE ...]], comma-separated (e.g. ucgm,euler,ucgm:extrapolation=0.3)"


class SamplerSpec(NamedTuple):
    """A sampler to evaluate: ``label`` (the spec text), registry ``name`` and its ``settings``."""

    label: str
    name: str
    settings: dict


def run_ucgm_settings(config: dict) -> dict:
    """A run's UCGM-S settings (its ``sampling`` section's stochasticity, extrapolation, time_warp, gaps and
    time_difference, :data:`~ucgm.sampling.seeded.UCGM_SAMPLING_SETTINGS`; those set to ``None`` keep the sampler's
    defaults and are left out)."""
    sampling = config.get("sampling") or {}
    settings = {key: sampling[key] for key in UCGM_SAMPLING_SETTINGS if sampling.get(key) is not None}
    return {key: tuple(value) if isinstance(value, list) else value for key, value in settings.items()}


def effective_settings(spec: SamplerSpec, run_settings: dict, method_sampler: tuple[str, dict] = ("ucgm", {})
                       ) -> dict:
    """The spec's settings over the run's UCGM-S settings (``ucgm`` family) and over the method's own sampler
    settings (when the spec names the method's sampler, ``method_sampler = (name, settings)``); a UCGM-S sampler's
    own defaults fill the settings none of them set."""
    base = dict(method_sampler[1]) if spec.name == method_sampler[0] else {}
    if spec.name in UCGM_FAMILY:
        return ucgm_settings(spec.name, {**base, **run_settings, **spec.settings})
    return {**base, **spec.settings}


def jsonable_settings(settings: dict) -> dict:
    """Settings with tuples as lists, as JSON records hold them."""
    return {key: list(value) if isinstance(value, tuple) else value for key, value in settings.items()}


def split_outside_brackets(text: str, separator: str) -> list[str]:
    """Split ``text`` at ``separator`` characters that are not inside ``[...]``; unbalanced brackets raise."""
    parts, depth, current = [], 0, ""
    for character in text:
        depth += (character == "[") - (character == "]")
        if depth < 0:
            raise ValueError(f"unbalanced ']' in {text!r}")
        if character == separator and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += character
    if depth != 0:
        raise ValueError(f"unbalanced '[' in {text!r}")
    return parts + [current]


def parse_sampler_spec(text: str) -> SamplerSpec:
    """One ``NAME[:KEY=VALUE ...]`` spec; unknown names or settings raise ``ValueError`` listing allowed ones."""
    name, *assignments = [part.strip() for part in split_outside_brackets(text.strip(), ":")]
    if not name:
        raise ValueError(f"sampler spec {text!r} has no sampler name; expected {SPEC_SYNTAX}")
    settings, written = {}, [name]
    for assignment in assignments:
        key, equals, value = (part.strip() for part in assignment.partition("="))
        if not equals or not key:
            raise ValueError(f"setting {assignment!r} of sampler spec {text!r} is not KEY=VALUE; "
                             f"expected {SPEC_SYNTAX}")
        settings[key] = parse_yaml(value)
        written.append(f"{key}={value}")
    try:
        get_sampler(name, settings)
    except ImportError as error:
        raise ValueError(str(error)) from error
    label = ":".join(written)
    return SamplerSpec(label, name, settings)


def parse_sampler_specs(text: str) -> list[SamplerSpec]:
    """Comma-separated specs (see the module docstring); duplicates and an empty list raise ``ValueError``."""
    specs = [parse_sampler_spec(part) for part in split_outside_brackets(text, ",") if part.strip()]
    if not specs:
        raise ValueError(f"no sampler given; expected {SPEC_SYNTAX} with names from {', '.join(SAMPLER_NAMES)}")
    labels = [spec.label for spec in specs]
    duplicates = sorted({label for label in labels if labels.count(label) > 1})
    if duplicates:
        raise ValueError(f"sampler spec(s) {duplicates} given more than once")
    return specs


def parse_nfe_list(text: str) -> list[int]:
    """``"1,2,4"`` -> ``[1, 2, 4]``: positive integers, comma-separated, no repeats."""
    parts = [part.strip() for part in text.split(",") if part.strip()]
    if not parts or not all(part.isdigit() and int(part) >= 1 for part in parts):
        raise ValueError(f"NFE list {text!r} must be comma-separated positive integers, e.g. 1,2,4,8")
    nfes = [int(part) for part in parts]
    if len(set(nfes)) != len(nfes):
        raise ValueError(f"NFE list {text!r} repeats a value")
    return nfes


class DrawnSamples(NamedTuple):
    """Samples ``(num, *shape)`` on the CPU in float32, their labels (or ``None``) and the NFE actually spent."""

    samples: Tensor
    labels: Optional[Tensor]
    nfe: int


@torch.no_grad()
def draw_samples(network: Callable, transport, sampler: BudgetedSampler, nfe: int, shape: Sequence[int],
                 num_classes: int, num: int, seed: int = 0, batch_size: int = 1000,
                 device: torch.device | str = "cpu", label: str = "sampler") -> DrawnSamples:
    """``num`` samples of ``sampler`` at budget ``nfe`` in batches (seeding in the module docstring); non-finite
    samples raise :class:`~ucgm.sampling.seeded.NonFiniteSamples` naming ``label`` (the sampler spec)."""
    labels = sample_labels(num, num_classes or 0)
    outputs, spent = [], 0
    for start in range(0, num, batch_size):
        batch = range(start, min(start + batch_size, num))
        noise = initial_noise(seed, batch, shape, torch.device(device))
        batch_labels = None if labels is None else labels[batch.start:batch.stop].to(device)
        result = sampler(network, transport, noise, batch_labels, nfe, fresh_noise_source(seed, batch))
        check_finite_samples(result.sample, f"sampler {label!r} at NFE budget {nfe}", batch.start)
        outputs.append(result.sample.float().cpu())
        spent = result.nfe
    return DrawnSamples(torch.cat(outputs), labels, spent)


def find_value(records: Iterable[dict], **match) -> Optional[float]:
    """The ``value`` of the first record whose keys equal ``match`` (e.g. ``model=..., sampler=..., budget=8``)."""
    for record in records:
        if all(record.get(key) == value for key, value in match.items()):
            return record["value"]
    return None


def _panels(records: Sequence[dict]) -> list[tuple[str, str]]:
    return list(dict.fromkeys((record["dataset"], record["metric"]) for record in records))


def _budget(record: dict) -> int:
    return record.get("budget", record["nfe"])


def markdown_tables(records: Sequence[dict], higher_is_better: Sequence[str] = ("log_likelihood",)) -> str:
    """One table per (dataset, metric): rows (model, sampler), columns NFE budgets; a cell whose actual NFE
    differs from its budget shows it as ``(n=...)``. Baselines (``nfe = 0``) are listed under their table."""
    lines = []
    for dataset, metric in _panels(records):
        rows = [record for record in records if (record["dataset"], record["metric"]) == (dataset, metric)]
        measured = [record for record in rows if record["nfe"] > 0]
        budgets = sorted({_budget(record) for record in measured})
        better = "higher" if metric in higher_is_better else "lower"
        lines += [f"### {dataset}: {metric} ({better} is better)", "",
                  "| model | sampler | " + " | ".join(f"NFE {budget}" for budget in budgets) + " |",
                  "|---|---|" + "---|" * len(budgets)]
        for model, sampler in dict.fromkeys((record["model"], record["sampler"]) for record in measured):
            cells = []
            for budget in budgets:
                found = [r for r in measured if (r["model"], r["sampler"], _budget(r)) == (model, sampler, budget)]
                if not found:
                    cells.append("–")
                    continue
                note = f" (n={found[0]['nfe']})" if found[0]["nfe"] != budget else ""
                cells.append(f"{found[0]['value']:.4g}{note}")
            lines.append(f"| {model} | {sampler} | " + " | ".join(cells) + " |")
        baselines = [record for record in rows if record["nfe"] == 0]
        lines += [""] + [f"Baseline, {record['model']} ({record['sampler']}): {record['value']:.4g}"
                         for record in baselines] + ([""] if baselines else [])
    return "\n".join(lines)


def plot_nfe_quality(records: Sequence[dict], path: Path | str) -> None:
    """One panel per (dataset, metric): value against actual NFE (log2 axis), a line per (model, sampler) and a
    dashed line per baseline; the value axis is logarithmic when every value is positive. Written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = _panels(records)
    columns = min(3, len(panels))
    rows_of_panels = math.ceil(len(panels) / columns)
    figure, axes = plt.subplots(rows_of_panels, columns, figsize=(5.2 * columns, 3.8 * rows_of_panels), dpi=100,
                                squeeze=False)
    for axis, (dataset, metric) in zip(axes.flat, panels):
        rows = [record for record in records if (record["dataset"], record["metric"]) == (dataset, metric)]
        measured = [record for record in rows if record["nfe"] > 0]
        for model, sampler in dict.fromkeys((record["model"], record["sampler"]) for record in measured):
            line = sorted((r["nfe"], r["value"]) for r in measured if (r["model"], r["sampler"]) == (model, sampler))
            axis.plot(*zip(*line), marker="o", label=f"{model}, {sampler}")
        for record in rows:
            if record["nfe"] == 0:
                axis.axhline(record["value"], linestyle="--", color="grey", label=f"{record['model']} (baseline)")
        axis.set_xscale("log", base=2)
        if all(record["value"] > 0 for record in rows):
            axis.set_yscale("log")
        axis.set_xlabel("NFE")
        axis.set_ylabel(metric)
        axis.set_title(f"{dataset}: {metric}")
        axis.legend(fontsize=7)
    for axis in list(axes.flat)[len(panels):]:
        axis.set_visible(False)
    figure.tight_layout()
    with atomic_path(path) as temporary:
        figure.savefig(temporary, format="png")
    plt.close(figure)
