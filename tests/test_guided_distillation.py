"""Guided-model distillation (Meng et al.): exact targets of both stages against closed forms, the curriculum and
its round teachers, the DDIM samplers' budgets, the CLI run with its own sampler, and exact resume after SIGKILL."""

from __future__ import annotations

import json
import math
import random
import signal
import subprocess

import pytest
import torch
from training_fixtures import TINY_GMM, cli_command, run_cli, subprocess_env, tiny_gmm_config

from ucgm.cli import main
from ucgm.cli.run_log import read_stats
from ucgm.cli.train import run_training
from ucgm.data.mixtures import OracleModel, make_mixture
from ucgm.methods.base import Batch
from ucgm.methods.consistency.mcm import ddim_step
from ucgm.methods.distillation.guided import (
    DistillationCurriculum,
    GuidanceConditioned,
    GuidedDistillation,
    guided_prediction,
    truncated_snr_loss,
    two_step_target,
)
from ucgm.models.mlp import MLP
from ucgm.sampling.guidance import ClassifierFreeGuidance
from ucgm.sampling.noise import PerSampleNoise
from ucgm.sampling.registry import get_sampler
from ucgm.training.checkpoint import complete_checkpoints, read_weights
from ucgm.training.loading import load_checkpoint_model
from ucgm.transports import make_transport

ORACLE = "oracle:8gaussians"
GD = ["objective=guided_distillation"]


