"""Analog Bits: exact bit encodings, the discrete datasets and their exact metrics, self-conditioning in training
and sampling (any objective, any sampler), and the asymmetric time intervals of the samplers."""

from __future__ import annotations

import math

import pytest
import torch

from ucgm.data import build_dataset
from ucgm.data.bits import BitEncoding, BitNormalisation, bits_to_int, int_to_bits, normalisation_from_dict
from ucgm.data.discrete import CategoricalGridDataset, QuantisedDigitsDataset, grid_table, quantise_digits
from ucgm.data.mixtures import GaussianMixture, OracleModel
from ucgm.methods import build_method
from ucgm.methods.base import Batch, Networks
from ucgm.methods.discrete.self_conditioning import SelfConditioned, SelfConditionedSampling
from ucgm.metrics.discrete_suites import CategoricalSuite
from ucgm.metrics.histograms import category_histogram, kl_divergence, total_variation
from ucgm.analysis.reports import SamplerSpec, effective_settings, run_ucgm_settings
from ucgm.cli.components import accepted_keys
from ucgm.cli.config import resolve_config, resolve_run_config
from ucgm.models import build_model
from ucgm.sampling.registry import get_sampler
from ucgm.sampling.seeded import generate_samples, initial_noise, resolve_sampler
from ucgm.sampling.settings import SamplingConfig
from ucgm.sampling.ucgm_sampler import ucgm_sample
from ucgm.timegrids import asymmetric_targets, uniform_grid
from ucgm.transports import make_transport

ENCODINGS = [("binary", None), ("gray", None), ("binary", 3), ("gray", 11)]


# ----------------------------------------------------------------------------------------------- encodings
@pytest.mark.parametrize("code, permutation", ENCODINGS)
@pytest.mark.parametrize("num_bits", [1, 2, 3, 5, 8])
def test_every_value_round_trips_exactly(code, permutation, num_bits):
    encoding = BitEncoding(num_bits, code, permutation, scale=0.5)
    values = torch.arange(2**num_bits)
    bits = encoding.encode(values[:, None])
    assert bits.shape == (2**num_bits, num_bits) and set(bits.unique().tolist()) <= {-0.5, 0.5}
    assert torch.equal(encoding.decode(bits)[:, 0], values)
    assert len({tuple(row.tolist()) for row in bits}) == 2**num_bits  # distinct codes
    noisy = bits * (1 + torch.rand(bits.shape))  # any value of the right sign decodes alike
    assert torch.equal(encoding.decode(noisy)[:, 0], values)


def test_binary_bits_are_least_significant_first_and_gray_neighbours_differ_in_one_bit():
    assert int_to_bits(torch.tensor([6]), 4).tolist() == [[0, 1, 1, 0]]
    assert bits_to_int(torch.tensor([[0, 1, 1, 0]])).tolist() == [6]
    gray = BitEncoding(8, "gray").encode(torch.arange(256)[:, None]) > 0
    assert ((gray[1:] != gray[:-1]).sum(dim=1) == 1).all()


def test_image_layout_stacks_the_bits_of_each_channel_and_round_trips():
    encoding = BitEncoding(3, "gray", permutation_seed=5)
    values = torch.randint(0, 8, (4, 2, 5, 5), generator=torch.Generator().manual_seed(0))
    bits = encoding.encode(values)
    assert bits.shape == (4, 6, 5, 5)
    assert torch.equal(bits[:, 3:6], encoding.encode(values[:, 1:2]))
    assert torch.equal(encoding.decode(bits), values)
    normaliser = BitNormalisation(encoding)
    rebuilt = normalisation_from_dict(normaliser.to_dict())
    assert torch.equal(rebuilt.denormalise(bits), values.float())
    assert rebuilt.display(bits).min() >= -1 and rebuilt.display(bits).max() <= 1


def test_bad_bit_input_is_a_clear_error():
    with pytest.raises(ValueError, match=r"integers in \[0, 7\]"):
        BitEncoding(3).encode(torch.tensor([[8]]))
    with pytest.raises(ValueError, match="allowed values: 'binary', 'gray'"):
        BitEncoding(3, "hamming")
    with pytest.raises(ValueError, match="power of two"):
        CategoricalGridDataset(grid=6)
    with pytest.raises(ValueError, match="allowed values: 'affine', 'bits'"):
        normalisation_from_dict({"kind": "mystery"})


# ------------------------------------------------------------------------------------------------ datasets
def test_categorical_toy_draws_from_its_table():
    dataset = build_dataset({"name": "categorical", "grid": 4, "table": "stripes"})
    table = grid_table(4, "stripes")
    assert dataset.shape == (4,) and float(table.sum()) == pytest.approx(1.0)
    assert table[0, 0] / table[0, 1] == pytest.approx(10.0)
    data, labels = dataset.sample_batch(40000, torch.Generator().manual_seed(0))
    assert labels is None and set(data.unique().tolist()) == {-1.0, 1.0}
    histogram = category_histogram(dataset.categories(dataset.denormalise(data).long()), 16)
    assert total_variation(histogram, dataset.table) < 0.02


