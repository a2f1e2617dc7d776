"""DDDM: the context is the model's own estimate keyed by dataset index (never the clean target), the weight
schedule, the buffer's state round trip, the iterative-refinement sampler against a closed-form fixed point, and
the fixed, indexed mixture training set DDDM needs on the GMM presets."""

from __future__ import annotations

import pytest
import torch
from flow_map_oracle import exact_flow_map
from torch import nn
from training_fixtures import tiny_gmm_config

from ucgm.bench.throughput import like_for_like, make_trainer, trainer_block, training_setup
from ucgm.cli.components import accepted_keys
from ucgm.cli.config import resolve_config
from ucgm.cli.sample import load_checkpoint_model
from ucgm.cli.train import run_training
from ucgm.data import build_dataset
from ucgm.data.base import FiniteDataset
from ucgm.methods.base import Batch, Networks
from ucgm.methods.flow_maps.dddm import DirectlyDenoisingMethod, dddm_distance, visit_weight
from ucgm.methods.flow_maps.estimate_buffer import EstimateBuffer, first_occurrences
from ucgm.metrics.distances import sliced_wasserstein
from ucgm.sampling.dddm_sampler import dddm_sample
from ucgm.sampling.registry import get_sampler
from ucgm.transports import make_transport


class SpyModel(nn.Module):
    """``F = w * (x + 0.5 * self_condition)``: records every context it is given."""

    num_classes = None

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.tensor(0.3))
        self.contexts = []

    def forward(self, x, t, labels=None, self_condition=None):
        self.contexts.append(self_condition.detach().clone())
        return self.weight * (x + 0.5 * self_condition)


def _batches(data, steps, batch_size=6, seed=0):
    generator = torch.Generator().manual_seed(seed)
    for step in range(steps):
        indices = torch.randint(data.shape[0], (batch_size,), generator=generator)
        yield step, Batch(data[indices], None, indices, torch.Generator().manual_seed(100 + step))


def test_the_context_is_the_models_own_estimate_keyed_by_index_never_the_clean_target():
    data = torch.randn(10, 2, generator=torch.Generator().manual_seed(1)) + 5.0
    method, model = DirectlyDenoisingMethod(), SpyModel()
    method.set_seed(7)
    transport = method.transport
    networks = Networks({"model": model})
    estimates = {}  # what the model predicted for each index at its latest visit (first occurrence in a step)
    for step, batch in _batches(data, 12):
        method.set_progress(step)
        expected_contexts = [estimates.get(int(i)) for i in batch.indices]
        output = method.loss("train", networks, batch)
        context = model.contexts[-1]
        assert not torch.isclose(context, batch.data, atol=1e-3).all(dim=1).any()  # leak guard
        for row, expected in enumerate(expected_contexts):
            if expected is None:  # first visit: the seeded initial noise of that index
                initial = EstimateBuffer(7).initial(batch.indices[row:row + 1], (2,), torch.float32)[0]
                torch.testing.assert_close(context[row], initial)
            else:
                torch.testing.assert_close(context[row], expected)
        # the model's data prediction, recomputed from its output, is what the buffer will hold
        generator = torch.Generator().manual_seed(100 + step)
        time = method.draw_time(6, generator).float()
        noise = torch.randn(batch.data.shape, generator=generator)
        x_t = transport.interpolate(batch.data, noise, time)
        prediction = transport.predict(lambda x, t, labels: model.weight * (x + 0.5 * context), x_t, time).data
        seen = set()
        for row, index in enumerate(batch.indices.tolist()):
            if index not in seen:
                estimates[index] = prediction[row].detach()
                seen.add(index)
        assert output.loss.requires_grad
    method.set_progress(12)
    for index, estimate in estimates.items():
        torch.testing.assert_close(method.buffer.values[index], estimate)


