"""The method-agnostic trainer with stand-in models and methods: exact resume, shards, EMA, reference networks,
multi-network schedules, non-finite gradients, optimizers."""

from __future__ import annotations

import math

import pytest
import torch
from training_fixtures import GaussianBatches, TinyFlowMatching, TinyMLP, TwoNetworkMethod, tiny_gmm_config

from ucgm.bench.minimal_loop import minimal_training_loop
from ucgm.data.base import AffineNormalisation, TensorDataset
from ucgm.methods.base import NetworkSpec, ObjectiveOutput, Phase, warmed_up_decay
from ucgm.training.batches import CycledBatches, DatasetBatches, ShardPlan
from ucgm.training.ema import power_ema_exponent
from ucgm.training.loop import Hook, Trainer, TrainingDiverged
from ucgm.training.networks import build_networks
from ucgm.training.optim import gradient_norm, warmup_lr
from ucgm.training.settings import EMAConfig, OptimizerConfig, TrainingConfig
from ucgm.validation import ConfigError

METADATA = {"config": {}, "data_shape": [2], "num_classes": 0}
OPTIMIZER = OptimizerConfig(lr=1e-2, warmup_steps=2, grad_clip=1.0)


def _trainer(objective=None, seed=0, pretrained=False, batches=None, make_model=TinyMLP, **training) -> Trainer:
    torch.manual_seed(seed)
    settings = TrainingConfig(**{"steps": 10, "batch_size": 8, **training})
    return Trainer.for_objective(make_model(), objective or TinyFlowMatching(), batches or GaussianBatches(),
                                 settings, OPTIMIZER, pretrained=pretrained)


def _losses_per_step(trainer: Trainer, until: int) -> list[dict]:
    losses = []
    trainer.fit(until, [Hook(1, lambda t: losses.append(t.pop_mean_losses()))])
    return losses


def _parameters(module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in module.parameters()]


def test_resume_from_a_checkpoint_is_exact(tmp_path):
    make = lambda: TinyFlowMatching(reference_mode="ema", reference_decay=0.9)  # noqa: E731
    uninterrupted = _trainer(make())
    expected = _losses_per_step(uninterrupted, 8)

    first = _trainer(make())
    before = _losses_per_step(first, 3)
    first.save_checkpoint(tmp_path, METADATA)
    resumed = _trainer(make(), seed=123)  # different initial weights: everything must come from the checkpoint
    resumed.load_checkpoint(tmp_path / "checkpoints" / "step_0000003")
    after = _losses_per_step(resumed, 8)

    assert before + after == expected
    for group in ("model", "ema", "reference"):
        for a, b in zip(uninterrupted.weights()[group].values(), resumed.weights()[group].values()):
            assert torch.equal(a, b)


def test_two_networks_on_a_five_to_one_schedule_with_their_own_learning_rates_resume_exactly(tmp_path):
    """Phases in order, each network stepped only in its phase with its own optimizer; everything resumes."""
    def make(seed=0):
        torch.manual_seed(seed)
        method = TwoNetworkMethod()
        networks = build_networks(method, TinyMLP(), OptimizerConfig(lr=1e-2), EMAConfig(decay=0.5),
                                  build_backbone=lambda role, spec: TinyMLP())
        return Trainer(method, networks, GaussianBatches(), TrainingConfig(steps=6, batch_size=8))

    trainer = make()
    assert [(p.name, p.repeats) for p in trainer.schedule] == [("critic", 5), ("generator", 1)]
    assert trainer.networks["critic"].optimizer.param_groups[0]["lr"] == 1e-3
    assert trainer.networks["model"].optimizer.param_groups[0]["lr"] == 1e-2
    generator_before = _parameters(trainer.networks["model"].module)
    critic_before = _parameters(trainer.networks["critic"].module)
    trainer.train_step()
    assert trainer.method.calls == ["critic"] * 5 + ["generator"]
    assert trainer.networks["critic"].updates == 5 and trainer.networks["model"].updates == 1
    assert not any(torch.equal(a, b) for a, b in zip(generator_before, trainer.networks["model"].module.parameters()))
    assert not any(torch.equal(a, b) for a, b in zip(critic_before, trainer.networks["critic"].module.parameters()))
    # the generator phase saw a frozen critic (gradients only through its input), and vice versa
    assert trainer.method.grad_flags == [("critic", True, False)] * 5 + [("generator", False, True)]

    uninterrupted = make()
    expected = _losses_per_step(uninterrupted, 6)
    assert set(expected[0]) == {"loss", "loss/critic", "loss/generator"}
    first = make()
    before = _losses_per_step(first, 2)
    first.save_checkpoint(tmp_path, METADATA)
    resumed = make(seed=7)
    resumed.load_checkpoint(tmp_path / "checkpoints" / "step_0000002")
    assert before + _losses_per_step(resumed, 6) == expected
    for group in ("model", "ema", "critic", "critic-ema"):
        for a, b in zip(uninterrupted.weights()[group].values(), resumed.weights()[group].values()):
            assert torch.equal(a, b)
    assert resumed.method.state_dict() == uninterrupted.method.state_dict()


