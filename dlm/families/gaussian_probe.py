"""The Gaussian family's probes of its denoiser on held-out windows (its `probe`, with "probe" in its
SUPPORTS; benchmarks/probe.py), to see where samples go wrong.

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

from dlm.core.embeddings import nearest_rows
from dlm.core.schedule import q_sample
from dlm.families.contract import LoadedRun, SampleOptions
from dlm.families.gaussian_sampling import sample_chain, x0_given_earlier_blocks

PROBE_TIMESTEPS = (0, 50, 200, 400, 700, 1000, 1400, 1800, 1999)  # for T = 2000; scaled otherwise
# The chains compared from held-out x_t: the step noise (ancestral, DDIM), the x0 the step moves
# toward (the denoiser's, or its rounding softmax's expected embedding) and clamping at every step.
SAMPLERS = ({"eta": 1.0, "x0": "predicted"}, {"eta": 0.0, "x0": "predicted"}, {"eta": 1.0, "x0": "expected"},
            {"eta": 0.0, "x0": "expected"}, {"eta": 1.0, "x0": "predicted", "clamp": True})


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
    states = sample_chain(model, run.objective, options, tuple(ids.shape), generator=generator, start=x_t,
                          start_t=start_t)
    last = collections.deque(states, maxlen=1)[0]
    # a block chain's words as each block was decoded (the argmax of its x: the same at temperature 0)
    final_ids = last.words if last.words is not None else model.round(last.x).argmax(-1)
    return {"start_t": start_t, "chain_steps": last.index + 1, "clamp": clamp, "eta": options.eta, "x0": options.x0,
            "first_step_accuracy": (first_logits.argmax(-1) == ids).float().mean().item(),
            "first_step_calibrated": calibrated_share(first_logits, ids),
            "kept": (final_ids == ids).float().mean().item(), "final_ids": final_ids}


def probe(run: LoadedRun, ids: torch.Tensor, unigram: torch.Tensor,
          start_ts: Sequence[float] = ()) -> list[tuple[str, pd.DataFrame]]:
    """The family's probe (dlm.families.contract): the one-step table and, for each noise level of
    start_ts (a fraction of the chain, 1 pure noise) and each of SAMPLERS, the chain's from there
    (a left-to-right run has no shared timestep to start a chain from: its one-step table only)."""
    tables = [(f"One denoiser step from x_t, {len(ids)} held-out windows", denoising_accuracy(run, ids))]
    if start_ts and run.config.left_to_right == 0:
        last = run.objective.steps - 1
        rows = [{k: v for k, v in chain_retention(run, ids, round(level * last), **sampler).items() if k != "final_ids"}
                for level in start_ts for sampler in SAMPLERS]
        tables.append((f"The reverse chain ({run.config.sample_steps} steps, {run.config.sample_spacing}) from "
                       f"held-out x_t", pd.DataFrame(rows)))
    return tables
