"""The method-agnostic trainer with stand-in model and objective: exact resume, shards, EMA, reference, optimizer."""

from __future__ import annotations

import math

import pytest
import torch
from training_fixtures import GaussianBatches, TinyFlowMatching, TinyMLP, tiny_gmm_config

from ucgm.methods.base import ObjectiveOutput
from ucgm.training.batches import CycledBatches, DatasetBatches, ShardPlan
from ucgm.training.ema import power_ema_exponent
from ucgm.training.loop import Hook, Trainer
from ucgm.bench.minimal_loop import minimal_training_loop
from ucgm.training.optim import sanitise_and_clip, warmup_lr
from ucgm.training.reference import next_reference_decay
from ucgm.training.schema import EMAConfig, OptimizerConfig, TrainingConfig

METADATA = {"config": {}, "data_shape": [2], "num_classes": 0}


def _trainer(objective=None, seed=0, **training) -> Trainer:
    torch.manual_seed(seed)
    settings = TrainingConfig(**{"steps": 10, "batch_size": 8, **training})
    return Trainer(TinyMLP(), objective or TinyFlowMatching(), GaussianBatches(), settings,
                   OptimizerConfig(lr=1e-2, warmup_steps=2, grad_clip=1.0))


def _losses_per_step(trainer: Trainer, until: int) -> list[float]:
    losses = []
    trainer.fit(until, [Hook(1, lambda t: losses.append(t.pop_mean_loss()))])
    return losses


def test_resume_from_a_checkpoint_is_exact(tmp_path):
    make = lambda: TinyFlowMatching(reference_mode="ema", reference_decay=0.9)
    uninterrupted = _trainer(make())
    expected = _losses_per_step(uninterrupted, 8)

    first = _trainer(make())
    before = _losses_per_step(first, 3)
    first.save_checkpoint(tmp_path, METADATA)
    resumed = _trainer(make(), seed=123)  # different initial weights: everything must come from the checkpoint
    resumed.load_checkpoint(tmp_path / "checkpoints" / "step_0000003")
    after = _losses_per_step(resumed, 8)

    assert before + after == expected
    for a, b in zip(uninterrupted.weights()["ema"].values(), resumed.weights()["ema"].values()):
        assert torch.equal(a, b)
    for a, b in zip(uninterrupted.reference.module.parameters(), resumed.reference.module.parameters()):
        assert torch.equal(a, b)
    assert uninterrupted.reference.decay == resumed.reference.decay


def test_one_process_with_two_rounds_sees_the_shards_of_two_processes():
    source = DatasetBatches(GaussianBatches(), seed=5)
    single = ShardPlan(source, 8, 2, rank=0, world_size=1, seed=5, device=torch.device("cpu"))
    ranks = [ShardPlan(source, 8, 1, rank=r, world_size=2, seed=5, device=torch.device("cpu")) for r in (0, 1)]
    for step in (0, 7):
        rounds = [(b.data, torch.rand(3, generator=b.generator)) for b in single.micro_batches(step)]
        split = [(b.data, torch.rand(3, generator=b.generator)) for plan in ranks for b in plan.micro_batches(step)]
        for (data_a, draw_a), (data_b, draw_b) in zip(rounds, split):
            assert data_a.shape == (4, 2) and torch.equal(data_a, data_b) and torch.equal(draw_a, draw_b)
    step0, step1 = (next(iter(single.micro_batches(step))).data for step in (0, 1))
    assert not torch.equal(step0, step1)
    with pytest.raises(ValueError, match="divisible"):
        ShardPlan(source, 6, 4, rank=0, world_size=1, seed=0, device=torch.device("cpu"))


def test_grad_accumulation_matches_the_mean_of_its_micro_batches():
    whole = _trainer(grad_accumulation=2)
    losses = _losses_per_step(whole, 1)
    objective = TinyFlowMatching()
    torch.manual_seed(0)
    model = TinyMLP()
    shard_losses = [objective(model, b.data, b.labels, generator=b.generator).loss.item()
                    for b in whole.plan.micro_batches(0)]
    assert losses[0] == pytest.approx(sum(shard_losses) / 2, rel=1e-6)


def test_constant_ema_and_power_ema():
    trainer = _trainer(ema=EMAConfig(kind="constant", decay=0.75))
    initial = [p.detach().clone() for p in trainer.model.parameters()]
    trainer.fit(1)
    for ema, start, now in zip(trainer.ema.module.parameters(), initial, trainer.model.parameters()):
        assert torch.allclose(ema, 0.75 * start + 0.25 * now)
    assert power_ema_exponent(0.1) == pytest.approx(6.94, abs=0.01)
    assert power_ema_exponent(0.05) == pytest.approx(16.97, abs=0.01)
    gamma = power_ema_exponent(0.07)
    assert math.sqrt((gamma + 1) / ((gamma + 2) ** 2 * (gamma + 3))) == pytest.approx(0.07)
    power = _trainer(ema=EMAConfig(kind="power", std=0.1))
    assert power.ema.decay(0) == 0.0
    assert power.ema.decay(99) == pytest.approx(0.99 ** (6.94 + 1), rel=1e-3)
    assert _trainer(ema=EMAConfig(kind="none")).ema is None


