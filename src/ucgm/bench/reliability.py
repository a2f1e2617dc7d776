"""Fault drills of the ``reliability`` bench section, each through the command a user runs (``python -m ucgm``,
``torchrun``) in subprocesses.

* **SIGKILL trials** (:func:`sigkill_drill`): ``ucgm train gmm`` killed with SIGKILL at random points, then re-run
  with the same command to the end, for a one-network method (UCGM-T) and a multi-network method (the test
  suite's 5:1 critic/generator ``TwoNetworkMethod`` when the source tree is at hand, else the registered ``caf``).
  Half the trials kill at a random logged step, half while a random checkpoint is being written (its temporary
  directory exists; the model is large enough that a write takes a while). A trial is *exact* when the resumed
  ``stats.jsonl`` equals the uninterrupted run's (every key but the wall-clock ``sec_per_step``) and no
  temporary file or directory remains; a kill during a checkpoint write *resumed from the previous* checkpoint
  when the re-run said so (or, before the first checkpoint, said it starts from step 0) and was exact.
* **Rank death** (:func:`rank_death_drill`): a 2-process gloo ``torchrun`` training job whose rank 1 is killed
  with SIGKILL; the seconds until the whole job has exited, and the survivor's message naming the dead rank.
* **Shared machine** (:func:`shared_machine_drill`): a 400-step ``gmm`` run (the preset's model and batch) alone
  and beside one competing CPU-bound process (a busy loop started a second before), with ``training.threads``
  at its default ``auto`` and at torch's default thread count (what ucgm used before ``auto``), in interleaved
  rounds; a run's time is its training loop's (the sum of its ``sec_per_step`` records, no start-up).
* **Batch invariance** (:func:`batch_invariance`): every registry sampler on a briefly trained toy model of a run
  that samples with it (:func:`sampler_runs`; UCGM-T for the generic solvers, with stochasticity) draws
  ``num`` samples through :func:`ucgm.analysis.reports.draw_samples` in batches of 1, 7 and 64; the largest
  difference to the batch-64 samples in units of the samples' rounding, ``eps(dtype) * max |x|``
  (0 means bitwise identical). Every random draw is per sample, so what can remain is the rounding of batched
  matrix kernels (BLAS picks other blockings for 1 and 64 rows); a sampler counts as batch-invariant up to
  :data:`ROUNDING_UNITS` (a different noise draw moves samples by about ``1 / eps`` units).
"""

from __future__ import annotations

import os
import random
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch

from ..analysis.reports import draw_samples
from ..atomic import is_temporary
from ..cli.components import accepted_keys, build_method
from ..cli.config import preset_names, resolve_config
from ..cli.run_log import read_stats
from ..cli.train import run_training
from ..methods.registry import METHODS
from ..sampling.registry import available_sampler_names, get_sampler
from ..training.checkpoint import complete_checkpoints
from ..training.loading import load_checkpoint_model


@dataclass(frozen=True)
class ReliabilitySizes:
    """Trials and run lengths of the drills."""

    trials_per_method: int
    steps: int
    checkpoint_every: int
    shared_rounds: int
    shared_steps: int = 400


QUICK = ReliabilitySizes(trials_per_method=5, steps=40, checkpoint_every=10, shared_rounds=2)
FULL = ReliabilitySizes(trials_per_method=8, steps=60, checkpoint_every=10, shared_rounds=3)

#: A model whose checkpoint writes take long enough to be interrupted (tens of MB per checkpoint).
KILL_MODEL = ("model.hidden=512", "model.depth=3", "training.batch_size=16", "training.keep_last=2",
              "optimizer.warmup_steps=5")
ONE_NETWORK: tuple[str, ...] = ()
#: The test suite's two-network stand-in (``tests/training_fixtures.py``), importable with that folder on the path.
TESTS_DIRECTORY = Path(__file__).resolve().parents[3] / "tests"
TWO_NETWORK_FIXTURE = "objective=training_fixtures:TwoNetworkMethod"
#: Records keys that differ between identical runs (wall-clock time).
CLOCK_KEYS = ("sec_per_step",)
TINY = ("model.hidden=16", "model.depth=1", "training.batch_size=32", "sampling.nfe=4")
BATCH_SIZES = (1, 7, 64)
#: Largest batch-size difference, in rounding units of the samples, that counts as identical (kernel rounding).
ROUNDING_UNITS = 1e3