def test_quantised_digits_have_the_bits_of_their_grey_levels():
    dataset = QuantisedDigitsDataset(levels=4, split="heldout")
    assert dataset.shape == (2, 8, 8) and len(dataset) == 360 and dataset.num_classes == 10
    assert torch.equal(quantise_digits(torch.tensor([0.0, 5.0, 6.0, 16.0]), 4), torch.tensor([0, 1, 1, 3]))
    images, _ = dataset.batch(torch.arange(360))
    grey = dataset.normaliser.display(images)
    assert torch.equal(grey, dataset.grey_images())
    assert torch.allclose(grey.unique(), torch.tensor([-1.0, -1 / 3, 1 / 3, 1.0]))


def test_histogram_distances_are_exact():
    empirical = category_histogram(torch.tensor([0, 0, 1, 3]), 4)
    table = torch.tensor([0.25, 0.25, 0.25, 0.25], dtype=torch.float64)
    assert empirical.tolist() == [0.5, 0.25, 0.0, 0.25]
    assert total_variation(empirical, table) == pytest.approx(0.25)
    assert kl_divergence(empirical, table) == pytest.approx(0.5 * math.log(2) + 0.5 * math.log(1.0))
    assert kl_divergence(empirical, torch.tensor([0.0, 0.5, 0.25, 0.25], dtype=torch.float64)) == math.inf
    with pytest.raises(ValueError, match=r"categories must lie in \[0, 3\]"):
        category_histogram(torch.tensor([4]), 4)


