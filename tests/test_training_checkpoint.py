"""Checkpoint files: atomic writes, pruning, interrupted writes, corrupt and foreign files."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from training_fixtures import GaussianBatches, TinyFlowMatching, TinyMLP

from ucgm.training import checkpoint as checkpoint_module
from ucgm.training.checkpoint import (
    CheckpointError,
    complete_checkpoints,
    find_checkpoint,
    latest_checkpoint,
    read_checkpoint_info,
    read_state,
    read_weights,
    remove_unfinished,
    write_checkpoint,
)
from ucgm.training.loop import Trainer
from ucgm.training.settings import OptimizerConfig, TrainingConfig

METADATA = {"config": {"model": {"name": "mlp"}}, "normalisation": {"kind": "affine", "scale": 1.0, "shift": 0.0},
            "data_shape": [2], "num_classes": 0}


def _trainer(seed: int = 0) -> Trainer:
    torch.manual_seed(seed)
    return Trainer.for_objective(TinyMLP(), TinyFlowMatching(), GaussianBatches(),
                                 TrainingConfig(steps=10, batch_size=8), OptimizerConfig(lr=1e-2))


def _write(run_dir: Path, step: int, keep_last=None) -> Path:
    weights = {"model": {"w": torch.full((3,), float(step))}, "ema": {"w": torch.zeros(3)}}
    return write_checkpoint(run_dir, step, weights, METADATA, {"step": step}, keep_last)


def test_write_read_round_trip(tmp_path):
    path = _write(tmp_path, 7)
    assert path == tmp_path / "checkpoints" / "step_0000007"
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == "step_0000007"
    info = read_checkpoint_info(tmp_path)
    assert (info.step, info.config, info.data_shape, info.groups) == (7, METADATA["config"], [2], ["ema", "model"])
    assert torch.equal(read_weights(path / "model.safetensors", "model")["w"], torch.full((3,), 7.0))
    assert read_state(path)["step"] == 7


def test_keep_last_prunes_the_oldest(tmp_path):
    for step in (1, 2, 3, 4):
        _write(tmp_path, step, keep_last=2)
    assert [step for step, _ in complete_checkpoints(tmp_path)] == [3, 4]
    assert latest_checkpoint(tmp_path).name == "step_0000004"


def test_write_interrupted_midway_leaves_the_previous_checkpoint_loadable(tmp_path, monkeypatch):
    trainer = _trainer()
    trainer.fit(3)
    trainer.save_checkpoint(tmp_path, METADATA)
    expected = {name: tensor.clone() for name, tensor in trainer.model.state_dict().items()}
    trainer.fit(5)

    def killed_while_writing(state, stream):  # the process dies with the state file half written
        stream.write(b"PK\x03\x04 partial")
        raise KeyboardInterrupt("killed")

    monkeypatch.setattr(checkpoint_module.torch, "save", killed_while_writing)
    with pytest.raises(KeyboardInterrupt):
        trainer.save_checkpoint(tmp_path, METADATA)
    monkeypatch.undo()

    assert latest_checkpoint(tmp_path).name == "step_0000003"
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == "step_0000003"
    resumed = _trainer(seed=1)
    resumed.load_checkpoint(latest_checkpoint(tmp_path))
    assert resumed.step == 3
    for name, tensor in resumed.model.state_dict().items():
        assert torch.equal(tensor, expected[name])
    remove_unfinished(tmp_path)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["latest", "step_0000003"]


def test_corrupt_weights_file_is_a_clear_error(tmp_path):
    path = _write(tmp_path, 1) / "model.safetensors"
    path.write_bytes(path.read_bytes()[:40])
    with pytest.raises(CheckpointError, match="corrupt or not a safetensors file"):
        read_checkpoint_info(tmp_path)


def test_foreign_safetensors_is_a_clear_error(tmp_path):
    save_file({"weight": torch.zeros(2)}, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError, match="not a ucgm checkpoint"):
        read_checkpoint_info(tmp_path / "model.safetensors")


class _Payload:
    """Unpickling this would create a marker file: the loader must refuse it instead."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_state_with_pickled_code_is_refused_without_running_it(tmp_path):
    directory = _write(tmp_path, 1)
    marker = tmp_path / "executed"
    torch.save({"format": "ucgm-checkpoint", "payload": _Payload(marker)}, directory / "state.pt")
    with pytest.raises(CheckpointError, match="state.pt"):
        read_state(directory)
    assert not marker.exists()


def test_truncated_state_is_a_clear_error(tmp_path):
    directory = _write(tmp_path, 1)
    (directory / "state.pt").write_bytes((directory / "state.pt").read_bytes()[:30])
    with pytest.raises(CheckpointError, match="corrupt"):
        read_state(directory)


def test_missing_and_empty_locations(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        find_checkpoint(tmp_path / "nowhere")
    with pytest.raises(CheckpointError, match="no finished checkpoint"):
        find_checkpoint(tmp_path)
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(CheckpointError, match="not a ucgm checkpoint"):
        find_checkpoint(tmp_path / "notes.txt")
