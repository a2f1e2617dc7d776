"""Datasets that yield ``(x, labels)`` in a normalised model space, with deterministic batch drawing."""

from .base import AffineNormalisation, Dataset, FiniteDataset, TensorDataset
from .digits import DigitsDataset, load_digits_split
from .image_folder import ImageFolderDataset
from .latents import LatentsDataset, fit_normalisation, load_latents
from .mixtures import MixtureDataset
from .registry import DATASETS, build_dataset, dataset_options
from .vae import VAEImagesDataset, load_local_vae

__all__ = [
    "AffineNormalisation",
    "DATASETS",
    "Dataset",
    "DigitsDataset",
    "FiniteDataset",
    "ImageFolderDataset",
    "LatentsDataset",
    "MixtureDataset",
    "TensorDataset",
    "VAEImagesDataset",
    "build_dataset",
    "dataset_options",
    "fit_normalisation",
    "load_digits_split",
    "load_latents",
    "load_local_vae",
]