def test_one_process_with_two_rounds_sees_the_shards_of_two_processes():
    source = DatasetBatches(GaussianBatches(), seed=5)
    single = ShardPlan(source, 8, 2, rank=0, world_size=1, seed=5, device=torch.device("cpu"))
    ranks = [ShardPlan(source, 8, 1, rank=r, world_size=2, seed=5, device=torch.device("cpu")) for r in (0, 1)]
    for step, slot in ((0, 0), (7, 0), (3, 2)):
        rounds = [(b.data, torch.rand(3, generator=b.generator)) for b in single.micro_batches(step, slot)]
        split = [(b.data, torch.rand(3, generator=b.generator)) for plan in ranks
                 for b in plan.micro_batches(step, slot)]
        for (data_a, draw_a), (data_b, draw_b) in zip(rounds, split):
            assert data_a.shape == (4, 2) and torch.equal(data_a, data_b) and torch.equal(draw_a, draw_b)
    step0, step1, slot1 = (next(iter(single.micro_batches(step, slot))).data for step, slot in ((0, 0), (1, 0), (0, 1)))
    assert not torch.equal(step0, step1) and not torch.equal(step0, slot1)
    with pytest.raises(ValueError, match="divisible"):
        ShardPlan(source, 6, 4, rank=0, world_size=1, seed=0, device=torch.device("cpu"))


def test_batches_of_indexed_datasets_carry_their_sample_indices():
    data = torch.arange(40, dtype=torch.float32).reshape(20, 2)
    dataset = TensorDataset(data, None, 0, AffineNormalisation(1.0, 0.0))
    plan = ShardPlan(DatasetBatches(dataset, seed=1), 8, 1, rank=0, world_size=1, seed=1, device=torch.device("cpu"))
    batch = next(iter(plan.micro_batches(3)))
    assert batch.indices.shape == (8,) and torch.equal(batch.data, data[batch.indices])
    assert next(iter(ShardPlan(DatasetBatches(GaussianBatches(), 1), 8, 1, 0, 1, 1,
                               torch.device("cpu")).micro_batches(0))).indices is None


