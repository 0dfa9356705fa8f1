"""The run folder: every path inside one, in one place."""

from __future__ import annotations

from pathlib import Path


class RunDir:
    """Where one run keeps everything: run_dir/{config.yaml, vocab.json, metrics.csv, checkpoints/}."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    config = property(lambda self: self.path / "config.yaml")
    vocab = property(lambda self: self.path / "vocab.json")
    metrics = property(lambda self: self.path / "metrics.csv")
    checkpoints = property(lambda self: self.path / "checkpoints")
    last_checkpoint = property(lambda self: self.path / "checkpoints" / "last.pt")
    samples = property(lambda self: self.path / "samples")

    def epoch_checkpoint(self, epoch: int) -> Path:
        return self.checkpoints / f"epoch_{epoch:04d}.pt"

    def kept_checkpoints(self) -> list[Path]:
        """The checkpoints kept on the schedule, oldest first."""
        return sorted(self.checkpoints.glob("epoch_*.pt"))

    def has_run(self) -> bool:
        return self.last_checkpoint.exists() or self.metrics.exists()
