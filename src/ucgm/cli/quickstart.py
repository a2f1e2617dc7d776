"""``ucgm quickstart``: the main job on built-in data.

For the 8-Gaussians mixture and scikit-learn's 8x8 digits: train a multi-step UCGM model (consistency ratio 0),
tune it to a few-step model (consistency ratio 1, the preset's tuning recipe), sample both at NFE 1 ... 64 with
UCGM-S and plain Euler, and write ``report.md``, ``metrics.json`` (records ``{dataset, model, sampler, nfe, metric,
value}``), sample grids and an NFE-quality plot. Metrics: sliced W2 against the exact mixture for the GMM,
the digits Frechet distance (features of a classifier trained by ucgm) for the digits. Re-running on the same
directory resumes the training runs and redoes the evaluation.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
from torch import Tensor

from ..sampling.registry import get_sampler
from ..metrics import sliced_wasserstein
from .artifacts import write_png
from ..atomic import atomic_path, atomic_write_text
from .components import accepted_keys
from .help_text import plain_text
from .config import resolve_config
from ..analysis.reports import SamplerSpec, draw_samples, effective_settings, run_ucgm_settings
from .progress import Progress
from .train import run_training
from .sample import load_checkpoint_model
from .tune import tune_config

NFES = (1, 2, 4, 8, 16, 32, 64)
FEW_VS_MULTI_TARGET = 1.5


@dataclass
class Recipe:
    """One dataset of the quickstart: presets with overrides, the sampler settings of each model, the metric."""

    preset: str
    overrides: list[str]
    tune_overrides: list[str]
    num_samples: int
    metric_name: str
    samplers: dict[str, dict[str, dict]] = field(default_factory=dict)
    #: A named recipe of the preset's ``tune_recipes:`` (``ucgm tune --recipe NAME``); ``None``: its ``tune:``.
    tune_recipe: Optional[str] = None


#: The quickstart's datasets. A sampler's settings apply over the run's own, as in ``ucgm evaluate``: the ``ucgm``
#: family starts from the run's ``sampling`` section (a few-step model: its tune recipe's re-noising and end gap;
#: a multi-step model: ucgm's defaults).
RECIPES: dict[str, Recipe] = {
    "gmm": Recipe(
        preset="gmm",
        overrides=["data.conditional=false", "objective.enhanced_ratio=0", "training.steps=2000",
                   "training.checkpoint_every=1000", "training.log_every=100"],
        # The 3000-step recipe: on this 2000-step base the 300-step one swings between training seeds (NFE 2 /
        # NFE 64 = 2.27 on seed 0, 0.75 on seed 1); `long` gives 1.10 / 0.86 (docs/ucgm_tune.md). ~40 s on the MLP.
        tune_overrides=["objective.enhanced_ratio=0", "training.checkpoint_every=1000"],
        tune_recipe="long",
        num_samples=4000,
        metric_name="sliced_w2",
        samplers={
            "multi-step": {"ucgm": {}, "euler": {}},
            "few-step": {"ucgm": {}, "euler": {}},
        },
    ),
    "digits": Recipe(
        preset="digits",
        overrides=["model.base_channels=16", "objective.enhanced_ratio=0.3", "training.steps=2500",
                   "training.batch_size=64", "training.checkpoint_every=500", "training.sample_every=0"],
        tune_overrides=["training.steps=200", "training.checkpoint_every=200", "training.sample_every=0"],
        num_samples=500,
        metric_name="digits_fd",
        samplers={
            "multi-step": {"ucgm": {}, "euler": {}},
            "few-step": {"ucgm": {}, "euler": {}},
        },
    ),
}


def _gmm_metric(run_dir: Path, count: int) -> Callable[[Tensor], float]:
    """Sliced W2 against exact samples of the run's mixture (10 000 of them, fixed seed)."""
    from ..data.mixtures import make_mixture

    loaded = load_checkpoint_model(run_dir)
    data = loaded.config["data"]
    mixture = make_mixture(data.get("mixture", "8gaussians"), **(data.get("mixture_options") or {}))
    reference, _ = mixture.sample(10000, generator=torch.Generator().manual_seed(12345))
    return lambda samples: sliced_wasserstein(samples, reference, num_projections=128, seed=0)


