"""Sample diffusers models saved in LOCAL directories with UCGM-S (:func:`ucgm.sampling.ucgm_sampler.ucgm_sample`).

Supported denoisers (``kind``): ``unet`` (``UNet2DModel``), ``dit`` (``DiTTransformer2DModel``, class-conditional)
and ``sd3`` (``SD3Transformer2DModel``, given fixed prompt embeddings), optionally followed by an ``AutoencoderKL``
that decodes the sampled latents: ``image = vae.decode(x / scaling_factor + shift_factor)``.

What the model's output means is read from the diffusers scheduler config it was trained with
(:func:`ucgm.interop.diffusers_transports.transport_from_scheduler_config`): flow matching -> linear path,
output ``z - x``, timestep ``1000 t``; DDPM-family -> its discrete VP path, output epsilon / v / x0 by its
``prediction_type``, timestep ``t (T - 1)``. Hub ids are never resolved; only local directories are read.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import torch
from torch import Tensor, nn

from ..data.vae import load_local_vae
from ..models.diffusers_wrapper import DiffusersModel, import_diffusers, load_diffusers_model
from ..sampling.ucgm_sampler import ucgm_sample
from ..validation import check_choice, check_positive_int
from .diffusers_transports import transport_from_scheduler_config

#: ``kind`` -> diffusers class name.
DENOISER_CLASSES = {"unet": "UNet2DModel", "dit": "DiTTransformer2DModel", "sd3": "SD3Transformer2DModel"}
#: sub-folders of a saved pipeline (``model_index.json``) that may hold the denoiser, in order of preference.
PIPELINE_DENOISER_FOLDERS = ("transformer", "unet")


class PromptConditionedTransformer(nn.Module):
    """An SD3-style transformer ``module(hidden_states, encoder_hidden_states, pooled_projections, timestep)`` as
    ``model(x, t, labels)`` with fixed prompt embeddings (batch 1 is broadcast). ``t`` is the model timestep
    (as given by the transport); labels are not used by such models and must be ``None``."""

    num_classes = None

    def __init__(self, module: nn.Module, encoder_hidden_states: Tensor, pooled_projections: Tensor):
        super().__init__()
        self.module = module
        self.register_buffer("encoder_hidden_states", encoder_hidden_states, persistent=False)
        self.register_buffer("pooled_projections", pooled_projections, persistent=False)

    def forward(self, x: Tensor, t: Tensor, labels: Optional[Tensor] = None) -> Tensor:
        if labels is not None:
            raise ValueError("a prompt-conditioned transformer takes no class labels; pass labels=None")
        batch_size = x.shape[0]
        return self.module(
            hidden_states=x,
            encoder_hidden_states=self.encoder_hidden_states.expand(batch_size, -1, -1),
            pooled_projections=self.pooled_projections.expand(batch_size, -1),
            timestep=torch.as_tensor(t, device=x.device, dtype=x.dtype).expand(batch_size),
        ).sample


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist; save the component with `save_pretrained`")
    return json.loads(path.read_text())


def _local_directory(directory: str | Path) -> Path:
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"{str(directory)!r} is not a local directory; hub ids are not supported")
    return directory


def _pipeline_parts(directory: Path) -> dict[str, Path]:
    """Denoiser, scheduler and VAE folders of a saved pipeline (``denoiser`` is absent when none is found)."""
    index = _read_json(directory / "model_index.json")
    parts = {name: directory / name for name in ("scheduler", "vae") if name in index}
    folders = [folder for folder in PIPELINE_DENOISER_FOLDERS if folder in index]
    if folders:
        parts["denoiser"] = directory / folders[0]
    return parts


def _kind_of(module_or_directory: nn.Module | Path) -> str:
    """``kind`` of a diffusers module or of the class named in a directory's ``config.json``."""
    if isinstance(module_or_directory, nn.Module):
        class_name = type(module_or_directory).__name__
    else:
        class_name = _read_json(module_or_directory / "config.json").get("_class_name", "")
    for kind, name in DENOISER_CLASSES.items():
        if name == class_name:
            return kind
    raise ValueError(f"unsupported denoiser class {class_name!r}; supported: {', '.join(DENOISER_CLASSES.values())}")