def test_reference_modes():
    assert [round(d, 6) for d in _decays(0.9, 4)] == [0.0, 0.45, 0.57375, 0.643282]
    ema_objective = TinyFlowMatching("ema", 0.9)
    trainer = _trainer(ema_objective)
    initial = [p.detach().clone() for p in trainer.model.parameters()]
    trainer.fit(1)  # d_0 = 0: before the first loss the reference is the model itself
    assert all(torch.equal(r, p) for r, p in zip(trainer.reference.module.parameters(), initial))
    assert trainer.reference.decay == pytest.approx(0.45)

    frozen = _trainer(TinyFlowMatching("frozen"))
    start = [p.detach().clone() for p in frozen.model.parameters()]
    frozen.fit(3)
    assert all(torch.equal(r, p) for r, p in zip(frozen.reference.module.parameters(), start))
    assert not all(torch.equal(r, p) for r, p in zip(frozen.model.parameters(), start))

    online = _trainer(TinyFlowMatching("online"))
    online.fit(1)
    assert online.objective.reference_calls[-1] is online.model
    plain = _trainer(TinyFlowMatching(None))
    plain.fit(1)
    assert plain.objective.reference_calls[-1] is None


def _decays(target, count):
    values, decay = [], 0.0
    for _ in range(count):
        values.append(decay)
        decay = next_reference_decay(decay, target)
    return values


def test_learning_rate_warmup():
    assert [warmup_lr(1.0, step, 4) for step in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    trainer = _trainer()
    seen = []
    trainer.fit(4, [Hook(1, lambda t: seen.append(t.lr))])
    assert seen == [0.005, 0.01, 0.01, 0.01]


def test_nan_gradients_are_zeroed_and_norms_clipped():
    parameters = [torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(2))]
    parameters[0].grad = torch.tensor([float("nan"), 3.0, 4.0])
    parameters[1].grad = torch.tensor([0.0, 0.0])
    sanitise_and_clip(parameters, max_norm=1.0)
    assert torch.allclose(parameters[0].grad, torch.tensor([0.0, 0.6, 0.8]), atol=1e-5)

    class Poisoned(TinyFlowMatching):
        def __call__(self, model, data, labels=None, **kwargs):
            output = super().__call__(model, data, labels, **kwargs)
            return ObjectiveOutput(output.loss * torch.tensor(float("nan")), output.per_sample, {})

    trainer = _trainer(Poisoned())
    trainer.fit(2)
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())


def test_objective_stats_and_logged_loss_are_read_only_at_log_steps():
    trainer = _trainer()
    trainer.fit(4)
    assert set(trainer.last_stats) == {"mean_t"}
    assert math.isfinite(trainer.pop_mean_loss())
    assert math.isnan(trainer.pop_mean_loss())  # nothing since the last read


def test_minimal_loop_and_cycled_batches():
    batches = [(torch.randn(8, 2), None) for _ in range(3)]
    torch.manual_seed(0)
    losses = minimal_training_loop(TinyMLP(), TinyFlowMatching("online"), batches, 5, 1e-2)
    assert losses.shape == (5,) and torch.isfinite(losses).all()
    torch.manual_seed(0)
    trainer = Trainer(TinyMLP(), TinyFlowMatching(), CycledBatches(batches), TrainingConfig(steps=5, batch_size=8),
                      OptimizerConfig(lr=1e-2))
    trainer.fit(5)
    assert trainer.step == 5
    with pytest.raises(ValueError, match="shards of 4"):
        CycledBatches(batches).shard_batch(0, 0, 4)


class _Curriculum(TinyFlowMatching):
    """A stand-in objective with a progress-dependent reference decay."""

    reference_mode = "ema"

    def __init__(self):  # the base constructor would assign the read-only reference_decay
        self.reference_calls, self.progress = [], []

    def set_progress(self, step, total_steps=None):
        self.progress.append((step, total_steps))

    @property
    def reference_decay(self):
        return 0.5 if len(self.progress) < 2 else 0.9


def test_objective_progress_and_curriculum_decay_are_read_every_step():
    objective = _Curriculum()
    trainer = _trainer(objective, steps=7)
    trainer.fit(3)
    assert objective.progress == [(0, 7), (1, 7), (2, 7)]
    assert trainer.reference.decay == pytest.approx(next_reference_decay(next_reference_decay(0.25, 0.9), 0.9))
    minimal_objective = _Curriculum()
    minimal_training_loop(TinyMLP(), minimal_objective, [(torch.randn(8, 2), None)], 2, 1e-3)
    assert minimal_objective.progress == [(0, 2), (1, 2)]


def test_objective_parameters_are_trained_and_resumed_exactly(tmp_path):
    """sCM's adaptive weighting head: optimised with the model, saved in state.pt and restored on resume."""
    from ucgm.cli.components import (build_dataset, build_model, build_objective, build_transport,
                                          with_data_defaults)
    from ucgm.training.schema import typed_section

    config = tiny_gmm_config("transport.name=trigflow", "objective=scm", "objective.tangent_method=finite_difference",
                             "objective.tangent_warmup_steps=2", "objective.adaptive_weighting=true")
    dataset = build_dataset(config)
    config = with_data_defaults(config, dataset.shape, dataset.num_classes)

    def make_trainer():
        torch.manual_seed(0)
        objective = build_objective(config, build_transport(config))
        return Trainer(build_model(config), objective, dataset, typed_section(config, "training"),
                       typed_section(config, "optimizer"))

    uninterrupted = make_trainer()
    head_before = [p.detach().clone() for p in uninterrupted.objective_parameters]
    expected = _losses_per_step(uninterrupted, 6)
    assert head_before and any(not torch.equal(a, b) for a, b in zip(head_before, uninterrupted.objective_parameters))

    first = make_trainer()
    before = _losses_per_step(first, 3)
    first.save_checkpoint(tmp_path, METADATA)
    resumed = make_trainer()
    resumed.load_checkpoint(tmp_path / "checkpoints" / "step_0000003")
    assert before + _losses_per_step(resumed, 6) == expected
    for a, b in zip(uninterrupted.objective_parameters, resumed.objective_parameters):
        assert torch.equal(a, b)
