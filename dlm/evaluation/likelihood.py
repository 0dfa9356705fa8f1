"""A run's likelihood in nats per token, whatever its family: the family's own bound (its
window_bound: the Gaussian family's Diffusion-LM bound, the masked and uniform families' NELBO) on
held-out windows with a standard error, and the AR baseline's exact NLL on the same windows.

Each window's total is one draw of an unbiased estimate of its bound, and the standard error is the
spread of those totals over the windows (so it counts both the Monte Carlo noise and which held-out
windows were drawn). A family whose likelihood is exact (the AR baseline) has no bound: its NLL is
its validation loss, and here it is the number the bound is compared with.
"""
from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import torch
from tqdm import tqdm  # a text bar on a terminal; off where stderr is not one (notebooks, logs)

from dlm.core.config import machine_memory_bytes
from dlm.core.errors import UserError
from dlm.evaluation.evaluate import teacher_nll
from dlm.evaluation.rundata import run_checkpoints, validation_windows
from dlm.families import not_available, supports
from dlm.families.contract import BoundChain, SampleOptions
from dlm.runs import curves as tensorboard_curves
from dlm.runs.build import LoadedRun, load_run

logger = logging.getLogger("dlm")


@dataclass
class Bound:
    """The bound in nats per token: total with its standard error, and each term's mean."""
    total: float
    se: float
    terms: dict[str, float]
    windows: int
    draws: int
    tokens: int  # tokens per window
    per_window: torch.Tensor = field(repr=False)  # (windows,) each window's total, nats per token

    def as_row(self) -> dict:
        return {"nll_bound": self.total, "nll_bound_se": self.se, **{f"bound_{k}": v for k, v in self.terms.items()}}


def check_counts(windows: int, draws: int) -> None:
    if windows < 2:
        raise UserError(f"--windows must be at least 2 (the standard error needs two windows), got {windows}.")
    if draws < 1:
        raise UserError(f"--draws must be a positive number of timesteps per window, got {draws}.")


def check_windows_fit(windows: int, seq_len: int) -> None:
    """Refuse up front a --windows whose held-out ids (and their copies for the AR run) cannot fit."""
    per_window = 300 + 50 * seq_len  # the ids, their views and the AR run's lists of Python ints
    have = machine_memory_bytes()
    if have is not None and windows * per_window > have / 2:
        raise UserError(f"--windows {windows}: the held-out windows need about {windows * per_window / 2**30:.0f} "
                        f"GiB; this machine has {have / 2**30:.0f} GiB: use at most {int(have / 2 / per_window)}.")


def check_has_bound(run: LoadedRun) -> None:
    """A run whose family has a likelihood bound; else one line (an exact family: where its NLL goes)."""
    if not supports(run.config.model, "likelihood_bound"):
        exact = " Its NLL is exact: give it as --ar_run." if supports(run.config.model, "likelihood_exact") else ""
        raise UserError(not_available(run.config.model, "A likelihood bound") + exact)


def no_chain_bound(run: LoadedRun) -> str:
    return (f"--steps scores the bound of a shortened chain; the '{run.config.model}' family's bound has no such "
            f"chain: drop --steps.")


def bound_chain(run: LoadedRun, steps: int | None, spacing: str | None = None) -> BoundChain | None:
    """The shortened chain whose bound `dlm evaluate --nll --steps N` asks for (None: the family's
    whole bound), checked before any window is scored: a family with a bound that has such a chain
    (its BOUND_OPTIONS), N a step count its sampler can take (its check_steps)."""
    check_has_bound(run)
    if steps is None:
        if spacing is not None:
            raise UserError("--spacing places the steps of a shortened chain: give --steps N too (without it the "
                            "bound is over all of the run's timesteps).")
        return None
    if "steps" not in run.family.BOUND_OPTIONS:
        raise UserError(no_chain_bound(run))
    options = SampleOptions.from_config(run.config, steps=steps, spacing=spacing)
    try:
        options.validate()
        run.family.check_steps(options, run.config)
    except UserError as error:  # the options are flags here: "--steps must be ..."
        raise UserError(f"--{error}") from None
    return BoundChain(options.steps, options.spacing)


