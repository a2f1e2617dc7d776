"""Config presets, overrides, validation errors and resume compatibility."""

from __future__ import annotations

import pytest
from training_fixtures import tiny_gmm_config

from ucgm.cli.components import accepted_keys
from ucgm.cli.config import (
    apply_overrides,
    complete_config,
    parse_override,
    preset_names,
    read_yaml_mapping,
    resolve_config,
    save_config,
)
from ucgm.cli.train import resume_changes
from ucgm.cli.schema import RunConfig, typed_section
from ucgm.validation import ConfigError


def test_every_preset_resolves():
    assert {"gmm", "digits", "images", "latent-dit"} <= set(preset_names())
    for name in preset_names():
        config = resolve_config(name, [], accepted_keys)
        assert typed_section(config, "training").total_steps() > 0
        assert config["tune"]["objective"]["consistency_ratio"] == 1.0


def test_override_values_are_yaml_scalars_and_lists():
    assert parse_override("optimizer.lr=1e-3") == ("optimizer.lr", 0.001)
    assert parse_override("optimizer.betas=[0.9, 0.95]") == ("optimizer.betas", [0.9, 0.95])
    assert parse_override("optimizer.grad_clip=null") == ("optimizer.grad_clip", None)
    config = tiny_gmm_config("optimizer.lr=1e-3", "objective.consistency_ratio=1", "training.ema.decay=0.9")
    assert config["optimizer"]["lr"] == 0.001
    assert config["objective"]["consistency_ratio"] == 1
    assert config["training"]["ema"] == {"kind": "constant", "decay": 0.9, "std": 0.05}


def test_section_shorthand_sets_the_name_and_drops_the_previous_components_options():
    config = tiny_gmm_config("objective=flow_matching", "objective.label_dropout=0.2")
    assert config["objective"] == {"name": "flow_matching", "label_dropout": 0.2}


def test_options_the_component_accepts_are_valid_keys_even_if_the_preset_omits_them():
    config = tiny_gmm_config("objective.tangent=jvp", "data.mixture_options={radius: 2.0}")
    assert config["objective"]["tangent"] == "jvp"
    assert config["data"]["mixture_options"] == {"radius": 2.0}


@pytest.mark.parametrize("override, suggestion", [
    ("optimizer.lrr=1", "optimizer.lr"),
    ("training.batchsize=8", "training.batch_size"),
    ("objective.consistency_ration=1", "objective.consistency_ratio"),
    ("trainin.steps=3", "training"),
])
def test_unknown_key_names_the_closest_valid_key(override, suggestion):
    with pytest.raises(ConfigError) as error:
        tiny_gmm_config(override)
    assert override.split("=")[0] in str(error.value)
    assert f"did you mean '{suggestion}" in str(error.value)


@pytest.mark.parametrize("override, key", [
    ("training.batch_size=-1", "training.batch_size"),
    ("optimizer.name=sgd", "optimizer.name"),
    ("optimizer.betas=[0.9]", "optimizer.betas"),
    ("training.ema.kind=power", None),
    ("training.ema={kind: power, std: 0.5}", "training.ema.std"),
    ("training.kimg=5", "training.steps"),
    ("training.grad_accumulation=3", "training.batch_size"),
    ("sampling.sampler=no-such-sampler", "sampling.sampler"),
    ("transport.name=curved", "transport.name"),
])
def test_bad_values_are_errors_naming_the_key(override, key):
    if key is None:  # a valid change: power EMA with the default std
        assert tiny_gmm_config(override)["training"]["ema"]["kind"] == "power"
        return
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        tiny_gmm_config(override)


def test_malformed_overrides_and_files(tmp_path):
    with pytest.raises(ConfigError, match="key=value"):
        parse_override("optimizer.lr")
    with pytest.raises(ConfigError, match="neither a YAML file nor a preset.*did you mean preset 'gmm'"):
        resolve_config("gmn")
    bad = tmp_path / "bad.yaml"
    bad.write_text("optimizer:\n  lr: 1\n  momentum: 0.9\n")
    with pytest.raises(ConfigError, match="optimizer.momentum"):
        resolve_config(str(bad))
    nameless = tmp_path / "nameless.yaml"
    nameless.write_text("training:\n  steps: 3\n")
    with pytest.raises(ConfigError, match="data.name"):
        resolve_config(str(nameless))


def test_saved_config_round_trips(tmp_path):
    config = tiny_gmm_config()
    save_config(config, tmp_path / "config.yaml")
    assert read_yaml_mapping(tmp_path / "config.yaml") == config
    assert not [p for p in tmp_path.iterdir() if p.name != "config.yaml"]  # no temporary left behind


def test_resume_accepts_duration_changes_and_names_method_and_world_size_changes():
    saved = tiny_gmm_config()
    assert resume_changes(saved, apply_overrides(saved, ["training.steps=99", "sampling.nfe=2"]), 1, 1) == []
    changed = apply_overrides(saved, ["objective.enhanced_ratio=0.2", "model.hidden=32"])
    assert resume_changes(saved, changed, 1, 1) == ["model.hidden: 16 -> 32", "objective.enhanced_ratio: 0.5 -> 0.2"]
    assert resume_changes(saved, saved, 1, 2) == ["processes: 1 -> 2 (the global batch is split otherwise)"]
    assert resume_changes(saved, saved, None, 2) == []  # a checkpoint that does not record its world size
    other_defaults = apply_overrides(saved, ["objectives.ct.objective={}", "tune.training.steps=9"])
    assert resume_changes(saved, other_defaults, 1, 1) == []  # other objectives' defaults, the tuning recipe


def test_complete_config_fills_defaults():
    config = complete_config({"data": {"name": "mixture"}, "model": {"name": "mlp"}, "objective": {"name": "ucgm"},
                              "training": {"steps": 2}})
    assert config["optimizer"]["name"] == "adamw" and config["training"]["ema"]["kind"] == "constant"


def test_a_run_parses_its_config_once_at_the_entry(tmp_path, monkeypatch):
    """``ucgm train`` parses the resolved config into typed sections once; nothing below re-types it."""
    import ucgm.cli.config as config_module
    from ucgm.cli.config import resolve_run_config
    from ucgm.cli.train import run_training
    from ucgm.training.settings import TrainingConfig
    from training_fixtures import TINY_GMM

    run = resolve_run_config("gmm", TINY_GMM + ["training.steps=2", "training.checkpoint_every=2"], accepted_keys)
    assert isinstance(run, RunConfig) and isinstance(run.training, TrainingConfig) and run.training.steps == 2
    assert run.section("model")["name"] == "mlp"
    with pytest.raises(KeyError, match="closed section"):
        run.section("training")
    parses = []
    original = config_module.parse_run_config
    monkeypatch.setattr(config_module, "parse_run_config", lambda config: parses.append(1) or original(config))
    run_training(run, tmp_path / "run", progress=False)
    assert parses == []
    run_training(run.values, tmp_path / "from-dict", progress=False)
    assert parses == [1]
