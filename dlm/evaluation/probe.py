"""Probes of a trained denoiser on held-out text, to see where samples go wrong.

`denoising_accuracy`: noise held-out windows to timestep t and ask the denoiser for x0 once: how
often its rounding picks the right word, against picking the row nearest to the noisy vector
itself (no context). The gap is what the model reads from context; the t where the two meet is
where words stop being chosen. `chain_retention`: noise held-out windows to t and run the reverse
chain from there: how many words survive. A sampler that loses words the denoiser knew adds
errors of its own.
"""

from __future__ import annotations

import collections
import math
from collections.abc import Sequence

import pandas as pd
import torch
import torch.nn.functional as F

from dlm.core.data import fixed_windows
from dlm.core.embeddings import nearest_rows
from dlm.core.errors import UserError
from dlm.core.schedule import q_sample
from dlm.evaluation.rundata import run_data, train_token_counts
from dlm.families import not_available, supports
from dlm.families.gaussian_sampling import sample_chain, x0_given_earlier_blocks
from dlm.runs.build import LoadedRun
from dlm.runs.sample import SampleOptions

PROBE_TIMESTEPS = (0, 50, 200, 400, 700, 1000, 1400, 1800, 1999)  # for T = 2000; scaled otherwise


def heldout_ids(run: LoadedRun, count: int) -> torch.Tensor:
    """`count` validation windows spread over the whole split, (count, seq_len): the denoising
    probes' inputs (their x_t, chains and rounding are the Gaussian family's)."""
    if not supports(run.config.model, "geometry"):
        raise UserError(not_available(run.config.model, "The denoising probe", "geometry"))
    return spread_heldout_windows(run, count)


def spread_heldout_windows(run: LoadedRun, count: int) -> torch.Tensor:
    """`count` validation windows spread evenly over the whole split, (count, seq_len)."""
    windows = fixed_windows(run_data(run).val_ids, run.config.seq_len)
    if len(windows) < count:
        raise UserError(f"The validation split has {len(windows)} windows; asked for {count}.")
    return windows[torch.linspace(0, len(windows) - 1, count).long()]


def probe_timesteps(total_steps: int) -> list[int]:
    return sorted({min(total_steps - 1, round(t * total_steps / 2000)) for t in PROBE_TIMESTEPS})


def noised(run: LoadedRun, ids: torch.Tensor, t: int, generator: torch.Generator) -> torch.Tensor:
    """x_t ~ q(x_t | EMB(w)) for every window, all positions at timestep t."""
    emb = run.model.embed(ids)
    noise = torch.randn(emb.shape, generator=generator)
    return q_sample(run.objective.schedule, emb, torch.full((ids.shape[0],), t), noise)


def one_step_x0(run: LoadedRun, ids: torch.Tensor, x_t: torch.Tensor, t: int) -> torch.Tensor:
    """The denoiser's x0 (B, L, d) from x_t in one step, asked as its sampler asks
    (`x0_given_earlier_blocks`: a block run's blocks each with the true words before it). Asking a
    block model for the whole noised window at once reads a context it never saw."""
    return x0_given_earlier_blocks(run.model, run.objective, x_t, torch.full((ids.shape[0],), t),
                                   run.model.embed(ids))


@torch.inference_mode()
def denoising_accuracy(run: LoadedRun, ids: torch.Tensor, timesteps: Sequence[int] | None = None,
                       seed: int = 0) -> pd.DataFrame:
    """One row per timestep: log-SNR, the denoiser's cross-entropy and accuracy on the words of
    `ids` from x_t in one step, its calibrated share (the mean rounding probability of the right
    word: what drawing each word once from the rounding softmax gets right), and the accuracy of
    the row nearest to x_t / sqrt(alpha_bar)."""
    model, diffusion = run.model, run.objective
    schedule = diffusion.schedule
    generator = torch.Generator().manual_seed(seed)
    table = model.table()
    rows = []
    for t in timesteps or probe_timesteps(schedule.steps):
        x_t = noised(run, ids, t, generator)
        logits = model.round(one_step_x0(run, ids, x_t, t)).float()
        alpha_bar = float(schedule.alphas_cumprod[t])
        own = nearest_rows(x_t / math.sqrt(alpha_bar), table)
        rows.append({"t": t, "log_snr": math.log(alpha_bar / (1 - alpha_bar)),
                     "cross_entropy": F.cross_entropy(logits.flatten(0, 1), ids.flatten()).item(),
                     "accuracy": (logits.argmax(-1) == ids).float().mean().item(),
                     "calibrated": calibrated_share(logits, ids),
                     "own_vector_accuracy": (own == ids).float().mean().item()})
    return pd.DataFrame(rows)


