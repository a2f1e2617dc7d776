"""``ucgm sample``: load a checkpoint on its own (config and normalisation come from its metadata), sample, write."""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple, Optional, Sequence

import torch
from torch import nn

from ..data.base import AffineNormalisation
from ..transports import Transport
from .artifacts import check_output_path, write_arrays, write_png
from ..training.checkpoint import CheckpointError, CheckpointInfo, read_checkpoint_info, read_weights
from .components import build_model, build_transport, sampling_network
from .config import apply_overrides, complete_config, validate_config
from ..training.distributed import resolve_device
from ..sampling.seeded import Samples, generate_samples
from ..training.schema import SamplingConfig, typed_section


class LoadedCheckpoint(NamedTuple):
    """A network ready to sample, with the config, transport and data description of its checkpoint."""

    model: nn.Module
    transport: Transport
    config: dict
    info: CheckpointInfo


def load_checkpoint_model(checkpoint: Path | str, weights: str = "ema", device: torch.device | str = "cpu",
                          overrides: Sequence[str] = ()) -> LoadedCheckpoint:
    """Rebuild the network of ``checkpoint`` (run dir, checkpoint dir or ``model.safetensors``) with its ``weights``
    group (``ema`` falls back to ``model`` when the run kept no EMA); ``overrides`` adjust the stored config."""
    info = read_checkpoint_info(checkpoint)
    config = validate_config(complete_config(apply_overrides(complete_config(info.config), overrides)))
    group = weights if weights in info.groups else "model"
    model = build_model(config)
    try:
        model.load_state_dict(read_weights(info.path, group))
    except RuntimeError as error:
        raise CheckpointError(f"{str(info.path)!r}: the {group!r} weights do not fit the model its config "
                              f"describes ({error})") from error
    model = model.to(device).eval().requires_grad_(False)
    return LoadedCheckpoint(model, build_transport(config), config, info)


def _denormaliser(info: CheckpointInfo) -> Optional[AffineNormalisation]:
    if not info.normalisation:
        return None
    return AffineNormalisation.from_dict(info.normalisation)


def write_samples(samples: Samples, outputs: Sequence[Path], info: CheckpointInfo) -> None:
    """Write each output by its extension: arrays in data units, PNGs of images in model space ([-1, 1] for
    image datasets) and scatter plots of 2-D points in data units."""
    denormaliser = _denormaliser(info)
    data = denormaliser.denormalise(samples.samples) if denormaliser is not None else samples.samples
    for path in outputs:
        path = Path(path)
        if path.suffix == ".png":
            write_png(data if samples.samples.ndim == 2 else samples.samples, samples.labels, path)
        else:
            write_arrays(data, samples.labels, path, metadata={"checkpoint": info.path, "step": info.step})


def run_sampling(checkpoint: Path | str, outputs: Sequence[Path], overrides: Sequence[str] = (),
                 weights: str = "ema", device: str = "auto") -> tuple[Samples, SamplingConfig]:
    """Sample ``checkpoint`` with its ``sampling`` settings (after ``overrides``) and write ``outputs``."""
    for path in outputs:
        check_output_path(path)
    loaded = load_checkpoint_model(checkpoint, weights, resolve_device(device), overrides)
    settings = typed_section(loaded.config, "sampling")
    info = loaded.info
    if info.data_shape is None:
        raise CheckpointError(f"{str(info.path)!r} does not record the data shape; cannot draw noise")
    network, transport = sampling_network(loaded.model, loaded.transport, loaded.config)
    samples = generate_samples(network, transport, settings, info.data_shape, info.num_classes or 0,
                               next(loaded.model.parameters()).device)
    write_samples(samples, outputs, info)
    return samples, settings
