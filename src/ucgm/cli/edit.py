"""``ucgm edit``: zero-shot inpainting, colorization and super-resolution with a trained checkpoint.

    ucgm edit RUN_OR_CHECKPOINT --task inpaint --input digits.npy --region right --out filled.png
    ucgm edit RUN --task superres --factor 2 --input photo.png --out sharp.npz
    ucgm edit RUN --task colorize --input gray.png --out colour.png

Array inputs are in the data's raw units (``.npy``, ``.npz`` / ``.safetensors`` with a ``samples`` entry); one
sample ``(*shape)`` or a batch ``(B, *shape)``, normalised with the checkpoint's normalisation. An image file
(``.png``, ``.jpg``) is read as an image dataset reads its files (:func:`ucgm.data.image_folder.load_image`:
converted to RGB or grey as the data have 3 or 1 channels, resized when the run's data section sets
``image_size``) and its pixels 0..255 mapped to [-1, 1], the model space of image data. Each is edited with
:func:`ucgm.sampling.editing.edit` (the network read as its objective trained it: the consistency wrapper for
consistency objectives, the run transport otherwise; per-sample noise, so a sample does not depend on the batch),
and written atomically (``.png`` grid in model space, ``.npz`` / ``.safetensors`` in data units). For colorization the
input's luma is what is kept: a grey input replicated to 3 channels keeps its grey level as luma.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
from torch import Tensor

from ..transports import EDM_SIGMA_MAX, EDM_SIGMA_MIN

EDIT_TASKS = ("inpaint", "colorize", "superres")
MASK_REGIONS = ("left", "right", "top", "bottom", "center")
INPUT_SUFFIXES = (".npy", ".npz", ".safetensors", ".png", ".jpg", ".jpeg")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ucgm edit", description="edit data with a trained model (zero-shot "
                                     "inpainting, colorization, super-resolution)")
    parser.add_argument("checkpoint", help="run directory, checkpoint directory or model.safetensors")
    parser.add_argument("--task", required=True, choices=EDIT_TASKS,
                        help="inpaint (keep known pixels), colorize (keep the luma) or superres (keep patch means)")
    parser.add_argument("--input", required=True, type=Path, help=f"data to edit ({', '.join(INPUT_SUFFIXES)})")
    parser.add_argument("--out", required=True, type=Path, help="output file (.png, .npz or .safetensors)")
    parser.add_argument("--mask", type=Path, help="inpaint: known-pixel mask file (non-zero = known)")
    parser.add_argument("--region", choices=MASK_REGIONS, help="inpaint: the unknown region (instead of --mask)")
    parser.add_argument("--factor", type=int, default=2, help="superres: patch size whose mean is known")
    parser.add_argument("--nfe", type=int, default=20, help="editor iterations = network evaluations (default 20)")
    parser.add_argument("--sigma-min", type=float, default=EDM_SIGMA_MIN,
                        help=f"smallest noise level of the editor's Karras times (default {EDM_SIGMA_MIN})")
    parser.add_argument("--sigma-max", type=float, default=EDM_SIGMA_MAX,
                        help=f"largest noise level, where editing starts (default {EDM_SIGMA_MAX:g})")
    parser.add_argument("--no-clamp", action="store_true", help="do not clamp predictions to [-1, 1] (images)")
    parser.add_argument("--labels", type=int, nargs="+",
                        help="class labels, cycled over the samples (default: the null label)")
    parser.add_argument("--seed", type=int, default=0, help="noise seed; sample i uses the generator (seed, i)")
    parser.add_argument("--weights", choices=("ema", "model"), default="ema", help="weights to edit with (default ema)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    return parser


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


def _check_input_file(path: Path) -> None:
    if path.suffix.lower() not in INPUT_SUFFIXES:
        raise ValueError(f"{str(path)!r}: allowed input extensions: {', '.join(INPUT_SUFFIXES)}")
    if not path.is_file():
        raise ValueError(f"{str(path)!r} does not exist")


def read_image_input(path: Path, shape: Sequence[int], data_config: dict) -> Tensor:
    """An image file as a model-space batch ``(1, *shape)`` in [-1, 1], read as the run's image data were."""
    from ..data.image_folder import PIXEL_NORMALISATION, load_image

    _check_input_file(path)
    shape = tuple(shape)
    if len(shape) != 3 or shape[0] not in (1, 3):
        raise ValueError(f"an image input needs image data (1 or 3, H, W); the checkpoint's data have shape {shape} "
                         f"(pass a .npy, .npz or .safetensors array instead)")
    size = shape[1:] if data_config.get("image_size") is not None else None
    pixels = load_image(path, "RGB" if shape[0] == 3 else "L", size)
    if tuple(pixels.shape) != shape:
        raise ValueError(f"image {str(path)!r} is {pixels.shape[1]}x{pixels.shape[2]} pixels; the checkpoint's data "
                         f"are {shape[1]}x{shape[2]} (resize it, or train with data.image_size)")
    return PIXEL_NORMALISATION.normalise(pixels.unsqueeze(0))


