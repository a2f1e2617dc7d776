"""Backbones: shapes, conditioning, initialisation, gradients, presets, errors and the diffusers adapter."""

from __future__ import annotations

import sys

import pytest
import torch

from ucgm.models import (
    DIT_SIZES,
    DiffusersModel,
    DiT,
    build_model,
    count_parameters,
    load_diffusers_model,
    parse_dit_name,
    sinusoidal_features,
)
from ucgm.models.diffusers_wrapper import import_diffusers
from ucgm.models.unet import AttentionBlock

NUM_CLASSES = 10
BATCH = 4

TINY_CONFIGS = {
    "mlp": {"name": "mlp", "data_dim": 64, "hidden": 32, "depth": 2},
    "unet": {
        "name": "unet",
        "input_size": 8,
        "in_channels": 1,
        "base_channels": 32,
        "channel_mults": (1, 2),
        "num_res_blocks": 1,
        "attention_resolutions": (4,),
        "attention_head_channels": 32,
    },
    "dit": {
        "name": "dit",
        "input_size": 8,
        "patch_size": 2,
        "in_channels": 1,
        "depth": 2,
        "hidden_size": 32,
        "num_heads": 4,
    },
}


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    """Tiny models run fastest on one thread, especially when other processes share the two cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_model(name: str, num_classes: int | None = NUM_CLASSES, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_model({**TINY_CONFIGS[name], "num_classes": num_classes})


def digits_batch(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Images (B, 1, 8, 8), times in [0, 1] and labels including the null label."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(BATCH, 1, 8, 8, generator=generator)
    t = torch.rand(BATCH, generator=generator)
    labels = torch.tensor([0, 3, 9, NUM_CLASSES])
    return x, t, labels


@torch.no_grad()
def perturb(model: torch.nn.Module, std: float = 0.05, seed: int = 2) -> None:
    """Add noise to every parameter so that zero-initialised layers no longer block the signal."""
    generator = torch.Generator().manual_seed(seed)
    for parameter in model.parameters():
        parameter.add_(std * torch.randn(parameter.shape, generator=generator))


@pytest.mark.parametrize("name", TINY_CONFIGS)
@pytest.mark.parametrize("num_classes", [NUM_CLASSES, None])
def test_output_has_input_shape_and_starts_at_zero(name, num_classes):
    model = tiny_model(name, num_classes)
    x, t, labels = digits_batch()
    output = model(x, t, labels if num_classes else None)
    assert output.shape == x.shape
    assert model.num_classes == num_classes
    assert torch.equal(output, torch.zeros_like(x)), "zero-initialised output layer"


def test_mlp_on_vectors_and_scalar_time():
    torch.manual_seed(0)
    model = build_model({"name": "mlp", "data_dim": 2, "num_classes": 3})
    perturb(model)
    x = torch.randn(5, 2)
    assert model(x, torch.tensor(0.3)).shape == (5, 2)
    assert torch.allclose(model(x, torch.tensor(0.3)), model(x, torch.full((5,), 0.3)))


@pytest.mark.parametrize("name", TINY_CONFIGS)
def test_labels_condition_the_output_and_none_means_null_label(name):
    model = tiny_model(name)
    perturb(model)
    x, t, _ = digits_batch()
    class_a, class_b = torch.zeros(BATCH, dtype=torch.long), torch.full((BATCH,), 7)
    null = torch.full((BATCH,), NUM_CLASSES)
    assert not torch.allclose(model(x, t, class_a), model(x, t, class_b))
    assert torch.equal(model(x, t, None), model(x, t, null))


@pytest.mark.parametrize("name", TINY_CONFIGS)
def test_unconditional_model_ignores_labels(name):
    model = tiny_model(name, num_classes=None)
    perturb(model)
    x, t, labels = digits_batch()
    assert torch.equal(model(x, t, labels), model(x, t, None))


@pytest.mark.parametrize("name", TINY_CONFIGS)
def test_gradients_reach_every_parameter(name):
    model = tiny_model(name)
    perturb(model)
    x, t, labels = digits_batch()
    (model(x, t, labels) * torch.randn_like(x)).sum().backward()
    without_gradient = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert without_gradient == []


@pytest.mark.parametrize("name", TINY_CONFIGS)
def test_forward_is_deterministic_and_reproducible_from_seed(name):
    model, twin = tiny_model(name, seed=5), tiny_model(name, seed=5)
    perturb(model)
    perturb(twin)
    x, t, labels = digits_batch()
    assert torch.equal(model(x, t, labels), model(x, t, labels))
    assert torch.equal(model(x, t, labels), twin(x, t, labels))


@pytest.mark.parametrize("name", TINY_CONFIGS)
@pytest.mark.parametrize("time_value", [0.0, 1.0, 80.0, 999.0, 1e-3])
def test_time_ranges_give_finite_distinct_outputs(name, time_value):
    """t in [0, 1], t * 1000 and EDM sigma up to 80 are all valid network times."""
    model = tiny_model(name)
    perturb(model)
    x, _, labels = digits_batch()
    output = model(x, torch.full((BATCH,), time_value), labels)
    assert torch.isfinite(output).all()
    assert not torch.allclose(output, model(x, torch.full((BATCH,), time_value + 0.5), labels))


def test_sinusoidal_features_are_bounded_and_time_scaled():
    t = torch.tensor([0.0, 0.5, 80.0, 1000.0])
    features = sinusoidal_features(t, 33, time_scale=1000.0)
    assert features.shape == (4, 33) and features.abs().max() <= 1
    assert torch.equal(features[0, :16], torch.ones(16)), "cos(0) = 1"
    assert torch.allclose(sinusoidal_features(t, 8, time_scale=2.0), sinusoidal_features(2 * t, 8, time_scale=1.0))


def test_dit_is_exactly_zero_at_init_and_learns_after_one_step():
    model = tiny_model("dit")
    x, t, labels = digits_batch()
    target = torch.randn_like(x)
    output = model(x, t, labels)
    assert torch.equal(output, torch.zeros_like(x))
    torch.nn.functional.mse_loss(output, target).backward()
    assert model.final.linear.weight.grad.abs().sum() > 0
    assert model.blocks[0].modulation[-1].weight.grad.abs().sum() == 0, "adaLN-zero: trunk is silent at init"

    torch.optim.SGD(model.parameters(), lr=0.5).step()
    model.zero_grad()
    output = model(x, t, labels)
    assert output.abs().sum() > 0
    torch.nn.functional.mse_loss(output, target).backward()
    assert model.blocks[0].modulation[-1].weight.grad.abs().sum() > 0


def test_dit_unpatchify_inverts_row_major_patch_order():
    model = tiny_model("dit")
    x = torch.randn(2, 1, 8, 8)
    grid, p = 4, 2
    patches = x.reshape(2, 1, grid, p, grid, p).permute(0, 2, 4, 3, 5, 1).reshape(2, grid * grid, p * p)
    assert torch.equal(model.unpatchify(patches), x)


def test_dit_xl2_has_about_675m_parameters_on_meta_device():
    with torch.device("meta"):
        model = build_model({"name": "DiT-XL/2", "input_size": 32, "in_channels": 4, "num_classes": 1000})
    assert all(p.is_meta for p in model.parameters())
    assert (model.patch_size, len(model.blocks)) == (2, 28)
    assert abs(count_parameters(model) - 675e6) < 1e6


def test_dit_presets_and_names():
    assert DIT_SIZES["S"] == (12, 384, 6) and DIT_SIZES["B"] == (12, 768, 12)
    assert DIT_SIZES["L"] == (24, 1024, 16) and DIT_SIZES["XL"] == (28, 1152, 16)
    assert parse_dit_name("DiT-XL/2") == ("XL", 2) and parse_dit_name("SiT-B/4") == ("B", 4)
    with torch.device("meta"):
        model = DiT.from_name("DiT-S/4", input_size=32, in_channels=4)
    assert (model.patch_size, len(model.blocks)) == (4, 12)
    assert model.blocks[0].modulation[-1].out_features == 6 * 384
    extra_small = build_model({"name": "DiT-XS/2", "input_size": 8, "in_channels": 1, "num_classes": NUM_CLASSES})
    assert extra_small(*digits_batch()).shape == (BATCH, 1, 8, 8)
    assert build_model({"name": "dit", "size": "xs", "input_size": 8, "in_channels": 1}).hidden_size == 192


def test_unet_places_attention_at_listed_resolutions():
    def attention_count(resolutions):
        config = {**TINY_CONFIGS["unet"], "attention_resolutions": resolutions}
        return sum(isinstance(m, AttentionBlock) for m in build_model(config).modules())

    middle = 1
    # one block down, two up at the attended level
    assert attention_count(()) == middle
    assert attention_count((4,)) == middle + 1 + 2
    assert attention_count((8, 4)) == middle + 2 * (1 + 2)


def test_unet_scales_up_by_config():
    torch.manual_seed(0)
    model = build_model(
        {"name": "unet", "input_size": 16, "in_channels": 3, "base_channels": 32,
         "channel_mults": (1, 2, 2), "num_res_blocks": 2, "attention_resolutions": (8,), "dropout": 0.1}
    )
    perturb(model)
    model.eval()
    x = torch.randn(2, 3, 16, 16)
    assert model(x, torch.rand(2)).shape == x.shape
    assert count_parameters(model) > count_parameters(tiny_model("unet"))


def test_count_parameters_trainable_only():
    model = tiny_model("mlp")
    total = count_parameters(model)
    model.input.weight.requires_grad_(False)
    assert count_parameters(model, trainable_only=True) == total - model.input.weight.numel()


@pytest.mark.parametrize(
    "config, message",
    [
        ({"name": "resnet"}, "allowed: mlp, unet, dit"),
        ({"hidden": 3}, "needs a 'name'"),
        ({"name": "mlp", "data_dim": 4, "width": 3}, "unknown key(s) ['width']"),
        ({"name": "mlp"}, "needs the key(s) ['data_dim']"),
        ({"name": "dit", "size": "XXL"}, "allowed values: 'XS', 'S', 'B', 'L', 'XL'"),
        ({"name": "DiT-H/2"}, "allowed: DiT-XS/<patch>"),
        ({"name": "DiT-XL/2", "patch_size": 4}, "'patch_size' is set by the name"),
        ({"name": "dit", "input_size": 8, "patch_size": 3}, "allowed patch sizes: [1, 2, 4, 8]"),
        ({"name": "dit", "hidden_size": 36, "num_heads": 8, "depth": 1}, "divisible by the number of attention heads"),
        ({**TINY_CONFIGS["unet"], "attention_resolutions": (2,)}, "allowed: [8, 4]"),
        ({**TINY_CONFIGS["unet"], "input_size": 9}, "divisible by 2^(len(channel_mults) - 1) = 2"),
        ({**TINY_CONFIGS["mlp"], "num_classes": 0}, "num_classes"),
    ],
)
def test_bad_configs_raise_value_error(config, message):
    with pytest.raises(ValueError) as error:
        build_model(config)
    assert message in str(error.value)


@pytest.mark.parametrize("name", TINY_CONFIGS)
def test_bad_inputs_raise_value_error(name):
    model = tiny_model(name)
    x, t, _ = digits_batch()
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 10\]"):
        model(x, t, torch.full((BATCH,), NUM_CLASSES + 1))
    with pytest.raises(ValueError, match="labels must lie"):
        model(x, t, torch.full((BATCH,), -1))
    with pytest.raises(ValueError, match="integer tensor"):
        model(x, t, torch.zeros(BATCH))
    with pytest.raises(ValueError, match="shape"):
        model(torch.randn(BATCH, 2, 8, 8), t, None)
    with pytest.raises(ValueError, match="time must be a scalar or have shape"):
        model(x, torch.rand(BATCH + 1), None)


# ----------------------------------------------------------------------------------------------- diffusers
def tiny_diffusers_unet(num_class_embeds: int | None = None):
    torch.manual_seed(0)
    module = import_diffusers().UNet2DModel(
        sample_size=8,
        in_channels=1,
        out_channels=1,
        block_out_channels=(8, 16),
        layers_per_block=1,
        norm_num_groups=4,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        num_class_embeds=num_class_embeds,
    )
    perturb(module)
    return module.eval()


def test_diffusers_unet_round_trip_through_local_directory(tmp_path):
    module = tiny_diffusers_unet()
    module.save_pretrained(tmp_path)
    for kind in ("auto", "unet"):
        loaded = load_diffusers_model(tmp_path, kind=kind).eval()
        x, t, labels = digits_batch()
        with torch.no_grad():
            expected = module(x, timestep=t * 1000.0).sample
            assert torch.allclose(loaded(x, t, labels), expected, atol=1e-6), "unconditional: labels ignored"
            assert torch.allclose(DiffusersModel(module)(x, t), expected)
        assert loaded.num_classes is None


def test_diffusers_class_conditional_unet_and_time_scale():
    module = tiny_diffusers_unet(num_class_embeds=NUM_CLASSES + 1)
    model = DiffusersModel(module, time_scale=1.0, num_classes=NUM_CLASSES)
    x, t, labels = digits_batch()
    with torch.no_grad():
        expected = module(x, timestep=t, class_labels=labels).sample
        assert torch.allclose(model(x, t, labels), expected)
        null = module(x, timestep=t, class_labels=torch.full((BATCH,), NUM_CLASSES)).sample
        assert torch.allclose(model(x, t, None), null)
    with pytest.raises(ValueError, match="labels must lie"):
        model(x, t, torch.full((BATCH,), NUM_CLASSES + 1))


def test_diffusers_dit_drops_learned_sigma_channels(tmp_path):
    torch.manual_seed(0)
    module = import_diffusers().DiTTransformer2DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=1,
        sample_size=8, patch_size=2, num_embeds_ada_norm=NUM_CLASSES, norm_num_groups=4,
    )
    perturb(module)
    module.save_pretrained(tmp_path)
    model = load_diffusers_model(tmp_path, kind="dit").eval()
    x, t = torch.randn(BATCH, 4, 8, 8), torch.rand(BATCH)
    labels = torch.tensor([0, 1, 9, NUM_CLASSES])
    with torch.no_grad():
        full = module.eval()(hidden_states=x, timestep=t * 1000.0, class_labels=labels).sample
        assert full.shape == (BATCH, 8, 8, 8)
        assert torch.allclose(model(x, t, labels), full[:, :4], atol=1e-6)
    assert model.num_classes == NUM_CLASSES


def test_diffusers_loader_errors(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_diffusers_model(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_diffusers_model(tmp_path)
    with pytest.raises(ValueError, match="allowed values: 'auto', 'unet', 'dit'"):
        load_diffusers_model(tmp_path, kind="vae")
    (tmp_path / "config.json").write_text('{"_class_name": "AutoencoderKL"}')
    with pytest.raises(ValueError, match="'UNet2DModel', 'DiTTransformer2DModel'"):
        load_diffusers_model(tmp_path)
    monkeypatch.setitem(sys.modules, "diffusers", None)
    with pytest.raises(ImportError, match=r"pip install ucgm\[diffusers\]"):
        load_diffusers_model(tmp_path, kind="unet")


@pytest.mark.parametrize("name", TINY_CONFIGS)
def test_conditions_through_config_start_as_the_plain_model_and_then_condition_the_output(name):
    """MLP, UNet and DiT take a second time ``s`` and a self-conditioning input through ``conditions``: the condition
    layers start at zero (the plain model's output, its weights load as they are), then both conditions change the
    output; a condition the model was not built with is an error."""
    plain = tiny_model(name)
    perturb(plain)
    torch.manual_seed(0)
    conditioned = build_model({**TINY_CONFIGS[name], "num_classes": NUM_CLASSES, "conditions": ["s", "self_condition"]})
    missing, unexpected = conditioned.load_state_dict(plain.state_dict(), strict=False)
    assert not unexpected and missing and all(key.startswith("conditions.") for key in missing)
    x, t, labels = digits_batch()
    x = x.flatten(1) if name == "mlp" else x
    estimate = torch.randn_like(x)
    with torch.no_grad():
        torch.testing.assert_close(conditioned(x, t, labels, s=t / 2, self_condition=estimate), plain(x, t, labels))
        perturb(conditioned, seed=3)
        base = conditioned(x, t, labels, s=t / 2, self_condition=estimate)
        assert not torch.allclose(base, conditioned(x, t, labels, s=t / 3, self_condition=estimate))
        assert not torch.allclose(base, conditioned(x, t, labels, s=t / 2, self_condition=2 * estimate))
    with pytest.raises(ValueError, match="step"):
        conditioned(x, t, labels, step=t)
