"""Backbones with the calling convention ``model(x, t, labels)`` -> tensor shaped like ``x``.

``num_classes`` is the number of classes of a class-conditional model (label ``num_classes`` is the null label
for classifier-free guidance) or ``None`` for an unconditional one.
"""

from .diffusers_wrapper import DiffusersModel, load_diffusers_model
from .dit import DIT_SIZES, DiT, DiTSize, parse_dit_name
from .embeddings import ConditionEmbedding, TimeEmbedding, sinusoidal_features
from .mlp import MLP
from .registry import MODEL_CLASSES, build_model, count_parameters
from .unet import UNet

__all__ = [
    "DIT_SIZES",
    "MLP",
    "MODEL_CLASSES",
    "ConditionEmbedding",
    "DiT",
    "DiTSize",
    "DiffusersModel",
    "TimeEmbedding",
    "UNet",
    "build_model",
    "count_parameters",
    "load_diffusers_model",
    "parse_dit_name",
    "sinusoidal_features",
]
