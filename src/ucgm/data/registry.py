"""``build_dataset(config)``: the one entry point from a run configuration to a dataset."""

from __future__ import annotations

import inspect
from typing import Callable

from ..validation import check_choice
from .base import Dataset
from .digits import DigitsDataset
from .discrete import CategoricalGridDataset, QuantisedDigitsDataset
from .image_folder import ImageFolderDataset
from .latents import LatentsDataset
from .mixtures import MixtureDataset
from .upsampled_digits import UpsampledDigitsDataset
from .vae import VAEImagesDataset

DATASETS: dict[str, Callable[..., Dataset]] = {
    "mixture": MixtureDataset,
    "digits": DigitsDataset,
    "categorical": CategoricalGridDataset,
    "quantised_digits": QuantisedDigitsDataset,
    "upsampled_digits": UpsampledDigitsDataset,
    "image_folder": ImageFolderDataset,
    "latents": LatentsDataset,
    "vae_images": VAEImagesDataset,
}


def dataset_options(name: str) -> dict[str, inspect.Parameter]:
    """The options a dataset accepts (its constructor's keyword parameters)."""
    check_choice("dataset name", name, DATASETS)
    return dict(inspect.signature(DATASETS[name]).parameters)


def build_dataset(config: dict) -> Dataset:
    """Build the dataset ``config["name"]`` with the other keys as its options, e.g.
    ``{"name": "digits", "split": "train"}`` or ``{"name": "mixture", "mixture": "checkerboard"}``."""
    if not isinstance(config, dict) or "name" not in config:
        raise ValueError(
            f"dataset config must be a dict with a 'name'; allowed names: {', '.join(map(repr, DATASETS))}"
        )
    options = dict(config)
    name = options.pop("name")
    allowed = dataset_options(name)
    unknown = [key for key in options if key not in allowed]
    if unknown:
        raise ValueError(
            f"unknown option(s) {', '.join(map(repr, unknown))} for dataset {name!r}; "
            f"allowed options: {', '.join(map(repr, allowed))}"
        )
    missing = [
        key for key, parameter in allowed.items() if parameter.default is inspect.Parameter.empty and key not in options
    ]
    if missing:
        raise ValueError(f"dataset {name!r} needs the option(s) {', '.join(map(repr, missing))}")
    return DATASETS[name](**options)