def calibrated_share(logits: torch.Tensor, ids: torch.Tensor) -> float:
    """The mean rounding probability of the right word: the share a sampler that draws each word
    once from the one-step rounding softmax keeps (a calibrated sampler's share)."""
    return torch.softmax(logits.float(), -1).gather(-1, ids[..., None]).mean().item()


@torch.inference_mode()
def chain_retention(run: LoadedRun, ids: torch.Tensor, start_t: int, steps: int | None = None,
                    clamp: bool = False, seed: int = 0, **sampling) -> dict:
    """Noise `ids` to start_t, run the run's reverse chain (its `steps`, spacing, eta and x0, or
    `sampling` overrides of SampleOptions such as eta=0 or x0="expected") from there, and report
    the share of words the denoiser got right in its first step (argmax, and calibrated: see
    `calibrated_share`) and the share the chain's final argmax keeps."""
    config, model = run.config, run.model
    generator = torch.Generator().manual_seed(seed)
    x_t = noised(run, ids, start_t, generator)
    # clamp here means at every step (clamp_fraction 1), whatever the run's recipe says
    options = SampleOptions.from_config(config, steps=steps, clamp=clamp, clamp_fraction=1.0, **sampling)
    # the denoiser's own one-step prediction (the chain's first step, before any hook edits it;
    # for a block run every block's, each given the true words before it)
    first_logits = model.round(one_step_x0(run, ids, x_t, start_t)).float()
    states = sample_chain(model, run.objective, options, tuple(ids.shape), generator, start=x_t, start_t=start_t)
    last = collections.deque(states, maxlen=1)[0]
    # a block chain's words as each block was decoded (the argmax of its x: the same at temperature 0)
    final_ids = last.words if last.words is not None else model.round(last.x).argmax(-1)
    return {"start_t": start_t, "chain_steps": last.index + 1, "clamp": clamp, "eta": options.eta, "x0": options.x0,
            "first_step_accuracy": (first_logits.argmax(-1) == ids).float().mean().item(),
            "first_step_calibrated": calibrated_share(first_logits, ids),
            "kept": (final_ids == ids).float().mean().item(), "final_ids": final_ids}


MASK_RATES = (0.02, 0.1, 0.3, 0.5, 0.7, 0.9, 1.0)


@torch.no_grad()
def masked_context_use(model, ids: torch.Tensor, unigram: torch.Tensor, rates: Sequence[float] = MASK_RATES,
                       seed: int = 0) -> pd.DataFrame:
    """Does a masked-diffusion model read its context? For each mask rate, the cross-entropy
    (nats) at the masked positions of held-out windows ids (B, L), beside the unigram model's on
    the same positions (`unigram`: log-probabilities (V,), e.g. the training counts'). A model
    that reads its context does far better than the unigram when few positions are masked; a bag
    of words does no better with 2% masked than with all of it (docs/journal.md, "Where things
    stand"). model(z) -> logits (B, L, V) for ids z with model.mask_id where masked."""
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for rate in rates:
        masked = torch.rand(ids.shape, generator=generator) < rate
        if not masked.any():
            continue
        logits = model(torch.where(masked, model.mask_id, ids)).float()
        rows.append({"mask_rate": rate, "positions": int(masked.sum()),
                     "cross_entropy": float(F.cross_entropy(logits[masked], ids[masked])),
                     "unigram": float(-unigram[ids[masked]].mean())})
    return pd.DataFrame(rows)


def run_context_use(run: LoadedRun, windows: int) -> pd.DataFrame:
    """`masked_context_use` for a masked run on `windows` held-out windows spread over the split,
    beside its training unigram (add-one: a held-out word unseen in training)."""
    counts = train_token_counts(run).double() + 1
    run.model.eval()
    return masked_context_use(run.model, spread_heldout_windows(run, windows), (counts / counts.sum()).log())
