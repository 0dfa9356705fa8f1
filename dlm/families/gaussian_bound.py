"""The Gaussian family's likelihood: Diffusion-LM's variational bound on -log p(w) (its window_bound;
dlm.evaluation.likelihood turns any family's into nats per token with a standard error).

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

import math
from collections.abc import Sequence

import pandas as pd
import torch

from dlm.core.runtime import autocast
from dlm.core.schedule import q_sample, sampling_timesteps
from dlm.families.contract import BoundChain, LoadedRun
from dlm.families.gaussian_sampling import X0_HOOKS, x0_given_earlier_blocks

BOUND_TERMS = ("prior", "diffusion", "decoder", "rounding")
# what `dlm evaluate --nll` may set: the x0 the chain steps toward, and a shortened chain (--steps, --spacing)
BOUND_OPTIONS = frozenset({"x0", "steps", "spacing"})


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
def window_terms(model, diffusion, ids: torch.Tensor, draws: int = 1, generator: torch.Generator | None = None, *,
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
        return {name: out[name].cpu() for name in BOUND_TERMS}
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
    return {name: out[name].cpu() for name in BOUND_TERMS}


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


def window_bound(run: LoadedRun, ids: torch.Tensor, draws: int, generator: torch.Generator | None = None,
                 x0: str | None = None, chain: BoundChain | None = None) -> dict[str, torch.Tensor]:
    """The family's window_bound (dlm.families.contract): `window_terms` of the run, toward the x0
    `x0` (None: the run's sample_x0), of the shortened `chain` when given."""
    timesteps = None if chain is None else sampling_timesteps(run.objective.schedule, chain.steps, chain.spacing)
    return window_terms(run.model, run.objective, ids, draws, generator, precision=run.config.precision,
                        x0_kind=x0 or run.config.sample_x0, chain=timesteps)
