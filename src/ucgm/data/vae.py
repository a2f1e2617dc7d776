"""Latents computed on the fly: images of a class-per-folder directory encoded by a local diffusers ``AutoencoderKL``.

Model space is ``(latent - shift_factor) * scaling_factor``; :meth:`VAEImagesDataset.decode` maps model-space
samples back to images in [-1, 1]. The VAE is only ever read from a local directory (never from a hub).
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence, Union

import torch
from torch import Tensor

from ..validation import check_choice
from .base import AffineNormalisation, FiniteDataset
from .image_folder import ImageFolderDataset

POSTERIOR_MODES = ("mean", "sample")


def load_local_vae(path: Union[str, Path], device: Union[str, torch.device] = "cpu"):
    """A frozen ``diffusers.AutoencoderKL`` in eval mode from a local ``save_pretrained`` directory."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise ValueError(
            f"no VAE found at {str(path)!r}: expected a local directory written by AutoencoderKL.save_pretrained "
            "(with config.json and weights); hub ids are not supported"
        )
    try:
        from diffusers import AutoencoderKL
    except ImportError as error:
        raise ImportError("the 'vae_images' dataset needs diffusers: pip install 'ucgm[diffusers]'") from error
    vae = AutoencoderKL.from_pretrained(str(path), local_files_only=True, low_cpu_mem_usage=False)
    return vae.to(device).eval().requires_grad_(False)


class VAEImagesDataset(FiniteDataset):
    """Images from ``root`` (see :class:`ImageFolderDataset`) encoded by the VAE at ``vae_path`` for every batch.

    ``posterior="mean"`` encodes to the mean of the latent distribution; ``"sample"`` draws ``mean + std * eps``
    with the batch's generator. ``scaling_factor`` and ``shift_factor`` default to the VAE config's (1 and 0
    when it has none).
    """

    def __init__(
        self,
        root: Union[str, Path],
        vae_path: Union[str, Path],
        image_size: Optional[Union[int, Sequence[int]]] = None,
        posterior: str = "mean",
        scaling_factor: Optional[float] = None,
        shift_factor: Optional[float] = None,
        device: Union[str, torch.device] = "cpu",
    ):
        check_choice("posterior", posterior, POSTERIOR_MODES)
        self.vae = load_local_vae(vae_path, device)
        config = self.vae.config
        self.images = ImageFolderDataset(root, image_size=image_size, mode="RGB" if config.in_channels == 3 else "L")
        self.posterior = posterior
        self.device = torch.device(device)
        self.num_classes = self.images.num_classes
        self.scaling_factor = float(scaling_factor if scaling_factor is not None else config.scaling_factor or 1.0)
        self.shift_factor = float(shift_factor if shift_factor is not None else config.shift_factor or 0.0)
        self.normaliser = AffineNormalisation(self.scaling_factor, -self.shift_factor * self.scaling_factor)
        downsampling = 2 ** (len(config.block_out_channels) - 1)
        _, height, width = self.images.shape
        if height % downsampling or width % downsampling:
            raise ValueError(f"image size {height}x{width} must be divisible by the VAE's downsampling {downsampling}")
        self.shape = (config.latent_channels, height // downsampling, width // downsampling)

    def __len__(self) -> int:
        return len(self.images)

    def batch(self, indices: Tensor, generator: Optional[torch.Generator] = None) -> tuple[Tensor, Optional[Tensor]]:
        """Encoded images at ``indices``; ``posterior="sample"`` needs ``generator``."""
        images, labels = self.images.batch(indices)
        return self.encode(images, generator), labels

    def sample_batch(self, batch_size: int, generator: torch.Generator) -> tuple[Tensor, Optional[Tensor]]:
        return self.batch(self.draw_indices(batch_size, generator), generator)

    @torch.no_grad()
    def encode(self, images: Tensor, generator: Optional[torch.Generator] = None) -> Tensor:
        """Model-space latents of images in [-1, 1] ``(B, C, H, W)``."""
        distribution = self.vae.encode(images.to(self.device)).latent_dist
        latents = distribution.mean
        if self.posterior == "sample":
            if generator is None:
                raise ValueError("posterior='sample' needs a torch.Generator to draw the latent noise")
            noise = torch.randn(latents.shape, generator=generator, device=generator.device, dtype=latents.dtype)
            latents = latents + distribution.std * noise.to(latents.device)
        return self.normaliser.normalise(latents.to(torch.float32))

    @torch.no_grad()
    def decode(self, x: Tensor) -> Tensor:
        """Images in [-1, 1] (not clamped) decoded from model-space latents ``(B, *shape)``."""
        latents = self.denormalise(x.to(self.device, torch.float32))
        return self.vae.decode(latents).sample
