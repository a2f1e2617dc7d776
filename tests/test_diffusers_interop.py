"""diffusers interop: UCGMScheduler in diffusers denoising loops, and UCGM-S on diffusers models saved locally.

All models are tiny, randomly initialised from configs (every parameter perturbed so that zero-initialised output
layers do not hide the signal) and, where loading is tested, saved to and read back from a tmp directory.
"""

import json

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from ucgm.conventions import diffusers_flow_transport  # noqa: E402
from ucgm.interop.diffusers_models import (  # noqa: E402
    PromptConditionedTransformer,
    decode_latents,
    load_denoiser,
    sample_diffusers_model,
)
from ucgm.interop.diffusers_scheduler import UCGMScheduler  # noqa: E402
from ucgm.interop.diffusers_transports import (  # noqa: E402
    DiscreteVPPath,
    diffusers_vp_transport,
    transport_from_scheduler_config,
)
from ucgm.sampling.ucgm_sampler import ucgm_sample  # noqa: E402

BATCH = 2
NUM_CLASSES = 3


def perturbed(module: torch.nn.Module, std: float = 0.05, seed: int = 3) -> torch.nn.Module:
    """Add Gaussian noise to every parameter (diffusers zero-initialises some output layers)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.add_(std * torch.randn(parameter.shape, generator=generator))
    return module.eval()


@pytest.fixture(scope="module")
def sd3():
    """A tiny SD3 flow-matching transformer wrapped with fixed random prompt embeddings."""
    torch.manual_seed(0)
    module = diffusers.SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=1, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=12, caption_projection_dim=16, pooled_projection_dim=6,
        pos_embed_max_size=8,
    )
    generator = torch.Generator().manual_seed(1)
    prompt = torch.randn(1, 5, 12, generator=generator), torch.randn(1, 6, generator=generator)
    return perturbed(module), prompt


@pytest.fixture(scope="module")
def unet():
    torch.manual_seed(0)
    module = diffusers.UNet2DModel(
        sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
        norm_num_groups=4, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
    )
    return perturbed(module)


def noise_like(shape, seed=0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def denoising_loop(scheduler, model, noise, steps, generator=None):
    """The standard diffusers loop: ``model(x, timestep)`` returns the raw model output (flow-matching schedulers
    have neither ``init_noise_sigma`` nor ``scale_model_input``: their loops use the noise and state as they are)."""
    scheduler.set_timesteps(steps)
    x = noise * getattr(scheduler, "init_noise_sigma", 1.0)
    for timestep in scheduler.timesteps:
        model_input = scheduler.scale_model_input(x, timestep) if hasattr(scheduler, "scale_model_input") else x
        output = model(model_input, timestep)
        x = scheduler.step(output, timestep, x, generator=generator).prev_sample
    return x


# ------------------------------------------------------------------------------------------- scheduler
@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_order_one_without_extrapolation_matches_flow_match_euler(sd3, shift):
    module, prompt = sd3
    model = PromptConditionedTransformer(module, *prompt)
    euler = diffusers.FlowMatchEulerDiscreteScheduler(shift=shift)
    # FlowMatchEuler's grid (sigma: 1 ... sigma_min = shifted 1/1000, then 0) is UCGM-S's with gaps (0, sigma_min).
    ucgm = UCGMScheduler(shift=shift, gaps=(0.0, euler.sigma_min), time_warp=(1.0, 1.0, 1.0))
    noise = noise_like((BATCH, 4, 8, 8))
    expected = denoising_loop(euler, model, noise, steps=6)
    result = denoising_loop(ucgm, model, noise, steps=6)
    assert torch.allclose(ucgm.sigmas, euler.sigmas, atol=1e-6)
    assert torch.allclose(ucgm.timesteps, euler.timesteps, atol=1e-3)
    assert expected.abs().mean() > 0.1
    assert torch.allclose(result, expected, atol=1e-5)


@pytest.mark.parametrize(
    "settings",
    [
        dict(extrapolation=0.5, time_warp=(1.17, 0.8, 1.1), gaps=(0.001, 0.001)),
        dict(extrapolation=0.3, stochasticity=0.5, time_warp=(1.2, 0.72, 1.2), gaps=(0.0, 0.002)),
        dict(stochasticity="sde", gaps=(0.01, 0.0)),
    ],
)
def test_scheduler_loop_equals_ucgm_sample_on_flow_transport(sd3, settings):
    module, prompt = sd3
    model = PromptConditionedTransformer(module, *prompt)
    noise, steps = noise_like((BATCH, 4, 8, 8)), 7
    scheduler = UCGMScheduler(**settings)
    result = denoising_loop(scheduler, model, noise, steps, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        expected = ucgm_sample(model, diffusers_flow_transport(), noise, steps=steps,
                               generator=torch.Generator().manual_seed(5), **settings).sample
    assert torch.isfinite(expected).all() and expected.abs().mean() > 0.1
    assert torch.allclose(result, expected, atol=1e-5)


def test_scheduler_output_and_last_step_return_the_data_prediction(sd3):
    module, prompt = sd3
    model = PromptConditionedTransformer(module, *prompt)
    scheduler = UCGMScheduler(extrapolation=0.5)
    scheduler.set_timesteps(3)
    x = noise_like((BATCH, 4, 8, 8))
    with torch.no_grad():
        for index, timestep in enumerate(scheduler.timesteps):
            output = model(x, timestep)
            step = scheduler.step(output, timestep, x)
            t = scheduler.sigmas[index]
            assert torch.allclose(step.pred_original_sample, x - t * output, atol=1e-6), "x_hat = x_t - t v"
            as_tuple = (step.prev_sample, step.pred_original_sample)
            x = step.prev_sample
    assert torch.equal(as_tuple[0], as_tuple[1]), "the last step returns the data prediction"
    assert scheduler.step_index == 3 and scheduler.scale_model_input(x, timestep) is x and len(scheduler) == 1000


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_vp_prediction_types_match_ddim(unet, prediction_type):
    """UCGM-S with rho = kappa = 0 is DDIM (eta = 0) on the same discrete VP grid: DDIM's trailing timesteps
    999, 899, ..., 99 are the float indices t (T - 1) of UCGM-S's grid with gaps (0, 99/999)."""
    model = lambda x, timestep: unet(x, timestep).sample  # noqa: E731
    ddim = diffusers.DDIMScheduler(clip_sample=False, set_alpha_to_one=True, timestep_spacing="trailing",
                                   prediction_type=prediction_type)
    ucgm = UCGMScheduler(prediction_type=prediction_type, gaps=(0.0, 99 / 999))
    noise = noise_like((BATCH, 1, 8, 8))
    expected = denoising_loop(ddim, model, noise, steps=10)
    result = denoising_loop(ucgm, model, noise, steps=10)
    assert torch.allclose(ucgm.timesteps, ddim.timesteps.float(), atol=1e-3)
    assert torch.allclose(result, expected, rtol=1e-4, atol=1e-4)