def _digits_metric(run_dir: Path, count: int) -> Callable[[Tensor], float]:
    """Digits Frechet distance against the held-out split."""
    from ..metrics.digits_fd import digits_frechet_distance

    return lambda samples: digits_frechet_distance(samples)["value"]


METRICS = {"sliced_w2": _gmm_metric, "digits_fd": _digits_metric}


def train_pair(name: str, recipe: Recipe, out: Path, progress: Optional[bool]) -> tuple[Path, Path]:
    """Train (or resume) the multi-step run, then the few-step tuning run started from it."""
    multi_dir, few_dir = out / name / "multi-step", out / name / "few-step"
    run_training(resolve_config(recipe.preset, recipe.overrides, accepted_keys), multi_dir, progress=progress)
    run_training(tune_config(multi_dir, recipe.tune_overrides, recipe.tune_recipe), few_dir, progress=progress)
    return multi_dir, few_dir


@torch.no_grad()
def evaluate_pair(name: str, recipe: Recipe, runs: dict[str, Path], out: Path, nfes: Sequence[int],
                  progress: Optional[bool]) -> list[dict]:
    """Sample every model with every sampler at every NFE on the same noise; return metric records and write
    sample grids (NFE 1, 2 and 64)."""
    metric = METRICS[recipe.metric_name](runs["multi-step"], recipe.num_samples)
    records = []
    jobs = [(model_name, sampler, nfe) for model_name in runs for sampler in recipe.samplers[model_name]
            for nfe in nfes]
    bar = Progress(f"quickstart {name}: sampling", len(jobs), "job", mode=progress)
    loaded = {model_name: load_checkpoint_model(path) for model_name, path in runs.items()}
    for model_name, sampler_name, nfe in jobs:
        checkpoint = loaded[model_name]
        spec = SamplerSpec(sampler_name, sampler_name, recipe.samplers[model_name][sampler_name])
        sampler = get_sampler(sampler_name, effective_settings(spec, run_ucgm_settings(checkpoint.config)))
        drawn = draw_samples(checkpoint.model, checkpoint.transport, sampler, nfe, checkpoint.info.data_shape,
                             checkpoint.info.num_classes or 0, recipe.num_samples, seed=0,
                             batch_size=recipe.num_samples, label=sampler_name)
        samples, labels = drawn.samples, drawn.labels
        records.append({"dataset": name, "model": model_name, "sampler": sampler_name, "nfe": drawn.nfe,
                        "metric": recipe.metric_name, "value": float(metric(samples))})
        bar.update()
        if nfe in (1, 2, 64):
            count = 1000 if samples.ndim == 2 else 64
            write_png(samples[:count], None if labels is None else labels[:count],
                      out / name / "samples" / f"{model_name}_{sampler_name}_nfe{nfe}.png")
    bar.close()
    return records


def _value(records: list[dict], dataset: str, model: str, sampler: str, nfe: int) -> Optional[float]:
    for record in records:
        if (record["dataset"], record["model"], record["sampler"], record["nfe"]) == (dataset, model, sampler, nfe):
            return record["value"]
    return None


def few_vs_multi(records: list[dict], dataset: str) -> Optional[float]:
    """Few-step UCGM-S at NFE 2 divided by multi-step UCGM-S at NFE 64 (lower is better)."""
    few = _value(records, dataset, "few-step", "ucgm", 2)
    multi = _value(records, dataset, "multi-step", "ucgm", 64)
    return None if few is None or multi is None else few / multi