def multi_network_overrides() -> tuple[str, tuple[str, ...]]:
    """The multi-network method of the SIGKILL trials: its label and overrides."""
    if (TESTS_DIRECTORY / "training_fixtures.py").is_file():
        return "TwoNetworkMethod (critic 5 : generator 1)", (TWO_NETWORK_FIXTURE,)
    return "caf (velocity and acceleration networks)", ("objective=caf",)


def cli_environment(single_thread: bool = True) -> dict:
    """Subprocess environment: unbuffered, the tests folder importable, one thread unless ``single_thread`` is
    false (then no thread variable at all, so that ``training.threads=auto`` decides)."""
    env = {key: value for key, value in os.environ.items() if key not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    if single_thread:
        env["OMP_NUM_THREADS"] = "1"
    env["PYTHONUNBUFFERED"] = "1"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(TESTS_DIRECTORY), env.get("PYTHONPATH")]))
    return env


def _train_command(run_dir: Path, steps: int, checkpoint_every: int, overrides: tuple[str, ...]) -> list[str]:
    return [sys.executable, "-m", "ucgm", "train", "gmm", "--run-dir", str(run_dir), "--steps", str(steps),
            "--checkpoint-every", str(checkpoint_every), "--log-every", "1", "--no-progress", *overrides]


def comparable(records: list[dict]) -> list[dict]:
    """Stats records without their wall-clock keys."""
    return [{key: value for key, value in record.items() if key not in CLOCK_KEYS} for record in records]


def leftovers(run_dir: Path) -> list[str]:
    """Temporary files and directories of interrupted writes anywhere in a run directory."""
    return sorted(str(path.relative_to(run_dir)) for path in Path(run_dir).rglob(".*")
                  if is_temporary(path) or path.name.startswith((".tmp-", ".trash-")))


def _writing_checkpoint(run_dir: Path) -> bool:
    root = run_dir / "checkpoints"
    return root.is_dir() and any(entry.name.startswith(".tmp-") for entry in root.iterdir())


def _kill_when(process: subprocess.Popen, ready: Callable[[], bool], timeout: float = 300.0) -> bool:
    """SIGKILL ``process`` as soon as ``ready()``; ``False`` when it ended first."""
    deadline = time.monotonic() + timeout
    while process.poll() is None and time.monotonic() < deadline:
        if ready():
            process.send_signal(signal.SIGKILL)
            process.wait()
            return True
        time.sleep(0.001)
    if process.poll() is None:
        process.kill()
    process.wait()
    return False


