"""Probes of a trained denoiser on held-out text, to see where samples go wrong: each family's own
tables (its `probe`, with "probe" in its SUPPORTS: the Gaussian family's one-step accuracy and
chain retention by noise level, the masked family's cross-entropy by mask rate beside the unigram)
on held-out windows spread over the split."""

from __future__ import annotations

from collections.abc import Sequence

import pandas as pd
import torch

from dlm.core.data import fixed_windows
from dlm.core.errors import UserError
from dlm.evaluation.rundata import run_data, train_token_counts
from dlm.families import not_available, supports
from dlm.runs.build import LoadedRun


def heldout_ids(run: LoadedRun, count: int) -> torch.Tensor:
    """`count` validation windows spread over the whole split, (count, seq_len): the probes' inputs,
    for a family that has a probe."""
    if not supports(run.config.model, "probe"):
        raise UserError(not_available(run.config.model, "A probe of the denoiser", "probe"))
    return spread_heldout_windows(run, count)


def spread_heldout_windows(run: LoadedRun, count: int) -> torch.Tensor:
    """`count` validation windows spread evenly over the whole split, (count, seq_len)."""
    windows = fixed_windows(run_data(run).val_ids, run.config.seq_len)
    if len(windows) < count:
        raise UserError(f"The validation split has {len(windows)} windows; asked for {count}.")
    return windows[torch.linspace(0, len(windows) - 1, count).long()]


def unigram_log_probs(run: LoadedRun) -> torch.Tensor:
    """The training split's unigram, (V,) log-probabilities (add-one: a held-out word unseen in training)."""
    counts = train_token_counts(run).double() + 1
    return (counts / counts.sum()).log()


def probe_tables(run: LoadedRun, windows: int, start_ts: Sequence[float] = ()) -> list[tuple[str, pd.DataFrame]]:
    """The run's family's probe on `windows` held-out windows: (title, table) pairs; start_ts: noise
    levels in (0, 1] to start its chain from, where it has such a probe."""
    ids = heldout_ids(run, windows)
    run.model.eval()
    return run.family.probe(run, ids, unigram_log_probs(run), start_ts)