def test_the_weight_falls_as_one_over_visits_and_the_loss_mixes_guide_and_iterate():
    torch.testing.assert_close(visit_weight(torch.tensor([0, 1, 3, 9])),
                               torch.tensor([1.0, 0.5, 0.25, 0.1], dtype=torch.float64))
    data = torch.full((3, 2), 2.0)
    method, model = DirectlyDenoisingMethod(), SpyModel()
    batch = Batch(data, None, torch.tensor([0, 1, 2]), torch.Generator().manual_seed(0))
    first = method.loss("train", Networks({"model": model}), batch)
    assert float(first.stats["dddm_guide_weight"]) == 1.0
    method.set_progress(1)
    method.buffer.visits[:] = 3  # the fourth visit of every example
    second = method.loss("train", Networks({"model": model}), Batch(data, None, batch.indices,
                                                                    torch.Generator().manual_seed(1)))
    assert float(second.stats["dddm_guide_weight"]) == 0.25


def test_missing_indices_are_a_clear_error():
    batch = Batch(torch.zeros(4, 2), None, None, torch.Generator())
    with pytest.raises(ValueError, match="data.num_samples"):
        DirectlyDenoisingMethod().loss("train", Networks({"model": SpyModel()}), batch)


def test_the_buffer_round_trips_with_staged_writes_and_keeps_the_first_of_repeated_indices():
    buffer = EstimateBuffer(seed=3)
    buffer.read(torch.tensor([4]), (2,))
    buffer.stage(torch.tensor([4, 1, 4]), torch.tensor([[1.0, 1.0], [2.0, 2.0], [3.0, 3.0]]))
    restored = EstimateBuffer()
    restored.load_state_dict(buffer.state_dict())
    for each in (buffer, restored):
        each.apply_pending()
        values, visits = each.read(torch.tensor([4, 1, 0]), (2,))
        torch.testing.assert_close(values[:2], torch.tensor([[1.0, 1.0], [2.0, 2.0]]))
        assert visits.tolist() == [1, 1, 0]
        torch.testing.assert_close(values[2], EstimateBuffer(3).initial(torch.tensor([0]), (2,), torch.float32)[0])
    assert first_occurrences(torch.tensor([5, 2, 5, 2, 7])).tolist() == [1, 0, 4]


def test_distances():
    a, b = torch.randn(4, 3), torch.randn(4, 3)
    torch.testing.assert_close(dddm_distance(a, b, "l2"), ((a - b) ** 2).mean(dim=1))
    torch.testing.assert_close(dddm_distance(a, b, "pseudo_huber", 0.1),
                               (torch.sqrt((a - b) ** 2 + 0.01) - 0.1).mean(dim=1))


class HalvingModel(nn.Module):
    """At ``t = 1`` (``x_t = z``) the linear transport's data prediction is ``x_t - F``; ``F`` makes it
    ``(x_bar + c) / 2``, a contraction with fixed point ``c``."""

    def __init__(self, target):
        super().__init__()
        self.target = target

    def forward(self, x, t, labels=None, self_condition=None):
        return x - (self_condition + self.target) / 2


@pytest.mark.parametrize("steps", [1, 3, 6])
def test_the_sampler_iterates_the_estimate_at_the_noise_end(steps):
    target = torch.tensor([[1.0, -2.0]]).expand(5, 2)
    noise = torch.randn(5, 2, generator=torch.Generator().manual_seed(0))
    start_source = torch.Generator().manual_seed(9)
    start = torch.randn(5, 2, generator=torch.Generator().manual_seed(9))
    result = dddm_sample(HalvingModel(target), make_transport("linear"), noise, steps=steps,
                         generator=start_source, return_trajectory=True)
    torch.testing.assert_close(result.sample, target + (start - target) / 2**steps)
    assert result.nfe == steps and result.trajectory.shape == (steps + 1, 5, 2)
    torch.testing.assert_close(result.trajectory[0], start)
    budgeted = get_sampler("dddm", {"clip": 1.5})(HalvingModel(target), make_transport("linear"), noise, None,
                                                   steps, torch.Generator().manual_seed(9))
    assert budgeted.nfe == steps and float(budgeted.sample.abs().max()) <= 1.5


