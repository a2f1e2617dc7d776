"""Reliability under faults, load and bad input: one error path for every command (one line, exit status 2, the
last good checkpoint intact), no non-finite outputs, housekeeping after kill -9, thread choice, progress lines and
batch-invariant sampling. The long drills (SIGKILL at random points, a dead torchrun rank, a shared machine) run in
``ucgm bench --sections reliability`` and in the slow tests at the end."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import types

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from training_fixtures import TINY_GMM, losses, tiny_gmm_config

from ucgm import atomic
from ucgm.cli import DISPATCHED, main
from ucgm.cli.errors import run_command
from ucgm.cli.progress import Progress, format_duration
from ucgm.cli.run_log import RunLog
from ucgm.data.latents import LatentsDataset
from ucgm.sampling.registry import available_sampler_names
from ucgm.sampling.seeded import NonFiniteSamples, check_finite_samples
from ucgm.training import threads as threads_module
from ucgm.training.checkpoint import latest_checkpoint, read_checkpoint_info
from ucgm.training.distributed import DistributedContext, dead_ranks
from ucgm.training.threads import choose_threads
from ucgm.validation import ConfigError


def _train(run_dir, *arguments: str, steps: int = 4, every: int = 2) -> int:
    return main(["train", "gmm", "--run-dir", str(run_dir), "--steps", str(steps), "--checkpoint-every", str(every),
                 "--log-every", "1", "--no-progress", *TINY_GMM, *arguments])


def _digests(directory) -> dict[str, str]:
    """Content hashes of every file below ``directory`` (to show nothing was overwritten)."""
    return {str(path.relative_to(directory)): hashlib.sha256(path.read_bytes()).hexdigest()
            for path in sorted(directory.rglob("*")) if path.is_file()}


@pytest.fixture(scope="module")
def template_run(tmp_path_factory):
    """A tiny gmm run of 4 steps with checkpoints at steps 2 and 4."""
    run_dir = tmp_path_factory.mktemp("template") / "run"
    assert _train(run_dir) == 0
    return run_dir


@pytest.fixture
def run_copy(template_run, tmp_path):
    shutil.copytree(template_run, tmp_path / "run")
    return tmp_path / "run"


# ------------------------------------------------------------------------------------------ error path
def test_expected_failures_are_one_line_and_unexpected_ones_keep_their_traceback(capsys):
    def raising(error):
        def handler(argv):
            raise error
        return handler

    assert run_command("x", raising(ConfigError("model.hidden=0 is invalid: must be >= 1")), []) == 2
    assert capsys.readouterr().err == "ucgm x: error: model.hidden=0 is invalid: must be >= 1\n"
    assert run_command("x", raising(OSError(errno.ENOSPC, "No space left on device", "/runs/a")), []) == 2
    assert "No space left on device ('/runs/a'): free some space" in capsys.readouterr().err
    assert run_command("x", raising(ModuleNotFoundError("no sklearn", name="sklearn")), []) == 2
    assert "optional package 'sklearn', which is not installed: pip install scikit-learn" in capsys.readouterr().err
    for unexpected in (RuntimeError("a bug"), ModuleNotFoundError("no", name="ucgm.gone"),
                       OSError(errno.EBADF, "Bad file descriptor")):
        with pytest.raises(type(unexpected)):
            run_command("x", raising(unexpected), [])
    assert run_command("train", raising(KeyboardInterrupt()), []) == 130
    assert "re-run the same command to resume" in capsys.readouterr().err


def test_a_command_added_later_gets_the_error_path_from_the_dispatcher(monkeypatch, capsys):
    fake = types.ModuleType("ucgm.cli.later")
    fake.main = lambda argv: (_ for _ in ()).throw(ValueError(f"--flag={argv[0]!r} is not allowed; allowed: a, b"))
    monkeypatch.setitem(sys.modules, "ucgm.cli.later", fake)
    monkeypatch.setitem(DISPATCHED, "later", "ucgm.cli.later")
    assert main(["later", "c"]) == 2
    assert capsys.readouterr().err == "ucgm later: error: --flag='c' is not allowed; allowed: a, b\n"


def test_unknown_benchmark_section(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert main(["bench", "--sections", "nope", "--out", str(out)]) == 2
    error = capsys.readouterr().err
    assert error.startswith("ucgm bench: error: unknown benchmark section(s) ['nope']; allowed: ")
    assert "core" in error and "reliability" in error and not out.exists()


def test_run_directory_that_is_a_file(tmp_path, capsys):
    path = tmp_path / "notes.txt"
    path.write_text("keep me")
    assert _train(path) == 2
    assert f"ucgm train: error: --run-dir '{path}' is an existing file" in capsys.readouterr().err
    assert path.read_text() == "keep me"


def test_read_only_run_directory(run_copy, monkeypatch, capsys):
    before = _digests(run_copy)

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system", kwargs.get("dir"))

    monkeypatch.setattr(atomic.tempfile, "mkstemp", read_only)
    assert _train(run_copy, steps=8) == 2
    error = capsys.readouterr().err
    assert "ucgm train: error: Read-only file system" in error and str(run_copy) in error
    assert "choose a writable location" in error
    monkeypatch.undo()
    assert _digests(run_copy) == before


def test_full_disk_while_writing_a_checkpoint_keeps_the_last_complete_one(run_copy, monkeypatch, capsys):
    before = _digests(run_copy / "checkpoints" / "step_0000004")
    real_write = atomic.write_all

    def full_disk(handle, data):
        if "step_0000006" in handle.name:
            raise OSError(errno.ENOSPC, "No space left on device")
        real_write(handle, data)

    monkeypatch.setattr(atomic, "write_all", full_disk)
    assert _train(run_copy, steps=8) == 2
    error = capsys.readouterr().err
    assert "cannot write checkpoint step_0000006" in error and "No space left on device" in error
    assert "the last complete checkpoint, step_0000004, is intact" in error
    assert latest_checkpoint(run_copy).name == "step_0000004"
    assert _digests(run_copy / "checkpoints" / "step_0000004") == before
    assert not [p.name for p in (run_copy / "checkpoints").iterdir() if p.name.startswith(".")]
    monkeypatch.undo()
    assert _train(run_copy, steps=8) == 0  # with space again, it resumes
    assert [step for step, _ in losses(run_copy)] == list(range(1, 9))


def test_evaluate_out_naming_an_existing_file(run_copy, tmp_path, capsys):
    out = tmp_path / "metrics.json"
    out.write_text("[]")
    assert main(["evaluate", str(run_copy), "--out", str(out), "--nfe", "2", "--num", "8"]) == 2
    assert capsys.readouterr().err == (f"ucgm evaluate: error: --out '{out}' is an existing file; --out names a "
                                       "directory (metrics.json, metrics.md and nfe_quality.png are written into it, "
                                       "created when missing)\n")
    assert out.read_text() == "[]"


def test_a_missing_weight_file_is_named_before_anything_is_written(run_copy, tmp_path, capsys):
    out = tmp_path / "evaluation"
    assert main(["evaluate", str(run_copy), "--out", str(out), "--fid", "--inception-weights",
                 str(tmp_path / "nowhere.pt"), "--nfe", "2", "--num", "8", "--no-progress"]) == 2
    error = capsys.readouterr().err
    assert error.startswith("ucgm evaluate: error: the FID Inception network file") and error.count("\n") == 1
    assert "nowhere.pt' (from the argument) is not an existing file" in error
    assert not out.exists()


def test_weights_of_another_model_size_on_resume(run_copy, capsys):
    before = _digests(run_copy / "checkpoints")
    assert _train(run_copy, "model.hidden=32", steps=8) == 2
    error = capsys.readouterr().err
    assert "model.hidden: 16 -> 32" in error and "--allow-changes" in error
    assert _train(run_copy, "model.hidden=32", "--allow-changes", steps=8) == 2
    error = capsys.readouterr().err
    assert "do not fit the model" in error and "[32, " in error and "[16, " in error
    (run_copy / "config.yaml").unlink()  # checkpoints copied without their run's config: still compared
    assert _train(run_copy, "model.hidden=32", steps=8) == 2
    assert "model.hidden: 16 -> 32" in capsys.readouterr().err
    assert _digests(run_copy / "checkpoints") == before


def test_unlabelled_latents_with_the_latent_dit_preset(tmp_path, capsys):
    save_file({"latents": torch.randn(8, 4, 4, 4)}, str(tmp_path / "latents.safetensors"))
    status = main(["train", "latent-dit", "--run-dir", str(tmp_path / "run"), "--steps", "2", "--no-progress",
                   f"data.path={tmp_path / 'latents.safetensors'}", "model.depth=1", "model.hidden_size=32",
                   "model.num_heads=2", "training.batch_size=4", "training.precision=fp32"])
    assert status == 2
    error = capsys.readouterr().err
    assert error.count("\n") <= 2 and "needs class labels" in error and "no classes" in error
    assert "Traceback" not in error


def test_labels_of_one_class_id_do_not_make_that_many_classes(tmp_path):
    save_file({"latents": torch.randn(6, 2), "labels": torch.full((6,), 99)}, str(tmp_path / "l.safetensors"))
    with pytest.raises(ValueError, match="1 distinct class id.*largest is 99.*num_classes=100"):
        LatentsDataset(tmp_path / "l.safetensors")
    assert LatentsDataset(tmp_path / "l.safetensors", num_classes=100).num_classes == 100
    save_file({"latents": torch.randn(6, 2), "labels": torch.tensor([0, 1, 2, 2, 1, 0])},
              str(tmp_path / "dense.safetensors"))
    assert LatentsDataset(tmp_path / "dense.safetensors").num_classes == 3


def _image_folder(root, count: int = 4):
    for index in range(count):
        folder = root / f"class{index % 2}"
        folder.mkdir(parents=True, exist_ok=True)
        pixels = np.random.default_rng(index).integers(0, 255, (8, 8, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"{index}.png")
    return root


IMAGE_RUN = ["data.image_size=null", "model.base_channels=8", "model.channel_mults=[1]", "model.num_res_blocks=1",
             "model.attention_resolutions=[]", "training.batch_size=8", "training.precision=fp32",
             "--no-progress", "--log-every", "1"]


def test_a_file_that_is_not_an_image_fails_before_training(tmp_path, capsys):
    root = _image_folder(tmp_path / "images")
    (root / "class0" / "notes.png").write_text("not an image")
    status = main(["train", "images", "--run-dir", str(tmp_path / "run"), f"data.root={root}", "--steps", "2",
                   *IMAGE_RUN])
    assert status == 2
    assert "notes.png' cannot be read" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()  # nothing was started


def test_a_truncated_image_met_mid_training_names_the_file_and_keeps_the_checkpoint(tmp_path, capsys):
    root = _image_folder(tmp_path / "images")
    arguments = ["train", "images", "--run-dir", str(tmp_path / "run"), f"data.root={root}",
                 "--checkpoint-every", "2", *IMAGE_RUN]
    assert main([*arguments, "--steps", "2"]) == 0
    before = _digests(tmp_path / "run" / "checkpoints")
    broken = root / "class1" / "1.png"
    broken.write_bytes(broken.read_bytes()[:80])  # the header still reads: only decoding fails
    assert main([*arguments, "--steps", "6"]) == 2
    error = capsys.readouterr().err
    assert "1.png' cannot be decoded" in error and "(sample 2 of image folder" in error  # files sorted by class
    assert _digests(tmp_path / "run" / "checkpoints") == before


# ---------------------------------------------------------------------------------------- finite outputs
def test_no_non_finite_samples_are_written(run_copy, tmp_path, capsys):
    out = tmp_path / "samples.npz"
    assert main(["sample", str(run_copy), "--out", str(out), "--num", "8", "--nfe", "4", "--cfg-scale", "1e30"]) == 2
    error = capsys.readouterr().err
    assert "sampler 'ucgm' (nfe=4" in error and "cfg_scale=1e+30" in error and "NaN or Inf" in error
    assert not out.exists()
    with pytest.raises(NonFiniteSamples, match="sampler 'euler' .* 2 of 3 samples \\(first: sample 11\\)"):
        check_finite_samples(torch.tensor([[0.0], [float("nan")], [float("inf")]]), "sampler 'euler' (nfe=4)", 10)


def test_budgets_have_a_limit(run_copy, tmp_path, capsys):
    assert main(["sample", str(run_copy), "--out", str(tmp_path / "s.npz"), "--nfe", "1000000"]) == 2
    assert "sampling.nfe=1000000 is invalid: must be an integer from 1 to 10000" in capsys.readouterr().err
    assert main(["evaluate", str(run_copy), "--out", str(tmp_path / "e"), "--nfe", "1000000", "--num", "8"]) == 2
    assert "above the largest budget 10000" in capsys.readouterr().err
    assert not (tmp_path / "e").exists()


def test_edit_reads_an_image_input_as_image_data_are_read(tmp_path):
    from ucgm.data.digits import load_digits_split

    run_dir = tmp_path / "digits"
    assert main(["train", "digits", "--run-dir", str(run_dir), "--steps", "1", "model.base_channels=8",
                 "model.channel_mults=[1]", "training.batch_size=8", "--no-progress"]) == 0
    pixels = np.random.default_rng(0).integers(0, 256, (8, 8), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "digit.png")
    out = tmp_path / "edited.npz"
    assert main(["edit", str(run_dir), "--task", "inpaint", "--region", "right", "--input", str(tmp_path / "digit.png"),
                 "--out", str(out), "--nfe", "2", "--device", "cpu"]) == 0
    edited = np.load(out)["samples"]  # written in the digits' raw units, 0..16
    raw_max = float(load_digits_split("heldout")[0].max())
    np.testing.assert_allclose(edited[0, 0, :, :4], pixels[:, :4] / 255.0 * raw_max, rtol=0, atol=1e-4)


# ------------------------------------------------------------------------------------ after kill -9
def test_a_restart_cleans_up_what_a_killed_process_left(tmp_path, capfd):
    reference, run_dir = tmp_path / "reference", tmp_path / "run"
    assert _train(reference, steps=6, every=3) == 0
    assert _train(run_dir, steps=6, every=3) == 0
    # As a process killed while writing its step-6 checkpoint leaves it: a temporary checkpoint directory,
    # temporary siblings of atomic writes, and logs up to step 6 beyond the step-3 checkpoint.
    checkpoints = run_dir / "checkpoints"
    (checkpoints / "step_0000006").rename(checkpoints / ".tmp-step_0000006-99999")
    for path in (run_dir / ".stats.jsonl.a1b2c3d4.tmp", run_dir / ".config.yaml.zz_x9y8w.tmp",
                 checkpoints / ".latest.q1w2e3r4.tmp"):
        path.write_text("partial")
    capfd.readouterr()
    assert _train(run_dir, steps=6, every=3) == 0
    error = capfd.readouterr().err
    assert ("the write of checkpoint step_0000006 was interrupted and is removed; resuming from the previous "
            "complete checkpoint, step_0000003") in error
    assert "removed 3 temporary file(s)" in error
    assert losses(run_dir) == losses(reference)
    assert not [p for p in run_dir.rglob(".*")]
    tensorboard = run_dir / "tensorboard"
    if tensorboard.is_dir():  # tensorboard installed: every step's loss once, as in the uninterrupted run
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        assert "TensorBoard event(s) after step 3" in error
        steps = []
        for path in sorted(tensorboard.glob("events.out.tfevents.*")):
            accumulator = EventAccumulator(str(path))
            accumulator.Reload()
            steps += [event.step for event in accumulator.Scalars("loss")]
        assert sorted(steps) == list(range(1, 7))
    modes = {str(path.relative_to(run_dir)): oct(path.stat().st_mode & 0o777) for path in run_dir.rglob("*")
             if path.is_file() and "tensorboard" not in path.parts}
    assert set(modes.values()) == {oct(atomic.FILE_MODE)}, modes
    assert "checkpoints/step_0000006/model.safetensors" in modes


def test_a_run_without_a_resumable_checkpoint_says_so(run_copy, capsys):
    shutil.rmtree(run_copy / "checkpoints")
    assert _train(run_copy, steps=4) == 0
    assert ("no resumable checkpoint in" in capsys.readouterr().err)
    (latest_checkpoint(run_copy) / "state.pt").unlink()
    shutil.rmtree(run_copy / "checkpoints" / "step_0000002")
    assert _train(run_copy, steps=4) == 0
    error = capsys.readouterr().err
    assert "checkpoints/step_0000004 has no state.pt (it can be sampled, not resumed)" in error
    assert "starting from step 0" in error
    assert [step for step, _ in losses(run_copy)] == [1, 2, 3, 4]


def test_checkpoints_record_world_size_and_threads_and_a_resumption_keeps_the_threads(run_copy, monkeypatch,
                                                                                      capsys):
    assert read_checkpoint_info(run_copy).run == {"world_size": 1, "threads": torch.get_num_threads()}
    monkeypatch.delenv("OMP_NUM_THREADS")
    assert _train(run_copy, steps=6) == 0
    assert "thread(s) per process (as the run used before" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------- threads
def test_thread_choice(monkeypatch):
    assert choose_threads(3) == (3, "training.threads")
    assert choose_threads("auto", resumed=2).threads == 2
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert choose_threads("auto").reason == "OMP_NUM_THREADS"
    monkeypatch.delenv("OMP_NUM_THREADS")
    monkeypatch.setattr(threads_module, "available_cores", lambda: 8)
    assert choose_threads("auto", local_processes=8).threads == 1  # one per process under torchrun
    assert choose_threads("auto", local_processes=2).threads == 4
    monkeypatch.setattr(threads_module, "busy_cores", lambda: 1.1)  # another process keeps a core busy
    assert choose_threads("auto") == (7, "7 of 8 cores idle")
    monkeypatch.setattr(threads_module, "busy_cores", lambda: 8.0)
    assert choose_threads("auto").threads == 1
    monkeypatch.setattr(threads_module, "busy_cores", lambda: None)
    assert choose_threads("auto").threads == 8
    monkeypatch.undo()
    busy = threads_module.busy_cores(0.05)  # the real measurement
    assert busy is None or 0 <= busy <= len(os.sched_getaffinity(0)) + 1e-6
    with pytest.raises(ConfigError, match="training.threads"):
        tiny_gmm_config("training.threads=0")


def test_a_dead_rank_is_named():
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    host = socket.gethostname()
    context = DistributedContext(rank=0, world_size=3, peers=[(host, os.getpid()), (host, gone.pid),
                                                              ("another-host", 1)])
    assert dead_ranks(context) == [f"rank 1 (pid {gone.pid} on {host})"]


# -------------------------------------------------------------------------------------------- progress
def test_plain_progress_lines_when_stderr_is_not_a_terminal(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("UCGM_PROGRESS_INTERVAL", "0")
    log = RunLog(tmp_path, total_steps=4, start_step=1, label="train gmm")
    assert log.has_progress_bar
    log.advance()
    log.record({"step": 2, "loss": 0.25, "lr": 0.1, "sec_per_step": 0.01})
    log.advance()
    log.close()
    lines = capsys.readouterr().err.splitlines()
    assert lines[0].startswith("train gmm: step 2/4 (50%), ") and "step/s, ETA " in lines[0]
    assert lines[-1].startswith("train gmm: step 3/4 (75%), loss 0.25, ")
    assert format_duration(42) == "42s" and format_duration(185) == "3m05s" and format_duration(7620) == "2h07m"
    monkeypatch.setenv("UCGM_PROGRESS_INTERVAL", "soon")
    with pytest.raises(ValueError, match="UCGM_PROGRESS_INTERVAL"):
        Progress("x", 1)


def test_bars_are_labelled(capsys):
    bar = Progress("quickstart gmm: sampling", 2, "job", mode=True)
    bar.update()
    bar.close()
    assert "quickstart gmm: sampling" in capsys.readouterr().err


def test_sample_and_evaluate_report_progress(run_copy, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("UCGM_PROGRESS_INTERVAL", "0")
    assert main(["sample", str(run_copy), "--out", str(tmp_path / "s.npz"), "--num", "8", "--batch-size", "4",
                 "--nfe", "2"]) == 0
    assert "ucgm sample: sample 4/8 (50%)" in capsys.readouterr().err
    assert main(["evaluate", str(run_copy), "--out", str(tmp_path / "e"), "--nfe", "1,2", "--num", "8",
                 "--num-reference", "16"]) == 0
    assert "ucgm evaluate: job 1/2 (50%)" in capsys.readouterr().err


# ----------------------------------------------------------------------------------- batch invariance
@pytest.fixture(scope="module")
def invariance(tmp_path_factory):
    from ucgm.bench.reliability import BatchInvariance

    return BatchInvariance(tmp_path_factory.mktemp("invariance"))


@pytest.mark.parametrize("sampler", available_sampler_names())
def test_every_sampler_gives_the_same_samples_for_batch_sizes_1_7_and_64(invariance, sampler):
    """Every draw is per sample, so batches of 1, 7 and 64 give the same samples up to the rounding of batched
    matrix kernels (ROUNDING_UNITS units of eps; mostly bitwise), while another seed moves them by ~1/eps units
    (float32: 8e6)."""
    from ucgm.bench.reliability import ROUNDING_UNITS, rounding_units

    whole = invariance.samples(sampler, 64)
    assert torch.isfinite(whole).all() and whole.unique(dim=0).shape[0] > 1
    for size in (1, 7):
        difference = rounding_units(invariance.samples(sampler, size), whole)
        assert difference <= ROUNDING_UNITS, f"{sampler}: batch size {size} differs by {difference:.3g} units"
    assert rounding_units(invariance.samples(sampler, 64, seed=4), whole) > 1e3 * ROUNDING_UNITS  # > 12 %


def test_guided_stochastic_sampling_does_not_depend_on_batch_size(run_copy, tmp_path):
    drawn = {}
    for size in (1, 7, 64):
        out = tmp_path / f"s{size}.npz"
        assert main(["sample", str(run_copy), "--out", str(out), "--num", "64", "--batch-size", str(size),
                     "--nfe", "3", "--cfg-scale", "2", "stochasticity=0.7"]) == 0
        drawn[size] = np.load(out)["samples"]
    assert np.array_equal(drawn[1], drawn[64]) and np.array_equal(drawn[7], drawn[64])


# ---------------------------------------------------------------------------------------------- drills
@pytest.mark.slow
def test_sigkill_at_random_points_resumes_exactly(tmp_path):
    from ucgm.bench.reliability import QUICK, sigkill_drill

    result = sigkill_drill(QUICK, tmp_path)
    failures = [trial for trial in result["trials"] if trial["killed"] and not trial["exact"]]
    assert result["sigkill_trials"] >= 10 and not failures, json.dumps(failures, indent=1)
    assert result["checkpoint_write_kills"] >= 1
    assert result["resumed_from_previous"] == result["checkpoint_write_kills"]


@pytest.mark.slow
def test_a_dead_rank_ends_the_job_within_a_minute_with_a_message(tmp_path):
    from ucgm.bench.reliability import rank_death_drill

    result = rank_death_drill(tmp_path)
    assert result["exit_seconds"] < 60 and result["returncode"] != 0
    assert result["names_the_rank"], result
    assert "rank 1 (pid" in result["message"] and "re-run the same command to resume" in result["message"]

