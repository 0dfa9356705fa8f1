"""What an analysis reads from a run: its corpus cut as it was trained, held-out windows of its
shape, its training token counts, its kept checkpoints, and samples from one of them."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pandas as pd
import torch

from dlm.core.data import CorpusData
from dlm.core.textstats import heldout_windows
from dlm.evaluation.tokens import ids_to_words
from dlm.runs.build import LoadedRun, corpus_data, load_run
from dlm.runs.rundir import RunDir
from dlm.runs.sample import SampleBatch, SampleOptions, generate


def run_data(run: LoadedRun) -> CorpusData:
    """The run's corpus encoded with its vocabulary, its train split cut as it was trained (and
    checked to be the text it was trained on: dlm.runs.build.corpus_data)."""
    return corpus_data(run)


def validation_windows(run: LoadedRun, count: int, seed: int = 0, data: CorpusData | None = None) -> torch.Tensor:
    """`count` random held-out windows of the run's length, in its tokens (the package's held-out
    windows: what the bound scores and samples are compared with)."""
    return heldout_windows((data or run_data(run)).val_ids, run.config.seq_len, count, seed)


def heldout_sequences(run: LoadedRun, count: int, seed: int = 0, data: CorpusData | None = None) -> list[list[str]]:
    """`count` random held-out windows of the run's length (in its tokens), as their words."""
    return ids_to_words(validation_windows(run, count, seed, data), run.tokenizer)


def train_token_counts(run: LoadedRun, data: CorpusData | None = None) -> torch.Tensor:
    """How often each vocabulary id occurs in the text the run trained on, (V,)."""
    data = data or run_data(run)
    return torch.bincount(data.train_ids, minlength=len(run.tokenizer))


def pick_checkpoints(paths: Sequence[Path], max_count: int) -> list[Path]:
    """At most `max_count` of `paths`, evenly spaced; the first and last are always kept."""
    paths = list(paths)
    if max_count <= 0 or len(paths) <= max_count:
        return paths
    if max_count == 1:
        return [paths[-1]]
    picks = sorted({round(i * (len(paths) - 1) / (max_count - 1)) for i in range(max_count)})
    return [paths[i] for i in picks]


def run_checkpoints(run_dir: str | Path, max_count: int = 0) -> list[Path]:
    """A run's kept checkpoints (oldest first), or its last.pt when none were kept."""
    run = RunDir(run_dir)
    kept = run.kept_checkpoints()
    if not kept and run.last_checkpoint.exists():
        kept = [run.last_checkpoint]
    if not kept:
        raise FileNotFoundError(f"'{run.path}' holds no checkpoints. Train into it first (train.ipynb or dlm train).")
    return pick_checkpoints(kept, max_count)


def sample_checkpoint(run: LoadedRun, num_samples: int, steps: int | None = None, seed: int = 0,
                      **options) -> SampleBatch:
    """Samples from a loaded checkpoint with the run's own sampling recipe."""
    return generate(run, SampleOptions.from_config(run.config, num_samples=num_samples, steps=steps, seed=seed, **options))


def checkpoint_samples_table(run_dir: str | Path, num_samples: int = 3, steps: int | None = None,
                             max_checkpoints: int = 0, seed: int = 0) -> pd.DataFrame:
    """A few decoded samples from each kept checkpoint: epoch, step, sample number, text."""
    rows = []
    for path in run_checkpoints(run_dir, max_checkpoints):
        run = load_run(run_dir, path)
        batch = generate(run, SampleOptions.from_config(run.config, num_samples=num_samples, steps=steps, seed=seed))
        for index, text in enumerate(batch.texts):
            rows.append({"epoch": run.epoch, "step": run.step, "sample": index, "text": text.replace("\n", " / ")})
    return pd.DataFrame(rows, columns=["epoch", "step", "sample", "text"])
