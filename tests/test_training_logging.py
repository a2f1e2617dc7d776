"""Run logs: stats.jsonl records, crash-cut lines, truncation on resume, progress bar, optional TensorBoard."""

from __future__ import annotations

import json
import sys
import types

from ucgm.cli.run_log import RunLog, read_stats, truncate_stats


def test_records_truncation_and_cut_lines(tmp_path):
    log = RunLog(tmp_path, total_steps=4, start_step=0, progress=False)
    for step in (1, 2, 3):
        log.record({"step": step, "loss": 1.0 / step, "lr": 0.1, "sec_per_step": 0.01})
    log.record({"step": 4, "loss": float("nan"), "lr": 0.1, "sec_per_step": 0.01})
    log.close()
    with open(tmp_path / "stats.jsonl", "a") as handle:
        handle.write('{"step": 5, "lo')  # a crash in the middle of a line
    records = read_stats(tmp_path / "stats.jsonl")
    assert [r["step"] for r in records] == [1, 2, 3, 4] and records[3]["loss"] == "nan"
    truncate_stats(tmp_path / "stats.jsonl", 2)
    lines = (tmp_path / "stats.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [1, 2]


def test_progress_bar_and_tensorboard_when_installed(tmp_path, monkeypatch, capsys):
    scalars = []

    class FakeWriter:
        def __init__(self, log_dir):
            self.log_dir = log_dir

        def add_scalar(self, key, value, step):
            scalars.append((key, value, step))

        def close(self):
            scalars.append("closed")

    fake = types.ModuleType("torch.utils.tensorboard")
    fake.SummaryWriter = FakeWriter
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", fake)
    log = RunLog(tmp_path, total_steps=3, start_step=1, progress=True)
    assert log.has_progress_bar
    log.advance()
    log.record({"step": 2, "loss": 0.5, "lr": 0.1, "sec_per_step": 0.2})
    log.message("hello")
    log.close()
    assert scalars == [("loss", 0.5, 2), ("lr", 0.1, 2), ("sec_per_step", 0.2, 2), "closed"]
    assert "hello" in capsys.readouterr().err


def test_other_ranks_write_nothing(tmp_path):
    log = RunLog(tmp_path, total_steps=3, start_step=0, enabled=False)
    log.record({"step": 1, "loss": 1.0})
    log.message("quiet")
    log.close()
    assert not (tmp_path / "stats.jsonl").exists()
