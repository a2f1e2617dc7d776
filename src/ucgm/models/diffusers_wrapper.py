"""Use diffusers backbones with ucgm's calling convention ``model(x, t, labels)``.

Two forward signatures are adapted:

* UNet-style (``UNet2DModel``): ``module(sample, timestep=..., class_labels=...).sample``;
* transformer-style (``DiTTransformer2DModel``): ``module(hidden_states, timestep=..., class_labels=...).sample``;
  when it predicts a learned variance (``out_channels == 2 * in_channels``) only the first half is kept.

The network time handed over is ``t * time_scale`` (diffusers models are trained on timesteps in [0, 1000)).
diffusers is optional: it is imported only when loading, with a hint to ``pip install ucgm[diffusers]``.
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path
from types import ModuleType
from typing import Optional

import torch
from torch import Tensor, nn

from ..validation import check_choice
from .embeddings import resolve_labels

#: ``kind`` of :func:`load_diffusers_model` -> diffusers class name.
DIFFUSERS_CLASSES = {"unet": "UNet2DModel", "dit": "DiTTransformer2DModel"}


def import_diffusers() -> ModuleType:
    """Import diffusers or raise an ``ImportError`` saying how to install it."""
    try:
        import diffusers
    except ImportError as error:
        raise ImportError(
            "diffusers is needed for diffusers models; install it with `pip install ucgm[diffusers]`"
        ) from error
    return diffusers


def _input_argument(module: nn.Module) -> str:
    """Name of the module's input argument: ``sample`` (UNets) or ``hidden_states`` (transformers)."""
    parameters = inspect.signature(module.forward).parameters
    for name in ("sample", "hidden_states"):
        if name in parameters:
            return name
    raise ValueError(
        f"{type(module).__name__}.forward takes neither `sample` nor `hidden_states`; "
        f"supported: UNet-style (sample, timestep, class_labels) and DiT-style (hidden_states, timestep, class_labels)"
    )


class DiffusersModel(nn.Module):
    """Wrap a diffusers backbone as ``model(x, t, labels)`` returning a tensor of the shape of ``x``.

    ``num_classes = None`` makes the wrapper unconditional (labels ignored, no ``class_labels`` passed), except
    for a DiT transformer, which is always class-conditional and then reads ``num_embeds_ada_norm`` from its
    config. For a conditional wrapper, labels must lie in ``[0, num_classes]`` and ``labels = None`` passes the
    null label ``num_classes`` (the module's embedding table must have that row to use guidance).
    """

    def __init__(self, module: nn.Module, time_scale: float = 1000.0, num_classes: Optional[int] = None):
        super().__init__()
        self.module = module
        self.time_scale = time_scale
        self.input_argument = _input_argument(module)
        config = getattr(module, "config", {})
        if num_classes is None and self.input_argument == "hidden_states":
            num_classes = config.get("num_embeds_ada_norm")
        self.num_classes = num_classes
        in_channels, out_channels = config.get("in_channels"), config.get("out_channels")
        self.drops_learned_sigma = in_channels is not None and out_channels == 2 * in_channels

    def forward(self, x: Tensor, t: Tensor, labels: Optional[Tensor] = None) -> Tensor:
        timestep = torch.as_tensor(t, device=x.device, dtype=x.dtype).expand(x.shape[0]) * self.time_scale
        inputs = {
            self.input_argument: x,
            "timestep": timestep,
            "class_labels": None
            if self.num_classes is None
            else resolve_labels(labels, self.num_classes, x.shape[0], x.device),
        }
        output = self.module(**inputs).sample
        if self.drops_learned_sigma:
            output = output[:, : x.shape[1]]
        return output


def _class_name_in_config(directory: Path) -> str:
    config_file = directory / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{directory} has no config.json; save the model there with `save_pretrained`")
    return json.loads(config_file.read_text()).get("_class_name", "")


def load_diffusers_model(
    directory: str | Path,
    kind: str = "auto",
    time_scale: float = 1000.0,
    num_classes: Optional[int] = None,
) -> DiffusersModel:
    """Load a diffusers backbone saved in a LOCAL ``directory`` and wrap it as :class:`DiffusersModel`.

    ``kind`` is ``"unet"`` (``UNet2DModel``), ``"dit"`` (``DiTTransformer2DModel``) or ``"auto"`` (read the class
    from ``config.json``). Hub ids are never resolved: a missing directory raises ``FileNotFoundError``.
    """
    check_choice("kind", kind, ("auto", *DIFFUSERS_CLASSES))
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(
            f"model directory {str(directory)!r} does not exist; load_diffusers_model only reads local directories"
        )
    if kind == "auto":
        class_name = _class_name_in_config(directory)
        check_choice(f"the model class in {directory / 'config.json'}", class_name, DIFFUSERS_CLASSES.values())
    else:
        class_name = DIFFUSERS_CLASSES[kind]
    model_class = getattr(import_diffusers(), class_name)
    module = model_class.from_pretrained(str(directory), local_files_only=True)
    return DiffusersModel(module, time_scale=time_scale, num_classes=num_classes)