def _bit_mixture(dataset: CategoricalGridDataset) -> GaussianMixture:
    """The bit-encoded toy as a mixture of (nearly) point masses at its codes: an exact denoiser."""
    grid = dataset.grid
    cells = torch.stack([torch.arange(grid * grid) // grid, torch.arange(grid * grid) % grid], dim=1)
    return GaussianMixture(dataset.normaliser.normalise(cells).double(), 1e-3, weights=dataset.table.flatten())


def test_exact_denoiser_samples_decode_to_the_table():
    """Sampling with the exact posterior and decoding by sign reaches the sample-noise floor: the encoding,
    decoding and metric pipeline itself adds no error."""
    dataset = CategoricalGridDataset(grid=4)
    oracle = OracleModel(_bit_mixture(dataset), make_transport("linear"))
    suite = CategoricalSuite(dataset, 8000)
    noise = torch.randn(8000, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    sample = ucgm_sample(oracle, oracle.transport, noise, steps=40, gaps=(0.0, 0.0)).sample
    tv = suite.evaluate(sample.float(), None)[0].value
    floor = suite.baselines()[0].value
    assert tv < 2 * floor + 0.01, (tv, floor)



@pytest.mark.parametrize("preset", ["categorical-bits", "digits-bits"])
def test_bit_presets_regress_the_mean_of_the_target(preset):
    """The bit presets' UCGM-T loss is minimised by the target's mean (pix2seq's MSE), not by its geometric median,
    which huber_constant 0 (the per-sample RMS) picks: for bit targets the median is the majority value."""
    from ucgm.cli.components import accepted_keys
    from ucgm.cli.config import resolve_config
    from ucgm.methods.diffusion.ucgm import UCGMObjective

    huber = resolve_config(preset, [], accepted_keys)["objective"]["huber_constant"]
    targets = torch.ones(1000, 6)
    targets[:100] = -1.0  # mean 0.8, geometric median 1
    levels = torch.linspace(0.0, 1.2, 1201)

    def minimiser(objective: UCGMObjective) -> float:
        losses = [objective.per_sample_loss(torch.full_like(targets, float(v)), targets).mean() for v in levels]
        return float(levels[int(torch.stack(losses).argmin())])

    assert minimiser(UCGMObjective(huber_constant=huber)) == pytest.approx(0.8, abs=0.01)
    assert minimiser(UCGMObjective(huber_constant=0.0)) == pytest.approx(1.0, abs=0.01)


# --------------------------------------------------------------------------------------- self-conditioning
class RecordingModel(torch.nn.Module):
    """A linear network that accepts ``self_condition`` and records what it gets."""

    def __init__(self, dim: int = 3):
        super().__init__()
        self.linear = torch.nn.Linear(dim, dim)
        self.conditions = build_model({"name": "mlp", "data_dim": dim, "hidden": 4, "depth": 1,
                                       "conditions": ["self_condition"]}).conditions
        self.seen: list = []

    def forward(self, x, t, labels=None, self_condition=None):
        self.seen.append((t.detach().clone(), None if self_condition is None else self_condition.detach().clone()))
        shift = 0.0 if self_condition is None else 0.5 * self_condition
        return self.linear(x) + shift + t[:, None]


def _self_conditioned(objective: dict, clip=1.0) -> SelfConditioned:
    method = build_method({**objective, "self_conditioning": {"rate": 0.5, "clip": clip}}, make_transport("linear"))
    assert isinstance(method, SelfConditioned)
    assert "self_condition" in method.networks()["model"].conditions
    return method


def test_training_conditions_the_first_half_on_a_clipped_no_gradient_estimate():
    method = _self_conditioned({"name": "flow_matching"}, clip=0.2)
    model = RecordingModel()
    data = torch.randn(8, 3, generator=torch.Generator().manual_seed(0))
    batch = Batch(data, None, None, torch.Generator().manual_seed(1))
    output = method.loss("train", Networks({"model": model}), batch)
    output.loss.backward()
    (t_first, zeros), (t_second, estimate) = model.seen
    assert torch.equal(zeros, torch.zeros(4, 3)) and torch.equal(t_first, t_second[:4])
    assert torch.equal(estimate[4:], torch.zeros(4, 3)) and estimate[:4].abs().max() <= 0.2
    # The estimate is the clipped data prediction of the first (zero-conditioned) pass: rebuild it.
    generator = torch.Generator().manual_seed(1)
    time = torch.rand(8, generator=generator)
    noise = torch.randn(8, 3, generator=generator)
    x_t = method.transport.interpolate(data, noise, time)
    with torch.no_grad():
        first = model.linear(x_t[:4]) + time[:4, None]
    expected = method.transport.recover(first, x_t[:4], time[:4])[0].clamp(-0.2, 0.2)
    assert torch.allclose(estimate[:4], expected, atol=1e-6)
    assert model.linear.weight.grad is not None


def test_ucgm_t_lambda_1_calls_are_all_split_and_concatenated_calls_split_every_copy():
    """UCGM-T at lambda = 1 calls the network for the output and for the tangent at t +- eps: every call gets the
    half-batch split; a call on k concatenated copies of the batch splits each copy alike."""
    method = _self_conditioned({"name": "ucgm", "consistency_ratio": 1.0, "label_dropout": 0.0})
    model = RecordingModel()
    batch = Batch(torch.randn(6, 3), None, None, torch.Generator().manual_seed(2))
    method.loss("train", Networks({"model": model}), batch)
    conditioned = [estimate for _, estimate in model.seen if estimate is not None and estimate.shape[0] == 6]
    assert len(conditioned) >= 2
    for estimate in conditioned:
        assert (estimate[:3].abs().sum(dim=1) > 0).all() and torch.equal(estimate[3:], torch.zeros(3, 3))
    rows = method.conditioning.estimated_rows(12, torch.device("cpu"))
    assert rows.tolist() == [True] * 3 + [False] * 3 + [True] * 3 + [False] * 3


@pytest.mark.parametrize("sampler", ["ucgm", "euler", "heun", "dpm++2m", "edm"])
def test_sampling_estimate_is_zero_first_then_the_previous_prediction(sampler):
    method = _self_conditioned({"name": "flow_matching"})
    model = RecordingModel()
    network, transport = method.sampling_model({"model": model})
    assert isinstance(transport, SelfConditionedSampling)
    noise = torch.randn(5, 3, generator=torch.Generator().manual_seed(0))
    bound = get_sampler(sampler)
    for _ in range(2):  # a second trajectory starts from a zero estimate again
        model.seen.clear()
        bound(network, transport, noise, None, 4, torch.Generator().manual_seed(0))
        calls = model.seen
        assert torch.equal(calls[0][1], torch.zeros(5, 3))
        assert all(estimate.abs().sum() > 0 for _, estimate in calls[1:])
    assert len(calls) >= 3


def test_sampling_estimate_equals_the_previous_clipped_data_prediction():
    method = _self_conditioned({"name": "flow_matching"}, clip=0.3)
    model = RecordingModel()
    network, transport = method.sampling_model({"model": model})
    noise = torch.randn(4, 3, generator=torch.Generator().manual_seed(3))
    states = []
    original = transport.network_output

    def spy(model_, x_t, t, labels=None, **conditions):
        output = original(model_, x_t, t, labels, **conditions)
        states.append(transport.estimate.clone())
        return output

    transport.network_output = spy
    get_sampler("euler")(network, transport, noise, None, 5, None)
    received = [estimate for _, estimate in model.seen]
    assert torch.equal(received[0], torch.zeros(4, 3))
    for k in range(1, len(received)):
        assert torch.equal(received[k], states[k - 1].to(received[k].dtype))
        assert states[k - 1].abs().max() <= 0.3


def test_a_method_calling_its_backbone_directly_runs_unconditioned():
    """CT's boundary-condition parameterisation calls the backbone outside the transport: the wrapper leaves it
    as it is (the network never receives an estimate) instead of failing."""
    method = build_method({"name": "ct", "self_conditioning": {"rate": 0.5}}, make_transport("linear"))
    model = build_model({"name": "mlp", "data_dim": 2, "hidden": 8, "depth": 1, "conditions": ["self_condition"]})
    output = method.loss("train", Networks({"model": model, "reference": model}),
                         Batch(torch.randn(8, 2), None, None, torch.Generator().manual_seed(0)))
    assert torch.isfinite(output.loss)
    network, transport = method.sampling_model({"model": model})
    result = get_sampler(*method.sampler())(network, transport, torch.randn(4, 2), None, 2, None)
    assert torch.isfinite(result.sample).all()


# ----------------------------------------------------------------------------------------- asymmetric time
def test_asymmetric_time_targets_are_pix2seq_td():
    grid = uniform_grid(4)
    td = 0.5
    expected = [max(1 - (i + 1 + td) / 4, 0.0) for i in range(4)]
    assert asymmetric_targets(grid, td).tolist() == pytest.approx(expected)
    assert torch.equal(asymmetric_targets(grid, 0.0), grid[1:])
    with pytest.raises(ValueError, match="time_difference"):
        asymmetric_targets(grid, -1.0)


def test_ucgm_sample_with_td_steps_to_the_shifted_times():
    """With a deterministic DDIM-type step, the state after step i is gamma(e_i) x_hat + alpha(e_i) z_hat at the
    shifted target e_i, while the network is called at the grid times."""
    mixture = GaussianMixture(torch.tensor([[1.0, -1.0]]), 0.5)
    oracle = OracleModel(mixture, make_transport("linear"))
    calls = []

    class Spy(torch.nn.Module):
        def forward(self, x, t, labels=None):
            calls.append(float(t[0]))
            return oracle(x, t, labels)

    noise = torch.randn(3, 2, dtype=torch.float64)
    grid = uniform_grid(4)
    result = ucgm_sample(Spy(), oracle.transport, noise, times=grid, steps=4, time_difference=0.5,
                         return_trajectory=True)
    assert calls == pytest.approx(grid[:-1].tolist())
    targets = asymmetric_targets(grid, 0.5)
    state = result.trajectory[1]
    prediction = oracle.transport.predict(oracle, noise, grid[0].expand(3))
    expected = oracle.transport.gamma(targets[0]) * prediction.data + oracle.transport.alpha(targets[0]) * prediction.noise
    assert torch.allclose(state, expected)


def test_the_sampling_sections_time_difference_reaches_the_sampler():
    """``sampling.time_difference`` is not dropped on any path a run's config takes to UCGM-S: the typed section of
    ``ucgm sample`` and training sample grids (:func:`resolve_sampler`, :func:`generate_samples`: the samples are
    those of ``ucgm_sample(time_difference=td)`` on the same seeded noise, not the symmetric ones) and the plain
    dict of ``ucgm evaluate``, ``ucgm search`` and the benches (:func:`run_ucgm_settings`)."""
    mixture = GaussianMixture(torch.tensor([[1.0, -1.0], [-1.0, 0.5]]), 0.3)
    oracle = OracleModel(mixture, make_transport("linear"))
    common = dict(nfe=4, num=6, batch_size=6, extrapolation=0.0, time_warp=[1.0, 1.0, 1.0], gaps=[0.0, 0.0])
    shifted, symmetric = SamplingConfig(time_difference=0.5, **common), SamplingConfig(**common)
    assert resolve_sampler(shifted)[1]["time_difference"] == 0.5
    drawn = generate_samples(oracle, oracle.transport, shifted, (2,), 0, torch.device("cpu")).samples
    noise = initial_noise(0, range(6), (2,), torch.device("cpu"))
    expected = ucgm_sample(oracle, oracle.transport, noise, steps=4, time_warp=(1.0, 1.0, 1.0), gaps=(0.0, 0.0),
                           time_difference=0.5).sample
    assert torch.allclose(drawn, expected.float())
    plain = generate_samples(oracle, oracle.transport, symmetric, (2,), 0, torch.device("cpu")).samples
    assert (plain - drawn).abs().max() > 1e-3
    overrides = ["sampling.time_difference=0.5"]
    assert resolve_run_config("categorical-bits", overrides, accepted_keys).sampling.time_difference == 0.5
    run_settings = run_ucgm_settings(resolve_config("categorical-bits", overrides, accepted_keys))
    assert run_settings["time_difference"] == 0.5
    assert effective_settings(SamplerSpec("ucgm", "ucgm", {}), run_settings)["time_difference"] == 0.5
    with pytest.raises(Exception, match="time_difference"):
        resolve_run_config("categorical-bits", ["sampling.time_difference=-1"], accepted_keys)
