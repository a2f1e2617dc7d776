"""``ucgm sample``: load a checkpoint on its own (config and normalisation come from its metadata), sample, write.

Samples holding NaN or Inf are not written (:class:`~ucgm.sampling.seeded.NonFiniteSamples` names the sampler and
its settings); progress is reported per batch of samples (:mod:`ucgm.cli.progress`).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Optional, Sequence

import torch

from ..data.bits import normalisation_from_dict
from .artifacts import OUTPUT_SUFFIXES, check_output_path, write_arrays, write_png
from .progress import Progress
from ..training.checkpoint import CheckpointError, CheckpointInfo, read_checkpoint_info
from ..training.loading import LoadedCheckpoint
from ..training.loading import load_checkpoint_model as load_sampling_model
from .config import apply_overrides, complete_config, parse_run_config
from .schema import RunConfig
from ..training.distributed import resolve_device
from ..sampling.seeded import Samples, generate_samples, resolve_sampler
from ..sampling.settings import SamplingConfig


def load_checkpoint_model(checkpoint: Path | str, weights: str = "ema", device: torch.device | str = "cpu",
                          overrides: Sequence[str] = ()) -> LoadedCheckpoint:
    """The sampling model of ``checkpoint`` (run dir, checkpoint dir or ``model.safetensors``) with its ``weights``
    (``ema`` falls back to ``model`` for networks without an EMA), its config adjusted by ``overrides``."""
    return load_checkpoint_and_config(checkpoint, weights, device, overrides)[0]


def load_checkpoint_and_config(checkpoint: Path | str, weights: str = "ema", device: torch.device | str = "cpu",
                               overrides: Sequence[str] = ()) -> tuple[LoadedCheckpoint, RunConfig]:
    """:func:`load_checkpoint_model` and the checkpoint's config (adjusted by ``overrides``), parsed once."""
    info = read_checkpoint_info(checkpoint)
    config = parse_run_config(complete_config(apply_overrides(complete_config(info.config), overrides)))
    return load_sampling_model(info.path, weights, device, config.values), config


def _denormaliser(info: CheckpointInfo):
    """The checkpoint's normalisation (affine, or bits: :func:`~ucgm.data.bits.normalisation_from_dict`)."""
    if not info.normalisation:
        return None
    return normalisation_from_dict(info.normalisation)


def write_samples(samples: Samples, outputs: Sequence[Path], info: CheckpointInfo) -> None:
    """Write each output by its extension: arrays in data units, PNGs of images in model space ([-1, 1] for
    image datasets; bit-encoded images decoded to grey levels) and scatter plots of 2-D points in data units."""
    denormaliser = _denormaliser(info)
    data = denormaliser.denormalise(samples.samples) if denormaliser is not None else samples.samples
    for path in outputs:
        path = Path(path)
        if path.suffix == ".png":
            display = getattr(denormaliser, "display", None)
            images = samples.samples if display is None else display(samples.samples)
            write_png(data if samples.samples.ndim == 2 else images, samples.labels, path)
        else:
            write_arrays(data, samples.labels, path, metadata={"checkpoint": info.path, "step": info.step})


def run_sampling(checkpoint: Path | str, outputs: Sequence[Path], overrides: Sequence[str] = (),
                 weights: str = "ema", device: str | torch.device = "auto", progress: Optional[bool] = None
                 ) -> tuple[Samples, SamplingConfig]:
    """Sample ``checkpoint`` with its ``sampling`` settings (after ``overrides``) and write ``outputs``;
    ``progress`` is the mode of :class:`~ucgm.cli.progress.Progress`."""
    for path in outputs:
        check_output_path(path)
        if Path(path).is_dir():
            raise ValueError(f"--out {str(path)!r} is a directory; --out names a file "
                             f"({', '.join(OUTPUT_SUFFIXES)})")
    device = resolve_device(device)
    loaded, config = load_checkpoint_and_config(checkpoint, weights, device, overrides)
    settings, info = config.sampling, loaded.info
    if info.data_shape is None:
        raise CheckpointError(f"{str(info.path)!r} does not record the data shape; cannot draw noise")
    bar = Progress("ucgm sample", settings.num, "sample", mode=progress)
    try:
        samples = generate_samples(loaded.model, loaded.transport, settings, info.data_shape, info.num_classes or 0,
                                   device, loaded.method.sampler(), on_batch=bar.update)
    finally:
        bar.close()
    write_samples(samples, outputs, info)
    return samples, dataclasses.replace(settings, sampler=resolve_sampler(settings, loaded.method.sampler())[0])
