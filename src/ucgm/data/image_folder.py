"""A class-per-folder image directory (``root/<class name>/**/<image>``) read with Pillow.

Class names sorted alphabetically give the label ids. Images are decoded per batch (nothing is held in memory
but the file list); every image must have the same size unless ``image_size`` resizes them. Every file's header
is read when the dataset is built, so a file that is not an image fails before training, naming the file; an
image whose data turn out corrupt or truncated when a batch decodes it fails naming the file and sample index.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
import torch
from torch import Tensor

from ..validation import check_choice
from .base import AffineNormalisation, FiniteDataset

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
IMAGE_MODES = ("RGB", "L")

#: Pixel values 0..255 map to [-1, 1].
PIXEL_NORMALISATION = AffineNormalisation(scale=2.0 / 255.0, shift=-1.0)


class ImageFolderDataset(FiniteDataset):
    """Images as float32 ``(C, H, W)`` in [-1, 1] (C = 3 for ``"RGB"``, 1 for ``"L"``), labels = class ids.

    ``image_size``: ``None`` (keep sizes; all must match), an int (square) or ``(height, width)``.
    """

    decoded_per_batch = True

    def __init__(
        self, root: Union[str, Path], image_size: Optional[Union[int, Sequence[int]]] = None, mode: str = "RGB"
    ):
        check_choice("mode", mode, IMAGE_MODES)
        self.target_size = _parse_size(image_size)
        self.root = Path(root)
        self.mode = mode
        self.class_names, self.files, labels = _scan_class_folders(self.root)
        self.labels = torch.tensor(labels, dtype=torch.long)
        self.num_classes = len(self.class_names)
        sizes = _image_sizes(self.files)
        height, width = self.target_size or _common_size(sizes)
        self.shape = (3 if mode == "RGB" else 1, height, width)
        self.normaliser = PIXEL_NORMALISATION

    def __len__(self) -> int:
        return len(self.files)

    def batch(self, indices: Tensor) -> tuple[Tensor, Optional[Tensor]]:
        images = torch.stack([self._load(int(index)) for index in indices])
        return self.normaliser.normalise(images), self.labels[indices]

    def _load(self, index: int) -> Tensor:
        try:
            return load_image(self.files[index], self.mode, self.target_size)
        except ValueError as error:
            raise ValueError(f"{error} (sample {index} of image folder {str(self.root)!r})") from error


def load_image(path: Path, mode: str, size: Optional[tuple[int, int]] = None) -> Tensor:
    """The pixels 0..255 of an image file as float32 ``(C, H, W)``: converted to ``mode`` (``"RGB"`` or ``"L"``)
    and, when ``size = (height, width)`` differs, resized (bicubic) — how the dataset reads its files. A file
    Pillow cannot decode raises ``ValueError`` naming it."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            image = image.convert(mode)
            if size is not None and image.size != size[::-1]:
                image = image.resize(size[::-1], Image.Resampling.BICUBIC)
            pixels = np.asarray(image, dtype=np.float32)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:  # PIL's decoding errors
        raise ValueError(f"image {str(path)!r} cannot be decoded ({error}); repair or remove the file") from error
    if pixels.ndim == 2:
        pixels = pixels[:, :, None]
    return torch.from_numpy(pixels.copy()).permute(2, 0, 1)


def _scan_class_folders(root: Path) -> tuple[list[str], list[Path], list[int]]:
    if not root.is_dir():
        raise ValueError(f"image folder {str(root)!r} does not exist or is not a directory")
    class_dirs = sorted((entry for entry in root.iterdir() if entry.is_dir()), key=lambda entry: entry.name)
    if not class_dirs:
        raise ValueError(f"image folder {str(root)!r} has no class sub-folders; expected root/<class name>/<images>")
    files: list[Path] = []
    labels: list[int] = []
    for label, class_dir in enumerate(class_dirs):
        class_files = sorted(
            path for path in class_dir.rglob("*") if path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS
        )
        if not class_files:
            raise ValueError(
                f"class folder {str(class_dir)!r} holds no images; allowed extensions: {', '.join(IMAGE_EXTENSIONS)}"
            )
        files += class_files
        labels += [label] * len(class_files)
    return [class_dir.name for class_dir in class_dirs], files, labels


def _parse_size(image_size: Optional[Union[int, Sequence[int]]]) -> Optional[tuple[int, int]]:
    if image_size is None:
        return None
    size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    if len(size) != 2 or not all(isinstance(side, int) and not isinstance(side, bool) and side > 0 for side in size):
        raise ValueError(f"image_size={image_size!r} must be a positive int or a (height, width) pair of them")
    return size


def _image_sizes(files: list[Path]) -> dict[tuple[int, int], Path]:
    """``(height, width)`` -> the first file of that size, from every file's header (cheap: no pixel data is
    decoded); a file that is not an image raises ``ValueError`` naming it."""
    from PIL import Image

    sizes: dict[tuple[int, int], Path] = {}
    for path in files:
        try:
            with Image.open(path) as image:
                sizes.setdefault((image.height, image.width), path)
        except (OSError, SyntaxError, ValueError) as error:  # UnidentifiedImageError is an OSError
            raise ValueError(f"image {str(path)!r} cannot be read ({error}); repair or remove the file") from error
    return sizes


def _common_size(sizes: dict[tuple[int, int], Path]) -> tuple[int, int]:
    """The shared ``(height, width)`` of all images."""
    if len(sizes) > 1:
        examples = ", ".join(f"{height}x{width} ({path.name})" for (height, width), path in list(sizes.items())[:3])
        raise ValueError(f"images have different sizes ({examples}); set image_size to resize them to one size")
    return next(iter(sizes))
