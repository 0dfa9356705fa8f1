"""Atomic checkpoint writes and safe loads (weights_only, so a checkpoint can never run code), with a
checksum of every tensor so that flipped bytes are caught at load time instead of training on."""

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
VERSION = 1


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, corrupt or not dlm's."""


def tensor_checksum(value: Any) -> str:
    """SHA-256 over every tensor in a nested payload (dict keys in sorted order): shapes, dtypes and bytes."""
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

    visit(value, "")
    return digest.hexdigest()


def save_checkpoint(path: str | Path, payload: dict[str, Any]) -> Path:
    """Serialise in memory, then write a temp file and rename: a crash never leaves half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    torch.save({"format": FORMAT, "version": VERSION, **payload, "checksum": tensor_checksum(payload)}, buffer)
    atomic_write_bytes(path, buffer.getvalue())
    return path


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu", require: tuple[str, ...] = ()) -> dict[str, Any]:
    """The payload of a dlm checkpoint, checked: dlm's format and version, the tensor checksum, and the
    `require`d keys present; anything else is a CheckpointError that says what to do."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(
            f"No checkpoint at '{path}'. Train first (dlm train ... --run_dir DIR) or pass --checkpoint FILE."
        )
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except (RuntimeError, pickle.UnpicklingError, EOFError, zipfile.BadZipFile, ValueError, OSError, IndexError,
            KeyError, TypeError, AttributeError, UnicodeDecodeError) as error:
        # the weights-only unpickler raises any of these on random bytes
        raise CheckpointError(
            f"'{path}' is corrupt or not a dlm checkpoint ({type(error).__name__}). "
            f"Pick another file from the run's checkpoints/ folder, or retrain."
        ) from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"'{path}' is a PyTorch file but not a dlm checkpoint.")
    if payload.get("version") != VERSION:
        raise CheckpointError(
            f"'{path}' is dlm checkpoint version {payload.get('version')}; this dlm reads version {VERSION}."
        )
    expected = payload.pop("checksum", None)  # checkpoints written before the checksum have none
    if expected is not None and tensor_checksum(payload) != expected:
        raise CheckpointError(
            f"'{path}' failed its checksum: its tensors changed after it was written (a damaged disk or copy). "
            f"Pick another file from the run's checkpoints/ folder, or retrain."
        )
    missing = [key for key in require if key not in payload]
    if missing:
        raise CheckpointError(f"'{path}' is a dlm checkpoint without {', '.join(missing)}: it cannot be loaded.")
    return payload