class _ImageRegression(TinyFlowMatching):
    """A stand-in loss on flattened images, two updates per step, recording the sample indices it trains on."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def schedule(self):
        return [Phase("train", ("model",), repeats=2)]

    def loss(self, phase, networks, batch):
        self.seen.append(batch.indices.tolist())
        data = batch.data.flatten(1)
        t = torch.rand(data.shape[0], generator=batch.generator)
        per_sample = ((networks["model"](data, t) - data.flip(1)) ** 2).mean(dim=1)
        return ObjectiveOutput(per_sample.mean(), per_sample.detach(), {})


def _image_folder(root):
    from PIL import Image

    generator = torch.Generator().manual_seed(0)
    for label in ("a", "b"):
        (root / label).mkdir(parents=True)
        for index in range(5):
            pixels = torch.randint(0, 256, (2, 3), generator=generator, dtype=torch.uint8).numpy()
            Image.fromarray(pixels, mode="L").save(root / label / f"{index}.png")


def test_image_folders_are_decoded_by_dataloader_workers_with_the_in_process_batches_and_resume(tmp_path):
    """Image folders go through a DataLoader with worker processes and prefetch; the shards (data, labels, indices)
    are exactly the in-process ones for every update of a 2-update step with 2 accumulation rounds, and a trainer
    resumed mid-run restarts the loader at its step."""
    from ucgm.data.image_folder import ImageFolderDataset
    from ucgm.training.batches import DatasetBatches, LoaderBatches

    _image_folder(tmp_path / "images")
    dataset = ImageFolderDataset(tmp_path / "images", mode="L")
    runs = {}
    for workers in (0, 2):
        trainer = _trainer(_ImageRegression(), batches=dataset, steps=6, grad_accumulation=2, data_workers=workers,
                           data_prefetch=3, ema=EMAConfig(kind="none"), make_model=lambda: TinyMLP(dim=6))
        source = trainer.plan.source
        assert isinstance(source, LoaderBatches if workers else DatasetBatches)
        runs[workers] = (_losses_per_step(trainer, 3), trainer)
        if workers:
            assert isinstance(source._iterator, torch.utils.data.dataloader._MultiProcessingDataLoaderIter)
            assert source._iterator._num_workers == 2 and source._iterator._prefetch_factor == 3
    (serial, serial_trainer), (loaded, loaded_trainer) = runs[0], runs[2]
    assert loaded == serial and loaded_trainer.method.seen == serial_trainer.method.seen
    assert len(loaded_trainer.method.seen) == 3 * 2 * 2
    loaded_trainer.save_checkpoint(tmp_path / "run", METADATA)
    resumed = _trainer(_ImageRegression(), batches=dataset, steps=6, grad_accumulation=2, data_workers=2,
                       ema=EMAConfig(kind="none"), make_model=lambda: TinyMLP(dim=6))
    resumed.load_checkpoint(tmp_path / "run" / "checkpoints" / "step_0000003")
    assert _losses_per_step(resumed, 6) == _losses_per_step(serial_trainer, 6)
    assert resumed.method.seen == serial_trainer.method.seen[12:]
    resumed.plan.source.close()


def test_grad_accumulation_matches_the_mean_of_its_micro_batches():
    whole = _trainer(grad_accumulation=2)
    losses = _losses_per_step(whole, 1)
    objective = TinyFlowMatching()
    torch.manual_seed(0)
    model = TinyMLP()
    shard_losses = [objective(model, b.data, b.labels, generator=b.generator).loss.item()
                    for b in whole.plan.micro_batches(0)]
    assert losses[0]["loss"] == pytest.approx(sum(shard_losses) / 2, rel=1e-6)


def test_constant_ema_and_power_ema():
    trainer = _trainer(ema=EMAConfig(kind="constant", decay=0.75))
    initial = _parameters(trainer.model)
    trainer.fit(1)
    ema = trainer.networks["model"].ema
    for average, start, now in zip(ema.module.parameters(), initial, trainer.model.parameters()):
        assert torch.allclose(average, 0.75 * start + 0.25 * now)
    assert power_ema_exponent(0.1) == pytest.approx(6.94, abs=0.01)
    assert power_ema_exponent(0.05) == pytest.approx(16.97, abs=0.01)
    gamma = power_ema_exponent(0.07)
    assert math.sqrt((gamma + 1) / ((gamma + 2) ** 2 * (gamma + 3))) == pytest.approx(0.07)
    power = _trainer(ema=EMAConfig(kind="power", std=0.1)).networks["model"].ema
    assert power.decay(0) == 0.0
    assert power.decay(99) == pytest.approx(0.99 ** (6.94 + 1), rel=1e-3)
    assert _trainer(ema=EMAConfig(kind="none")).networks["model"].ema is None


def test_reference_networks_follow_their_mode():
    assert [round(warmed_up_decay(0.9, k), 6) for k in range(4)] == [0.0, 0.45, 0.57375, 0.643282]
    warm = TinyFlowMatching("ema", 0.9)
    warm.reference_warmup = True
    trainer = _trainer(warm)
    initial = _parameters(trainer.model)
    trainer.fit(1)  # d_0 = 0: before the first loss the reference is the model itself
    reference = trainer.networks["reference"].module
    assert all(torch.equal(r, p) for r, p in zip(reference.parameters(), initial))
    assert warm.reference_calls[-1] is reference

    frozen = _trainer(TinyFlowMatching("frozen"), pretrained=True)
    start = _parameters(frozen.model)
    frozen.fit(3)
    assert all(torch.equal(r, p) for r, p in zip(frozen.networks["reference"].module.parameters(), start))
    assert not all(torch.equal(r, p) for r, p in zip(frozen.model.parameters(), start))
    with pytest.raises(ConfigError, match="init.checkpoint"):
        _trainer(TinyFlowMatching("frozen"))  # a frozen copy of random weights is an error

    online = _trainer(TinyFlowMatching("online"))
    online.fit(1)
    assert online.method.reference_calls[-1] is online.model
    plain = _trainer(TinyFlowMatching(None))
    plain.fit(1)
    assert plain.method.reference_calls[-1] is None and set(plain.networks) == {"model"}


class _Curriculum(TinyFlowMatching):
    """A stand-in objective with a progress-dependent target decay mu(k), applied without warm-up."""

    def __init__(self):
        super().__init__("ema")
        self.progress = []

    def set_progress(self, step, total_steps=None):
        self.progress.append((step, total_steps))

    @property
    def reference_decay(self):
        return 0.5 if len(self.progress) < 2 else 0.9

    @reference_decay.setter
    def reference_decay(self, value):
        pass


def test_target_decay_of_a_curriculum_is_applied_directly_through_the_trainer():
    objective = _Curriculum()
    trainer = _trainer(objective, steps=7)
    target, source = trainer.networks["reference"], trainer.networks["model"]
    expected = _parameters(trainer.model)
    for step in range(3):
        online = _parameters(source.module)
        trainer.train_step()
        decay = 0.5 if step == 0 else 0.9
        expected = [decay * e + (1 - decay) * o for e, o in zip(expected, online)]
        for have, want in zip(target.module.parameters(), expected):
            torch.testing.assert_close(have, want)
    assert objective.progress == [(0, 7), (1, 7), (2, 7)]
    minimal_objective = _Curriculum()
    minimal_training_loop(TinyMLP(), minimal_objective, [(torch.randn(8, 2), None)], 2, 1e-3)
    assert minimal_objective.progress == [(0, 2), (1, 2)]


def test_learning_rate_warmup():
    assert [warmup_lr(1.0, step, 4) for step in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    trainer = _trainer()
    seen = []
    trainer.fit(4, [Hook(1, lambda t: seen.append(t.lr))])
    assert seen == [0.005, 0.01, 0.01, 0.01]


def test_gradient_norm_matches_clip_grad_norm():
    parameters = [torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(2))]
    parameters[0].grad = torch.tensor([1.0, 3.0, 4.0])
    parameters[1].grad = torch.tensor([0.5, 0.0])
    norm = gradient_norm(parameters)
    assert torch.equal(norm, torch.nn.utils.clip_grad_norm_(parameters, 1e9))


class _Poisoned(TinyFlowMatching):
    """Non-finite losses at the steps listed in ``bad_steps`` (counted per call)."""

    def __init__(self, bad_steps):
        super().__init__()
        self.bad_steps, self.calls = set(bad_steps), 0

    def __call__(self, model, data, labels=None, **kwargs):
        output = super().__call__(model, data, labels, **kwargs)
        poisoned = self.calls in self.bad_steps
        self.calls += 1
        loss = output.loss * torch.tensor(float("nan")) if poisoned else output.loss
        return ObjectiveOutput(loss, output.per_sample, {})


def test_non_finite_updates_are_skipped_counted_and_a_run_of_them_stops_training():
    trainer = _trainer(_Poisoned({1, 2}), max_nonfinite_steps=3)
    trainer.fit(2)
    after_bad = _parameters(trainer.model)
    trainer.fit(3)  # step 2 is bad as well: skipped, the weights do not move
    assert all(torch.equal(a, b) for a, b in zip(after_bad, trainer.model.parameters()))
    trainer.fit(5)
    assert trainer.nonfinite_steps == 2 and all(torch.isfinite(p).all() for p in trainer.model.parameters())
    diverging = _trainer(_Poisoned(range(2, 100)), max_nonfinite_steps=3)
    with pytest.raises(TrainingDiverged, match="3 consecutive updates"):
        diverging.fit(10)
    assert diverging.step == 4  # steps 2, 3, 4 non-finite: the third ends the run


def test_a_diverging_run_logs_its_non_finite_steps_and_stops_keeping_the_last_good_checkpoint(tmp_path):
    """Through ``run_training``: the skipped updates are counted in stats.jsonl, the run ends with a clear error
    after ``training.max_nonfinite_steps`` of them, and its checkpoints hold the last finite weights."""
    from ucgm.cli.run_log import read_stats
    from ucgm.cli.train import run_training
    from ucgm.training.checkpoint import latest_checkpoint, read_weights

    config = tiny_gmm_config("objective=training_fixtures:DivergingFlowMatching", "objective.diverge_at=6",
                             "training.steps=20", "training.log_every=1", "training.checkpoint_every=4",
                             "training.max_nonfinite_steps=3")
    with pytest.raises(TrainingDiverged, match="3 consecutive updates of model had non-finite gradients"):
        run_training(config, tmp_path, progress=False)
    records = read_stats(tmp_path / "stats.jsonl")
    assert [record["nonfinite_steps"] for record in records] == [0] * 6 + [1, 2]  # step 9 raises before its record
    checkpoint = latest_checkpoint(tmp_path)
    assert checkpoint.name == "step_0000008"  # written during the skipped updates: the weights of step 6
    weights = read_weights(checkpoint, "model")
    assert all(torch.isfinite(value).all() for value in weights.values())


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
    trainer = Trainer.for_objective(TinyMLP(), TinyFlowMatching(), CycledBatches(batches),
                                    TrainingConfig(steps=5, batch_size=8), OptimizerConfig(lr=1e-2))
    trainer.fit(5)
    assert trainer.step == 5
    with pytest.raises(ValueError, match="shards of 4"):
        CycledBatches(batches).shard_batch((0, 0), 4)


def test_network_specs_are_checked():
    with pytest.raises(ValueError, match="allowed: 'scratch'"):
        NetworkSpec(init="somewhere")
    with pytest.raises(ValueError, match="cannot also be trainable"):
        NetworkSpec(tracks="model")
    with pytest.raises(ValueError, match="repeats"):
        Phase("p", ("model",), repeats=0)
    method = TwoNetworkMethod()
    with pytest.raises(ConfigError, match="no network 'fake'"):
        build_networks(method, TinyMLP(), OPTIMIZER, EMAConfig(), build_backbone=lambda role, spec: TinyMLP(),
                       overrides={"fake": {"optimizer": {"lr": 1.0}}})
    with pytest.raises(ConfigError, match="unknown setting networks.critic.optimizer.learning_rate"):
        build_networks(method, TinyMLP(), OPTIMIZER, EMAConfig(), build_backbone=lambda role, spec: TinyMLP(),
                       overrides={"critic": {"optimizer": {"learning_rate": 1.0}}})


def test_method_owned_networks_are_trained_and_resumed_exactly(tmp_path):
    """sCM's adaptive weighting head: a network the method builds, optimised with the model, checkpointed."""
    from ucgm.cli.components import build_dataset, build_method, build_model, build_run_networks, with_data_defaults

    config = tiny_gmm_config("transport.name=trigflow", "objective=scm", "objective.tangent_method=finite_difference",
                             "objective.tangent_warmup_steps=2", "objective.adaptive_weighting=true")
    dataset = build_dataset(config)
    config = with_data_defaults(config, dataset.shape, dataset.num_classes)

    def make_trainer():
        torch.manual_seed(0)
        method = build_method(config)
        networks = build_run_networks(config, method, build_model(config), False)
        return Trainer(method, networks, dataset, config.training)

    uninterrupted = make_trainer()
    head = uninterrupted.networks["weighting"].module
    head_before = _parameters(head)
    expected = _losses_per_step(uninterrupted, 6)
    assert any(not torch.equal(a, b) for a, b in zip(head_before, head.parameters()))

    first = make_trainer()
    before = _losses_per_step(first, 3)
    first.save_checkpoint(tmp_path, METADATA)
    resumed = make_trainer()
    resumed.load_checkpoint(tmp_path / "checkpoints" / "step_0000003")
    assert before + _losses_per_step(resumed, 6) == expected
    for a, b in zip(head.parameters(), resumed.networks["weighting"].module.parameters()):
        assert torch.equal(a, b)