def read_tensor(path: Path) -> Tensor:
    """A float32 tensor from ``.npy``, ``.npz`` / ``.safetensors`` (entry ``samples``, else the only entry) or an
    image file (``(C, H, W)`` pixels 0..255)."""
    suffix = path.suffix.lower()
    _check_input_file(path)
    if suffix == ".npy":
        return torch.as_tensor(np.load(path, allow_pickle=False), dtype=torch.float32)
    if suffix in (".npz", ".safetensors"):
        if suffix == ".npz":
            with np.load(path, allow_pickle=False) as archive:
                entries = {key: torch.as_tensor(archive[key]) for key in archive.files}
        else:
            from safetensors.torch import load_file

            entries = load_file(str(path))
        if "samples" not in entries and len(entries) != 1:
            raise ValueError(f"{str(path)!r} holds {sorted(entries)}; expected a 'samples' entry or a single one")
        return (entries["samples"] if "samples" in entries else next(iter(entries.values()))).to(torch.float32)
    from PIL import Image

    pixels = np.asarray(Image.open(path))
    tensor = torch.as_tensor(pixels, dtype=torch.float32)
    return tensor.unsqueeze(0) if tensor.ndim == 2 else tensor.permute(2, 0, 1)


def _as_batch(data: Tensor, shape: Sequence[int]) -> Tensor:
    """``(*shape)`` or ``(B, *shape)`` -> ``(B, *shape)``; image inputs are matched to the channel count."""
    shape = tuple(shape)
    if tuple(data.shape) == shape:
        return data.unsqueeze(0)
    if data.ndim == len(shape) and len(shape) == 3 and data.shape[1:] == shape[1:]:
        if data.shape[0] == 1 and shape[0] == 3:
            return data.repeat(3, 1, 1).unsqueeze(0)
        if data.shape[0] in (3, 4) and shape[0] == 1:
            return data[:3].mean(dim=0, keepdim=True).unsqueeze(0)
        if data.shape[0] == 4 and shape[0] == 3:
            return data[:3].unsqueeze(0)
    if tuple(data.shape[1:]) == shape:
        return data
    raise ValueError(f"input has shape {tuple(data.shape)}; the checkpoint's data have shape {shape} "
                     f"(pass one sample {shape} or a batch (B, *{shape}))")


