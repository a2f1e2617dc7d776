"""The quality side of UCGM-T's fast mode: one recipe trained in parity and in fast mode, 2-NFE sliced W2.

The class-conditional GMM preset (``ucgm train gmm``: UCGM-T multi-step with the enhanced target) trains
``base_steps``; the preset's ``tune:`` recipe (``ucgm tune``: consistency ratio 1, enhanced target against the
frozen base model) then trains ``tune_steps`` from it twice, ``objective.mode=parity`` and ``objective.mode=fast``,
same seed, through :func:`~ucgm.cli.train.run_training`. Each tuned run's EMA weights
(:func:`~ucgm.training.loading.load_checkpoint_model`, the path of ``ucgm sample``) are sampled by UCGM-S with the
run's tuned settings at NFE 2 (:func:`ucgm.analysis.reports.draw_samples`, class labels drawn with the noise); the
value is the sliced W2 (256 projections) of ``num_samples`` samples against ``num_reference`` exact mixture samples.
The floor: the same metric of ``num_samples`` exact samples, over :data:`FLOOR_REPEATS` draws (mean and standard
deviation); "equal" quality is fast <= parity + 2 floor standard deviations.
"""

from __future__ import annotations

import statistics
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ..analysis.reports import draw_samples, run_ucgm_settings
from ..cli.components import accepted_keys
from ..cli.config import resolve_config
from ..cli.sample import load_checkpoint_model
from ..cli.train import run_training
from ..cli.tune import tune_config
from ..data.mixtures import make_mixture
from ..metrics.suites import REFERENCE_SEED, SlicedW2Against
from ..sampling.registry import get_sampler
from ..training.checkpoint import read_checkpoint_info

FEW_STEP_NFE = 2
MODES = ("parity", "fast")
FLOOR_REPEATS, FLOOR_SEED = 3, 1000


@dataclass(frozen=True)
class FastModeSizes:
    """Training steps of the base and tuned runs, and sample counts."""

    base_steps: int
    tune_steps: int
    num_samples: int
    num_reference: int


QUICK = FastModeSizes(base_steps=300, tune_steps=60, num_samples=2000, num_reference=10000)
FULL = FastModeSizes(base_steps=3000, tune_steps=300, num_samples=5000, num_reference=20000)


def _steps(steps: int) -> list[str]:
    return [f"training.steps={steps}", f"training.checkpoint_every={steps}", f"training.log_every={steps}"]


def train_parity_and_fast(workdir: Path, sizes: FastModeSizes) -> dict[str, Path]:
    """The base GMM run, then the preset's tune recipe from it in each mode; run directories by mode."""
    base = workdir / "gmm-base"
    run_training(resolve_config("gmm", _steps(sizes.base_steps), accepted_keys), base, progress=False)
    runs = {}
    for mode in MODES:
        runs[mode] = workdir / f"gmm-tuned-{mode}"
        run_training(tune_config(base, [f"objective.mode={mode}", *_steps(sizes.tune_steps)]), runs[mode],
                     progress=False)
    return runs


def few_step_sliced_w2(run_dir: Path, metric: SlicedW2Against, num_samples: int) -> float:
    """Sliced W2 of ``num_samples`` 2-NFE samples of the run's EMA weights (UCGM-S, the run's tuned settings)."""
    loaded = load_checkpoint_model(run_dir)
    sampler = get_sampler("ucgm", run_ucgm_settings(loaded.config))
    drawn = draw_samples(loaded.model, loaded.transport, sampler, FEW_STEP_NFE, loaded.info.data_shape,
                         loaded.info.num_classes or 0, num_samples)
    return metric(drawn.samples)


def fast_mode_quality(sizes: FastModeSizes) -> tuple[dict, dict]:
    """``{"parity": v, "fast": v}`` 2-NFE sliced W2 on the GMM, and the sizes and recipe it was measured with."""
    mixture = make_mixture("8gaussians")
    metric = SlicedW2Against(mixture.sample(sizes.num_reference, torch.Generator().manual_seed(REFERENCE_SEED))[0])
    with tempfile.TemporaryDirectory() as workdir:
        runs = train_parity_and_fast(Path(workdir), sizes)
        values = {mode: few_step_sliced_w2(run_dir, metric, sizes.num_samples) for mode, run_dir in runs.items()}
        recipe = read_checkpoint_info(runs["fast"]).config["objective"]
    floors = [metric(mixture.sample(sizes.num_samples, torch.Generator().manual_seed(FLOOR_SEED + repeat))[0])
              for repeat in range(FLOOR_REPEATS)]
    floor = {"mean": statistics.fmean(floors), "std": statistics.pstdev(floors)}
    return values, {**asdict(sizes), "nfe": FEW_STEP_NFE, "tuned_objective": recipe, "floor": floor}
