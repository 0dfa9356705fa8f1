"""Atomic checkpoint writes and safe loads (weights_only, so a checkpoint can never run code)."""

from __future__ import annotations

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


def save_checkpoint(path: str | Path, payload: dict[str, Any]) -> Path:
    """Serialise in memory, then write a temp file and rename: a crash never leaves half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    torch.save({"format": FORMAT, "version": VERSION, **payload}, buffer)
    atomic_write_bytes(path, buffer.getvalue())
    return path


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(
            f"No checkpoint at '{path}'. Train first (dlm train ... --run_dir DIR) or pass --checkpoint FILE."
        )
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except (RuntimeError, pickle.UnpicklingError, EOFError, zipfile.BadZipFile, ValueError, OSError) as error:
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
    return payload