def region_mask(shape: Sequence[int], region: str) -> Tensor:
    """Known-pixel mask ``(1, *shape)`` of an image whose ``region`` (a half, or the central half-size square)
    is unknown."""
    if len(shape) != 3:
        raise ValueError(f"--region needs image data (C, H, W); the checkpoint's data have shape {tuple(shape)}")
    _, height, width = shape
    known = torch.ones(1, 1, height, width, dtype=torch.bool)
    unknown = {"left": (slice(None), slice(0, width // 2)), "right": (slice(None), slice(width // 2, None)),
               "top": (slice(0, height // 2), slice(None)), "bottom": (slice(height // 2, None), slice(None)),
               "center": (slice(height // 4, height - height // 4), slice(width // 4, width - width // 4))}[region]
    known[..., unknown[0], unknown[1]] = False
    return known


def _subspace(args: argparse.Namespace, shape: Sequence[int], batch: Tensor):
    from ..sampling.editing import PixelMask, colorization_subspace, super_resolution_subspace

    if args.task == "colorize":
        if len(shape) != 3 or shape[0] != 3:
            raise ValueError(f"colorize needs RGB images (3, H, W); the checkpoint's data have shape {tuple(shape)}")
        return colorization_subspace()
    if args.task == "superres":
        return super_resolution_subspace(args.factor)
    if (args.mask is None) == (args.region is None):
        raise ValueError("inpaint needs exactly one of --mask FILE or --region {" + ",".join(MASK_REGIONS) + "}")
    if args.region is not None:
        return PixelMask(region_mask(shape, args.region))
    mask = read_tensor(args.mask) != 0
    try:
        torch.broadcast_shapes(mask.shape, batch.shape)
    except RuntimeError as error:
        raise ValueError(f"mask has shape {tuple(mask.shape)}, which does not broadcast against the input "
                         f"{tuple(batch.shape)}") from error
    return PixelMask(mask)


def run_edit(args: argparse.Namespace) -> Tensor:
    """Load, edit and write; returns the edited batch in model space."""
    from ..data.base import AffineNormalisation
    from ..sampling.editing import edit
    from ..sampling.seeded import check_finite_samples, fresh_noise_source
    from ..validation import check_finite
    from .artifacts import check_output_path, write_arrays, write_png
    from ..training.distributed import resolve_device
    from .sample import load_checkpoint_model

    check_output_path(args.out)
    loaded = load_checkpoint_model(args.checkpoint, args.weights, resolve_device(args.device))
    model, transport = loaded.model, loaded.transport
    info = loaded.info
    if info.data_shape is None:
        raise ValueError(f"{str(info.path)!r} does not record the data shape")
    normalisation = AffineNormalisation.from_dict(info.normalisation) if info.normalisation else None
    device = next(loaded.networks[loaded.method.sampling_role].parameters()).device
    if args.input.suffix.lower() in IMAGE_SUFFIXES:
        observation = read_image_input(args.input, info.data_shape, loaded.config.get("data") or {}).to(device)
    else:
        raw = _as_batch(read_tensor(args.input), info.data_shape)
        observation = (normalisation.normalise(raw) if normalisation is not None else raw).to(device)
    check_finite("input", observation)
    subspace = _subspace(args, info.data_shape, observation)
    labels = None if args.labels is None else \
        torch.tensor(args.labels, device=device).repeat(observation.shape[0])[:observation.shape[0]]
    is_image = len(info.data_shape) == 3
    with torch.no_grad():
        result = edit(model, transport, observation, subspace, labels, steps=args.nfe, sigma_min=args.sigma_min,
                      sigma_max=args.sigma_max, clamp=None if args.no_clamp or not is_image else (-1.0, 1.0),
                      generator=fresh_noise_source(args.seed, range(observation.shape[0]))).sample.cpu()
    check_finite_samples(result, f"the {args.task} editor ({args.nfe} NFE, sigma_min={args.sigma_min}, "
                                 f"sigma_max={args.sigma_max})")
    if args.out.suffix == ".png":
        data = normalisation.denormalise(result) if normalisation is not None and not is_image else result
        write_png(data, labels.cpu() if labels is not None else None, args.out)
    else:
        data = normalisation.denormalise(result) if normalisation is not None else result
        write_arrays(data, labels.cpu() if labels is not None else None, args.out,
                     metadata={"checkpoint": info.path, "step": info.step, "task": args.task})
    return result


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of ``ucgm edit`` (bad input raises; the ``ucgm`` dispatcher turns it into one line, exit 2)."""
    args = _parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    result = run_edit(args)
    print(f"ucgm edit: wrote {result.shape[0]} edited samples ({args.task}, {args.nfe} NFE) to {args.out}",
          file=sys.stderr)
    return 0
