"""AutoDiffusion's search: operators that keep exactly N distinct steps (the released code's duplicate-step bug
cannot happen), a skip-layer mutation that changes the candidate (its no-op bug cannot happen), the shared
evolution engine, block skipping, explicit grids in the samplers, schedule files and ``ucgm search``."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch
from training_fixtures import TINY_GMM

from ucgm.analysis.autodiffusion import StepSpace, search_steps
from ucgm.analysis.evolution import EvolutionSettings, evolve
from ucgm.analysis.gridsearch import EvaluationSet
from ucgm.cli import main
from ucgm.data.mixtures import OracleModel, eight_gaussians
from ucgm.metrics.suites import SlicedW2Against
from ucgm.models import build_model
from ucgm.models.skipping import StepSkipping, skippable_blocks, skipping
from ucgm.sampling.registry import get_sampler
from ucgm.sampling.schedules import Schedule, read_schedule, write_schedule
from ucgm.timegrids import kumaraswamy_grid, uniform_grid
from ucgm.transports import make_transport


def _distinct(candidate, steps: int, levels: int) -> bool:
    chosen = [level for level, _ in candidate]
    return len(chosen) == steps == len(set(chosen)) and all(1 <= level <= levels for level in chosen)


@pytest.mark.parametrize("skip", [False, True])
def test_every_candidate_of_every_operator_has_exactly_n_distinct_steps(skip):
    space = StepSpace(4, 12, blocks=3 if skip else 0, budget=8 if skip else None, mutation_probability=0.5)
    rng = random.Random(0)
    pool = [space.random_candidate(rng) for _ in range(20)] + [space.uniform()]
    for _ in range(2000):
        first, second = rng.choice(pool), rng.choice(pool)
        child = rng.choice([space.mutate(first, rng), space.crossover(first, second, rng), space.random_candidate(rng)])
        assert _distinct(child, 4, 12), child
        assert child == space.canonical(child)
        if skip:
            assert space.cost(child) <= 8 and all(len(s) <= 2 for _, s in child)
        pool.append(child)


def test_crossover_of_parents_sharing_levels_keeps_n_distinct_steps():
    """The released code draws gene i from either parent: (10, 9, 8, 7) x (9, 8, 7, 6) can give 9 twice and then
    silently run 3 steps. Here every crossover has 4 distinct steps."""
    space = StepSpace(4, 20)
    first, second = space.canonical([(level, ()) for level in (10, 9, 8, 7)]), \
        space.canonical([(level, ()) for level in (9, 8, 7, 6)])
    for seed in range(500):
        assert _distinct(space.crossover(first, second, random.Random(seed)), 4, 20)


def test_skip_layer_mutation_changes_the_candidate_and_keeps_its_steps():
    space = StepSpace(3, 30, blocks=4, budget=10, mutation_probability=0.1)
    rng = random.Random(1)
    for _ in range(300):
        parent = space.random_candidate(rng)
        child = space.mutate(parent, rng, skips_only=True)
        assert child != parent
        assert [level for level, _ in child] == [level for level, _ in parent]
        assert space.cost(child) <= 10
    for _ in range(300):  # a full mutation always changes something too
        parent = space.random_candidate(rng)
        assert space.mutate(parent, rng) != parent


def test_evolution_evaluates_each_candidate_once_and_is_seeded():
    calls = []

    def fitness(candidate):
        calls.append(candidate)
        return abs(sum(candidate) - 7)

    settings = EvolutionSettings(population=8, generations=5, elite=2, seed=3)
    mutate = lambda c, rng: tuple(v + rng.choice((-1, 1)) for v in c)  # noqa: E731
    cross = lambda a, b, rng: tuple(rng.choice(pair) for pair in zip(a, b))  # noqa: E731
    draw = lambda rng: (rng.randint(-5, 5), rng.randint(-5, 5))  # noqa: E731
    result = evolve([(0, 0)], fitness, mutate, cross, draw, settings)
    assert len(calls) == len(set(calls)) == len(result.evaluated)
    assert result.value == 0 and result.history == sorted(result.history, reverse=True)
    assert evolve([(0, 0)], fitness, mutate, cross, draw, settings).best == result.best
    with pytest.raises(ValueError, match="exceed population"):
        EvolutionSettings(population=4, elite=1, mutations=3, crossovers=2)


@pytest.fixture(scope="module")
def gmm():
    mixture = eight_gaussians()
    oracle = OracleModel(mixture, make_transport("linear"))

    def evaluation_set(seed: int, size: int = 400) -> EvaluationSet:
        reference = mixture.sample(4000, torch.Generator().manual_seed(100 + seed))[0]
        return EvaluationSet(torch.randn(size, 2, generator=torch.Generator().manual_seed(seed)),
                             SlicedW2Against(reference, 64))

    return oracle, evaluation_set


def test_searched_steps_never_score_worse_than_uniform_on_the_search_set(gmm):
    oracle, evaluation_set = gmm
    search, evaluation = evaluation_set(0), evaluation_set(1)
    settings = EvolutionSettings(population=8, generations=3, elite=2)
    for sampler, nfe in (("ucgm", 4), ("euler", 3), ("heun", 5)):
        report = search_steps(oracle, oracle.transport, nfe, search, evaluation, settings, sampler, levels=60)
        assert report["search_value"] <= report["uniform_search_value"]
        assert all(len(set(c["times"])) == report["steps"] + 1 for c in report["candidates"])
        assert len({tuple(c["times"]) for c in report["candidates"]}) == len(report["candidates"])
        schedule = report["schedule"]
        assert len(schedule.times) == report["steps"] + 1 and schedule.sampler == sampler
        rescored = evaluation.score(lambda noise, labels: get_sampler(sampler, schedule.sampler_settings())(
            oracle, oracle.transport, noise, labels, nfe, None))[0]
        assert rescored == pytest.approx(report["evaluation_value"])
    with pytest.raises(ValueError, match="another seed"):
        search_steps(oracle, oracle.transport, 4, search, search, settings)
    with pytest.raises(ValueError, match="no searchable steps"):
        search_steps(oracle, oracle.transport, 4, search, evaluation, settings, "edm")


def test_explicit_grids_reproduce_the_samplers_own_grids(gmm):
    oracle, _ = gmm
    noise = torch.randn(16, 2, generator=torch.Generator().manual_seed(0))
    own = get_sampler("ucgm-official")(oracle, oracle.transport, noise, None, 5, None).sample
    times = kumaraswamy_grid(5, gaps=(0.001, 0.001)).tolist()
    given = get_sampler("ucgm-official", {"times": times})(oracle, oracle.transport, noise, None, 5, None).sample
    assert torch.allclose(own, given)
    euler = get_sampler("euler", {"times": uniform_grid(4).tolist()})(oracle, oracle.transport, noise, None, 4, None)
    assert torch.equal(euler.sample, get_sampler("euler")(oracle, oracle.transport, noise, None, 4, None).sample)
    with pytest.raises(ValueError, match="times has 4 intervals but the sampler runs 6"):
        get_sampler("euler", {"times": uniform_grid(4).tolist()})(oracle, oracle.transport, noise, None, 6, None)
    with pytest.raises(ValueError, match="skip_blocks needs the schedule's times"):
        get_sampler("ucgm", {"skip_blocks": [[0]]})


def test_skipped_blocks_fall_back_to_their_skip_path():
    mlp = build_model({"name": "mlp", "data_dim": 2, "hidden": 8, "depth": 3})
    with torch.no_grad():  # random weights everywhere (zero-initialised outputs would hide any difference)
        for parameter in mlp.parameters():
            parameter.normal_(0.0, 0.5, generator=torch.Generator().manual_seed(parameter.numel()))
    x, t = torch.randn(5, 2), torch.full((5,), 0.5)
    blocks = skippable_blocks(mlp)
    with skipping(blocks, range(3)):
        skipped = mlp(x, t)
    assert torch.allclose(skipped, mlp.output(mlp.input(x)))  # all residual blocks -> identity
    assert not torch.allclose(mlp(x, t), skipped)
    unet = build_model({"name": "unet", "input_size": 8, "in_channels": 1, "base_channels": 8,
                        "channel_mults": [1, 2], "num_res_blocks": 1, "max_groups": 4})
    assert len(skippable_blocks(unet)) == 8  # 2 down, 2 middle, 4 up stages
    dit = build_model({"name": "dit", "input_size": 8, "in_channels": 1, "patch_size": 2, "hidden_size": 16,
                       "depth": 2, "num_heads": 2})
    images = torch.randn(2, 1, 8, 8)
    with skipping(skippable_blocks(unet), range(8)), skipping(skippable_blocks(dit), [0, 1]):
        assert torch.isfinite(unet(images, t[:2])).all() and torch.isfinite(dit(images, t[:2])).all()
    # Per step: block 0 skipped at the step of time 0.75 only.
    wrapped = StepSkipping(mlp, mlp, torch.tensor([1.0, 0.75]), [[], [0]])
    with skipping(blocks, [0]):
        expected = mlp(x, torch.full((5,), 0.75))
    assert torch.equal(wrapped(x, torch.full((5,), 0.75)), expected)
    assert torch.equal(wrapped(x, torch.full((5,), 1.0)), mlp(x, torch.full((5,), 1.0)))
    assert wrapped.step_of(torch.tensor([0.3])) is None


def test_schedule_files_round_trip_and_reject_bad_content(tmp_path):
    schedule = Schedule("ucgm", 3, [1.0, 0.6, 0.2, 0.0], [[0], [], [1, 2]], {"gaps": [0.001, 0.001]})
    write_schedule(schedule, tmp_path / "schedule.json")
    again = read_schedule(tmp_path)
    assert again.to_dict() == schedule.to_dict()
    assert again.sampler_settings()["skip_blocks"] == [[0], [], [1, 2]]
    with pytest.raises(ValueError, match="decrease strictly"):
        Schedule("ucgm", 3, [1.0, 0.2, 0.6, 0.0])
    with pytest.raises(ValueError, match="takes no explicit grid"):
        Schedule("edm", 3, [1.0, 0.5, 0.0])
    (tmp_path / "bad.json").write_text(json.dumps({"sampler": "ucgm"}))
    with pytest.raises(ValueError, match="not a ucgm schedule"):
        read_schedule(tmp_path / "bad.json")


# ------------------------------------------------------------------------------------------------- CLI
def _search(run_dir, out, *extra) -> int:
    return main(["search", str(run_dir), "--nfe", "4", "--out", str(out), "--population", "6", "--generations", "2",
                 "--elite", "2", "--num-search", "64", "--num-eval", "96", "--levels", "40", "--num-reference", "1000", *extra])


def test_ucgm_search_on_a_gmm_run_and_its_schedule_in_sample_and_evaluate(tmp_path, capsys):
    run_dir = tmp_path / "gmm"
    assert main(["train", "gmm", "--run-dir", str(run_dir), "--steps", "20", "--no-progress", *TINY_GMM,
                 "model.depth=3"]) == 0
    out = tmp_path / "search"
    assert _search(run_dir, out, "--skip-budget", "0.8", "--kumaraswamy") == 0
    result = json.loads((out / "search.json").read_text())
    schedules = [record["schedule"] for record in result["records"]]
    assert schedules == ["uniform", "ucgm-default", "kumaraswamy-search", "autodiffusion"]
    assert all(record["nfe"] == 4 and record["metric"] == "sliced_w2" for record in result["records"])
    searched = {r["schedule"]: r for r in result["records"]}
    assert searched["autodiffusion"]["search_value"] <= searched["uniform"]["search_value"]
    schedule = read_schedule(out)
    assert schedule.skip_blocks is not None and len(schedule.times) == 5
    assert "| autodiffusion |" in (out / "search.md").read_text()
    evaluation = tmp_path / "evaluation"
    assert main(["evaluate", str(run_dir), "--out", str(evaluation), "--schedule", str(out), "--num", "96", "--num-reference", "1000",
                 "--no-progress"]) == 0
    record = next(r for r in json.loads((evaluation / "metrics.json").read_text())
                  if r["sampler"] == f"schedule:{out}" and r["metric"] == "sliced_w2")
    assert record["nfe"] == 4 and record["value"] == pytest.approx(searched["autodiffusion"]["value"], rel=1e-6)
    assert main(["sample", str(run_dir), "--schedule", str(out), "--out", str(tmp_path / "s.npz"), "--num", "8"]) == 0
    assert np.isfinite(np.load(tmp_path / "s.npz")["samples"]).all()
    capsys.readouterr()
    assert _search(run_dir, tmp_path / "bad", "--skip-budget", "1.5") == 2
    assert "ucgm search: error: skip_budget=1.5 must lie in (0, 1]" in capsys.readouterr().err


def test_ucgm_search_on_a_digits_run(tmp_path):
    run_dir = tmp_path / "digits"
    assert main(["train", "digits", "--run-dir", str(run_dir), "--steps", "2", "--no-progress",
                 "model.base_channels=8", "training.batch_size=8", "training.sample_every=0"]) == 0
    out = tmp_path / "search"
    assert _search(run_dir, out, "--sampler", "euler") == 0
    records = json.loads((out / "search.json").read_text())["records"]
    assert [r["schedule"] for r in records] == ["uniform", "euler-default", "autodiffusion"]
    assert all(r["metric"] == "digits_fd" and r["value"] > 0 for r in records)
    assert read_schedule(out).sampler == "euler"