def test_scheduler_in_a_diffusers_pipeline_takes_over_its_scheduler_config(unet):
    """``UCGMScheduler.from_config(pipeline.scheduler.config)`` in diffusers' own ``DDPMPipeline`` reproduces DDIM."""
    ddim = diffusers.DDIMScheduler(clip_sample=False, timestep_spacing="trailing", prediction_type="v_prediction",
                                   beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    pipeline = diffusers.DDPMPipeline(unet=unet, scheduler=ddim)
    pipeline.set_progress_bar_config(disable=True)
    settings = {"batch_size": BATCH, "num_inference_steps": 10, "output_type": "np"}
    expected = pipeline(generator=torch.Generator().manual_seed(0), **settings).images
    pipeline.scheduler = UCGMScheduler.from_config(ddim.config, gaps=(0.0, 99 / 999))
    assert pipeline.scheduler.config.prediction_type == "v_prediction"
    assert pipeline.scheduler.config.beta_schedule == "scaled_linear"
    result = pipeline(generator=torch.Generator().manual_seed(0), **settings).images
    assert 0.05 < expected.std() and torch.allclose(torch.from_numpy(result), torch.from_numpy(expected), atol=1e-5)
    flow = UCGMScheduler.from_config(diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0).config)
    assert flow.config.prediction_type == "flow" and flow.config.shift == 3.0


def test_config_round_trip(tmp_path):
    scheduler = UCGMScheduler(shift=2.0, stochasticity="sde", extrapolation=0.4, time_warp=(1.17, 0.8, 1.1),
                              gaps=(0.0, 0.01), prediction_type="v_prediction", beta_schedule="scaled_linear",
                              beta_start=0.00085, beta_end=0.012)
    scheduler.save_config(tmp_path)
    saved = json.loads((tmp_path / "scheduler_config.json").read_text())
    assert saved["_class_name"] == "UCGMScheduler" and saved["time_warp"] == [1.17, 0.8, 1.1]
    for loaded in (UCGMScheduler.from_pretrained(str(tmp_path)), UCGMScheduler.from_config(scheduler.config)):
        for key in ("shift", "stochasticity", "extrapolation", "prediction_type", "beta_schedule", "beta_start"):
            assert loaded.config[key] == scheduler.config[key]
        assert list(loaded.config.time_warp) == [1.17, 0.8, 1.1] and list(loaded.config.gaps) == [0.0, 0.01]
        loaded.set_timesteps(5), scheduler.set_timesteps(5)
        assert torch.equal(loaded.timesteps, scheduler.timesteps) and torch.equal(loaded.sigmas, scheduler.sigmas)


