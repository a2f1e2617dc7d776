"""Process groups for ``torchrun`` launches: DDP (gloo on CPU, NCCL on CUDA) or FSDP, with fail-fast teardown.

Outside ``torchrun`` everything degrades to a single process. Inside, every collective has the configured
timeout (``training.dist_timeout``, 600 s by default rather than torch's 30 minutes), and a rank that raises tears
its process group down before re-raising, so the job ends with an error (the ``torchrun`` agent then stops the
other ranks) instead of hanging. When a rank dies, the survivors' collectives fail (or the agent stops them with
SIGTERM); they end with :class:`JobStopped` naming the ranks whose processes are gone (ranks on the same host are
checked by process id, gathered when the job starts).
"""

from __future__ import annotations

import os
import signal
import socket
import sys
import threading
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Iterator

import torch
import torch.distributed as dist
from torch import nn


def launched_by_torchrun() -> bool:
    """Whether the process was started by ``torchrun`` (or another launcher that sets the ``env://`` variables)."""
    return all(name in os.environ for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"))


def resolve_device(setting: str, local_rank: int = 0) -> torch.device:
    """``"auto"``: this rank's CUDA device when CUDA is available, else the CPU; otherwise the named device."""
    if setting == "auto":
        return torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    device = torch.device(setting)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", local_rank)
    return device


@dataclass
class DistributedContext:
    """This process's place in the job and the collectives the trainer needs."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    #: ``(host, process id)`` of every rank.
    peers: list = field(default_factory=list)

    @property
    def is_main(self) -> bool:
        """Rank 0 alone logs and writes files."""
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1

    def mean(self, tensor: torch.Tensor) -> torch.Tensor:
        """The mean of ``tensor`` over ranks (a copy; the input itself on a single process)."""
        if not self.is_distributed:
            return tensor
        total = tensor.detach().clone()
        dist.all_reduce(total, op=dist.ReduceOp.SUM)
        return total / self.world_size

    def barrier(self) -> None:
        if self.is_distributed:
            dist.barrier()

    def wrap(self, model: nn.Module, parallel: str) -> nn.Module:
        """The module to train: ``model`` itself, a DDP wrapper, or ``model`` sharded in place by FSDP."""
        if not self.is_distributed:
            return model
        if parallel == "ddp":
            device_ids = [self.device.index] if self.device.type == "cuda" else None
            return nn.parallel.DistributedDataParallel(model, device_ids=device_ids)
        if parallel == "fsdp":
            return self.shard(model)
        raise ValueError(f"training.parallel={parallel!r} is not allowed; allowed values: 'ddp', 'fsdp'")

    def shard(self, model: nn.Module) -> nn.Module:
        """FSDP-shard ``model`` in place (parameters become sharded DTensors) and return it."""
        from torch.distributed.fsdp import fully_shard

        fully_shard(model)
        return model


def init_distributed(device_setting: str = "auto", timeout_seconds: float = 600.0) -> DistributedContext:
    """Join the ``torchrun`` job (NCCL on CUDA, gloo otherwise) or return a single-process context."""
    if not launched_by_torchrun():
        return DistributedContext(device=resolve_device(device_setting))
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ["LOCAL_RANK"])
    device = resolve_device(device_setting, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, rank=rank, world_size=world_size, timeout=timedelta(seconds=timeout_seconds))
    peers: list = [None] * world_size
    dist.all_gather_object(peers, (socket.gethostname(), os.getpid()))
    return DistributedContext(rank, world_size, local_rank, device, peers)


class JobStopped(RuntimeError):
    """This rank of a ``torchrun`` job stops because another rank died or the launcher ended the job."""


def _process_gone(pid: int) -> bool:
    """Whether process ``pid`` of this host has exited (a zombie awaiting its parent counts as exited)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return True
    except (OSError, IndexError):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        except OSError:
            return False
        return False
    return state in ("Z", "X")


def dead_ranks(context: DistributedContext) -> list[str]:
    """``"rank R (pid P on HOST)"`` for every other rank on this host whose process is gone."""
    host = socket.gethostname()
    return [f"rank {rank} (pid {pid} on {peer_host})" for rank, (peer_host, pid) in enumerate(context.peers)
            if rank != context.rank and peer_host == host and _process_gone(pid)]


def _stop_on_sigterm(signum, frame) -> None:
    raise JobStopped("stopped by SIGTERM (the launcher ends the job)")


def shutdown_distributed() -> None:
    """Destroy the process group if one exists (never raises)."""
    if dist.is_available() and dist.is_initialized():
        try:
            dist.destroy_process_group()
        except Exception as error:  # teardown after a failure must not mask the original error
            print(f"ucgm: process group teardown failed: {error}", file=sys.stderr)


@contextmanager
def distributed_session(device_setting: str = "auto", timeout_seconds: float = 600.0) -> Iterator[DistributedContext]:
    """Join the job for the duration of the block; on an error, report the rank, tear the group down and re-raise
    (as :class:`JobStopped` naming the dead ranks when other ranks of this host have died)."""
    context = init_distributed(device_setting, timeout_seconds)
    in_main_thread = threading.current_thread() is threading.main_thread()
    previous_handler = signal.signal(signal.SIGTERM, _stop_on_sigterm) if context.is_distributed and in_main_thread \
        else None
    try:
        yield context
    except BaseException as error:
        if not context.is_distributed:
            raise
        gone = dead_ranks(context)
        shutdown_distributed()
        if gone or isinstance(error, JobStopped):
            cause = f"{', '.join(gone)} died" if gone else "another rank failed"
            raise JobStopped(f"{cause}; rank {context.rank}/{context.world_size} ends the job ({error}). The last "
                             f"complete checkpoint is intact: re-run the same command to resume") from error
        print(f"ucgm: rank {context.rank}/{context.world_size} failed with {type(error).__name__}: {error}; "
              f"ending the job", file=sys.stderr, flush=True)
        raise
    finally:
        if previous_handler is not None:
            signal.signal(signal.SIGTERM, previous_handler)
    shutdown_distributed()