def _points(batch: int = 64, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    x_t = torch.randn(batch, 2, generator=generator, dtype=torch.float64)
    labels = torch.randint(0, 8, (batch,), generator=generator)
    guidance = 4 * torch.rand(batch, generator=generator, dtype=torch.float64)
    return x_t, labels, guidance


# ------------------------------------------------------------------------------------------------ stage 1
@pytest.mark.parametrize("transport_name", ["linear", "vp"])
def test_the_stage1_target_is_the_cfg_combination_of_the_exact_oracle(transport_name):
    transport = make_transport(transport_name)
    method = GuidedDistillation(transport, teacher=ORACLE)
    mixture = make_mixture("8gaussians")
    x_t, labels, guidance = _points()
    t = torch.rand(64, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 0.98 + 0.01
    target = method.stage1_targets(x_t, t, labels, guidance)
    null = torch.full_like(labels, mixture.num_classes)
    data_c, noise_c = mixture.predictions(x_t, t, transport, labels)
    data_u, noise_u = mixture.predictions(x_t, t, transport, null)
    w = guidance[:, None]
    torch.testing.assert_close(target.data, (1 + w) * data_c - w * data_u, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(target.noise, (1 + w) * noise_c - w * noise_u, rtol=1e-9, atol=1e-10)


def test_meng_w_is_ucgm_cfg_scale_minus_one():
    transport = make_transport("linear")
    oracle = OracleModel(make_mixture("8gaussians"), transport)
    x_t, labels, _ = _points()
    t = torch.full((64,), 0.6, dtype=torch.float64)
    for w in (0.0, 0.5, 3.0):
        ours = guided_prediction(oracle, oracle.transport, x_t, t, labels, 8, torch.full((64,), w,
                                                                                         dtype=torch.float64))
        theirs = oracle.transport.predict(ClassifierFreeGuidance(oracle, scale=1 + w), x_t, t, labels)
        torch.testing.assert_close(ours.data, theirs.data, rtol=1e-12, atol=1e-12)


def test_truncated_snr_loss_is_max_snr_one_times_the_data_error():
    transport = make_transport("linear")
    x_t, _, _ = _points(seed=3)
    t = torch.tensor([0.05, 0.3, 0.5, 0.9] * 16, dtype=torch.float64)
    generator = torch.Generator().manual_seed(4)
    student = transport.predict(lambda x, time, labels: torch.randn(x.shape, generator=generator,
                                                                    dtype=x.dtype), x_t, t)
    target = transport.predict(lambda x, time, labels: torch.randn(x.shape, generator=generator,
                                                                   dtype=x.dtype), x_t, t)
    snr = ((1 - t) / t) ** 2
    expected = torch.clamp(snr, min=1) * ((student.data - target.data) ** 2).mean(dim=1)
    torch.testing.assert_close(truncated_snr_loss(student, target.data, target.noise), expected, rtol=1e-10,
                               atol=1e-12)


# ------------------------------------------------------------------------------------------------ stage 2
@pytest.mark.parametrize("transport_name", ["linear", "vp", "trigflow"])
def test_one_ddim_step_with_the_progressive_target_lands_on_the_two_step_teacher_point(transport_name):
    transport = make_transport(transport_name)
    oracle = OracleModel(make_mixture("8gaussians"), transport)
    x_t, labels, guidance = _points(seed=5)
    steps = 8
    t = (torch.randint(0, steps, (64,), generator=torch.Generator().manual_seed(6)) + 1).double() / steps

    def teacher_data(x, time):
        return guided_prediction(oracle, oracle.transport, x, time, labels, 8, guidance).data

    target, teacher_point = two_step_target(teacher_data, transport.path, x_t, t, torch.full_like(t, 1 / steps))
    # the two teacher DDIM steps, written out: x' = gamma' x_hat + alpha' (x - gamma x_hat) / alpha
    path = transport.path

    def step(x, start, end):
        x_hat = teacher_data(x, start)
        noise_hat = (x - path.gamma(start)[:, None] * x_hat) / path.alpha(start)[:, None]
        return path.gamma(end)[:, None] * x_hat + path.alpha(end)[:, None] * noise_hat

    middle = t - 0.5 / steps
    explicit = step(step(x_t, t, middle), middle, t - 1 / steps)
    torch.testing.assert_close(teacher_point, explicit, rtol=1e-12, atol=1e-12)
    landed = ddim_step(path, x_t, target, t, t - 1 / steps)
    torch.testing.assert_close(landed, explicit, rtol=1e-10, atol=1e-10)
    last = t == 1 / steps  # the last student step: the target is the teacher's second data prediction
    torch.testing.assert_close(target[last], teacher_data(step(x_t, t, middle), middle)[last], rtol=1e-10,
                               atol=1e-10)


def test_the_method_distils_two_steps_of_its_round_teacher_at_the_same_guidance():
    torch.manual_seed(0)
    transport = make_transport("linear")
    method = GuidedDistillation(transport, teacher=ORACLE)
    teacher = MLP(2, hidden=16, depth=1, num_classes=8, conditions=("guidance",)).double()
    for parameter in teacher.parameters():
        torch.nn.init.normal_(parameter, std=0.3)
    x_t, labels, guidance = _points(seed=7)
    t = torch.full((64,), 0.75, dtype=torch.float64)
    data_target, noise_target = method.stage2_targets(teacher, x_t, t, labels, guidance, student_steps=4)
    guided_teacher = lambda x, time: transport.predict(teacher, x, time, labels, guidance=guidance).data  # noqa
    _, teacher_point = two_step_target(guided_teacher, transport.path, x_t, t, torch.full_like(t, 0.25))
    torch.testing.assert_close(ddim_step(transport.path, x_t, data_target, t, t - 0.25), teacher_point)
    torch.testing.assert_close(transport.interpolate(data_target, noise_target, t), x_t)
    other_w = transport.predict(teacher, x_t, t, labels, guidance=guidance + 1).data
    assert not torch.allclose(other_w, guided_teacher(x_t, t))  # the guidance condition matters


# ------------------------------------------------------------------------------------------------ curriculum
def test_the_curriculum_halves_the_steps_in_equal_rounds_after_stage1():
    curriculum = DistillationCurriculum(100, 0.5, 64, 4)
    assert curriculum.rounds == 4 and curriculum.round_end_steps() == [50, 62, 75, 87, 100]
    stages = [curriculum.stage_at(step) for step in (0, 49, 50, 61, 62, 87, 99, 150)]
    assert [(s.round, s.student_steps) for s in stages] == [(0, 64), (0, 64), (1, 32), (1, 32), (2, 16), (4, 4),
                                                             (4, 4), (4, 4)]
    method = GuidedDistillation(teacher=ORACLE)
    method.set_progress(0, 100)
    decays = [method.tracking_decay("round_teacher", step) for step in range(100)]
    assert [step for step, decay in enumerate(decays) if decay == 0.0] == [50, 62, 75, 87]
    assert set(decays) == {0.0, 1.0}
    assert DistillationCurriculum(10, 0.5, 4, 4).round_end_steps() == [10]  # no rounds: stage 1 only


def test_the_bench_raises_the_step_count_until_the_stage_ends_share_a_checkpoint_interval():
    from ucgm.bench.guided_distillation import MAX_CHECKPOINTS, aligned_curriculum

    def interval(curriculum: DistillationCurriculum) -> int:
        return math.gcd(*curriculum.round_end_steps())

    # 1500 steps end stages at 1275, 1312, 1350, ... (interval 1: a checkpoint every step); 1520 ends every 38
    assert interval(DistillationCurriculum(1500, 0.85, 64, 1)) * MAX_CHECKPOINTS < 1500
    raised = aligned_curriculum(1500, 0.85, 64, 1)
    assert raised.total_steps == 1520 and raised.round_end_steps() == [1292, 1330, 1368, 1406, 1444, 1482, 1520]
    assert all(interval(DistillationCurriculum(total, 0.85, 64, 1)) * MAX_CHECKPOINTS < total
               for total in range(1500, 1520))  # the first aligned count
    assert aligned_curriculum(3000, 0.85, 64, 1).total_steps == 3000 and interval(
        aligned_curriculum(3000, 0.85, 64, 1)) == 75


def test_bad_options_and_unconditional_data_are_clear_errors():
    with pytest.raises(ValueError, match="power of 2"):
        GuidedDistillation(teacher=ORACLE, teacher_steps=48, student_steps=4)
    with pytest.raises(ValueError, match="guidance_range"):
        GuidedDistillation(teacher=ORACLE, guidance_range=[3.0, 1.0])
    with pytest.raises(ValueError, match="teacher is required"):
        GuidedDistillation()
    method = GuidedDistillation(teacher=ORACLE)
    method.set_progress(0, 10)
    batch = Batch(torch.zeros(4, 2), None, None, torch.Generator())
    with pytest.raises(ValueError, match="needs class labels"):
        method.loss("distill", None, batch)
    with pytest.raises(ValueError, match="path"):
        GuidedDistillation("trigflow", teacher=OracleModel(make_mixture("8gaussians"), make_transport("linear"))
                           ).stage1_targets(*_points()[:1], torch.full((64,), 0.5), *_points()[1:])


# ------------------------------------------------------------------------------------------------ samplers
@pytest.mark.parametrize("name", ["ddim", "ddim-stochastic"])
@pytest.mark.parametrize("nfe", [1, 2, 5])
def test_the_samplers_spend_the_advertised_nfe(name, nfe):
    transport = make_transport("linear")
    oracle = OracleModel(make_mixture("8gaussians"), transport)
    calls = []

    def counted(x, t, labels=None):
        calls.append(float(t[0]))
        return oracle(x, t, labels)

    noise = torch.randn(16, 2, generator=torch.Generator().manual_seed(0))
    result = get_sampler(name)(counted, oracle.transport, noise, None, nfe, torch.Generator().manual_seed(1))
    assert result.nfe == nfe == len(calls)
    assert calls == pytest.approx([1 - k / nfe for k in range(nfe)])
    assert torch.isfinite(result.sample).all()


def test_ddim_is_euler_on_the_linear_path_and_the_stochastic_sampler_draws_per_sample():
    transport = make_transport("linear")
    oracle = OracleModel(make_mixture("8gaussians"), transport)
    noise = torch.randn(8, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    ddim = get_sampler("ddim")(oracle, oracle.transport, noise, None, 6, None).sample
    euler = get_sampler("euler")(oracle, oracle.transport, noise, None, 6, None).sample
    torch.testing.assert_close(ddim, euler, rtol=1e-10, atol=1e-10)
    stochastic = get_sampler("ddim-stochastic")
    whole = stochastic(oracle, oracle.transport, noise, None, 4, PerSampleNoise(3, range(8))).sample
    halves = [stochastic(oracle, oracle.transport, noise[rows], None, 4, PerSampleNoise(3, range(8)[rows])).sample
              for rows in (slice(0, 4), slice(4, 8))]
    torch.testing.assert_close(whole, torch.cat(halves))
    assert not torch.allclose(whole, get_sampler("ddim")(oracle, oracle.transport, noise, None, 4, None).sample)
    one = stochastic(oracle, oracle.transport, noise, None, 1, PerSampleNoise(3, range(8))).sample
    torch.testing.assert_close(one, get_sampler("ddim")(oracle, oracle.transport, noise, None, 1, None).sample)


def test_the_sampling_model_adds_the_guidance_condition():
    student = MLP(2, hidden=8, depth=1, num_classes=8, conditions=("guidance",))
    x, t, labels = torch.randn(4, 2), torch.rand(4), torch.arange(4)
    wrapped = GuidanceConditioned(student, 2.5)
    torch.testing.assert_close(wrapped(x, t, labels), student(x, t, labels, guidance=torch.full((4,), 2.5)))
    assert wrapped.num_classes == 8
    _, transport = GuidedDistillation(teacher=ORACLE, sample_guidance=2.5).sampling_model({"student": student})
    assert transport.path.name == "linear"


# ------------------------------------------------------------------------------------------------ CLI runs
def test_cli_run_trains_every_round_and_samples_with_its_own_sampler(tmp_path):
    run_dir = tmp_path / "run"
    assert main(["train", "gmm", *GD, "--run-dir", str(run_dir), "--steps", "30", "--checkpoint-every", "2",
                 "--log-every", "1", "--no-progress", *TINY_GMM]) == 0
    records = read_stats(run_dir / "stats.jsonl")
    method = load_checkpoint_model(run_dir).method
    curriculum = DistillationCurriculum(30, method.stage1_fraction, method.teacher_steps, method.student_steps)
    assert [(r["distillation_round"], r["student_steps"]) for r in records] == [
        tuple(map(float, curriculum.stage_at(r["step"] - 1))) for r in records]
    assert {r["distillation_round"] for r in records} == {0.0, 1.0, 2.0, 3.0, 4.0}
    # the round teacher of the last round is the student as it was when that round started (step 26)
    last_start = curriculum.round_end_steps()[-2]
    final, at_start = run_dir / "checkpoints" / "step_0000030", run_dir / "checkpoints" / f"step_{last_start:07d}"
    teacher, student_then = read_weights(final, "round_teacher"), read_weights(at_start, "model")
    assert teacher.keys() == student_then.keys()
    assert all(torch.equal(teacher[key], student_then[key]) for key in teacher)
    out = tmp_path / "evaluation"
    assert main(["evaluate", str(run_dir), "--out", str(out), "--nfe", "1,4", "--num", "64", "--no-progress"]) == 0
    evaluated = [r for r in json.loads((out / "metrics.json").read_text()) if r["nfe"] > 0]
    assert {r["sampler"] for r in evaluated} == {"ddim"} and {r["nfe"] for r in evaluated} == {1, 4}
    assert main(["sample", str(run_dir), "--out", str(tmp_path / "samples.npz"), "--num", "8",
                 "objective.sample_guidance=3.0"]) == 0
    assert main(["sample", str(run_dir), "--out", str(tmp_path / "noisy.npz"), "--num", "8", "--nfe", "4",
                 "--sampler", "ddim-stochastic"]) == 0


def test_sigkill_then_rerun_resumes_the_curriculum_exactly(tmp_path):
    steps, every = 60, 7
    overrides = [*GD, *TINY_GMM]
    reference_dir, run_dir = tmp_path / "uninterrupted", tmp_path / "interrupted"
    config = tiny_gmm_config(*GD, f"training.steps={steps}", f"training.checkpoint_every={every}",
                             "training.log_every=1")
    run_training(config, reference_dir, progress=False)
    expected = read_stats(reference_dir / "stats.jsonl")
    arguments = ["train", "gmm", "--run-dir", str(run_dir), "--steps", str(steps), "--checkpoint-every", str(every),
                 "--log-every", "1", *overrides]
    kill_step = random.Random().randint(every + 1, steps - 5)
    process = subprocess.Popen(cli_command(*arguments), env=subprocess_env(), stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    try:
        while process.poll() is None:
            logged = read_stats(run_dir / "stats.jsonl")
            if complete_checkpoints(run_dir) and logged and logged[-1]["step"] >= kill_step:
                process.send_signal(signal.SIGKILL)
                break
    finally:
        process.wait()
    assert process.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    finished = run_cli(*arguments)
    assert finished.returncode == 0, finished.stderr
    keys = ("step", "loss", "distillation_round", "student_steps", "lr")
    got = read_stats(run_dir / "stats.jsonl")
    assert [[r[key] for key in keys] for r in got] == [[r[key] for key in keys] for r in expected]


# ------------------------------------------------------------------------------------------------ bench rows
def test_bench_rows_at_toy_size(tmp_path):
    from ucgm.bench.distribution_matching import DIGITS_OVERRIDES, BenchContext, DistributionMatchingSizes
    from ucgm.bench.guided_distillation import METHOD, claim_lines, guided_distillation_records
    from ucgm.metrics.digits_fd import digits_frechet_distance
    from ucgm.metrics.suites import SlicedW2Against

    sizes = DistributionMatchingSizes(gmm_steps=2, flow_matching_steps=40, digits_teacher_steps=2, digits_steps=8,
                                      num_gmm=64, num_reference=256, num_digits=64, floor_repeats=1,
                                      timing_block_steps=1, timing_rounds=1)
    exact = make_mixture("8gaussians").sample(256, torch.Generator().manual_seed(0))[0]
    context = BenchContext(sizes, tmp_path, tmp_path, DIGITS_OVERRIDES, SlicedW2Against(exact),
                           lambda samples: digits_frechet_distance(samples)["value"])
    rows = guided_distillation_records(context)
    assert all(set(row) == {"dataset", "method", "sampler", "nfe", "metric", "value"} for row in rows)
    keys = {(row["dataset"], row["method"], row["sampler"], row["nfe"], row["metric"]) for row in rows}
    for metric in ("sliced_w2", "mode_coverage", "sliced_w2_to_teacher", "class_std"):
        assert {("gmm-conditional", "guided_distillation", "ddim", nfe, metric) for nfe in (1, 2, 4)} <= keys
        assert {("gmm-conditional", "cfg_teacher", "ddim", nfe, metric) for nfe in (1, 2, 4, 64)} <= keys
        assert {("gmm-conditional", "guided_distillation", "ddim-stochastic", nfe, metric) for nfe in (2, 4)} <= keys
        assert ("gmm-conditional", "guided_distillation_stage1", "ddim", 64, metric) in keys
    assert {("digits", "guided_distillation", "ddim", nfe, "digits_fd") for nfe in (1, 2, 4)} <= keys
    assert {("digits", "cfg_teacher", "ddim", nfe, "digits_fd") for nfe in (4, 64)} <= keys
    assert all(math.isfinite(row["value"]) for row in rows)
    assert all(0 <= row["value"] <= 1 for row in rows if row["metric"] == "mode_coverage")
    teacher = {row["metric"]: row["value"] for row in rows if row["method"] == "cfg_teacher" and row["nfe"] == 64}
    # the exact guided teacher at 64 steps: every mode, and its distance to another draw of itself is small
    assert teacher["mode_coverage"] == 1.0 and teacher["sliced_w2_to_teacher"] < 0.25 * teacher["sliced_w2"]
    lines = claim_lines(rows)
    student = next(row["value"] for row in rows if (row["dataset"], row["method"], row["sampler"], row["nfe"],
                                                    row["metric"]) == ("digits", METHOD, "ddim", 4, "digits_fd"))
    assert len(lines) == 2 and f"NFE 4 {student:.4g}" in lines[1]
    assert claim_lines([row for row in rows if row["dataset"] == "digits"]) == lines[1:]


def test_the_rows_join_the_distribution_matching_section():
    from ucgm.bench import SECTIONS, distribution_matching, report_distribution_matching  # noqa: F401 (registers)
    from ucgm.bench.guided_distillation import guided_distillation_records

    assert SECTIONS["distribution_matching"].in_quick
    assert guided_distillation_records in distribution_matching.EXTRA_RECORDS
