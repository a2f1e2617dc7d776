"""The one error path of every ``ucgm`` command: expected failures become one line, unexpected ones keep their
traceback.

Expected (exit status 2, ``ucgm COMMAND: error: MESSAGE``): bad config, arguments or data (``ValueError``, of
which :class:`~ucgm.validation.ConfigError`), unusable checkpoints
(:class:`~ucgm.training.checkpoint.CheckpointError`), training that diverged, missing weight files, a missing
optional package, a dead rank of a ``torchrun`` job, and the operating system's refusals to read or write a path
(full disk, permissions, read-only file system, a file where a directory should be and the reverse, ...). Set
``UCGM_TRACEBACK=1`` to see the traceback of an expected failure too.
"""

from __future__ import annotations

import errno
import os
import sys
import traceback
from typing import Callable, Optional, Sequence

#: Hints for the OSError kinds that are the user's environment rather than a bug.
OS_ERROR_HINTS = {
    errno.ENOSPC: "free some space or choose another location",
    errno.EDQUOT: "free some space or choose another location",
    errno.EFBIG: "the file system refuses a file this large; choose another location",
    errno.EACCES: "choose a location you may write (e.g. another --run-dir / --out) or fix its permissions",
    errno.EPERM: "choose a location you may write (e.g. another --run-dir / --out) or fix its permissions",
    errno.EROFS: "the file system is read-only; choose a writable location",
    errno.EISDIR: "a directory is in the place of a file",
    errno.ENOTDIR: "a file is in the place of a directory (a component of the path is not a directory)",
    errno.EEXIST: "something else already exists at that path",
    errno.ENOENT: "check the path",
    errno.ENAMETOOLONG: "choose a shorter path",
    errno.EIO: "the storage device reported an input/output error",
}
#: Import names of optional packages that differ from their ``pip install`` names.
PIP_NAMES = {"sklearn": "scikit-learn", "PIL": "pillow", "yaml": "pyyaml"}
_RESUME_NOTE = "files are written atomically, so earlier outputs and the last complete checkpoint are intact"


def _expected_types() -> tuple[type, ...]:
    from ..metrics.fid import MissingWeightsError
    from ..training.checkpoint import CheckpointError
    from ..training.distributed import JobStopped
    from ..training.loop import TrainingDiverged

    return ValueError, CheckpointError, TrainingDiverged, MissingWeightsError, JobStopped


def describe_os_error(error: OSError) -> Optional[str]:
    """One line for an OSError of a kind in :data:`OS_ERROR_HINTS` (naming the path), else ``None``."""
    if error.errno not in OS_ERROR_HINTS:
        return None
    paths = [str(path) for path in (error.filename, error.filename2) if path is not None]
    where = f" ({' -> '.join(map(repr, paths))})" if paths else ""
    return f"{error.strerror or os.strerror(error.errno)}{where}: {OS_ERROR_HINTS[error.errno]}; {_RESUME_NOTE}"


def describe_missing_module(error: ModuleNotFoundError) -> Optional[str]:
    """One line for a missing optional package (not for a missing part of ucgm itself, which is a bug)."""
    name = (error.name or "").split(".")[0]
    if not name or name == "ucgm":
        return None
    return f"this needs the optional package {name!r}, which is not installed: pip install {PIP_NAMES.get(name, name)}"


def expected_message(error: BaseException) -> Optional[str]:
    """The one-line message of an expected failure, or ``None`` for an unexpected one."""
    if isinstance(error, ModuleNotFoundError):
        return describe_missing_module(error)
    if isinstance(error, ImportError):  # raised on purpose by ucgm with an install hint
        return str(error) if "pip install" in str(error) else None
    if isinstance(error, _expected_types()):
        return str(error)
    if isinstance(error, OSError):
        return describe_os_error(error)
    return None


def _rank_prefix() -> str:
    """`` (rank R/N)`` inside a multi-process job, where every failing rank reports."""
    world = os.environ.get("WORLD_SIZE", "1")
    return f" (rank {os.environ.get('RANK', '0')}/{world})" if world not in ("", "1") else ""


def run_command(command: str, handler: Callable[[Sequence[str]], int], argv: Sequence[str]) -> int:
    """``handler(argv)`` with the error path of the module docstring; returns the exit status."""
    try:
        return int(handler(argv) or 0)
    except KeyboardInterrupt:
        resume = " (re-run the same command to resume from the last checkpoint)" if command in ("train", "tune") \
            else ""
        print(f"ucgm {command}: interrupted{resume}", file=sys.stderr)
        return 130
    except Exception as error:
        message = expected_message(error)
        if message is None:
            raise
        if os.environ.get("UCGM_TRACEBACK"):
            traceback.print_exc()
        print(f"ucgm {command}: error{_rank_prefix()}: {message}", file=sys.stderr, flush=True)
        return 2