@pytest.mark.parametrize(
    "settings, message",
    [
        (dict(prediction_type="x0"), "prediction_type"),
        (dict(stochasticity=1.5), "stochasticity"),
        (dict(stochasticity="ode"), "stochasticity"),
        (dict(extrapolation=-0.1), "extrapolation"),
        (dict(time_warp=(1.0, 1.0)), "time_warp"),
        (dict(gaps=(0.6, 0.5)), "gaps"),
        (dict(shift=0.0), "shift"),
        (dict(beta_schedule="cosine"), "beta_schedule"),
        (dict(num_train_timesteps=1), "num_train_timesteps"),
    ],
)
def test_scheduler_rejects_unsupported_settings(settings, message):
    with pytest.raises(ValueError, match=message):
        UCGMScheduler(**settings)


def test_scheduler_step_errors():
    scheduler = UCGMScheduler()
    x = torch.zeros(1, 1, 2, 2)
    with pytest.raises(ValueError, match="set_timesteps"):
        scheduler.step(x, 999.0, x)
    with pytest.raises(ValueError, match="num_inference_steps"):
        scheduler.set_timesteps(0)
    scheduler.set_timesteps(2)
    with pytest.raises(ValueError, match="not one of the scheduler's timesteps"):
        scheduler.step(x, 123.0, x)
    first, second = scheduler.timesteps
    scheduler.step(x, first, x)
    with pytest.raises(ValueError, match="does not match step 1"):
        scheduler.step(x, first, x)
    scheduler.step(x, second, x)
    with pytest.raises(ValueError, match="all 2 steps were taken"):
        scheduler.step(x, second, x)


# ------------------------------------------------------------------------------------- VP transport
def test_discrete_vp_path_is_exact_at_trained_indices():
    alphas_cumprod = diffusers.DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085,
                                             beta_end=0.012).alphas_cumprod
    path = DiscreteVPPath(alphas_cumprod)
    t = torch.arange(1000, dtype=torch.float64) / 999
    assert torch.allclose(path.gamma(t) ** 2, alphas_cumprod.double(), rtol=1e-12)
    assert torch.allclose(path.alpha(t) ** 2 + path.gamma(t) ** 2, torch.ones_like(t))
    between = torch.tensor([0.1234, 0.5, 0.87654], dtype=torch.float64)
    step = 1e-7
    assert torch.allclose((path.gamma(between + step) - path.gamma(between - step)) / (2 * step),
                          path.gamma_dot(between), rtol=1e-5)
    assert torch.allclose((path.alpha(between + step) - path.alpha(between - step)) / (2 * step),
                          path.alpha_dot(between), rtol=1e-5)
    assert torch.allclose(path.time_for_ratio(path.alpha(between) / path.gamma(between)), between)
    transport = diffusers_vp_transport(alphas_cumprod, "epsilon")
    assert torch.allclose(transport.network_time(between), between * 999)


def test_transport_from_scheduler_configs(tmp_path):
    flow = transport_from_scheduler_config(diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0))
    assert flow.parameterisation == "velocity" and float(flow.network_time(torch.tensor(0.25))) == 250.0
    vp = transport_from_scheduler_config(diffusers.EulerDiscreteScheduler(prediction_type="v_prediction"))
    assert vp.parameterisation == "v" and isinstance(vp.path, DiscreteVPPath)
    assert transport_from_scheduler_config(UCGMScheduler(prediction_type="sample")).parameterisation == "data"
    with pytest.raises(ValueError, match="neither a flow-matching schedule"):
        transport_from_scheduler_config(dict(diffusers.FlowMatchEulerDiscreteScheduler().config))
    with pytest.raises(ValueError, match="neither a flow-matching schedule nor a beta schedule"):
        transport_from_scheduler_config({"_class_name": "ScoreSdeVeScheduler", "sigma_max": 50.0})
    with pytest.raises(ValueError, match="rescale_betas_zero_snr"):
        transport_from_scheduler_config(diffusers.DDIMScheduler(rescale_betas_zero_snr=True))
    with pytest.raises(FileNotFoundError, match="scheduler_config.json"):
        transport_from_scheduler_config(tmp_path)
    with pytest.raises(ValueError, match="prediction_type"):
        transport_from_scheduler_config({"beta_schedule": "linear", "prediction_type": "score"})


