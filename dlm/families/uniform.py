"""The uniform-state discrete diffusion family: UDLM (Schiff et al. 2024, arXiv 2412.10193).

Forward process: each token is kept with probability alpha_t and otherwise replaced by a word drawn
uniformly from the V words of the vocabulary (which may be the token itself), independently:
q(z_t | x) = alpha_t x + (1 - alpha_t) / V, so a token is still itself with probability
alpha_t + (1 - alpha_t) / V. alpha_t = 1 - t (the log-linear schedule), t in [0, 1]: z_1 is uniform
noise, the prior itself. There is no [MASK]: nothing says which tokens are noise, so the network
(the same TinyTransformer, bidirectional) is told t, and the chain can change any token, also one
it wrote earlier (masked diffusion never revises an unmasked token).

The network gives x_theta(z_t, t), a distribution over the words at each position. A reverse step
from t to s draws from q(z_s | z_t, x) with x_theta in place of the one-hot x (`reverse_probs`);
with x_theta(z_t)^l = p(x^l | z_t at the other positions) it is the exact reverse chain.

The loss is UDLM's continuous-time NELBO (nats per token; `nelbo_integrand`), derived from the
reverse chain's rates: at a position whose token is i, with x_bar = V alpha_t x + 1 - alpha_t (x one-hot)
and x_bar_theta = V alpha_t x_theta + 1 - alpha_t,

    -alpha'_t / (V alpha_t) * sum_{j != i} r_j h(log(s_j / r_j)),
    r_j = x_bar_j / x_bar_i,  s_j = x_bar_theta_j / x_bar_theta_i,  h(u) = e^u - 1 - u >= 0,

integrated over t in (0, 1]: UDLM's expression (V / x_bar_i - V / x_bar_theta_i - sum_j r_j log(...)),
each term of the sum non-negative (all of them 0 only where x_theta is the one-hot x). No
prior term (alpha_1 = 0: q(z_1 | x) is the prior) and no reconstruction term (alpha_0 = 1: z_0 = x).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from dlm.core.config import Config
from dlm.core.embeddings import LearnedEmbedding
from dlm.core.errors import UserError
from dlm.core.nets import TinyTransformer
from dlm.core.noise import WindowKeys
from dlm.core.runtime import autocast
from dlm.families import Terms
from dlm.families.contract import Chain, Frames, LoadedRun, SampleOptions
from dlm.families.masked import WHY_NOT as MASKED_WHY_NOT
from dlm.families.masked import MaskedDiffusion, inverse_cdf

TIME_SCALE = 1000  # the network reads t as 1000 t: the range of the Gaussian chain's integer timesteps
TRAIN_TIMES = (1e-3, 1.0)  # UDLM's training range of t (its sampling_eps); the bound uses all of (0, 1)
EDGE = 1e-6  # t stays this far inside (0, 1), where log t and 1 / alpha_t are finite


class UniformDiffusionLM(nn.Module):
    """Token embedding (the vocabulary) -> bidirectional TinyTransformer conditioned on t -> a head
    over the vocabulary tied to the embedding: logits (B, L, V) of x_theta(z_t, t)."""

    def __init__(self, config: Config, vocab_size: int, pretrained_embeddings: torch.Tensor | None = None):
        super().__init__()
        self.vocab_size = vocab_size
        self.embedding = LearnedEmbedding(vocab_size, config.embed_dim, pretrained_embeddings,
                                          init_std=config.embedding_init_std)
        self.transformer = TinyTransformer(config.embed_dim, config.width, config.depth, config.heads, config.seq_len,
                                           config.dropout, causal=False, time_conditioned=True,
                                           positions=config.positions)
        self.bias = nn.Parameter(torch.zeros(vocab_size))

    def table(self) -> torch.Tensor:
        """The embedding table, (V, d) (the training log follows its geometry)."""
        return self.embedding.table()

    def forward(self, z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Word logits (B, L, V) in float32 for ids z (B, L) at times t (B,) in [0, 1]."""
        hidden = self.transformer(self.embedding(z), t * TIME_SCALE)
        return F.linear(hidden, self.table(), self.bias).float()


