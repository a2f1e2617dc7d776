"""Datasets: shapes, ranges, normalisation round trips, deterministic batches and clear errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from ucgm.data import (
    AffineNormalisation,
    DigitsDataset,
    ImageFolderDataset,
    LatentsDataset,
    MixtureDataset,
    build_dataset,
    load_digits_split,
)


def generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def write_png(path, size, mode="RGB", seed=0):
    height, width = size
    channels = 3 if mode == "RGB" else 1
    pixels = np.random.default_rng(seed).integers(0, 256, size=(height, width, channels), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels if mode == "RGB" else pixels[:, :, 0], mode=mode).save(path)
    return pixels


@pytest.fixture
def image_root(tmp_path):
    """Two classes, 'zebra' and 'ant' (so sorted order differs from creation order), 3 PNGs each of 6x4."""
    root = tmp_path / "images"
    pixels = {}
    for class_name in ("zebra", "ant"):
        for index in range(3):
            path = root / class_name / f"{index}.png"
            pixels[path] = write_png(path, (6, 4), seed=len(pixels))
    return root, pixels


@pytest.fixture
def latents_file(tmp_path):
    raw = torch.randn(40, 3, 4, 4, generator=generator(0)) * torch.tensor([1.0, 5.0, 0.2]).reshape(1, 3, 1, 1)
    raw += torch.tensor([2.0, -3.0, 0.5]).reshape(1, 3, 1, 1)
    labels = torch.arange(40) % 4
    path = tmp_path / "latents.safetensors"
    save_file({"latents": raw, "labels": labels}, str(path))
    return path, raw, labels


# ------------------------------------------------------------------------------------------- normalisation
def test_affine_normalisation_round_trip_global_and_per_channel():
    batch = torch.randn(5, 3, 2, 2, generator=generator(0))
    for normaliser in (AffineNormalisation(0.5, -1.0), AffineNormalisation([1.0, 2.0, 4.0], [0.0, 1.0, -1.0])):
        restored = AffineNormalisation.from_dict(normaliser.to_dict())
        torch.testing.assert_close(restored.denormalise(normaliser.normalise(batch)), batch)
    assert AffineNormalisation(2.0, 0.5).to_dict() == {"kind": "affine", "scale": 2.0, "shift": 0.5}


def test_affine_normalisation_rejects_zero_scale_and_wrong_channels():
    with pytest.raises(ValueError, match="non-zero"):
        AffineNormalisation(0.0, 1.0)
    with pytest.raises(ValueError, match="channels"):
        AffineNormalisation([1.0, 2.0], 0.0).normalise(torch.zeros(2, 3, 4))


# ------------------------------------------------------------------------------------------- digits
def test_digits_shapes_range_and_round_trip():
    dataset = DigitsDataset("train")
    assert dataset.shape == (1, 8, 8) and dataset.num_classes == 10 and len(dataset) == 1437
    assert dataset.data.dtype == torch.float32
    assert dataset.data.min() == -1.0 and dataset.data.max() == 1.0
    raw, labels = load_digits_split("train")
    torch.testing.assert_close(dataset.denormalise(dataset.data), raw)
    assert torch.equal(dataset.labels, labels)
    assert dataset.normalisation == {"kind": "affine", "scale": 0.125, "shift": -1.0}


def test_digits_splits_partition_the_data():
    train, heldout, every = (load_digits_split(split)[0] for split in ("train", "heldout", "all"))
    assert len(heldout) == 360 and len(train) + len(heldout) == len(every) == 1797
    assert torch.equal(heldout, every[::5])
    with pytest.raises(ValueError, match="split"):
        DigitsDataset("validation")


# ------------------------------------------------------------------------------------------- mixture
def test_mixture_dataset_draws_fresh_labelled_samples():
    dataset = build_dataset({"name": "mixture", "mixture": "8gaussians"})
    x, labels = dataset.sample_batch(256, generator(0))
    assert x.shape == (256, 2) and x.dtype == torch.float32 and dataset.shape == (2,)
    assert dataset.num_classes == dataset.mixture.num_classes == 8
    assert labels.shape == (256,) and 0 <= labels.min() and labels.max() < 8
    torch.testing.assert_close(x.norm(dim=1).mean(), torch.tensor(1.0), atol=0.05, rtol=0)
    assert not torch.equal(x, dataset.sample_batch(256, generator(1))[0])
    assert torch.equal(dataset.denormalise(x), x)


def test_unconditional_mixture_has_no_labels():
    dataset = MixtureDataset("grid", mixture_options={"n": 3}, conditional=False)
    x, labels = dataset.sample_batch(10, generator(0))
    assert labels is None and dataset.num_classes == 0 and x.shape == (10, 2)


# ------------------------------------------------------------------------------------------- determinism
@pytest.mark.parametrize("name", ["mixture", "digits", "image_folder", "latents"])
def test_sample_batch_is_determined_by_the_generator(name, image_root, latents_file):
    options = {"image_folder": {"root": image_root[0]}, "latents": {"path": latents_file[0]}}.get(name, {})
    dataset = build_dataset({"name": name, **options})
    first_x, first_labels = dataset.sample_batch(16, generator(7))
    again_x, again_labels = dataset.sample_batch(16, generator(7))
    other_x, _ = dataset.sample_batch(16, generator(8))
    assert torch.equal(first_x, again_x) and torch.equal(first_labels, again_labels)
    assert not torch.equal(first_x, other_x)
    assert first_x.shape == (16, *dataset.shape) and first_x.dtype == torch.float32


# ------------------------------------------------------------------------------------------- image folder
def test_image_folder_labels_sorted_classes_and_round_trips_pixels(image_root):
    root, pixels = image_root
    dataset = ImageFolderDataset(root)
    assert dataset.class_names == ["ant", "zebra"] and dataset.num_classes == 2
    assert dataset.shape == (3, 6, 4) and len(dataset) == 6
    x, labels = dataset.batch(torch.arange(6))
    assert x.min() >= -1 and x.max() <= 1 and labels.tolist() == [0, 0, 0, 1, 1, 1]
    restored = dataset.denormalise(x).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    for index, path in enumerate(dataset.files):
        np.testing.assert_array_equal(restored[index], pixels[path])


def test_image_folder_grayscale_and_resize(image_root):
    dataset = build_dataset({"name": "image_folder", "root": str(image_root[0]), "image_size": [8, 5], "mode": "L"})
    x, _ = dataset.sample_batch(4, generator(0))
    assert dataset.shape == (1, 8, 5) and x.shape == (4, 1, 8, 5)
    assert x.min() >= -1 and x.max() <= 1


def test_image_folder_mixed_sizes_need_image_size(tmp_path):
    write_png(tmp_path / "a" / "small.png", (4, 4))
    write_png(tmp_path / "b" / "large.png", (8, 8))
    with pytest.raises(ValueError, match="different sizes.*image_size"):
        ImageFolderDataset(tmp_path)
    dataset = ImageFolderDataset(tmp_path, image_size=6)
    assert dataset.batch(torch.tensor([0, 1]))[0].shape == (2, 3, 6, 6)


def test_image_folder_errors(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        ImageFolderDataset(tmp_path / "missing")
    with pytest.raises(ValueError, match="no class sub-folders"):
        ImageFolderDataset(tmp_path)
    (tmp_path / "empty_class").mkdir()
    (tmp_path / "empty_class" / "notes.txt").write_text("not an image")
    with pytest.raises(ValueError, match="holds no images"):
        ImageFolderDataset(tmp_path)
    with pytest.raises(ValueError, match="mode"):
        ImageFolderDataset(tmp_path, mode="CMYK")
    with pytest.raises(ValueError, match="image_size"):
        ImageFolderDataset(tmp_path, image_size=(0, 4))


# ------------------------------------------------------------------------------------------- latents
def test_latents_per_channel_scaling_standardises_and_round_trips(latents_file):
    path, raw, labels = latents_file
    dataset = LatentsDataset(path)
    assert dataset.shape == (3, 4, 4) and dataset.num_classes == 4 and torch.equal(dataset.labels, labels)
    torch.testing.assert_close(dataset.data.mean(dim=(0, 2, 3)), torch.zeros(3), atol=1e-5, rtol=0)
    torch.testing.assert_close(dataset.data.std(dim=(0, 2, 3), correction=0), torch.ones(3), atol=1e-5, rtol=0)
    torch.testing.assert_close(dataset.denormalise(dataset.data), raw, atol=1e-5, rtol=1e-5)
    assert len(dataset.normalisation["scale"]) == 3


def test_latents_global_and_no_scaling_from_npy(tmp_path, latents_file):
    _, raw, labels = latents_file
    np.save(tmp_path / "raw.npy", raw.numpy())
    np.save(tmp_path / "labels.npy", labels.numpy())
    scaled = build_dataset({"name": "latents", "path": str(tmp_path / "raw.npy"), "scaling": "global"})
    assert scaled.labels is None and scaled.num_classes == 0
    assert isinstance(scaled.normalisation["scale"], float)
    torch.testing.assert_close(scaled.data.std(correction=0), torch.tensor(1.0), atol=1e-5, rtol=0)
    plain = LatentsDataset(tmp_path / "raw.npy", labels_path=tmp_path / "labels.npy", scaling="none")
    assert torch.equal(plain.data, raw) and torch.equal(plain.labels, labels)


def test_latents_errors(tmp_path):
    bad = torch.randn(4, 2)
    bad[1, 0] = float("nan")
    save_file({"latents": bad}, str(tmp_path / "nan.safetensors"))
    with pytest.raises(ValueError, match=r"NaN or Inf values at index 1 \(1 of 4"):  # names the sample
        LatentsDataset(tmp_path / "nan.safetensors")
    save_file({"latents": torch.randn(4, 2), "labels": torch.arange(3)}, str(tmp_path / "short.safetensors"))
    with pytest.raises(ValueError, match="labels have shape"):
        LatentsDataset(tmp_path / "short.safetensors")
    save_file({"codes": torch.randn(4, 2)}, str(tmp_path / "keys.safetensors"))
    with pytest.raises(ValueError, match="'latents'"):
        LatentsDataset(tmp_path / "keys.safetensors")
    with pytest.raises(ValueError, match="does not exist"):
        LatentsDataset(tmp_path / "missing.npy")
    with pytest.raises(ValueError, match="scaling"):
        LatentsDataset(tmp_path / "keys.safetensors", scaling="minmax")


# ------------------------------------------------------------------------------------------- VAE latents
@pytest.fixture
def tiny_vae_dir(tmp_path):
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    vae = diffusers.AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(8, 8),
        layers_per_block=1,
        latent_channels=2,
        norm_num_groups=4,
        sample_size=8,
    )
    vae.save_pretrained(tmp_path / "vae")
    return tmp_path / "vae"


def test_vae_images_encode_decode_shapes_and_determinism(image_root, tiny_vae_dir):
    config = {"name": "vae_images", "root": str(image_root[0]), "vae_path": str(tiny_vae_dir), "image_size": 8}
    dataset = build_dataset({**config, "posterior": "sample"})
    assert dataset.shape == (2, 4, 4) and dataset.num_classes == 2
    assert dataset.normalisation == {"kind": "affine", "scale": dataset.vae.config.scaling_factor, "shift": 0.0}
    x, labels = dataset.sample_batch(3, generator(0))
    assert x.shape == (3, 2, 4, 4) and x.dtype == torch.float32 and labels.shape == (3,)
    assert torch.equal(x, dataset.sample_batch(3, generator(0))[0])
    assert dataset.decode(x).shape == (3, 3, 8, 8)

    mean_dataset = build_dataset({**config, "scaling_factor": 0.5})
    means, _ = mean_dataset.batch(torch.tensor([0, 1]))
    images, _ = mean_dataset.images.batch(torch.tensor([0, 1]))
    expected = mean_dataset.vae.encode(images).latent_dist.mean * 0.5
    torch.testing.assert_close(means, expected)
    torch.testing.assert_close(mean_dataset.denormalise(means), expected / 0.5)


def test_vae_images_missing_vae_is_a_clear_error(image_root, tmp_path):
    with pytest.raises(ValueError, match="no VAE found"):
        build_dataset({"name": "vae_images", "root": str(image_root[0]), "vae_path": str(tmp_path / "nowhere")})


# ------------------------------------------------------------------------------------------- build_dataset
def test_build_dataset_rejects_unknown_names_and_options():
    with pytest.raises(ValueError, match="'imagenet'.*'digits'"):
        build_dataset({"name": "imagenet"})
    with pytest.raises(ValueError, match="'resolution'.*'digits'.*allowed options: 'split'"):
        build_dataset({"name": "digits", "resolution": 8})
    with pytest.raises(ValueError, match="needs the option\\(s\\) 'path'"):
        build_dataset({"name": "latents"})
    with pytest.raises(ValueError, match="'name'"):
        build_dataset({"split": "train"})
