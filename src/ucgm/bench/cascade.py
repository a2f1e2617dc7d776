"""LowDiff-style cascade benchmark: samples per second of a two-level cascade (8x8 then 16x16) divided by those
of a single-resolution model of the same family (16x16 only) at equal or better quality.

Both models are UNets of the same size trained by ucgm's trainer (:func:`~ucgm.cli.train.run_training`) from
the ``digits-cascade`` preset (16x16 digits) with equal training compute, seed 0: the single model with
``objective.cascade=null`` for :attr:`CascadeSizes.steps` steps, the cascade as the preset is for
``steps / training_cost_fraction`` steps (:func:`~ucgm.methods.discrete.cascade.training_cost_fraction`: a step at
8x8 costs a quarter of a 16x16 step, so with the preset's level weights a cascade step costs a fraction of a single
one); both step counts are reported (``cascade_details.training_steps``), and so are the measured training
seconds. Sampling goes through the user path (EMA weights from
:func:`~ucgm.training.loading.load_checkpoint_model`, seeded noise of :func:`~ucgm.analysis.reports.
draw_samples`): the single model with UCGM-S at :attr:`CascadeSizes.single_nfe`, with the run's settings and with
the cascade's stage sampler (UCGM-S with its defaults), the better of the two being the quality to match; the
cascade with its own sampler (UCGM-S per level) at every budget of :attr:`CascadeSizes.cascade_nfes`, three
quarters of the calls at 8x8, refining from every start time of :attr:`CascadeSizes.refine_times`. Quality:
digits FD of the samples averaged back to 8x8 against the held-out split treated alike
(:class:`~ucgm.metrics.discrete_suites.UpsampledDigitsSuite`, the metric of ``ucgm evaluate``), lower is better;
pixel sliced W2 is recorded too.

Throughput: one batch of ``timing_batch`` samples per call, every sampler interleaved in one process
(:func:`~ucgm.bench.timing.interleaved_medians`, one thread). The reported cascade is the fastest budget whose FD
is at most the single model's (``equal_or_better`` false, and the best-quality budget reported, when none is).
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from ..analysis.reports import draw_samples, run_ucgm_settings
from ..cli.components import accepted_keys
from ..cli.config import resolve_config
from ..cli.sample import load_checkpoint_model
from ..methods.discrete.cascade import training_cost_fraction
from ..metrics.suites import build_metric_suite
from ..sampling.cascade_sampler import default_step_fractions, split_budget
from ..sampling.registry import get_sampler
from ..sampling.seeded import fresh_noise_source, initial_noise, sample_labels
from .discrete import train_run
from .timing import interleaved_medians

OVERRIDES = ["model.base_channels=16", "training.batch_size=64"]


@dataclass(frozen=True)
class CascadeSizes:
    steps: int
    num: int
    single_nfe: int
    cascade_nfes: tuple
    timing_batch: int
    timing_rounds: int
    #: Refinement start times the cascade is sampled with (1: from pure noise), each at every budget.
    refine_times: tuple = (1.0,)


QUICK = CascadeSizes(steps=60, num=64, single_nfe=8, cascade_nfes=(4, 8), timing_batch=16, timing_rounds=3,
                     refine_times=(1.0, 0.5))
FULL = CascadeSizes(steps=3000, num=1000, single_nfe=16, cascade_nfes=(8, 12, 16), timing_batch=64,
                    timing_rounds=9, refine_times=(1.0, 0.6, 0.3))


def equal_compute_steps(single_steps: int) -> dict:
    """Training steps of the single model and of the preset's cascade at equal training compute."""
    options = resolve_config("digits-cascade", OVERRIDES, accepted_keys)["objective"]["cascade"]
    weights = options.get("level_weights") or [1.0] * options["levels"]
    return {"cascade": round(single_steps / training_cost_fraction(weights)), "single": single_steps}