# ------------------------------------------------------------------------------------ model sampling
def test_epsilon_unet_from_directory_equals_ddim_loop(unet, tmp_path):
    unet.save_pretrained(tmp_path / "unet")
    ddim = diffusers.DDIMScheduler(clip_sample=False, set_alpha_to_one=True, timestep_spacing="trailing")
    ddim.save_config(tmp_path / "scheduler")
    noise = noise_like((BATCH, 1, 8, 8))
    expected = denoising_loop(ddim, lambda x, timestep: unet(x, timestep).sample, noise, steps=10)
    sample = sample_diffusers_model(tmp_path / "unet", scheduler=tmp_path / "scheduler", noise=noise,
                                    steps=10, gaps=(0.0, 99 / 999))
    assert sample.shape == noise.shape and torch.isfinite(sample).all()
    assert torch.allclose(sample, expected, rtol=1e-4, atol=1e-4)

    diffusers.DDPMPipeline(unet=unet, scheduler=ddim).save_pretrained(tmp_path / "pipeline")
    from_pipeline = sample_diffusers_model(tmp_path / "pipeline", noise=noise, steps=10, gaps=(0.0, 99 / 999))
    assert torch.equal(from_pipeline, sample)


def test_class_conditional_dit_with_learned_sigma(tmp_path):
    torch.manual_seed(0)
    module = diffusers.DiTTransformer2DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=1,
        sample_size=8, patch_size=2, num_embeds_ada_norm=NUM_CLASSES, norm_num_groups=4,
    )
    perturbed(module).save_pretrained(tmp_path)
    labels = torch.tensor([0, 2])

    def draw(seed):
        return sample_diffusers_model(tmp_path, scheduler=diffusers.DDPMScheduler(), batch_size=BATCH,
                                      labels=labels, generator=torch.Generator().manual_seed(seed),
                                      steps=4, extrapolation=0.3, time_warp=(1.17, 0.8, 1.1))

    first = draw(0)
    assert first.shape == (BATCH, 4, 8, 8) and torch.isfinite(first).all()
    assert torch.equal(first, draw(0)) and not torch.allclose(first, draw(1))


def test_sd3_transformer_with_vae(sd3, tmp_path):
    module, prompt = sd3
    module.save_pretrained(tmp_path / "transformer")
    torch.manual_seed(0)
    vae = perturbed(diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16), layers_per_block=1,
        norm_num_groups=4, down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        scaling_factor=1.5, shift_factor=0.1,
    ))
    vae.save_pretrained(tmp_path / "vae")
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler()
    settings = dict(scheduler=scheduler, encoder_hidden_states=prompt[0], pooled_projections=prompt[1],
                    batch_size=BATCH, steps=3, order=2, extrapolation=0.2, gaps=(0.001, 0.001))

    images = sample_diffusers_model(tmp_path / "transformer", vae=tmp_path / "vae",
                                    generator=torch.Generator().manual_seed(0), **settings)
    assert images.shape == (BATCH, 3, 16, 16) and torch.isfinite(images).all()
    latents = sample_diffusers_model(module, generator=torch.Generator().manual_seed(0), **settings)
    with torch.no_grad():
        assert torch.allclose(images, decode_latents(vae, latents), atol=1e-5)
        assert torch.allclose(decode_latents(vae, latents), vae.decode(latents / 1.5 + 0.1).sample)
    again = sample_diffusers_model(module, generator=torch.Generator().manual_seed(0), **settings)
    assert torch.equal(latents, again)


def test_model_sampling_errors(sd3, unet, tmp_path):
    module, _ = sd3
    with pytest.raises(ValueError, match="encoder_hidden_states"):
        load_denoiser(module)
    with pytest.raises(ValueError, match="kind"):
        load_denoiser(unet, kind="vae")
    with pytest.raises(FileNotFoundError, match="not a local directory"):
        sample_diffusers_model(tmp_path / "missing", scheduler=diffusers.DDPMScheduler())
    with pytest.raises(ValueError, match="scheduler config"):
        sample_diffusers_model(unet)
    with pytest.raises(ValueError, match="unsupported denoiser class 'AutoencoderKL'"):
        diffusers.AutoencoderKL(block_out_channels=(8,), norm_num_groups=4).save_pretrained(tmp_path / "vae")
        load_denoiser(tmp_path / "vae")
    with pytest.raises(ValueError, match="takes no class labels"):
        PromptConditionedTransformer(module, torch.zeros(1, 5, 12), torch.zeros(1, 6))(
            torch.zeros(1, 4, 8, 8), torch.ones(1), torch.zeros(1, dtype=torch.long))
