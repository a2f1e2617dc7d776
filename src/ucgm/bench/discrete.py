"""Analog Bits benchmark: the categorical toy's exact total variation with UCGM-T at lambda = 0 and lambda = 1,
with and without self-conditioning, and the quantised digits' FD.

Every model is trained by ucgm's trainer (:func:`~ucgm.cli.train.run_training`) from the presets
``categorical-bits`` and ``digits-bits`` (``objective.consistency_ratio`` 0 or 1, at 1 with ``huber_constant`` 1,
``objective.self_conditioning`` as the preset or ``null``), seed 0, the same steps for every row of a dataset, in a temporary directory; the
EMA weights are read back as ``ucgm sample`` reads them (:func:`~ucgm.training.loading.load_checkpoint_model`:
self-conditioned runs sample through their estimate-carrying transport) and sampled with UCGM-S from the seeded
noise of ``ucgm evaluate`` (:func:`~ucgm.analysis.reports.draw_samples`), each row's settings over the run's
(:func:`sampler_settings`): at lambda = 0 deterministic, from t = 1 to t = 0 without end gaps and with Analog Bits'
asymmetric time ``td = 0.25`` (the ``categorical-bits`` preset's own sampling; the official end gap spends the
last call at t ~ 0.001, where it is wasted, docs/discrete_cascade_search.md); at lambda = 1 with full re-noising
(``stochasticity=1``, the few-step setting), the official gaps and ``td = 0``; the quantised digits with the
``digits-bits`` preset's own settings (official gaps, ``td = 0``). Metrics are the
suites of ``ucgm evaluate`` (:mod:`ucgm.metrics.discrete_suites`): ``tv`` of the decoded histogram against the
exact table, digits FD of the decoded grey images against the quantised held-out split; floors are exact
draws from the table / quantised training digits.

Records: ``{dataset, method, sampler, nfe, metric, value, consistency_ratio, self_conditioning}``.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from ..analysis.reports import draw_samples, run_ucgm_settings
from ..cli.components import accepted_keys
from ..cli.config import resolve_config
from ..cli.sample import load_checkpoint_model
from ..cli.train import run_training
from ..metrics.suites import build_metric_suite
from ..sampling.registry import get_sampler


@dataclass(frozen=True)
class DiscreteSizes:
    """Training steps, model size and sample counts of one benchmark size."""

    categorical_steps: int
    digits_steps: int
    hidden: int
    num_categorical: int
    num_digits: int


QUICK = DiscreteSizes(categorical_steps=300, digits_steps=60, hidden=64, num_categorical=4000, num_digits=200)
FULL = DiscreteSizes(categorical_steps=8000, digits_steps=2000, hidden=128, num_categorical=20000, num_digits=1000)
#: Sampler (registry name, settings over the run's, label) and NFE budgets per consistency ratio of the categorical
#: toy. Lambda = 0: no end gaps and td = 0.25 (selected on training seeds 1 / 2, TV lower with and without
#: self-conditioning; seed 0 in docs/discrete_cascade_search.md); lambda = 1 keeps its measured settings.
SAMPLING = {0.0: ("ucgm", {"gaps": (0.0, 0.0), "time_difference": 0.25}, "UCGM-S, td = 0.25", (4, 8, 16)),
            1.0: ("ucgm", {"stochasticity": 1.0, "gaps": (0.001, 0.001), "time_difference": 0.0}, "UCGM-S, rho = 1",
                  (1, 2, 4))}
#: The quantised digits' sampler: the digits-bits preset's settings (official gaps, symmetric time); td 0.25 and no end
#: gaps were not better there (training seeds 0 / 1, docs/discrete_cascade_search.md).
DIGITS_SAMPLING = ("ucgm", {"gaps": (0.001, 0.001), "time_difference": 0.0}, "UCGM-S")
#: Objective overrides per consistency ratio: lambda = 1 trains with the few-step recipe's huber_constant 1 (the
#: presets' `tune` value; measured better than the presets' MSE-like 10 for both rows, docs/discrete_cascade_search.md).
OBJECTIVE = {0.0: [], 1.0: ["objective.huber_constant=1.0"]}
DIGITS_NFES = (8, 16)


def method_label(consistency_ratio: float, self_conditioning: bool) -> str:
    return f"ucgm (lambda={consistency_ratio:g})" + (" + self-conditioning" if self_conditioning else "")


def train_run(preset: str, overrides: list[str], steps: int, run_dir: Path) -> float:
    """Train ``preset`` with ``overrides`` for ``steps`` in ``run_dir``; seconds taken."""
    length = [f"training.steps={steps}", f"training.checkpoint_every={steps}", f"training.log_every={steps}",
              "training.sample_every=0"]
    started = time.perf_counter()
    run_training(resolve_config(preset, overrides + length, accepted_keys), run_dir, progress=False)
    return round(time.perf_counter() - started, 1)


def sampler_settings(config: dict, settings: dict) -> dict:
    """The UCGM-S settings a row samples with: ``settings`` over the run's (its ``sampling`` section)."""
    return {**run_ucgm_settings(config), **settings}


