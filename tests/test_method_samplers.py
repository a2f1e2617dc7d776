"""Every registered method samples with its own sampler by default: ``ucgm train gmm objective=NAME`` then
``ucgm evaluate`` (records name the method's sampler) and ``ucgm sample`` (finite samples), through the same
checkpoint loading; any other registry sampler can still be chosen."""

from __future__ import annotations

import json

import numpy as np
import pytest
from training_fixtures import TINY_GMM

from ucgm.cli import main
from ucgm.methods.registry import METHODS
from ucgm.training.loading import load_checkpoint_model


#: The samplers the consistency family and UCGM name as their own (the other families are checked against their
#: ``Method.sampler()`` alone).
OWN_SAMPLERS = {"cd": "cm-multistep", "ct": "cm-multistep", "ict": "cm-multistep", "ect": "cm-multistep",
                "tcm": "cm-multistep", "mcm": "mcm", "scm": "scm", "ucgm": "ucgm"}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One tiny run per method (2 steps), trained on first use."""
    runs = {}

    def run(name: str):
        if name not in runs:
            run_dir = tmp_path_factory.mktemp(name.replace(":", "_"))
            assert main(["train", "gmm", f"objective={name}", "--run-dir", str(run_dir), "--steps", "2",
                         "--no-progress", *TINY_GMM]) == 0
            runs[name] = run_dir
        return runs[name]

    return run


@pytest.mark.parametrize("name", sorted(METHODS))
def test_evaluate_and_sample_use_the_methods_own_sampler(tmp_path, trained, name):
    run_dir = trained(name)
    loaded = load_checkpoint_model(run_dir)
    own = loaded.method.sampler()[0]
    assert own == OWN_SAMPLERS.get(name, own)
    out = tmp_path / "evaluation"
    assert main(["evaluate", str(run_dir), "--out", str(out), "--nfe", "2", "--num", "32", "--no-progress"]) == 0
    records = [r for r in json.loads((out / "metrics.json").read_text()) if r["nfe"] > 0]
    assert records and {record["sampler"] for record in records} == {own}
    assert main(["sample", str(run_dir), "--out", str(tmp_path / "samples.npz"), "--num", "8", "--nfe", "2"]) == 0
    assert np.isfinite(np.load(tmp_path / "samples.npz")["samples"]).all()


def test_another_sampler_can_still_be_chosen(tmp_path, trained):
    run_dir = trained("ct")
    out = tmp_path / "evaluation"
    assert main(["evaluate", str(run_dir), "--out", str(out), "--nfe", "2", "--num", "32", "--no-progress",
                 "--sampler", "ucgm:stochasticity=1.0:gaps=[0.02,0.001],cm-multistep"]) == 0
    samplers = {r["sampler"] for r in json.loads((out / "metrics.json").read_text()) if r["nfe"] > 0}
    assert samplers == {"ucgm:stochasticity=1.0:gaps=[0.02,0.001]", "cm-multistep"}


def test_a_consistency_model_outside_its_trained_range_is_a_clear_error(tmp_path, trained, capsys):
    run_dir = trained("cd")
    status = main(["sample", str(run_dir), "--out", str(tmp_path / "s.npz"), "--num", "4", "--sampler", "euler"])
    assert status == 2
    assert "outside the trained range" in capsys.readouterr().err
    assert not (tmp_path / "s.npz").exists()
