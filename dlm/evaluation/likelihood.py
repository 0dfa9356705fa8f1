"""Diffusion-LM's variational bound on -log p(w), in nats per token, and the AR baseline's exact NLL
on the same windows.

The generative model is p(w) = integral p(x_T) prod_t p(x_{t-1} | x_t) p(x_0 | x_1) p(w | x_0) dx.
With q(x_0 | w) = N(EMB(w), sigma0^2 I) and the forward chain q(x_t | x_0) (code index t - 1 holds
x_t: index 0 is x_1, so x_1 = sqrt(a_0) x_0 + sqrt(1 - a_0) eps, a = alpha_bar), Jensen gives
(Diffusion-LM, eq. 2 and appendix):

    -log p(w) <= E_q[ KL(q(x_T | x_0) || N(0, I))                            prior
                      + sum_{t=2}^{T} KL(q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t))   diffusion
                      - log p(x_0 | x_1) + log q(x_0 | w)                     decoder
                      - log p(w | x_0) ]                                      rounding

Every p is the model's own: p(x_{t-1} | x_t) is the DDPM posterior q(x_{t-1} | x_t, x_0) with the
denoiser's x0 (`GaussianDiffusion.x0_from_output`) in place of x_0 and the posterior's fixed
variance (improved-diffusion's fixed variance, what `dlm sample` draws at eta 1), so each step's KL
is ||coef1 (x_0 - x0_hat)||^2 / (2 var). p(x_0 | x_1) follows the same rule one level down: the
training loss asks the denoiser at index 0 for EMB(w) itself, so p(x_0 | x_1) is q's posterior
q(x_0 | x_1, w) with the predicted embedding in place of EMB(w) (a Gaussian with the posterior's
variance, sigma0^2 (1 - a_0) / (a_0 sigma0^2 + 1 - a_0)). p(w | x_0) is the rounding decoder.

The bound is for the discrete words: p(w) above is a proper distribution over word sequences for
any embedding table (the table is learned, but it is part of the model, and q is only a proposal),
so its expectation over held-out windows is an upper bound on the model's cross-entropy, and so on
-log p(w) of the data. The continuous terms may be negative; their sum with the rounding term is
not (up to Monte Carlo error).

The sum over the T - 1 diffusion terms is estimated per window from `draws` timesteps, importance-
sampled (uniform in log(1 + SNR), see `BoundTerms`) or uniform, stratified along the proposal;
each window's total is one draw of an unbiased estimate, and the standard error is the spread of
those totals over the windows (so it counts both the Monte
Carlo noise and which held-out windows were drawn). Self-conditioned denoisers are scored without
their previous estimate (zeros, as at a chain's first step), which keeps p(x_{t-1} | x_t) Markov.
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
from dlm.core.runtime import autocast
from dlm.core.schedule import q_sample, sampling_timesteps
from dlm.evaluation.evaluate import teacher_nll
from dlm.evaluation.rundata import run_checkpoints, validation_windows
from dlm.families import not_available, supports
from dlm.families.gaussian_sampling import X0_HOOKS, x0_given_earlier_blocks
from dlm.runs import curves as tensorboard_curves
from dlm.runs.build import LoadedRun, load_run

logger = logging.getLogger("dlm")

TERMS = ("prior", "diffusion", "decoder", "rounding")


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


class BoundTerms:
    """The per-timestep quantities of the bound, in float64, from a run's noise schedule."""

    def __init__(self, schedule):
        a = schedule.alphas_cumprod.double()
        self.schedule = schedule
        self.steps = schedule.steps
        a_prev = torch.cat([a.new_ones(1), a[:-1]])
        betas = 1 - a / a_prev
        # DDPM posterior q(x_{t-1} | x_t, x_0) = N(coef1 x_0 + coef2 x_t, var) at code index t >= 1
        self.coef1 = betas * a_prev.sqrt() / (1 - a)
        self.coef2 = (1 - a_prev) * (1 - betas).sqrt() / (1 - a)
        self.var = betas * (1 - a_prev) / (1 - a)
        self.a = a
        self.sigma0_sq = float(1 - a[0])  # the variance of q(x_0 | w) (NoiseSchedule.sigma0 squared)
        # q(x_0 | x_1, w): x_0 ~ N(e, s0^2), x_1 | x_0 ~ N(sqrt(a_0) x_0, 1 - a_0); the posterior of x_0
        # is N(e + gain (x_1 - sqrt(a_0) e), decoder_var).
        a0, s0 = float(a[0]), self.sigma0_sq
        spread = a0 * s0 + (1 - a0)  # the variance of x_1 given e
        self.decoder_gain = math.sqrt(a0) * s0 / spread
        self.decoder_var = s0 * (1 - a0) / spread
        # Importance sampling of the diffusion terms: a step's KL is (SNR_{t-1} - SNR_t) / 2 times the
        # denoiser's squared error, and that error is at most about d var(x_0) / (1 + SNR_t var(x_0))
        # (the error of the best linear estimate), so draw t in proportion to the fall of
        # log(1 + SNR) over the step: uniform in log(1 + SNR), flat importance weights where the
        # denoiser is as good as a linear one. Under the sqrt schedule most of it is at low t.
        log_snr1 = torch.log1p(a / (1 - a))
        fall = (log_snr1[:-1] - log_snr1[1:]).clamp_min(0)  # index t - 1 holds step t's share
        importance = fall / fall.sum()
        uniform = torch.full_like(importance, 1.0 / len(importance))
        # a little uniform mass keeps every step's weight bounded
        self.proposals = {"uniform": uniform, "importance": 0.9 * importance + 0.1 * uniform}

    def draw_timesteps(self, batch: int, draws: int, proposal: str, generator: torch.Generator | None
                       ) -> tuple[torch.Tensor, torch.Tensor]:
        """`draws` timesteps in 1..T-1 per window, (draws, batch), stratified along the proposal's
        CDF (draw k falls in its k-th 1/draws of the mass), and each one's probability under it."""
        if proposal not in self.proposals:
            raise ValueError(f"Unknown timestep proposal '{proposal}': use {' or '.join(self.proposals)}.")
        probs = self.proposals[proposal]
        cdf = torch.cumsum(probs, 0)
        u = (torch.arange(draws, dtype=torch.float64)[:, None] + torch.rand(draws, batch, generator=generator,
                                                                             dtype=torch.float64)) / draws
        index = torch.searchsorted(cdf, u * cdf[-1]).clamp_max(len(probs) - 1)
        return index + 1, probs[index]

    def prior(self, x0: torch.Tensor) -> torch.Tensor:
        """KL(q(x_T | x_0) || N(0, I)) summed over positions and dimensions, (B,)."""
        a_T = self.a[-1]
        mean_sq = (a_T * x0.double() ** 2).flatten(1).sum(1)
        count = x0[0].numel()
        return 0.5 * (mean_sq + count * ((1 - a_T) - 1 - torch.log(1 - a_T)))

    def step_kl(self, x0: torch.Tensor, x_t: torch.Tensor, pred_x0: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """KL(q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t)) at code indices t >= 1 (B,), summed, (B,).
        Both are Gaussians with the posterior's variance: the KL is the means' squared distance."""
        view = (-1,) + (1,) * (x0.ndim - 1)
        c1, c2 = self.coef1.to(x0.device)[t].view(view), self.coef2.to(x0.device)[t].view(view)
        mean_q = c1 * x0.double() + c2 * x_t.double()
        mean_p = c1 * pred_x0.double() + c2 * x_t.double()
        return ((mean_q - mean_p) ** 2).flatten(1).sum(1) / (2 * self.var.to(x0.device)[t])

    def jump_kl(self, x0: torch.Tensor, x_t: torch.Tensor, pred_x0: torch.Tensor, t: int, s: int) -> torch.Tensor:
        """KL(q(x_s | x_t, x_0) || p(x_s | x_t)) for a chain that jumps from code index t to s < t
        (a shortened chain's step; s = t - 1 is step_kl's), summed, (B,). q(x_s | x_t, x_0) has
        variance (1 - a_s) / (1 - a_t) (1 - a_t / a_s), what the sampler's step draws at eta 1, and
        x_0's coefficient in its mean is sqrt(a_s) (1 - a_t / a_s) / (1 - a_t)."""
        a_t, a_s = float(self.a[t]), float(self.a[s])
        var = (1 - a_s) / (1 - a_t) * (1 - a_t / a_s)
        coef = math.sqrt(a_s) * (1 - a_t / a_s) / (1 - a_t)
        return (coef * (x0.double() - pred_x0.double())).pow(2).flatten(1).sum(1) / (2 * var)

    def decoder(self, x0: torch.Tensor, x1: torch.Tensor, emb: torch.Tensor, pred_emb: torch.Tensor) -> torch.Tensor:
        """-log p(x_0 | x_1) + log q(x_0 | w), summed, (B,)."""
        x0, x1, emb, pred_emb = x0.double(), x1.double(), emb.double(), pred_emb.double()
        a0 = float(self.a[0])
        mean = pred_emb + self.decoder_gain * (x1 - math.sqrt(a0) * pred_emb)
        log_p = _gaussian_log_density(x0, mean, self.decoder_var)
        log_q = _gaussian_log_density(x0, emb, self.sigma0_sq)
        return log_q - log_p


def _gaussian_log_density(x: torch.Tensor, mean: torch.Tensor, var: float) -> torch.Tensor:
    """log N(x; mean, var I) summed over every dimension but the first, (B,)."""
    count = x[0].numel()
    return -0.5 * (((x - mean) ** 2).flatten(1).sum(1) / var + count * math.log(2 * math.pi * var))


def _denoise_x0(model, diffusion, x_t: torch.Tensor, t: torch.Tensor, emb: torch.Tensor, precision: str,
                x0_kind: str = "predicted") -> torch.Tensor:
    """The model's x0 at (x_t, t): the denoiser's prediction, or (x0 'expected') the expected
    embedding under its rounding softmax, the x0 the sampler steps toward with sample_x0 expected:
    the bound then scores the reverse process that sampler draws from. A block run's blocks are
    each asked with the words before them clean (`emb`), so its bound is the sum over blocks of
    -log p(block | the words before it): the likelihood of the model that generates block by block."""
    with autocast(precision, x_t.device):
        pred_x0 = x0_given_earlier_blocks(model, diffusion, x_t, t, emb).float()
    if x0_kind != "predicted":
        pred_x0 = X0_HOOKS[x0_kind](model, diffusion)(pred_x0, t, x_t, 0)
    return pred_x0.float()


@torch.inference_mode()
def window_terms(model, diffusion, ids: torch.Tensor, draws: int = 1, generator: torch.Generator | None = None,
                 all_timesteps: bool = False, precision: str = "fp32", proposal: str = "importance",
                 x0_kind: str = "predicted", chain: Sequence[int] | None = None) -> dict[str, torch.Tensor]:
    """Each term of the bound for each window of ids (B, L), summed over the window, (B,) each.

    The diffusion term is the mean of KL_t / proposal(t) over `draws` timesteps in 1..T-1 per
    window (`BoundTerms.draw_timesteps`; with proposal 'uniform' that is (T - 1) times the mean KL),
    or with all_timesteps the sum over every one of them (the exact sum, for tests).
    chain: the bound of the shortened chain that visits these timesteps (sampling_timesteps: T-1
    first, 0 last), the sum of its every step's KL (`BoundTerms.jump_kl`), the model the sampler
    draws from at those steps."""
    terms = BoundTerms(diffusion.schedule)
    device = ids.device
    batch = ids.shape[0]

    def randn(shape):
        return torch.randn(shape, generator=generator).to(device)

    emb = model.embed(ids).float()
    x0 = emb + math.sqrt(terms.sigma0_sq) * randn(emb.shape)  # x_0 ~ q(x_0 | w)
    first = torch.zeros(batch, dtype=torch.long, device=device)
    x1 = q_sample(diffusion.schedule, x0, first, randn(x0.shape))
    pred_emb = _denoise_x0(model, diffusion, x1, first, emb, precision, x0_kind)
    logits = model.round(x0).float()
    rounding = torch.nn.functional.cross_entropy(logits.transpose(1, 2), ids, reduction="none").double().sum(1)
    out = {"prior": terms.prior(x0), "decoder": terms.decoder(x0, x1, emb, pred_emb), "rounding": rounding}

    if chain is not None:
        if chain[0] != terms.steps - 1 or chain[-1] != 0:
            raise ValueError(f"A chain's bound needs the chain from {terms.steps - 1} down to 0, got {chain[0]}..{chain[-1]}.")
        diffusion_sum = torch.zeros(batch, dtype=torch.float64, device=device)
        for t, s in sorted(zip(chain[:-1], chain[1:])):  # from the lowest t, as all_timesteps draws
            t_batch = torch.full((batch,), t, dtype=torch.long, device=device)
            x_t = q_sample(diffusion.schedule, x0, t_batch, randn(x0.shape))
            diffusion_sum += terms.jump_kl(x0, x_t, _denoise_x0(model, diffusion, x_t, t_batch, emb, precision, x0_kind),
                                           t, s)
        out["diffusion"] = diffusion_sum
        return {name: out[name].cpu() for name in TERMS}
    if all_timesteps:
        timesteps = torch.arange(1, terms.steps)[:, None].expand(-1, batch)
        weights = torch.ones(timesteps.shape, dtype=torch.float64)
    else:
        timesteps, probs = terms.draw_timesteps(batch, draws, proposal, generator)
        weights = 1 / (draws * probs)
    diffusion_sum = torch.zeros(batch, dtype=torch.float64, device=device)
    for t, weight in zip(timesteps.to(device), weights.to(device)):
        x_t = q_sample(diffusion.schedule, x0, t, randn(x0.shape))
        diffusion_sum += weight * terms.step_kl(x0, x_t, _denoise_x0(model, diffusion, x_t, t, emb, precision, x0_kind), t)
    out["diffusion"] = diffusion_sum
    return {name: out[name].cpu() for name in TERMS}


@torch.inference_mode()
def x0_errors(model, diffusion, ids: torch.Tensor, timesteps: Sequence[int], generator: torch.Generator | None = None,
              precision: str = "fp32", x0_kind: str = "predicted") -> pd.DataFrame:
    """Where the bound is made, one row per timestep t: the denoiser's squared x0 error per token
    (summed over dimensions, each block given the words before it as `window_terms` asks) beside
    the identity's (x_t / sqrt(alpha_bar_t), x_t itself rescaled), and the bound's weight on it: a
    step's KL is weight x error, so weight x (error - identity_error) is what the denoiser costs
    the bound per token beyond returning its input. At t = 0 the error is against EMB(w) and the
    weight the decoder term's (p(x_0 | x_1)); above, against x_0 and the step's KL weight. x0_kind:
    the denoiser's x0 or the expected embedding under its rounding softmax (`_denoise_x0`)."""
    terms = BoundTerms(diffusion.schedule)
    device = ids.device
    emb = model.embed(ids).float()
    x0 = emb + math.sqrt(terms.sigma0_sq) * torch.randn(emb.shape, generator=generator).to(device)
    rows = []
    for t in timesteps:
        t_batch = torch.full((ids.shape[0],), t, dtype=torch.long, device=device)
        x_t = q_sample(diffusion.schedule, x0, t_batch, torch.randn(x0.shape, generator=generator).to(device))
        pred = _denoise_x0(model, diffusion, x_t, t_batch, emb, precision, x0_kind).double()
        target = emb if t == 0 else x0
        if t == 0:
            weight = (1 - terms.decoder_gain * math.sqrt(float(terms.a[0]))) ** 2 / (2 * terms.decoder_var)
        else:
            weight = float(terms.coef1[t] ** 2 / (2 * terms.var[t]))
        identity = x_t.double() / math.sqrt(float(terms.a[t]))
        error = float(((pred - target.double()) ** 2).sum(-1).mean())
        identity_error = float(((identity - target.double()) ** 2).sum(-1).mean())
        rows.append({"t": t, "weight": weight, "error": error, "identity_error": identity_error,
                     "excess_nats": weight * (error - identity_error)})
    return pd.DataFrame(rows)


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
    return (f"--steps scores a shortened Gaussian chain; the '{run.config.model}' family's bound has no such chain: "
            f"drop --steps.")


def bound_chain(run: LoadedRun, steps: int | None, spacing: str | None = None) -> list[int] | None:
    """The timesteps of the chain whose bound `dlm evaluate --nll --steps N` asks for (None: the
    bound over all T timesteps), checked before any window is scored: a family with a bound, a
    Gaussian chain (the other families' bounds have none), N within the run's diffusion_steps."""
    check_has_bound(run)
    if steps is None:
        if spacing is not None:
            raise UserError("--spacing places the steps of a shortened chain: give --steps N too (without it the "
                            "bound is over all of the run's timesteps).")
        return None
    if hasattr(run.family, "window_bound"):
        raise UserError(no_chain_bound(run))
    total = run.objective.steps
    if not 1 <= steps <= total:
        raise UserError(f"--steps must be between 1 and the run's diffusion_steps ({total}), got {steps}.")
    return sampling_timesteps(run.objective.schedule, steps, spacing or run.config.sample_spacing)


def nll_bound(run: LoadedRun, windows: int | torch.Tensor = 256, draws: int = 4, seed: int = 0,
              batch_size: int = 64, proposal: str = "importance", x0: str | None = None,
              chain: Sequence[int] | None = None) -> Bound:
    """The bound on the run's validation split, nats per token: `windows` held-out windows (or the
    given ids), x0 'predicted' or 'expected' (see `_denoise_x0`; None: the run's sample_x0), `draws` uniform timesteps each;
    chain: of the shortened chain through those timesteps instead, every step of it (`window_terms`)."""
    check_has_bound(run)
    ids = validation_windows(run, windows, seed) if isinstance(windows, int) else windows
    check_counts(len(ids), draws)
    if chain is not None and hasattr(run.family, "window_bound"):
        raise UserError(no_chain_bound(run))  # before any window is scored
    device = next(run.model.parameters()).device
    generator = torch.Generator().manual_seed(seed)
    parts: dict[str, list[torch.Tensor]] = {}
    for start in tqdm(range(0, len(ids), batch_size), desc="NLL bound", unit="batch", disable=None):
        batch = ids[start: start + batch_size].to(device)
        if hasattr(run.family, "window_bound"):  # the family's own bound (the masked NELBO)
            terms = run.family.window_bound(run, batch, draws, generator)
        else:  # the Gaussian bound of this module
            terms = window_terms(run.model, run.objective, batch, draws, generator, precision=run.config.precision,
                                 proposal=proposal, x0_kind=x0 or run.config.sample_x0, chain=chain)
        for name, value in terms.items():
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