class _Candidate:
    """One sampler of one run: its quality and a timing call on a fixed batch."""

    def __init__(self, loaded, name: str, settings: dict, nfe: int, sizes: CascadeSizes):
        self.loaded, self.nfe = loaded, nfe
        self.sampler = get_sampler(name, settings)
        info = loaded.info
        self.shape, self.classes = info.data_shape, info.num_classes or 0
        batch = range(sizes.timing_batch)
        self.noise = initial_noise(0, batch, self.shape, "cpu")
        labels = sample_labels(sizes.timing_batch, self.classes)
        self.call = lambda: self.sampler(loaded.model, loaded.transport, self.noise, labels, nfe,
                                         fresh_noise_source(0, batch))

    def quality(self, num: int) -> dict:
        drawn = draw_samples(self.loaded.model, self.loaded.transport, self.sampler, self.nfe, self.shape,
                             self.classes, num)
        suite = build_metric_suite(self.loaded.config, num, self.classes)
        return {measured.metric: measured.value for measured in suite.evaluate(drawn.samples, drawn.labels)}


def _label(nfe: int, refine_time: float) -> str:
    return f"cascade@{nfe}" if refine_time == 1 else f"cascade@{nfe},t_r={refine_time:g}"


def run_cascade(sizes: CascadeSizes) -> dict:
    """Train both models, score and time them; the ``cascade`` and ``cascade_details`` keys."""
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="ucgm-bench-cascade-") as temporary:
        workdir = Path(temporary)
        steps = equal_compute_steps(sizes.steps)
        seconds = {"cascade": train_run("digits-cascade", list(OVERRIDES), steps["cascade"], workdir / "cascade"),
                   "single": train_run("digits-cascade", OVERRIDES + ["objective.cascade=null"], steps["single"],
                                       workdir / "single")}
        single_run, cascade_run = load_checkpoint_model(workdir / "single"), load_checkpoint_model(workdir / "cascade")
        name, settings = cascade_run.method.sampler()
        singles = {"single": _Candidate(single_run, "ucgm", run_ucgm_settings(single_run.config), sizes.single_nfe,
                                        sizes),
                   "single (stage sampler)": _Candidate(single_run, settings["stage_sampler"],
                                                        settings["stage_settings"], sizes.single_nfe, sizes)}
        specs = {_label(nfe, refine_time): (nfe, refine_time) for refine_time in sizes.refine_times
                 for nfe in sizes.cascade_nfes}
        cascades = {key: _Candidate(cascade_run, name, {**settings, "refine_time": refine_time}, nfe, sizes)
                    for key, (nfe, refine_time) in specs.items()}
        candidates = {**singles, **cascades}
        qualities = {key: candidate.quality(sizes.num) for key, candidate in candidates.items()}
        medians = interleaved_medians({key: candidate.call for key, candidate in candidates.items()},
                                      repeats=sizes.timing_rounds, warmup=1)
    rate = {key: sizes.timing_batch / seconds_per_call for key, seconds_per_call in medians.items()}
    fractions = settings.get("step_fractions") or default_step_fractions(settings["levels"])
    table = [{"sampler": key, "nfe": candidate.nfe,
              "steps_per_level": None if key in singles else split_budget(candidate.nfe, fractions),
              "refine_time": None if key in singles else specs[key][1],
              "samples_per_second": rate[key], **qualities[key]} for key, candidate in candidates.items()]
    single_fd = min(qualities[key]["digits_fd"] for key in singles)
    cascade_rows = [row for row in table if row["sampler"] in cascades]
    good = [row for row in cascade_rows if row["digits_fd"] <= single_fd]
    chosen = max(good, key=lambda row: row["samples_per_second"]) if good else min(cascade_rows,
                                                                                  key=lambda row: row["digits_fd"])
    ratio = chosen["samples_per_second"] / rate["single"]
    return {"cascade": {"throughput_ratio": ratio, "quality": {"cascade": chosen["digits_fd"], "single": single_fd}},
            "cascade_details": {"sizes": asdict(sizes), "rows": table, "chosen": chosen["sampler"],
                                "equal_or_better": bool(good), "met": bool(good) and ratio >= 1.5,
                                "metric": "digits_fd (8x8 block means)", "training_steps": steps,
                                "train_seconds": seconds,
                                "seconds": round(time.perf_counter() - started, 1)}}
