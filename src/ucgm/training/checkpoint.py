"""Checkpoint directories: ``RUN/checkpoints/step_XXXXXXX/{model.safetensors, state.pt}`` plus a ``latest`` pointer.

* ``model.safetensors`` holds weight groups — ``model.*`` / ``ema.*`` for the method's sampling network,
  ``ROLE.*`` / ``ROLE-ema.*`` for its other networks (:func:`weight_group_names`) — and, as metadata, the resolved
  config, the data normalisation and shape, so that the file alone is enough to sample.
* ``state.pt`` holds what resuming needs beyond the weights (every optimizer and update count, the method's own
  state, step, RNG states); it only contains tensors and plain containers and is read with
  ``torch.load(weights_only=True)``.

A checkpoint is written into a temporary directory that is renamed into place once complete, so a crash
leaves either the previous checkpoints or the new one, never a half-written one; a write that fails (full disk,
permissions) removes its temporary directory and raises :class:`CheckpointError` saying the previous checkpoint is
intact. Both files are streamed through :func:`ucgm.atomic.open_for_writing` (a full disk is ``ENOSPC``, every
file gets :data:`ucgm.atomic.FILE_MODE`).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
from safetensors import safe_open
from torch import Tensor, nn

from ..atomic import atomic_write_text, fsync_directory, open_for_writing

CHECKPOINT_FORMAT = "ucgm-checkpoint"
FORMAT_VERSION = "2"
#: Versions whose weights this ucgm still reads (version 1: one network, groups ``model`` and ``ema``).
READABLE_VERSIONS = ("1", "2")
WEIGHTS_FILE = "model.safetensors"
STATE_FILE = "state.pt"
LATEST_FILE = "latest"
CHECKPOINTS_DIRECTORY = "checkpoints"
_STEP_PATTERN = re.compile(r"^step_(\d+)$")
_TEMPORARY_PREFIX = ".tmp-"
_TRASH_PREFIX = ".trash-"


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, corrupt or not a ucgm checkpoint."""


@dataclass
class CheckpointInfo:
    """What ``model.safetensors`` says about itself."""

    path: Path
    step: int
    config: dict
    normalisation: Optional[dict]
    data_shape: Optional[list]
    num_classes: Optional[int]
    groups: list
    #: How the run that wrote it ran: ``world_size`` and intra-op ``threads`` (empty for older checkpoints).
    run: dict = field(default_factory=dict)


def weight_group_names(role: str, sampling_role: str) -> tuple[str, str]:
    """The weight groups of network ``role``: ``("model", "ema")`` for the method's sampling network, else
    ``(role, role + "-ema")``."""
    if role == sampling_role:
        return "model", "ema"
    return role, f"{role}-ema"


def step_directory_name(step: int) -> str:
    return f"step_{step:07d}"


def checkpoints_directory(run_dir: Path) -> Path:
    return Path(run_dir) / CHECKPOINTS_DIRECTORY


def complete_checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """``(step, directory)`` of the finished checkpoints of a run, oldest first."""
    found = []
    root = checkpoints_directory(run_dir)
    if not root.is_dir():
        return found
    for entry in root.iterdir():
        match = _STEP_PATTERN.match(entry.name)
        if match and (entry / WEIGHTS_FILE).is_file() and (entry / STATE_FILE).is_file():
            found.append((int(match.group(1)), entry))
    return sorted(found)


def latest_checkpoint(run_dir: Path) -> Optional[Path]:
    """The newest finished checkpoint of a run (the ``latest`` pointer names it), or ``None``."""
    found = complete_checkpoints(run_dir)
    return found[-1][1] if found else None


def find_checkpoint(path: Path | str) -> Path:
    """The checkpoint directory meant by a run directory, a checkpoint directory or a ``model.safetensors``."""
    path = Path(path)
    if path.is_file() and path.name == WEIGHTS_FILE:
        return path.parent
    if (path / WEIGHTS_FILE).is_file():
        return path
    if path.is_dir():
        latest = latest_checkpoint(path)
        if latest is not None:
            return latest
        raise CheckpointError(f"{str(path)!r} holds no finished checkpoint (expected {CHECKPOINTS_DIRECTORY}/"
                              f"step_XXXXXXX/{WEIGHTS_FILE} or {WEIGHTS_FILE})")
    if path.is_file():
        raise CheckpointError(f"{str(path)!r} is not a ucgm checkpoint: expected a run directory, a checkpoint "
                              f"directory or a {WEIGHTS_FILE} file")
    raise CheckpointError(f"checkpoint {str(path)!r} does not exist")


# ------------------------------------------------------------------------------------------- write
def _flatten_weights(groups: dict[str, dict[str, Tensor]]) -> dict[str, Tensor]:
    """``{"model": {"w": t}}`` -> ``{"model.w": t}`` on the CPU, contiguous."""
    flat = {}
    for group, tensors in groups.items():
        if "." in group:
            raise ValueError(f"weight group names cannot contain '.', got {group!r}")
        for name, tensor in tensors.items():
            flat[f"{group}.{name}"] = tensor.detach().to("cpu").contiguous()
    return flat