def nll_bound(run: LoadedRun, windows: int | torch.Tensor = 256, draws: int = 4, seed: int = 0,
              batch_size: int = 64, x0: str | None = None, chain: BoundChain | None = None) -> Bound:
    """The bound on the run's validation split, nats per token: `windows` held-out windows (or the
    given ids), `draws` draws each of the family's window_bound; x0 (None: the run's own) and chain
    (`bound_chain`) for a family whose bound reads them (its BOUND_OPTIONS)."""
    check_has_bound(run)
    ids = validation_windows(run, windows, seed) if isinstance(windows, int) else windows
    check_counts(len(ids), draws)
    if chain is not None and "steps" not in run.family.BOUND_OPTIONS:
        raise UserError(no_chain_bound(run))  # before any window is scored
    device = next(run.model.parameters()).device
    generator = torch.Generator().manual_seed(seed)
    parts: dict[str, list[torch.Tensor]] = {}
    for start in tqdm(range(0, len(ids), batch_size), desc="NLL bound", unit="batch", disable=None):
        batch = ids[start: start + batch_size].to(device)
        for name, value in run.family.window_bound(run, batch, draws, generator, x0=x0, chain=chain).items():
            parts.setdefault(name, []).append(value)
    return summarise({name: torch.cat(values) for name, values in parts.items()}, ids.shape[1], draws)


def summarise(parts: dict[str, torch.Tensor], tokens: int, draws: int) -> Bound:
    """Per-window terms (summed over the window) -> the bound per token with its standard error."""
    per_window = sum(parts.values()) / tokens
    count = len(per_window)
    se = float(per_window.std(unbiased=True)) / math.sqrt(count)
    terms = {name: float(value.mean()) / tokens for name, value in parts.items()}
    return Bound(float(per_window.mean()), se, terms, count, draws, tokens, per_window)


def check_ar_run(run: LoadedRun, ar: LoadedRun, flag: str = "--ar_run") -> None:
    """The AR run whose exact NLL the bound is compared with (given as `flag`): AR, same vocabulary."""
    if not supports(ar.config.model, "likelihood_exact"):
        raise UserError(f"{flag} '{ar.checkpoint.parent.parent}' is not an autoregressive run: "
                         f"train one with dlm train-ar params/ar.yaml.")
    if ar.tokenizer.fingerprint() != run.tokenizer.fingerprint():
        raise UserError(f"{flag} was trained with another vocabulary than the run '{run.checkpoint.parent.parent}', "
                        f"so their nats per token do not compare: train the AR run on the same corpus and tokenizer "
                        f"settings.")


def ar_nll(ar: LoadedRun, ids: torch.Tensor) -> float:
    """The AR run's exact NLL in nats per token on the windows ids (N, L): every token but each
    window's first, which has no context (`teacher_nll`)."""
    return teacher_nll(ar, ids.tolist())


@dataclass
class Comparison:
    bound: Bound
    ar_nll: float | None

    @property
    def ratio(self) -> float | None:
        return None if self.ar_nll is None else self.bound.total / self.ar_nll


def compare_with_ar(run: LoadedRun, ar: LoadedRun | None, windows: int = 256, draws: int = 4,
                    seed: int = 0, x0: str | None = None, chain: Sequence[int] | None = None) -> Comparison:
    """The bound (of the shortened `chain`, when given) and, when an AR run is given, its exact
    NLL on the same windows."""
    check_counts(windows, draws)
    check_windows_fit(windows, run.config.seq_len)
    if ar is not None:
        check_ar_run(run, ar)
    ids = validation_windows(run, windows, seed)
    bound = nll_bound(run, ids, draws, seed, x0=x0, chain=chain)
    return Comparison(bound, None if ar is None else ar_nll(ar, ids))


def bound_over_checkpoints(run_dir: str | Path, windows: int = 32, draws: int = 2, max_checkpoints: int = 0,
                           seed: int = 0, checkpoints: Sequence[str | Path] | None = None) -> pd.DataFrame:
    """The bound at each kept checkpoint (EMA weights when kept) on the same windows and draws:
    epoch, step, nll_bound, nll_bound_se and each term, one row per checkpoint."""
    paths = list(checkpoints) if checkpoints is not None else run_checkpoints(run_dir, max_checkpoints)
    rows, ids = [], None
    for path in paths:
        run = load_run(run_dir, path)
        ids = validation_windows(run, windows, seed) if ids is None else ids
        bound = nll_bound(run, ids, draws, seed)
        logger.info("NLL bound at epoch %d (step %d): %.3f +- %.3f nats/token", run.epoch, run.step, bound.total, bound.se)
        rows.append({"epoch": run.epoch, "step": run.step, **bound.as_row()})
    if rows and run.config.tensorboard and tensorboard_curves.available():  # beside the run's training curves
        curves = tensorboard_curves.Curves(run_dir)
        curves.log_nll_bounds(rows)
        curves.close()
    return pd.DataFrame(rows)
