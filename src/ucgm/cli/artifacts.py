"""Writing samples: PNG grids of images, PNG scatter plots of 2-D points, ``.npz`` and ``.safetensors`` arrays.

Every file is written to a temporary sibling and renamed into place, with :data:`ucgm.atomic.FILE_MODE`.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from torch import Tensor

from ..atomic import atomic_path, atomic_write_bytes

OUTPUT_SUFFIXES = (".png", ".npz", ".safetensors")


#: Small images are enlarged (nearest neighbour, integer factor) to tiles at least this wide.
MIN_TILE_SIZE = 32


def image_grid(images: Tensor, columns: Optional[int] = None) -> np.ndarray:
    """Tile ``(N, C, H, W)`` images with values in [-1, 1] (C = 1 or 3) into one ``uint8`` ``(rows, cols, C)``
    array with a 1-pixel gap; images narrower than :data:`MIN_TILE_SIZE` are enlarged by an integer factor."""
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"a PNG grid needs (N, 1 or 3, H, W) images; got shape {tuple(images.shape)} "
                         f"(write .npz or .safetensors instead)")
    factor = max(1, MIN_TILE_SIZE // images.shape[-1])
    if factor > 1:
        images = images.repeat_interleave(factor, dim=2).repeat_interleave(factor, dim=3)
    count, channels, height, width = images.shape
    columns = columns or math.ceil(math.sqrt(count))
    rows = math.ceil(count / columns)
    pixels = ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    grid = np.zeros((rows * (height + 1) - 1, columns * (width + 1) - 1, channels), dtype=np.uint8)
    for index in range(count):
        row, column = divmod(index, columns)
        top, left = row * (height + 1), column * (width + 1)
        grid[top:top + height, left:left + width] = pixels[index]
    return grid


def _write_grid_png(images: Tensor, path: Path) -> None:
    from PIL import Image

    grid = image_grid(images)
    picture = Image.fromarray(grid[:, :, 0] if grid.shape[2] == 1 else grid)
    with atomic_path(path) as temporary:
        picture.save(temporary, format="PNG")


def _write_scatter_png(points: Tensor, labels: Optional[Tensor], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(5, 5), dpi=100)
    colours = None if labels is None else labels.numpy()
    axes.scatter(points[:, 0].numpy(), points[:, 1].numpy(), s=3, c=colours, cmap="tab10" if labels is not None else None)
    axes.set_aspect("equal")
    figure.tight_layout()
    with atomic_path(path) as temporary:
        figure.savefig(temporary, format="png")
    plt.close(figure)


def write_png(samples: Tensor, labels: Optional[Tensor], path: Path) -> None:
    """A scatter plot for 2-D points ``(N, 2)``, an image grid for ``(N, C, H, W)`` images in [-1, 1]."""
    if samples.ndim == 2 and samples.shape[1] == 2:
        _write_scatter_png(samples, labels, path)
    else:
        _write_grid_png(samples, path)


def write_arrays(samples: Tensor, labels: Optional[Tensor], path: Path, metadata: Optional[dict] = None) -> None:
    """``.npz`` (arrays ``samples`` and ``labels``) or ``.safetensors`` (tensors of the same names)."""
    path = Path(path)
    if path.suffix == ".npz":
        arrays = {"samples": samples.numpy()}
        if labels is not None:
            arrays["labels"] = labels.numpy()
        with atomic_path(path) as temporary, open(temporary, "wb") as handle:
            np.savez(handle, **arrays)
    elif path.suffix == ".safetensors":
        from safetensors.torch import save

        tensors = {"samples": samples.contiguous()}
        if labels is not None:
            tensors["labels"] = labels.contiguous()
        atomic_write_bytes(path, save(tensors, metadata={k: str(v) for k, v in (metadata or {}).items()}))
    else:
        raise ValueError(f"cannot write samples to {str(path)!r}; allowed extensions: {', '.join(OUTPUT_SUFFIXES)}")


def check_output_path(path: Path) -> None:
    """Raise unless ``path`` has one of :data:`OUTPUT_SUFFIXES`."""
    if Path(path).suffix not in OUTPUT_SUFFIXES:
        raise ValueError(f"--out {str(path)!r}: allowed extensions: {', '.join(OUTPUT_SUFFIXES)}")