def sigkill_trial(run_dir: Path, command: list[str], expected: list[dict], during_write: bool, target_step: int,
                  delay: float) -> dict:
    """One trial: start, kill at ``target_step`` (after ``delay`` seconds) or during the first checkpoint write at
    or after it, re-run to the end, compare."""
    process = subprocess.Popen(command, env=cli_environment(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def logged() -> int:
        records = read_stats(run_dir / "stats.jsonl")
        return records[-1]["step"] if records else 0

    reached: list[float] = []

    def ready() -> bool:
        if not reached and logged() >= target_step:
            reached.append(time.monotonic())
        if during_write:
            return bool(reached) and _writing_checkpoint(run_dir)
        return bool(reached) and time.monotonic() - reached[0] >= delay

    killed = _kill_when(process, ready)
    writing = killed and _writing_checkpoint(run_dir)
    kill_step = logged() if killed else None
    resumed = subprocess.run(command, env=cli_environment(), capture_output=True, text=True, timeout=600)
    said = ("resuming from the previous complete checkpoint" in resumed.stderr
            or (not complete_checkpoints(run_dir) and "starting from step 0" in resumed.stderr)
            or "no resumable checkpoint" in resumed.stderr)
    remaining = leftovers(run_dir)
    exact = resumed.returncode == 0 and comparable(read_stats(run_dir / "stats.jsonl")) == expected and not remaining
    return {"killed": killed, "kill_step": kill_step, "during_checkpoint_write": writing,
            "said_previous": writing and said, "exact": exact, "leftovers": remaining,
            "returncode": resumed.returncode, "stderr_tail": resumed.stderr[-400:] if resumed.returncode else ""}


def sigkill_drill(sizes: ReliabilitySizes, workdir: Path, seed: int = 0) -> dict:
    """SIGKILL trials on a one-network and a multi-network method (see the module docstring)."""
    rng = random.Random(seed)
    multi_label, multi_overrides = multi_network_overrides()
    methods = {"ucgm (one network)": ONE_NETWORK, multi_label: multi_overrides}
    trials = []
    for index, (label, overrides) in enumerate(methods.items()):
        arguments = (sizes.steps, sizes.checkpoint_every, KILL_MODEL + overrides)
        reference = workdir / f"reference-{index}"
        subprocess.run(_train_command(reference, *arguments), env=cli_environment(), check=True,
                       capture_output=True, timeout=600)
        expected = comparable(read_stats(reference / "stats.jsonl"))
        for trial in range(sizes.trials_per_method):
            during_write = trial % 2 == 1
            target = rng.randint(1, sizes.steps - sizes.checkpoint_every) if during_write \
                else rng.randint(1, sizes.steps - 2)
            run_dir = workdir / f"trial-{index}-{trial}"
            result = sigkill_trial(run_dir, _train_command(run_dir, *arguments), expected, during_write, target,
                                   rng.uniform(0.0, 0.05))
            trials.append({"method": label, "aimed_at": "checkpoint write" if during_write else "step",
                           "target_step": target, **result})
    killed = [trial for trial in trials if trial["killed"]]
    writes = [trial for trial in killed if trial["during_checkpoint_write"]]
    return {"sigkill_trials": len(killed), "sigkill_exact": sum(trial["exact"] for trial in killed),
            "checkpoint_write_kills": len(writes),
            "resumed_from_previous": sum(trial["said_previous"] and trial["exact"] for trial in writes),
            "methods": list(methods), "trials": trials}


# --------------------------------------------------------------------------------------------- rank death
def _children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            if parent == pid:
                found.append(int(entry.name))
    return found


def _rank_of(pid: int) -> Optional[int]:
    try:
        variables = (Path("/proc") / str(pid) / "environ").read_bytes().split(b"\0")
    except OSError:
        return None
    ranks = [int(item[5:]) for item in variables if item.startswith(b"RANK=")]
    return ranks[0] if ranks else None


def rank_death_drill(workdir: Path, killed_rank: int = 1, timeout: float = 120.0) -> dict:
    """Kill one rank of a 2-process gloo job mid-training; how long the job takes to end and what it says."""
    run_dir = workdir / "ddp"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "ucgm",
               "train", "gmm", "--run-dir", str(run_dir), "--steps", "1000000", "--checkpoint-every", "50",
               "--log-every", "5", "--no-progress", *TINY]
    job = subprocess.Popen(command, env=cli_environment(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                           text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and job.poll() is None:
            if complete_checkpoints(run_dir) and len(read_stats(run_dir / "stats.jsonl")) >= 12:
                break
            time.sleep(0.1)
        ranks = {_rank_of(pid): pid for pid in _children(job.pid)}
        if killed_rank not in ranks:
            raise RuntimeError(f"rank {killed_rank} of the drill job was not found (processes: {ranks})")
        killed_at = time.monotonic()
        os.kill(ranks[killed_rank], signal.SIGKILL)
        try:
            _, stderr = job.communicate(timeout=timeout)
            seconds = time.monotonic() - killed_at
        except subprocess.TimeoutExpired:
            os.killpg(job.pid, signal.SIGKILL)
            _, stderr = job.communicate()
            seconds = float("inf")
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
            job.wait()
    lines = [line for line in stderr.splitlines() if "ucgm train: error" in line and f"rank {killed_rank}" in line]
    return {"exit_seconds": round(seconds, 2), "returncode": job.returncode,
            "message": lines[0] if lines else None, "names_the_rank": bool(lines)}


# ------------------------------------------------------------------------------------------ shared machine
def _training_seconds(run_dir: Path) -> float:
    """The training loop's seconds: the ``sec_per_step`` records times the steps they cover."""
    seconds, previous = 0.0, 0
    for record in read_stats(run_dir / "stats.jsonl"):
        seconds += record["sec_per_step"] * (record["step"] - previous)
        previous = record["step"]
    return seconds


def _timed_run(run_dir: Path, steps: int, threads: Optional[int]) -> tuple[float, str]:
    """Seconds of a ``steps``-step gmm run, and the thread count it reported."""
    overrides = [] if threads is None else [f"training.threads={threads}"]
    command = [sys.executable, "-m", "ucgm", "train", "gmm", "--run-dir", str(run_dir), "--steps", str(steps),
               "--checkpoint-every", str(steps), "--log-every", "50", "--no-progress", *overrides]
    finished = subprocess.run(command, env=cli_environment(single_thread=False), capture_output=True, text=True,
                              timeout=1800, check=False)
    if finished.returncode != 0:
        raise RuntimeError(f"the shared-machine drill run failed:\n{finished.stderr[-2000:]}")
    reported = [line.split("ucgm: ", 1)[-1] for line in finished.stderr.splitlines() if "intra-op thread" in line]
    return _training_seconds(run_dir), reported[0] if reported else ""


def shared_machine_drill(sizes: ReliabilitySizes, workdir: Path) -> dict:
    """Interleaved rounds of the four variants (alone / beside a busy process) x (auto / torch's default)."""
    default_threads = _torch_default_threads()
    variants = {("alone", "auto"): None, ("alone", "default"): default_threads,
                ("beside", "auto"): None, ("beside", "default"): default_threads}
    seconds: dict[tuple[str, str], list[float]] = {key: [] for key in variants}
    reports: dict[tuple[str, str], list[str]] = {key: [] for key in variants}
    for round_index in range(sizes.shared_rounds):
        for (place, threads_label), threads in variants.items():
            competitor = None
            if place == "beside":
                competitor = subprocess.Popen([sys.executable, "-c", "while True: pass"])
                time.sleep(1.0)
            try:
                run_dir = workdir / f"shared-{place}-{threads_label}-{round_index}"
                elapsed, report = _timed_run(run_dir, sizes.shared_steps, threads)
            finally:
                if competitor is not None:
                    competitor.kill()
                    competitor.wait()
            seconds[(place, threads_label)].append(elapsed)
            reports[(place, threads_label)].append(report)
    medians = {f"{place}_{label}": statistics.median(values) for (place, label), values in seconds.items()}
    return {"slowdown_auto": medians["beside_auto"] / medians["alone_auto"],
            "slowdown_default": medians["beside_default"] / medians["alone_default"],
            "alone_auto_vs_default": medians["alone_auto"] / medians["alone_default"],
            "median_seconds": medians, "default_threads": default_threads, "rounds": sizes.shared_rounds,
            "steps": sizes.shared_steps, "seconds": {f"{p}_{t}": v for (p, t), v in seconds.items()},
            "thread_reports": {f"{p}_{t}": v for (p, t), v in reports.items()},
            "load_average": os.getloadavg()}


def _torch_default_threads() -> int:
    """The intra-op thread count torch picks in a fresh process without thread variables (ucgm's count before
    ``training.threads``)."""
    probe = subprocess.run([sys.executable, "-c", "import torch; print(torch.get_num_threads())"],
                           env=cli_environment(single_thread=False), capture_output=True, text=True, check=True)
    return int(probe.stdout.strip())


# ---------------------------------------------------------------------------------------- batch invariance
#: Settings that make the generic samplers draw fresh noise where they can.
STOCHASTIC_SETTINGS = {"ucgm": {"stochasticity": 0.5}, "ucgm-o2": {"stochasticity": 0.5}}
#: Overrides that shrink each backbone to toy size.
TINY_MODELS = {"mlp": ("model.hidden=16", "model.depth=1"),
               "unet": ("model.base_channels=8", "model.channel_mults=[1]", "model.num_res_blocks=1",
                        "model.attention_resolutions=[]"),
               "dit": ("model.depth=1", "model.hidden_size=32", "model.num_heads=2")}
GENERIC_RUN = ("gmm", ("objective=ucgm",))


def sampler_runs() -> dict[str, tuple[str, tuple[str, ...]]]:
    """For every registry sampler, a run (preset, overrides) that samples with it: a registered method on the
    gmm preset or a preset whose method names it as its own sampler, else (generic solvers) UCGM-T on the gmm
    preset."""
    candidates = [("gmm", (f"objective={method}",)) for method in sorted(METHODS)]
    candidates += [(preset, ()) for preset in preset_names() if preset != "gmm"]
    chosen: dict[str, tuple[str, tuple[str, ...]]] = {}
    for preset, overrides in candidates:
        try:
            own = build_method(resolve_config(preset, list(overrides), accepted_keys)).sampler()[0]
        except ValueError:
            continue
        chosen.setdefault(own, (preset, overrides))
    return {name: chosen.get(name, GENERIC_RUN) for name in available_sampler_names()}


class BatchInvariance:
    """Briefly trained runs (2 steps, toy models) of :func:`sampler_runs` in ``workdir``, built on first use."""

    def __init__(self, workdir: Path):
        self.workdir = Path(workdir)
        self.runs = sampler_runs()
        self._loaded: dict[tuple[str, tuple[str, ...]], object] = {}

    def loaded(self, run: tuple[str, tuple[str, ...]]):
        if run not in self._loaded:
            preset, overrides = run
            config = resolve_config(preset, list(overrides), accepted_keys)
            tiny = TINY_MODELS.get(config["model"]["name"], ())
            config = resolve_config(preset, [*overrides, *tiny, "training.batch_size=8", "training.steps=2",
                                             "training.checkpoint_every=2", "training.precision=fp32"],
                                    accepted_keys)
            run_dir = self.workdir / f"invariance-{len(self._loaded)}"
            run_training(config, run_dir, progress=False)
            self._loaded[run] = load_checkpoint_model(run_dir)
        return self._loaded[run]

    def samples(self, sampler: str, batch_size: int, nfe: int = 4, num: int = 64, seed: int = 3) -> torch.Tensor:
        """``num`` samples of ``sampler`` at budget ``nfe`` drawn in batches of ``batch_size``."""
        loaded = self.loaded(self.runs[sampler])
        own_name, own_settings = loaded.method.sampler()
        settings = own_settings if own_name == sampler else STOCHASTIC_SETTINGS.get(sampler, {})
        drawn = draw_samples(loaded.model, loaded.transport, get_sampler(sampler, settings), nfe,
                             loaded.info.data_shape, loaded.info.num_classes or 0, num, seed, batch_size,
                             label=sampler)
        return drawn.samples

    def difference(self, sampler: str) -> float:
        """The largest difference between batch sizes 1 and 7 and batch size 64, in rounding units
        (:func:`rounding_units`; 0: bitwise equal)."""
        whole = self.samples(sampler, BATCH_SIZES[-1])
        return max(rounding_units(self.samples(sampler, size), whole) for size in BATCH_SIZES[:-1])


def rounding_units(samples: torch.Tensor, reference: torch.Tensor) -> float:
    """``max |samples - reference| / (eps(dtype) * max |reference|)``."""
    info = torch.finfo(reference.dtype)
    scale = info.eps * max(float(reference.abs().max()), info.tiny)
    return float((samples - reference).abs().max()) / scale


def batch_invariance(workdir: Path) -> dict[str, object]:
    """Per registry sampler: the largest difference across batch sizes, or the error it raised."""
    checker = BatchInvariance(workdir)
    results: dict[str, object] = {}
    for sampler in available_sampler_names():
        try:
            results[sampler] = checker.difference(sampler)
        except (ValueError, RuntimeError) as error:
            results[sampler] = f"error: {error}"
    return results
