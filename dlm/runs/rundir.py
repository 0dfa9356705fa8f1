"""The run folder: every path inside one, in one place, and its lock (one writer per folder)."""

from __future__ import annotations

import re
from pathlib import Path

from dlm.core.lockfile import FolderLock, FolderLocked


def run_and_checkpoint(path: str | Path) -> tuple[Path, Path | None]:
    """A run folder (its last checkpoint: None) or one of its checkpoint files, as
    (run folder, checkpoint): what the benchmarks accept wherever they take a run."""
    path = Path(path)
    return (path.parent.parent, path) if path.is_file() else (path, None)


def listing(names: list[str], most: int = 6) -> str:
    """What a folder holds, as a message names it: the first `most` names, then how many more."""
    return ", ".join(names[:most]) + (f" and {len(names) - most} more" if len(names) > most else "")


def folder_entries(folder: Path) -> list[str]:
    """A folder's entries by name, folders marked with a trailing '/'."""
    return sorted(p.name + ("/" if p.is_dir() else "") for p in folder.iterdir())


class RunDir:
    """Where one run keeps everything:

        run_dir/config.yaml, vocab.json, metrics.csv        (dlm train / train.ipynb)
        run_dir/tokenizer.json                               (a BPE run's tokenizer, instead of vocab.json)
        run_dir/provenance.json                              (who trained it: one entry per invocation)
        run_dir/calibration.json                             (dlm calibrate: the temperature at held-out entropy)
        run_dir/.train.lock                                  (held by the one process training the run)
        run_dir/checkpoints/{epoch_NNNN.pt, last.pt, best.pt}  (best.pt: the lowest validation loss so far)
        run_dir/samples/{samples.jsonl, .txt, .trajectory.json, summary.json, quality_vs_steps.csv}  (sample.ipynb)
        run_dir/analysis/{series.csv, verdict.json}           (collapse_analysis.ipynb)
        run_dir/analysis/nll_bound.csv                        (train.ipynb: the likelihood bound over checkpoints)
        run_dir/classifiers/{latent,judge}/ATTRIBUTE.pt       (dlm train-classifier)
        run_dir/tensorboard/events.out.tfevents.*             (dlm train --tensorboard)
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)

    config = property(lambda self: self.path / "config.yaml")
    vocab = property(lambda self: self.path / "vocab.json")
    tokenizer_json = property(lambda self: self.path / "tokenizer.json")
    metrics = property(lambda self: self.path / "metrics.csv")
    provenance = property(lambda self: self.path / "provenance.json")
    calibration = property(lambda self: self.path / "calibration.json")  # dlm calibrate: the sampling temperature
    lock = property(lambda self: self.path / ".train.lock")
    checkpoints = property(lambda self: self.path / "checkpoints")
    last_checkpoint = property(lambda self: self.path / "checkpoints" / "last.pt")
    best_checkpoint = property(lambda self: self.path / "checkpoints" / "best.pt")
    samples = property(lambda self: self.path / "samples")
    samples_file = property(lambda self: self.samples / "samples.jsonl")  # + .txt and .trajectory.json beside it
    sample_summary = property(lambda self: self.samples / "summary.json")
    quality_vs_steps = property(lambda self: self.samples / "quality_vs_steps.csv")
    analysis = property(lambda self: self.path / "analysis")
    series = property(lambda self: self.analysis / "series.csv")
    verdict = property(lambda self: self.analysis / "verdict.json")
    nll_bound = property(lambda self: self.analysis / "nll_bound.csv")  # the bound over checkpoints (train.ipynb)
    tensorboard = property(lambda self: self.path / "tensorboard")  # event files (--tensorboard)

    classifiers = property(lambda self: self.path / "classifiers")

    def classifier(self, kind: str, attribute: str, folder: str | Path | None = None) -> Path:
        """classifiers/KIND/ATTRIBUTE.pt (or FOLDER/KIND/ATTRIBUTE.pt), 'word:love' written
        'word-love' (no ':' in file names)."""
        return Path(folder or self.classifiers) / kind / (re.sub(r"[^A-Za-z0-9_'-]", "-", attribute) + ".pt")

    def checkpoint_file(self, checkpoint: str | Path | None = None) -> Path:
        """The checkpoint a user names: None or 'last' (last.pt), 'best' (best.pt), else that file."""
        name = str(checkpoint) if checkpoint else "last"
        if name in ("last", "best"):
            return self.last_checkpoint if name == "last" else self.best_checkpoint
        return Path(checkpoint)

    def epoch_checkpoint(self, epoch: int) -> Path:
        return self.checkpoints / f"epoch_{epoch:04d}.pt"

    def kept_checkpoints(self) -> list[Path]:
        """The checkpoints kept on the schedule, oldest first."""
        return sorted(self.checkpoints.glob("epoch_*.pt"))

    def has_run(self) -> bool:
        return self.has_checkpoint() or self.metrics.exists()

    def entries(self) -> list[str]:
        """What the folder holds, its lock and the temp files of interrupted writes aside (a folder
        is new or empty for a fresh run when this is empty)."""
        if not self.path.is_dir():
            return []
        return [name for name in folder_entries(self.path)
                if name != self.lock.name and not (name.startswith(".") and name.endswith(".tmp"))]

    def started_without_checkpoint(self) -> bool:
        """A run dlm started that stopped before its first checkpoint: its provenance.json is
        there (written once training begins) and no checkpoint; nothing in it to keep."""
        return self.provenance.is_file() and self.config.is_file() and not self.has_checkpoint()

    def has_checkpoint(self) -> bool:
        """Anything a run could be resumed or sampled from: last.pt or a kept checkpoint."""
        return self.last_checkpoint.exists() or bool(self.kept_checkpoints())

    def leftover_temp_files(self) -> list[Path]:
        """Hidden temp files (.NAME.XXXX.tmp) of atomic writes that a killed process never renamed:
        never read by anything, safe to delete while this run's lock is held."""
        return sorted(p for folder in (self.path, self.checkpoints) if folder.is_dir()
                      for p in folder.glob(".*.tmp") if p.is_file())


class RunExistsError(FileExistsError):
    """The run folder already holds a run and --resume was not given."""


class RunLockedError(RunExistsError):
    """Another process is training in the run folder."""


class RunLock:
    """One writer per run folder: an exclusive lock on run_dir/.train.lock, held from the start of
    train() to its end (dlm.core.lockfile: released by the kernel when the process dies)."""

    def __init__(self, run: RunDir):
        self.run, self.lock = run, FolderLock(run.lock)

    def __enter__(self) -> RunLock:
        try:
            self.lock.__enter__()
        except FolderLocked as held:
            raise RunLockedError(
                f"'{self.run.path}' is being trained right now by {held.holder}; two writers would corrupt it. "
                f"Wait for that run to end (or stop it), then continue it with --resume; or choose another --run_dir."
            ) from None
        return self

    def __exit__(self, *exc) -> None:
        self.lock.__exit__(*exc)
