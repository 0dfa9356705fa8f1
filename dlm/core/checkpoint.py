"""Atomic checkpoint writes and safe loads (weights_only, so a checkpoint can never run code), with a
checksum of the whole payload (tensors, vocabulary, config, counters) so that flipped bytes are caught
at load time instead of being trained on, sampled from, or written back by a resume."""

from __future__ import annotations

import hashlib
import io
import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch

from dlm.core.data import atomic_write_bytes

FORMAT = "dlm-checkpoint"
# Version 2's checksum covers every value in the payload; version 1's covered only the tensors (a flipped
# bit in the vocabulary or the config loaded silently). Both are read.
VERSION = 2
READABLE_VERSIONS = (1, 2)
HEADER_KEYS = ("format", "version", "checksum")  # what save_checkpoint adds around a payload


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, corrupt or not dlm's."""


def payload_checksum(value: Any, tensors_only: bool = False) -> str:
    """SHA-256 over a nested payload (dict keys in sorted order): every tensor's shape, dtype and bytes,
    and every other value by its type and repr (strings, numbers, booleans, None). `tensors_only` is
    version 1's checksum, kept to read checkpoints written before version 2."""
    digest = hashlib.sha256()

    def visit(item: Any, where: str) -> None:
        if isinstance(item, torch.Tensor):
            tensor = item.detach().cpu().contiguous().reshape(-1)
            digest.update(f"{where}:{tensor.dtype}:{tuple(item.shape)}".encode())
            digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
        elif isinstance(item, dict):
            for key in sorted(item, key=str):
                visit(item[key], f"{where}/{key}")
        elif isinstance(item, (list, tuple)):
            for index, element in enumerate(item):
                visit(element, f"{where}/{index}")
        elif not tensors_only:
            digest.update(f"{where}:{type(item).__name__}:{item!r}".encode())

    visit(value, "")
    return digest.hexdigest()


def save_checkpoint(path: str | Path, payload: dict[str, Any]) -> Path:
    """Serialise in memory, then write a temp file and rename: a crash never leaves half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    # a payload read back from a checkpoint carries its format, version and checksum: this file gets its own
    content = {key: value for key, value in payload.items() if key not in HEADER_KEYS}
    torch.save({**content, "format": FORMAT, "version": VERSION, "checksum": payload_checksum(content)}, buffer)
    atomic_write_bytes(path, buffer.getvalue())
    return path


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu", require: tuple[str, ...] = (),
                    instead: str | None = None) -> dict[str, Any]:
    """The payload of a dlm checkpoint, checked: dlm's format and version, the tensor checksum, and the
    `require`d keys present; anything else is a CheckpointError that says what to do (`instead`: what
    the caller can do about a missing or damaged file, in place of naming another checkpoint)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"No checkpoint at '{path}'. "
                              + (instead or "Train first (dlm train ... --run_dir DIR) or pass --checkpoint FILE."))
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except (RuntimeError, pickle.UnpicklingError, EOFError, zipfile.BadZipFile, ValueError, OSError, IndexError,
            KeyError, TypeError, AttributeError, UnicodeDecodeError) as error:
        # the weights-only unpickler raises any of these on random bytes
        raise CheckpointError(
            f"'{path}' is corrupt or not a dlm checkpoint ({type(error).__name__}). "
            + (instead or "Pick another file from the run's checkpoints/ folder, or retrain.")
        ) from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"'{path}' is a PyTorch file but not a dlm checkpoint.")
    version = payload.get("version")
    if version not in READABLE_VERSIONS:
        raise CheckpointError(
            f"'{path}' is dlm checkpoint version {version}; this dlm reads versions "
            f"{', '.join(map(str, READABLE_VERSIONS))}."
        )
    # version 1 checkpoints written before the checksum have none; from version 2 on it is required
    expected = payload.pop("checksum", None)
    content = {key: value for key, value in payload.items() if key not in HEADER_KEYS}
    if version == 1:
        damaged = expected is not None and payload_checksum(content, tensors_only=True) != expected
    else:
        damaged = payload_checksum(content) != expected
    if damaged:
        raise CheckpointError(
            f"'{path}' failed its checksum: it changed after it was written (a damaged disk or copy). "
            + (instead or "Pick another file from the run's checkpoints/ folder, or retrain.")
        )
    missing = [key for key in require if key not in payload]
    if missing:
        raise CheckpointError(f"'{path}' is a dlm checkpoint without {', '.join(missing)}: it cannot be loaded.")
    return payload
