"""Atomic file writes: write a temporary sibling, flush it to disk, then rename it over the target.

Every file ucgm writes gets the same permissions, :data:`FILE_MODE` (``0o666`` less the process umask: ``0644``
under the usual umask ``022``), as files created by ``open()``. A process killed during a write leaves its
temporary sibling ``.NAME.XXXXXXXX.tmp`` behind; :func:`remove_temporaries` deletes them on the next start.
All bytes go through :func:`write_all`, so a full disk raises ``OSError(ENOSPC)`` naming the file.
"""

from __future__ import annotations

import os
import re
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO, Iterator, Union

PathLike = Union[str, os.PathLike]

#: Suffix of the temporary siblings of :func:`atomic_path`; their names are ``.NAME.`` + 8 random characters + it.
TEMPORARY_SUFFIX = ".tmp"
_TEMPORARY_NAME = re.compile(r"^\..+\.[A-Za-z0-9_]{8}\.tmp$")


def _file_mode() -> int:
    """``0o666`` without the bits of the process umask (read without changing it for longer than a call)."""
    umask = os.umask(0o022)
    os.umask(umask)
    return 0o666 & ~umask


#: Permissions of every file ucgm writes.
FILE_MODE = _file_mode()


def fsync_directory(directory: PathLike) -> None:
    """Persist a rename inside ``directory`` (no-op where directories cannot be opened, e.g. Windows)."""
    try:
        handle = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(handle)
    finally:
        os.close(handle)


def write_all(handle: BinaryIO, data) -> None:
    """Write ``data`` (bytes or a buffer) to an open binary file: the one place ucgm's file bytes go through."""
    handle.write(data)


class _Sink:
    """A writable binary stream whose writes go through :func:`write_all` (for writers such as ``torch.save``)."""

    def __init__(self, handle: BinaryIO):
        self._handle = handle

    def write(self, data) -> int:
        write_all(self._handle, data)
        return memoryview(data).nbytes

    def flush(self) -> None:
        self._handle.flush()


@contextmanager
def open_for_writing(path: PathLike) -> Iterator[_Sink]:
    """Create (or replace in place) ``path`` and yield a stream to write it; on success it is flushed to disk and
    gets :data:`FILE_MODE`.

    Not atomic by itself: for files inside a directory that is renamed into place afterwards (checkpoints), or
    for the temporary path of :func:`atomic_path`.
    """
    try:
        with open(path, "wb") as handle:
            yield _Sink(handle)
            handle.flush()
            os.fsync(handle.fileno())
    except OSError as error:
        if error.filename is None and error.errno is not None:  # a failed write names no file: name it
            raise OSError(error.errno, error.strerror or os.strerror(error.errno), str(path)) from error
        raise
    os.chmod(path, FILE_MODE)


def write_file(path: PathLike, data: bytes) -> None:
    """:func:`open_for_writing` ``path`` and write ``data``."""
    with open_for_writing(path) as sink:
        sink.write(data)


@contextmanager
def atomic_path(target: PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``target``; when the block succeeds it replaces ``target`` atomically.

    The caller writes the temporary path completely (any writer that takes a path); on error it is removed and
    ``target`` is left untouched.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{target.name}.", suffix=TEMPORARY_SUFFIX, dir=target.parent)
    os.close(handle)
    temporary = Path(temporary)
    try:
        yield temporary
        os.chmod(temporary, FILE_MODE)  # after the writer: some writers replace the file they are given
        with open(temporary, "rb+") as written:
            os.fsync(written.fileno())
        os.replace(temporary, target)
    except OSError as error:
        temporary.unlink(missing_ok=True)
        if error.filename in (None, str(temporary)) and error.errno is not None:  # name the file being written
            raise OSError(error.errno, error.strerror or os.strerror(error.errno), str(target)) from error
        raise
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    fsync_directory(target.parent)


def atomic_write_bytes(target: PathLike, data: bytes) -> None:
    """Replace ``target`` with ``data`` atomically."""
    with atomic_path(target) as temporary:
        write_file(temporary, data)


def atomic_write_text(target: PathLike, text: str) -> None:
    """Replace ``target`` with ``text`` (UTF-8) atomically."""
    atomic_write_bytes(target, text.encode("utf-8"))


def is_temporary(path: PathLike) -> bool:
    """Whether ``path`` is named like a temporary sibling of :func:`atomic_path`."""
    return bool(_TEMPORARY_NAME.match(Path(path).name))


def remove_temporaries(directory: PathLike) -> list[Path]:
    """Delete the temporary siblings that interrupted atomic writes left in ``directory`` (not recursive);
    returns them. Call it only where no other process is writing."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    removed = [entry for entry in directory.iterdir() if entry.is_file() and is_temporary(entry)]
    for entry in removed:
        entry.unlink(missing_ok=True)
    return removed