_SAFETENSORS_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
                       torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
                       torch.uint8: "U8", torch.bool: "BOOL"}


def write_safetensors(path: Path, tensors: dict[str, Tensor], metadata: dict[str, str]) -> None:
    """Write a ``.safetensors`` file one tensor at a time (no second copy of the weights in memory).

    The layout of the format: an 8-byte little-endian header length ``n``, ``n`` bytes of JSON header
    ``{NAME: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {str: str}}`` padded with spaces
    to a multiple of 8, then the tensors' bytes (little-endian, row-major) back to back in header order.
    """
    names = sorted(tensors)
    header: dict[str, Any] = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for name in names:
        tensor = tensors[name]
        if tensor.dtype not in _SAFETENSORS_DTYPES:
            raise ValueError(f"tensor {name!r} has dtype {tensor.dtype}; allowed: {list(_SAFETENSORS_DTYPES)}")
        size = tensor.numel() * tensor.element_size()
        header[name] = {"dtype": _SAFETENSORS_DTYPES[tensor.dtype], "shape": list(tensor.shape),
                        "data_offsets": [offset, offset + size]}
        offset += size
    encoded = json.dumps(header, separators=(",", ":")).encode("utf-8")
    encoded += b" " * (-len(encoded) % 8)
    with open_for_writing(path) as sink:
        sink.write(struct.pack("<Q", len(encoded)) + encoded)
        for name in names:
            sink.write(tensors[name].contiguous().reshape(-1).view(torch.uint8).numpy())


def _remove_directory(directory: Path) -> None:
    """Rename ``directory`` out of the way first so that an interrupted removal never leaves a look-alike."""
    trash = directory.with_name(f"{_TRASH_PREFIX}{directory.name}-{os.getpid()}")
    os.rename(directory, trash)
    shutil.rmtree(trash, ignore_errors=True)


def write_checkpoint(run_dir: Path, step: int, weights: dict[str, dict[str, Tensor]], metadata: dict[str, Any],
                     state: dict, keep_last: Optional[int] = None) -> Path:
    """Write ``step_XXXXXXX`` atomically, point ``latest`` at it and keep only the newest ``keep_last``.

    ``metadata`` values must be JSON-serialisable (the config, the normalisation, ...). A finished checkpoint of
    the same step is kept as it is (a deterministic run writes the same state at the same step).
    """
    root = checkpoints_directory(run_dir)
    final = root / step_directory_name(step)
    previous = complete_checkpoints(run_dir)
    try:
        root.mkdir(parents=True, exist_ok=True)
        if not any(found == final for _, found in previous):
            _write_directory(final, step, weights, metadata, state)
        atomic_write_text(root / LATEST_FILE, final.name + "\n")
    except OSError as error:
        kept = f"the last complete checkpoint, {previous[-1][1].name}, is intact" if previous else \
            "no earlier checkpoint exists"
        raise CheckpointError(f"cannot write checkpoint {final.name} in {str(root)!r}: {error.strerror or error} "
                              f"({error.filename or root}); {kept}. Free some space or fix the permissions, then "
                              f"re-run the same command to resume") from error
    if keep_last is not None:
        for _, old in complete_checkpoints(run_dir)[:-keep_last]:
            _remove_directory(old)
    return final


def _write_directory(final: Path, step: int, weights: dict[str, dict[str, Tensor]], metadata: dict[str, Any],
                     state: dict) -> None:
    """Fill a temporary directory, flush it to disk and rename it to ``final``."""
    root = final.parent
    temporary = root / f"{_TEMPORARY_PREFIX}{final.name}-{os.getpid()}"
    if temporary.exists():
        shutil.rmtree(temporary)
    temporary.mkdir()
    header = {"format": CHECKPOINT_FORMAT, "version": FORMAT_VERSION, "step": str(step)}
    header.update({key: json.dumps(value) for key, value in metadata.items()})
    try:
        write_safetensors(temporary / WEIGHTS_FILE, _flatten_weights(weights), header)
        with open_for_writing(temporary / STATE_FILE) as sink:
            torch.save({"format": CHECKPOINT_FORMAT, **state}, sink)
        fsync_directory(temporary)
    except Exception:
        shutil.rmtree(temporary, ignore_errors=True)
        raise
    if final.exists():  # an unfinished directory of that name (e.g. copied by hand): it holds nothing usable
        _remove_directory(final)
    os.rename(temporary, final)
    fsync_directory(root)


def unfinished_writes(run_dir: Path) -> list[str]:
    """The step directories (``step_XXXXXXX``) whose writing an interrupted process left unfinished."""
    root = checkpoints_directory(run_dir)
    if not root.is_dir():
        return []
    names = [entry.name[len(_TEMPORARY_PREFIX):].rsplit("-", 1)[0] for entry in root.iterdir()
             if entry.is_dir() and entry.name.startswith(_TEMPORARY_PREFIX)]
    return sorted(set(names))