def measure(run_dir: Path, dataset: str, method: str, sampler: tuple, nfes, num: int, extra: dict) -> list[dict]:
    """Records of the run's EMA weights with ``sampler = (name, settings, label)`` at every NFE."""
    loaded = load_checkpoint_model(run_dir)
    name, settings, label = sampler
    bound = get_sampler(name, sampler_settings(loaded.config, settings))
    suite = build_metric_suite(loaded.config, num, loaded.info.num_classes or 0)
    records = []
    for nfe in nfes:
        drawn = draw_samples(loaded.model, loaded.transport, bound, nfe, loaded.info.data_shape,
                             loaded.info.num_classes or 0, num)
        for measured in suite.evaluate(drawn.samples, drawn.labels):
            records.append({"dataset": dataset, "method": method, "sampler": label, "nfe": drawn.nfe,
                            "metric": measured.metric, "value": measured.value, **extra})
    return records


def _floor(run_dir: Path, num: int) -> dict:
    loaded = load_checkpoint_model(run_dir)
    suite = build_metric_suite(loaded.config, num, loaded.info.num_classes or 0)
    return {measured.metric: measured.value for measured in suite.baselines()}


def run_discrete(sizes: DiscreteSizes) -> dict:
    """Train, sample and score every row; the ``discrete`` records and ``discrete_details``."""
    started = time.perf_counter()
    records, seconds, floors = [], {}, {}
    with tempfile.TemporaryDirectory(prefix="ucgm-bench-discrete-") as temporary:
        workdir = Path(temporary)
        for ratio, (name, settings, label, nfes) in SAMPLING.items():
            for self_conditioning in (False, True):
                method = method_label(ratio, self_conditioning)
                run_dir = workdir / f"categorical-{ratio:g}-{int(self_conditioning)}"
                overrides = [f"model.hidden={sizes.hidden}", "model.depth=2", "training.ema.decay=0.999",
                             f"objective.consistency_ratio={ratio}", *OBJECTIVE[ratio]]
                if not self_conditioning:
                    overrides.append("objective.self_conditioning=null")
                seconds[method] = train_run("categorical-bits", overrides, sizes.categorical_steps, run_dir)
                extra = {"consistency_ratio": ratio, "self_conditioning": self_conditioning}
                records += measure(run_dir, "categorical", method, (name, settings, label), nfes,
                                   sizes.num_categorical, extra)
                floors.setdefault("categorical", _floor(run_dir, sizes.num_categorical))
        for self_conditioning in (False, True):
            method = method_label(0.0, self_conditioning)
            run_dir = workdir / f"digits-{int(self_conditioning)}"
            overrides = ["model.base_channels=16", "training.batch_size=64",
                         f"training.ema.decay={0.999 if sizes.digits_steps >= 1500 else 0.99}"]
            if not self_conditioning:
                overrides.append("objective.self_conditioning=null")
            seconds[f"digits {method}"] = train_run("digits-bits", overrides, sizes.digits_steps, run_dir)
            records += measure(run_dir, "quantised_digits", method, DIGITS_SAMPLING, DIGITS_NFES,
                               sizes.num_digits, {"consistency_ratio": 0.0, "self_conditioning": self_conditioning})
            floors.setdefault("quantised_digits", _floor(run_dir, sizes.num_digits))
    return {"discrete": records, "discrete_details": {
        "sizes": asdict(sizes), "floors": floors, "train_seconds": seconds, "verdicts": verdicts(records),
        "seconds": round(time.perf_counter() - started, 1)}}


def verdicts(records: list[dict]) -> dict:
    """Per (dataset, lambda): the mean metric over the NFEs without and with self-conditioning, and whether
    self-conditioning lowers it."""
    found = {}
    for dataset, metric in (("categorical", "tv"), ("quantised_digits", "digits_fd")):
        for ratio in sorted({r["consistency_ratio"] for r in records if r["dataset"] == dataset}):
            means = [statistics.fmean(r["value"] for r in records if (r["dataset"], r["metric"]) == (dataset, metric)
                                      and r["consistency_ratio"] == ratio and r["self_conditioning"] == flag)
                     for flag in (False, True)]
            found[f"{dataset} lambda={ratio:g}"] = {"metric": metric, "without": means[0], "with": means[1],
                                                   "self_conditioning_lowers": means[1] < means[0]}
    return found