def corrupt(ids: torch.Tensor, t: torch.Tensor, coins: torch.Tensor, draws: torch.Tensor) -> torch.Tensor:
    """z_t ~ q(z_t | ids): a token replaced by its uniform draw `draws` where its coin (U(0, 1)) falls
    below t = 1 - alpha_t (t broadcast against ids)."""
    return torch.where(coins < t, draws, ids)


def noise_draws(shape: tuple[int, int], vocab_size: int, generator: torch.Generator | None = None,
                keys: WindowKeys | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The coins (B, L) and uniform words (B, L) of `corrupt`, from each window's own generator
    (keys: a window's draws do not depend on how the batch is split) or from one generator."""
    batch, length = shape
    if keys is not None:
        coins, words = zip(*[(torch.rand(length, generator=g), torch.randint(vocab_size, (length,), generator=g))
                             for g in keys.generators()])
        return torch.stack(coins), torch.stack(words)
    return torch.rand(shape, generator=generator), torch.randint(vocab_size, shape, generator=generator)


def nelbo_integrand(log_x_theta: torch.Tensor, z: torch.Tensor, ids: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The continuous-time NELBO's integrand at t for each position (B, L) (module docstring): its
    integral over t in (0, 1], in expectation over z_t ~ q(z_t | ids), bounds -log p(ids).
    log_x_theta (B, L, V): the denoiser's log-probabilities at z_t (B, L); t (B, 1) or (B, L), in
    (0, 1). Computed in log_x_theta's dtype.

    x_bar is V alpha + t at the clean word c and t at every other word, so the sum splits: the words
    j other than c and z_t's own i share r_j = t / x_bar_i, and their sum of r_j h(log(s_j / r_j))
    needs one pass over the vocabulary, sum_j log x_bar_theta_j (with sum_j x_bar_theta_j = V); c
    (where i is another word) is a term apart. One pass, not one per term: the loss costs about a
    cross-entropy. float32 then loses about 1e-7 / alpha_t nats at a position (terms of size V
    cancel), which matters only where alpha_t is small, a sliver of the integral."""
    vocab = log_x_theta.shape[-1]
    t = t.to(log_x_theta.dtype)
    alpha, log_t = 1 - t, torch.log(t)
    bar_theta = torch.addcmul(t[..., None], log_x_theta.exp(), (vocab * alpha)[..., None])  # (B, L, V)
    log_bar_theta = bar_theta.log()
    noised = z != ids
    extra = noised.to(t.dtype)  # 1 where i is not c: one more word leaves the shared part
    log_bar_clean = torch.log(vocab * alpha + t)
    log_bar_i = torch.where(noised, log_t, log_bar_clean)
    bar_i, bar_c = (bar_theta.gather(-1, w[..., None])[..., 0] for w in (z, ids))
    theta_i, theta_c = (log_bar_theta.gather(-1, w[..., None])[..., 0] for w in (z, ids))
    # sum over the shared words of r (e^u - 1 - u), u = theta_j + shift: r e^u = x_bar_theta_j / x_bar_theta_i
    shift = log_bar_i - theta_i - log_t
    shared = ((vocab - bar_c - extra * bar_i) / bar_i - torch.exp(log_t - log_bar_i)
              * ((vocab - 1 - extra) * (1 + shift) + log_bar_theta.sum(-1) - theta_c - extra * theta_i))
    log_u_clean = theta_c - theta_i - log_bar_clean + log_t
    clean = torch.where(noised, torch.exp(log_bar_clean - log_t) * (torch.expm1(log_u_clean) - log_u_clean), 0.0)
    return (shared + clean) / (vocab * alpha)  # -alpha'_t / (V alpha_t), alpha'_t = -1


class UniformDiffusion:
    """UDLM's continuous-time NELBO, shaped like the other objectives."""

    terms = ("total", "nelbo", "x0_ce")  # x0_ce: the denoiser's plain CE against the clean words, all positions
    timestep_sampler = None  # its times are drawn as they are, nothing measured

    def __init__(self):
        self.times = MaskedDiffusion(None, TRAIN_TIMES)  # its low-discrepancy draws of t over a batch

    def training_losses(self, model: UniformDiffusionLM, ids: torch.Tensor, generator: torch.Generator | None = None,
                        uniform_t: bool = False, keys: WindowKeys | None = None) -> dict[str, torch.Tensor]:
        """total = nelbo: the integrand at one t per window (low-discrepancy over the batch, in
        TRAIN_TIMES: training and validation alike), averaged over all B x L positions."""
        batch, length = ids.shape
        device = ids.device
        # (B, 1); a draw just below 1 would round to 1 in float32, where 1 / alpha_t is infinite
        t = self.times.draw_rates(batch, 1, keys, generator, TRAIN_TIMES).clamp(max=1 - EDGE).to(device)
        coins, draws = noise_draws((batch, length), model.vocab_size, generator, keys)
        z = corrupt(ids, t, coins.to(device), draws.to(device))
        log_x = model(z, t[:, 0]).log_softmax(-1)
        nelbo = nelbo_integrand(log_x, z, ids, t).mean()
        x0_ce = -log_x.detach().gather(-1, ids[..., None]).mean()  # a diagnostic: no gradient, no second softmax
        return {"total": nelbo, "nelbo": nelbo, "x0_ce": x0_ce}


# --- the reverse chain ---------------------------------------------------------------------------


def reverse_probs(x_theta: torch.Tensor, z: torch.Tensor, t: float, s: float) -> torch.Tensor:
    """q(z_s | z_t, x) with the distribution x_theta (..., V) in place of the one-hot x, (..., V):
    (V alpha_t x z + (alpha_t|s - alpha_t) z + (alpha_s - alpha_t) x + (1 - alpha_t|s)(1 - alpha_s) / V)
    / (V alpha_t x_z + 1 - alpha_t), z one-hot, alpha_t|s = alpha_t / alpha_s (UDLM, eq. 5)."""
    vocab = x_theta.shape[-1]
    alpha_t, alpha_s = 1 - t, 1 - s
    alpha_ts = alpha_t / alpha_s
    token = F.one_hot(z, vocab).to(x_theta.dtype)
    x_z = x_theta.gather(-1, z[..., None])
    numerator = ((vocab * alpha_t * x_z + alpha_ts - alpha_t) * token + (alpha_s - alpha_t) * x_theta
                 + (1 - alpha_ts) * (1 - alpha_s) / vocab)
    return numerator / (vocab * alpha_t * x_z + 1 - alpha_t)


def step_weights(x_z: torch.Tensor, vocab: int, t: float, s: float) -> tuple[torch.Tensor, ...]:
    """`reverse_probs` as a mixture: keep z_t, draw a word from x_theta, or draw one uniformly; the
    three weights (...,) at each position from x_theta's probability x_z of its token. The last is
    0 at s = 0 (alpha_s = 1): the chain's last words all come from the first two."""
    alpha_t, alpha_s = 1 - t, 1 - s
    alpha_ts = alpha_t / alpha_s
    denominator = vocab * alpha_t * x_z + 1 - alpha_t
    return ((vocab * alpha_t * x_z + alpha_ts - alpha_t) / denominator, (alpha_s - alpha_t) / denominator,
            (1 - alpha_ts) * (1 - alpha_s) / denominator)


def word_scores(logits: torch.Tensor, temperature: float, banned: Sequence[int] = ()) -> tuple[torch.Tensor, ...]:
    """x_theta (..., V) at `temperature` as log-weights and their float64 log-normaliser (...,):
    log x_theta = weights - normaliser. The weights are the logits less their row's largest, divided
    by the temperature, so never above 0: no overflow at any temperature (float32 logits / 1e-39
    overflowed to inf - inf = nan, and every draw became id 0 in the masked family). The normaliser is
    summed in float32 (terms at most 1: its rounding moves a probability by about 1e-7 of itself) and
    the step takes x_theta in float64 only at each position's own word and on the rows it draws from,
    so no float64 copy of the (..., V) scores is made: that copy cost more than the network. Temperature
    0: the argmax, one-hot; banned words at probability 0."""
    scaled = logits.float()
    if banned:
        scaled = scaled.clone()
        scaled[..., list(banned)] = -torch.inf
    if temperature == 0:
        best = F.one_hot(scaled.argmax(-1), scaled.shape[-1]).bool()
        weights = torch.zeros_like(scaled).masked_fill(~best, -torch.inf)
    else:
        weights = (scaled - scaled.amax(-1, keepdim=True)).div_(temperature)
    return weights, torch.logsumexp(weights, dim=-1).double()


def normalised(weights: torch.Tensor, normaliser: torch.Tensor) -> torch.Tensor:
    """log x_theta (..., V) in float64 from `word_scores`' log-weights (..., V) and normaliser (...,)."""
    return weights.double() - normaliser[..., None]


def word_log_probs(logits: torch.Tensor, temperature: float, banned: Sequence[int] = ()) -> torch.Tensor:
    """log x_theta (..., V) in float64: `word_scores` normalised."""
    return normalised(*word_scores(logits, temperature, banned))


def reverse_step(log_x: torch.Tensor, z: torch.Tensor, t: float, s: float,
                 generator: torch.Generator | None = None, normaliser: torch.Tensor | None = None) -> torch.Tensor:
    """z_s (B, L) drawn from `reverse_probs` in two float64 stages: each position's part of the
    mixture (a coin), then a word from x_theta (by its inverse CDF) only where that part is
    x_theta's. log_x: log x_theta, or log-weights with their `normaliser` (`word_scores`)."""
    vocab = log_x.shape[-1]
    if normaliser is None:
        normaliser = torch.logsumexp(log_x.double(), dim=-1)
    x_z = (log_x.gather(-1, z[..., None])[..., 0].double() - normaliser).exp()
    keep, _, from_uniform = step_weights(x_z, vocab, t, s)
    coin = torch.rand(z.shape, generator=generator, dtype=torch.float64).to(z.device)
    uniform = torch.randint(vocab, z.shape, generator=generator).to(z.device)
    z_s = torch.where(coin < keep, z, uniform)
    pick = (coin >= keep) & (coin < 1 - from_uniform)  # x_theta's part: the rest
    if pick.any():
        z_s[pick] = inverse_cdf(normalised(log_x[pick], normaliser[pick]).exp(), generator).to(z.device)
    return z_s


@torch.inference_mode()
def sample_ids(model: UniformDiffusionLM, ids: torch.Tensor, known: torch.Tensor, steps: int, *,
               generator: torch.Generator | None = None, temperature: float = 1.0, banned: Sequence[int] = (),
               precision: str = "fp32", on_step: Callable[[int, float, torch.Tensor], None] | None = None,
               keep_scores: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The ancestral chain over `steps` even steps of t, 1 -> 0, from uniform noise: windows (B, L)
    with ids kept where `known` (B, L) (the network reads them as given at every step) and the rest
    generated. Returns the ids and, with keep_scores, the log-probabilities (B, L, V) of the last
    step, which each generated word was drawn from (0 at known positions). on_step(index, s, window)."""
    batch, length = ids.shape
    device = ids.device
    noise = torch.randint(model.vocab_size, (batch, length), generator=generator).to(device)
    z = torch.where(known, ids, noise)
    scores = None
    for index in range(steps):
        t, s = 1 - index / steps, 1 - (index + 1) / steps
        with autocast(precision, device):
            logits = model(z, torch.full((batch,), t, device=device))
        weights, normaliser = word_scores(logits, temperature, banned)
        if keep_scores and index == steps - 1:
            probs = reverse_probs(normalised(weights, normaliser).exp(), z, t, s)
            scores = torch.where(known.cpu()[..., None], 0.0, probs.log().float().cpu())
        z = torch.where(known, ids, reverse_step(weights, z, t, s, generator, normaliser))
        if on_step is not None:
            on_step(index, s, z)
    return z, scores


# --- the likelihood bound ----------------------------------------------------------------------

BOUND_TERMS = ("nelbo",)
BOUND_OPTIONS = frozenset()  # its NELBO has no x0 to choose and no shortened chain


@torch.inference_mode()
def window_bound(run: LoadedRun, ids: torch.Tensor, draws: int, generator: torch.Generator | None = None,
                 **_) -> dict[str, torch.Tensor]:
    """Each window's continuous-time NELBO summed over its positions (B,): the integrand at `draws`
    times t stratified over (0, 1) (draw k in the k-th 1/draws of it), each with its own z_t,
    averaged: an unbiased estimate of the bound on -log p(window)."""
    model = run.model
    batch, length = ids.shape
    device = ids.device
    total = torch.zeros(batch, dtype=torch.float64)
    for k in range(draws):
        t = ((k + torch.rand(batch, 1, generator=generator, dtype=torch.float64)) / draws).clamp(EDGE, 1 - EDGE)
        coins, words = noise_draws((batch, length), model.vocab_size, generator)
        t = t.float().to(device)
        z = corrupt(ids, t, coins.to(device), words.to(device))
        with autocast(run.config.precision, device):
            logits = model(z, t[:, 0])
        total += nelbo_integrand(logits.log_softmax(-1), z, ids, t).double().sum(1).cpu()
    return {"nelbo": total / draws}


# --- the family interface (see dlm.families) ---------------------------------------------------

NAME = "uniform"
TITLE = "uniform-state diffusion"
DESCRIPTION = ("UDLM's uniform-state discrete diffusion: words replaced by uniformly drawn words, "
               "restored step by step by a bidirectional transformer that may revise any word")
SUPPORTS = frozenset({"likelihood_bound", "infill", "prefix", "length", "temperature"})
SAMPLE_OPTIONS = frozenset({"steps", "temperature", "unk", "seed", "batch_size", "num_samples", "record_every"})
# fixed words are held as given at every step: fill gives them back, with nothing to round
ROUNDS_FIXED_WORDS = False

TERMS = Terms(
    name="uniform-state discrete diffusion (UDLM)",
    losses="The NELBO (UDLM's continuous-time bound on -log p(w) over every position, in nats per token, and the "
           "total it minimises) and x0_ce, the denoiser's plain cross-entropy against the clean words at every "
           "position, on training batches and on fixed validation windows.",
    table="Mean row norm and mean nearest-neighbour distance of the embedding table's word rows (this family "
          "replaces words by uniformly drawn ones and never noises the table, so there is no noise scale to hold "
          "the distances against), the learning rate schedule and training throughput.",
    likelihood="The NELBO, UDLM's bound on -log p(w), in nats per token",
    titles={"nelbo": "NELBO (nats/token)", "x0_ce": "CE of the denoiser's words (all positions)"},
    trajectory="The window at each recorded step, every position holding a word (noise words early on, any of them "
               "revisable later); t is the noise level (1: every word drawn uniformly, down to 0).",
)
_GAUSSIAN_CHAIN = ("an option of the Gaussian chain (its timestep spacing, clamping, eta and x0 estimate); the "
                   "uniform chain draws words at evenly spaced noise levels")
WHY_NOT = {  # a discrete family's reasons, as the masked family gives them, in this family's words where they differ
    **MASKED_WHY_NOT,
    "latent": "it noises words by replacing them, not by adding noise to vectors: there are no noised latents for a "
              "classifier to read",
    "probe": "no probe of its denoiser is written yet (benchmarks/probe.py has the Gaussian and masked families')",
    **{option: _GAUSSIAN_CHAIN for option in ("spacing", "clamp", "clamp_fraction", "eta", "x0")},
    "sampler": "every position may change at every step of its chain, so there is no order of unmasking to choose",
}

# The family-specific Config keys it reads: its sampler's (steps, the per-step temperature, <unk>).
CONFIG_KEYS = frozenset({"sample_steps", "decode_temperature", "decode_unk"})


def likelihood_kind(config: Config) -> str:
    """The continuous-time NELBO, an upper bound on the NLL."""
    return "NELBO"


def recipe(config: Config) -> list[str]:
    """The run's uniform-state recipe in words."""
    return [f"sampled in {config.sample_steps} steps"]


def check_config(config: Config) -> None:
    """Nothing beyond the shared checks and the key check: its keys are CONFIG_KEYS."""


def new_model(config: Config, vocab_size: int, pretrained: torch.Tensor | None = None) -> UniformDiffusionLM:
    return UniformDiffusionLM(config, vocab_size, pretrained)


def objective(config: Config) -> UniformDiffusion:
    return UniformDiffusion()


def trunk(model: UniformDiffusionLM) -> nn.Module:
    return model.transformer


MOST_STEPS = 100_000  # a guard against a typo that would run for hours, not a limit of the chain


def chain(config: Config) -> Chain:
    """One chain over the whole window, in continuous time, a network call a step."""
    return Chain(blocks=1, timesteps=None)


def check_given_options(given: Mapping[str, object], flag: Callable[[str], str]) -> None:
    """Its sampler takes any of its SAMPLE_OPTIONS together."""


def check_steps(options: SampleOptions, config: Config) -> None:
    """The options' own ranges and the ancestral chain's step count (before any sampling)."""
    options.validate()
    if options.steps < 1:
        raise UserError(f"steps must be at least 1, got {options.steps}.")
    if options.steps > MOST_STEPS:
        raise UserError(f"steps must be at most {MOST_STEPS:,}, got {options.steps:,}: each step is a network call "
                        f"per batch, and the chain is already close to its continuous-time limit long before.")


def generate(run: LoadedRun, options: SampleOptions, generator: torch.Generator,
             device: torch.device | str = "cpu") -> tuple[torch.Tensor, list[dict]]:
    """One batch of options.num_samples windows by the ancestral chain of options.steps steps at
    options.temperature; frames of the window every options.record_every steps (t the noise level)."""
    check_steps(options, run.config)
    frames = Frames(options)

    def record(index: int, s: float, window: torch.Tensor) -> None:
        if frames.wants(index):
            frames.add(index, s, window)

    blank = torch.zeros(options.num_samples, run.config.seq_len, dtype=torch.long, device=device)
    ids, _ = sample_ids(run.model, blank, torch.zeros_like(blank, dtype=torch.bool), options.steps, generator=generator,
                        temperature=options.temperature, banned=options.banned_ids(run.tokenizer),
                        precision=run.config.precision, on_step=record)
    return ids.cpu(), frames.frames


def fill(run: LoadedRun, ids: torch.Tensor, known: torch.Tensor, options: SampleOptions, generator: torch.Generator,
         device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor | None]:
    """Control, one batch: windows ids (N, L) generated where `known` is False; the ids and the
    scores (N, L, V) each position's last word was drawn from (for the length constraint)."""
    check_steps(options, run.config)
    got, drawn_from = sample_ids(run.model, ids.to(device), known.expand(len(ids), -1).to(device), options.steps,
                                 generator=generator, temperature=options.temperature,
                                 banned=options.banned_ids(run.tokenizer), precision=run.config.precision,
                                 keep_scores=True)
    return got.cpu(), drawn_from


def decode_again(run: LoadedRun, options: SampleOptions, device: torch.device | str = "cpu") -> None:
    """The temperature enters every step's draw: each temperature is sampled afresh."""
    return None