def remove_unfinished(run_dir: Path) -> None:
    """Delete temporary and half-deleted checkpoint directories left by an interrupted process."""
    root = checkpoints_directory(run_dir)
    if root.is_dir():
        for entry in root.iterdir():
            if entry.is_dir() and entry.name.startswith((_TEMPORARY_PREFIX, _TRASH_PREFIX)):
                shutil.rmtree(entry, ignore_errors=True)


def check_weights_fit(weights: dict[str, Tensor], module: nn.Module, source: str) -> None:
    """Raise :class:`CheckpointError` unless ``weights`` has exactly the names and shapes of ``module``'s state
    (``source`` names the weights in the message)."""
    expected = {name: tuple(value.shape) for name, value in module.state_dict().items()}
    missing = sorted(set(expected) - set(weights))
    unexpected = sorted(set(weights) - set(expected))
    resized = [(name, tuple(weights[name].shape), shape) for name, shape in expected.items()
               if name in weights and tuple(weights[name].shape) != shape]
    if not (missing or unexpected or resized):
        return
    details = [f"{name!r} has shape {list(saved)} there but {list(shape)} in the model the config builds"
               for name, saved, shape in resized[:3]]
    details += [f"missing {missing[:3]}"] if missing else []
    details += [f"unexpected {unexpected[:3]}"] if unexpected else []
    raise CheckpointError(f"{source} do not fit the model: {'; '.join(details)}. They were written by a run with "
                          f"other model settings; resume with that run's model section (see its config.yaml) or "
                          f"choose a new --run-dir")


# -------------------------------------------------------------------------------------------- read
def _json_field(metadata: dict, key: str, path: Path):
    try:
        return json.loads(metadata[key]) if key in metadata else None
    except json.JSONDecodeError as error:
        raise CheckpointError(f"{str(path)!r}: metadata field {key!r} is not valid JSON ({error})") from error


def read_checkpoint_info(checkpoint: Path | str) -> CheckpointInfo:
    """Metadata of a checkpoint (run directory, checkpoint directory or weights file)."""
    directory = find_checkpoint(checkpoint)
    path = directory / WEIGHTS_FILE
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            keys = list(handle.keys())
    except Exception as error:  # safetensors raises SafetensorError / OSError on corrupt files
        raise CheckpointError(f"{str(path)!r} is corrupt or not a safetensors file ({error})") from error
    if metadata.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{str(path)!r} is not a ucgm checkpoint (its metadata has no "
                              f"format={CHECKPOINT_FORMAT!r}); foreign weights must be converted first")
    if metadata.get("version") not in READABLE_VERSIONS:
        raise CheckpointError(f"{str(path)!r} has checkpoint format version {metadata.get('version')!r}; "
                              f"this ucgm reads versions {', '.join(READABLE_VERSIONS)}")
    config = _json_field(metadata, "config", path)
    if not isinstance(config, dict):
        raise CheckpointError(f"{str(path)!r} holds no resolved config in its metadata")
    return CheckpointInfo(
        path=directory,
        step=int(metadata.get("step", 0)),
        config=config,
        normalisation=_json_field(metadata, "normalisation", path),
        data_shape=_json_field(metadata, "data_shape", path),
        num_classes=_json_field(metadata, "num_classes", path),
        groups=sorted({key.split(".", 1)[0] for key in keys}),
        run=_json_field(metadata, "run", path) or {},
    )


def read_weights(checkpoint: Path | str, group: str, device: torch.device | str = "cpu") -> dict[str, Tensor]:
    """The tensors of one weight group (e.g. ``"model"`` or ``"ema"``), names without the group prefix."""
    directory = find_checkpoint(checkpoint)
    path = directory / WEIGHTS_FILE
    prefix = f"{group}."
    try:
        with safe_open(str(path), framework="pt", device=str(device)) as handle:
            weights = {key[len(prefix):]: handle.get_tensor(key) for key in handle.keys() if key.startswith(prefix)}
    except Exception as error:
        raise CheckpointError(f"{str(path)!r} is corrupt or not a safetensors file ({error})") from error
    if not weights:
        raise CheckpointError(f"{str(path)!r} holds no {group!r} weights")
    return weights


def read_state(checkpoint: Path | str) -> dict:
    """The resume state (``state.pt``), loaded without executing any pickled code."""
    path = find_checkpoint(checkpoint) / STATE_FILE
    if not path.is_file():
        raise CheckpointError(f"{str(path)!r} is missing; this checkpoint can be sampled but not resumed")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # UnpicklingError (foreign objects), RuntimeError / EOFError (corrupt)
        raise CheckpointError(f"{str(path)!r} is corrupt or holds objects other than tensors and plain "
                              f"containers ({type(error).__name__}: {error})") from error
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{str(path)!r} is not a ucgm training state")
    return state