def plot_quality(records: list[dict], path: Path) -> None:
    """One panel per dataset: metric against NFE (log scale), one line per model and sampler."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    datasets = sorted({record["dataset"] for record in records})
    figure, axes = plt.subplots(1, len(datasets), figsize=(5.5 * len(datasets), 4), dpi=100, squeeze=False)
    for axis, dataset in zip(axes[0], datasets):
        rows = [record for record in records if record["dataset"] == dataset]
        for model, sampler in sorted({(record["model"], record["sampler"]) for record in rows}):
            line = sorted((r["nfe"], r["value"]) for r in rows if (r["model"], r["sampler"]) == (model, sampler))
            axis.plot(*zip(*line), marker="o", label=f"{model}, {sampler}")
        axis.set_xscale("log", base=2)
        axis.set_yscale("log")
        axis.set_xlabel("NFE")
        axis.set_ylabel(rows[0]["metric"])
        axis.set_title(dataset)
        axis.legend(fontsize=8)
    figure.tight_layout()
    with atomic_path(path) as temporary:
        figure.savefig(temporary, format="png")
    plt.close(figure)


def render_report(records: list[dict], nfes: Sequence[int], seconds: float) -> str:
    """Markdown: one table per dataset (rows model/sampler, columns NFE), the few-vs-multi ratio, the pictures."""
    lines = ["# ucgm quickstart", "", f"Wall time: {seconds:.0f} s. Lower is better in every table.", ""]
    for dataset in sorted({record["dataset"] for record in records}):
        rows = [record for record in records if record["dataset"] == dataset]
        lines += [f"## {dataset} ({rows[0]['metric']})", "",
                  "| model | sampler | " + " | ".join(f"NFE {nfe}" for nfe in nfes) + " |",
                  "|---|---|" + "---|" * len(nfes)]
        for model, sampler in sorted({(r["model"], r["sampler"]) for r in rows}):
            values = [_value(records, dataset, model, sampler, nfe) for nfe in nfes]
            cells = " | ".join("–" if value is None else f"{value:.4g}" for value in values)
            lines.append(f"| {model} | {sampler} | {cells} |")
        ratio = few_vs_multi(records, dataset)
        if ratio is not None:
            verdict = "met" if ratio <= FEW_VS_MULTI_TARGET else "missed"
            lines += ["", f"Few-step at NFE 2 / multi-step at NFE 64 (UCGM-S): **{ratio:.3f}** "
                          f"(target <= {FEW_VS_MULTI_TARGET}: {verdict})."]
        lines += ["", f"![{dataset} multi-step NFE 64]({dataset}/samples/multi-step_ucgm_nfe64.png) "
                      f"![{dataset} few-step NFE 2]({dataset}/samples/few-step_ucgm_nfe2.png)", ""]
    lines += ["![quality against NFE](nfe_quality.png)", ""]
    return "\n".join(lines)


def run_quickstart(out: Path | str = "runs/quickstart", datasets: Sequence[str] = tuple(RECIPES),
                   nfes: Sequence[int] = NFES, progress: Optional[bool] = None,
                   recipes: Optional[dict[str, Recipe]] = None) -> list[dict]:
    """Run the main job; returns the metric records (also written to ``out/metrics.json``)."""
    out = Path(out)
    recipes = recipes or RECIPES
    unknown = [name for name in datasets if name not in recipes]
    if unknown:
        raise ValueError(f"unknown quickstart dataset(s) {unknown}; allowed: {', '.join(recipes)}")
    started = time.perf_counter()
    records: list[dict] = []
    for name in datasets:
        multi_dir, few_dir = train_pair(name, recipes[name], out, progress)
        records += evaluate_pair(name, recipes[name], {"multi-step": multi_dir, "few-step": few_dir}, out, nfes,
                                 progress)
    atomic_write_text(out / "metrics.json", json.dumps(records, indent=2) + "\n")
    plot_quality(records, out / "nfe_quality.png")
    atomic_write_text(out / "report.md", render_report(records, nfes, time.perf_counter() - started))
    return records


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="ucgm quickstart", description=plain_text(__doc__),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/quickstart", help="output directory (default: runs/quickstart)")
    parser.add_argument("--datasets", default=",".join(RECIPES), help="comma-separated subset of: " + ", ".join(RECIPES))
    args = parser.parse_args(argv)
    # The quickstart's networks are tiny: one intra-op thread is as fast as two and does not collapse when other
    # processes share the cores.
    torch.set_num_threads(1)
    records = run_quickstart(args.out, [name for name in args.datasets.split(",") if name])
    print(f"wrote {Path(args.out) / 'report.md'} ({len(records)} measurements)")
    return 0