def test_a_fixed_mixture_training_set_has_indices_and_is_reproducible():
    dataset = build_dataset({"name": "mixture", "num_samples": 50, "sample_seed": 2})
    assert isinstance(dataset, FiniteDataset) and len(dataset) == 50 and dataset.mixture.num_classes == 8
    again = build_dataset({"name": "mixture", "num_samples": 50, "sample_seed": 2})
    assert torch.equal(dataset.data, again.data) and torch.equal(dataset.labels, again.labels)
    x, labels = dataset.batch(torch.tensor([3, 3, 10]))
    assert torch.equal(x[0], x[1]) and torch.equal(x[2], dataset.data[10]) and labels.shape == (3,)
    drawn, _ = dataset.sample_batch(16, torch.Generator().manual_seed(0))
    assert all(any(torch.equal(row, kept) for kept in dataset.data) for row in drawn)
    assert not isinstance(build_dataset({"name": "mixture"}), FiniteDataset)
    unconditional = build_dataset({"name": "mixture", "num_samples": 5, "conditional": False})
    assert unconditional.batch(torch.tensor([0]))[1] is None
    with pytest.raises(ValueError, match="num_samples"):
        build_dataset({"name": "mixture", "num_samples": 0})


def test_the_timing_benches_feed_an_indexed_dataset_with_its_indices():
    """The trainer-step timing (``ucgm bench``'s step costs) runs DDDM on the run's first shards, indices included."""
    config = like_for_like(tiny_gmm_config("objective=dddm", "data.num_samples=64"))
    setup = training_setup(config, num_batches=2)
    data, _, indices = setup.batches[1]
    torch.testing.assert_close(data, build_dataset(config.values["data"]).batch(indices)[0])
    trainer_block(make_trainer(setup.config, setup.model, setup.batches), 2)()


def test_refinements_converge_but_not_to_the_ode_endpoint_of_their_noise(tmp_path):
    """flow_maps.md DDDM toy check (ii), trained through ``run_training`` on the unconditional GMM: the paper's claim
    that ``x_bar^n`` approaches the ODE endpoint ``Phi_{1->0}(x_T)`` of its noise is not reproduced, and cannot be:
    at ``t = 1`` the training pairs ``(x, x_T)`` are independent and the loss has no ODE target, so nothing couples
    ``f(x_T, 1, .)`` to ``Phi(x_T)``. Measured (300 steps): the mean error falls from 1.53 (``x_bar^0``) to 0.97 at
    the first refinement (the data's scale), then stays near 1.0 for every ``n``, the level of independent mixture
    draws (1.24); the refinements converge to a fixed point."""
    run_dir = tmp_path / "dddm"
    run_training(resolve_config("gmm", ["objective=dddm", "data.conditional=false", "data.num_samples=1024",
                                        "model.hidden=64", "model.depth=2", "training.batch_size=128",
                                        "training.steps=300", "training.checkpoint_every=300",
                                        "training.log_every=300"], accepted_keys), run_dir, progress=False)
    loaded = load_checkpoint_model(run_dir)
    mixture = build_dataset({"name": "mixture", "conditional": False}).mixture
    noise = torch.randn(1000, 2, generator=torch.Generator().manual_seed(5))
    endpoint = exact_flow_map(mixture, loaded.transport, noise, torch.tensor(1.0), torch.tensor(0.0), steps=100)
    with torch.no_grad():
        iterates = dddm_sample(loaded.model, loaded.transport, noise, steps=8,
                               generator=torch.Generator().manual_seed(9), return_trajectory=True).trajectory
    errors = [float((iterate - endpoint.float()).norm(dim=1).mean()) for iterate in iterates]
    independent, _ = mixture.sample(1000, generator=torch.Generator().manual_seed(3))
    independent_error = float((independent - endpoint.float()).norm(dim=1).mean())
    changes = (iterates[1:] - iterates[:-1]).norm(dim=2).mean(dim=1)
    assert errors[1] < 0.8 * errors[0]  # the first refinement uses the model
    assert min(errors) > 0.6 * independent_error  # ... but no refinement approaches Phi(x_T)
    assert changes[-1] < 0.1 * changes[0]  # the refinements converge