def load_denoiser(
    source: str | Path | nn.Module,
    kind: str = "auto",
    num_classes: Optional[int] = None,
    encoder_hidden_states: Optional[Tensor] = None,
    pooled_projections: Optional[Tensor] = None,
) -> nn.Module:
    """A diffusers denoiser (module or local directory) as ``model(x, t, labels)`` taking the model timestep ``t``
    unscaled (the transport maps ucgm time to it). ``sd3`` needs ``encoder_hidden_states`` ``(1 or B, L, D)``
    and ``pooled_projections`` ``(1 or B, P)``; ``num_classes`` as in :class:`DiffusersModel`."""
    check_choice("kind", kind, ("auto", *DENOISER_CLASSES))
    if not isinstance(source, nn.Module):
        source = _local_directory(source)
    kind = _kind_of(source) if kind == "auto" else kind
    if kind != "sd3":
        if isinstance(source, nn.Module):
            return DiffusersModel(source, time_scale=1.0, num_classes=num_classes)
        return load_diffusers_model(source, kind=kind, time_scale=1.0, num_classes=num_classes)
    if encoder_hidden_states is None or pooled_projections is None:
        raise ValueError(
            "kind='sd3' needs encoder_hidden_states (1 or B, L, joint_attention_dim) and pooled_projections "
            "(1 or B, pooled_projection_dim): prompt embeddings are not computed here"
        )
    if not isinstance(source, nn.Module):
        source = import_diffusers().SD3Transformer2DModel.from_pretrained(str(source), local_files_only=True)
    return PromptConditionedTransformer(source, encoder_hidden_states, pooled_projections)


def _sample_shape(denoiser: nn.Module) -> tuple[int, int, int]:
    """``(in_channels, height, width)`` from the diffusers module's config (``sample_size`` int or pair)."""
    config = getattr(denoiser, "module", denoiser).config
    size = config.sample_size
    height, width = (size, size) if isinstance(size, int) else tuple(size)
    return config.in_channels, height, width


def decode_latents(vae: nn.Module, latents: Tensor) -> Tensor:
    """Images ``vae.decode(latents / scaling_factor + shift_factor)`` (factors from the VAE config; 1 and 0 when
    unset), the inverse of the model-space normalisation of :mod:`ucgm.data.vae`."""
    scaling_factor = vae.config.scaling_factor or 1.0
    shift_factor = vae.config.shift_factor or 0.0
    return vae.decode(latents / scaling_factor + shift_factor).sample


@torch.no_grad()
def sample_diffusers_model(
    source: str | Path | nn.Module,
    scheduler: Optional[str | Path | Mapping | Any] = None,
    vae: Optional[str | Path | nn.Module] = None,
    kind: str = "auto",
    batch_size: int = 1,
    shape: Optional[Sequence[int]] = None,
    noise: Optional[Tensor] = None,
    labels: Optional[Tensor] = None,
    num_classes: Optional[int] = None,
    encoder_hidden_states: Optional[Tensor] = None,
    pooled_projections: Optional[Tensor] = None,
    generator: Optional[torch.Generator] = None,
    **sampler_settings: Any,
) -> Tensor:
    """Sample a diffusers denoiser with UCGM-S; returns images when a VAE is given, else model-space samples.

    ``source``: a denoiser module, its local ``save_pretrained`` directory, or a saved pipeline directory
    (``model_index.json``; its ``transformer``/``unet``, ``scheduler`` and ``vae`` folders are the defaults).
    ``scheduler``: the diffusers scheduler config the model was trained with (directory, mapping or scheduler
    object); it decides the transport. ``vae``: ``AutoencoderKL`` module or local directory.
    ``noise`` (``(B, C, H, W)``) defaults to ``randn((batch_size, *shape), generator)`` with ``shape`` from the
    model config. ``sampler_settings``: keyword arguments of :func:`ucgm_sample` (``steps``,
    ``stochasticity``, ``extrapolation``, ``order``, ``time_warp``, ``gaps``, ``cfg_scale``, ``cfg_interval``).
    """
    if isinstance(source, (str, Path)) and (Path(source) / "model_index.json").is_file():
        parts = _pipeline_parts(Path(source))
        if "denoiser" not in parts:
            raise ValueError(f"pipeline {source} has none of the denoiser folders {PIPELINE_DENOISER_FOLDERS}")
        source = parts["denoiser"]
        scheduler = parts.get("scheduler") if scheduler is None else scheduler
        vae = parts.get("vae") if vae is None else vae
    if scheduler is None:
        raise ValueError("pass the scheduler config the model was trained with (it defines the transport)")
    transport = transport_from_scheduler_config(scheduler)
    model = load_denoiser(source, kind, num_classes, encoder_hidden_states, pooled_projections).eval()
    if noise is None:
        check_positive_int("batch_size", batch_size)
        sample_shape = tuple(shape) if shape is not None else _sample_shape(model)
        noise = torch.randn((batch_size, *sample_shape), generator=generator)
    sample = ucgm_sample(model, transport, noise, labels=labels, generator=generator, **sampler_settings).sample
    if vae is None:
        return sample
    vae = load_local_vae(vae) if isinstance(vae, (str, Path)) else vae.eval()
    return decode_latents(vae, sample)
