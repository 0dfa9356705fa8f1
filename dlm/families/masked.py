"""The masked (absorbing-state) diffusion family: MDLM (Sahoo et al. 2024) and, with block_size,
masked block diffusion (BD3-LM, Arriola et al. 2025).

Forward process: every token is replaced by a [MASK] token (one id past the vocabulary)
independently with probability 1 - alpha_t, alpha_t = 1 - t (the log-linear schedule), t in (0, 1].
The network is the same TinyTransformer, bidirectional and without time conditioning (a masked
window says how noisy it is). SUBS parameterisation: the [MASK] token is never predicted (the head
has no row for it), and an unmasked input token is its own prediction (carried over). The loss is
the continuous-time NELBO: the cross-entropy at masked positions weighted by
-alpha'_t / (1 - alpha_t) = 1 / t, over all positions, nats per token.

With block_size below the window, blocks are generated left to right; training sees every block
at once, each masked at its own t, beside the clean window under the Gaussian family's block-causal
layout (`blocks.every_block_mask`), so each block is trained as it is sampled: the earlier blocks
clean, itself masked.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

from dlm.core.config import Config, ConfigError
from dlm.core.embeddings import LearnedEmbedding
from dlm.core.errors import UserError
from dlm.core.nets import PrefixCache, TinyTransformer
from dlm.core.noise import WindowKeys, per_window
from dlm.core.runtime import autocast
from dlm.families import Terms
from dlm.families.blocks import block_causal_mask, every_block_mask
from dlm.families.contract import Chain, Frames, LoadedRun, SampleOptions
from dlm.families.masked_probe import probe  # noqa: F401  (its probe)

GOLDEN = (math.sqrt(5) - 1) / 2  # the additive recurrence u + i * GOLDEN (mod 1) is low-discrepancy


class MaskedDiffusionLM(nn.Module):
    """Token embedding (the vocabulary plus [MASK]) -> bidirectional TinyTransformer -> a head over
    the vocabulary only, tied to the embedding's word rows: logits (B, L, V), never [MASK]."""

    def __init__(self, config: Config, vocab_size: int, pretrained_embeddings: torch.Tensor | None = None):
        super().__init__()
        d = config.embed_dim
        if pretrained_embeddings is not None:  # the [MASK] row is new: drawn like a fresh row
            mask_row = torch.randn(1, d) * config.embedding_init_std
            pretrained_embeddings = torch.cat([pretrained_embeddings.float(), mask_row])
        self.vocab_size = vocab_size
        self.mask_id = vocab_size
        self.embedding = LearnedEmbedding(vocab_size + 1, d, pretrained_embeddings, init_std=config.embedding_init_std)
        self.transformer = TinyTransformer(d, config.width, config.depth, config.heads, config.seq_len,
                                           config.dropout, causal=False, time_conditioned=False,
                                           positions=config.positions)
        self.bias = nn.Parameter(torch.zeros(vocab_size))

    def table(self) -> torch.Tensor:
        """The word rows of the embedding table, (V, d) (the training log follows their geometry)."""
        return self.embedding.table()[: self.vocab_size]

    def hidden(self, z: torch.Tensor, attend: torch.Tensor | None = None,
               positions: torch.Tensor | None = None) -> torch.Tensor:
        """The transformer's output (B, L, d) for ids z (B, L), masks included."""
        return self.transformer(self.embedding(z), None, attend, positions)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Word logits (..., V) in float32: the mask has none (SUBS: it is never predicted)."""
        return F.linear(hidden, self.table(), self.bias).float()

    def forward(self, z: torch.Tensor, attend: torch.Tensor | None = None,
                positions: torch.Tensor | None = None) -> torch.Tensor:
        return self.logits(self.hidden(z, attend, positions))


def mask_rate_range(config: Config) -> tuple[float, float]:
    return config.mask_rate_min, config.mask_rate_max


class MaskedDiffusion:
    """The continuous-time NELBO of masked diffusion, shaped like the other objectives."""

    terms = ("total", "nelbo", "masked_ce")  # masked_ce: the plain CE at masked positions (unweighted)
    timestep_sampler = None  # its mask rates are drawn as they are, nothing measured

    def __init__(self, block_size: int | None = None, rate_range: tuple[float, float] = (1e-3, 1.0),
                 eval_min_rate: float = 1e-3):
        low, high = rate_range
        if not 0 < low < high <= 1:
            raise ValueError(f"mask_rate_min and mask_rate_max must satisfy 0 < min < max <= 1, got {low}, {high}.")
        self.block_size = block_size
        self.rate_range = (low, high)
        self.eval_range = (min(eval_min_rate, low), 1.0)  # validation and the bound: the whole range

    def block_size_for(self, length: int) -> int | None:
        size = self.block_size
        if size is None or size >= length:
            return None
        if size < 1 or length % size:
            raise ValueError(f"block_size ({size}) must divide the window length ({length}).")
        return size

    def draw_rates(self, batch: int, groups: int, keys: WindowKeys | None, generator: torch.Generator | None,
                   rate_range: tuple[float, float]) -> torch.Tensor:
        """Mask rates t (B, groups) in rate_range, low-discrepancy over the batch: one uniform u for
        the step and t_i = (u + i * GOLDEN) mod 1 for window i of the global batch (MDLM's antithetic
        draw, written so that a window's t does not depend on how the batch is split), a block's
        offset by its index on the same recurrence."""
        if keys is not None:
            u = torch.rand((), generator=keys.step_generator(), dtype=torch.float64)
            index = keys.index.double()
        else:
            u = torch.rand((), generator=generator, dtype=torch.float64)
            index = torch.arange(batch, dtype=torch.float64)
        # window i's block j is term i * groups + j of the recurrence
        terms = index[:, None] * groups + torch.arange(groups, dtype=torch.float64)[None]
        unit = (u + terms * GOLDEN) % 1.0
        low, high = rate_range
        return (low + (high - low) * unit).float()

    def training_losses(self, model: MaskedDiffusionLM, ids: torch.Tensor, generator: torch.Generator | None = None,
                        uniform_t: bool = False, keys: WindowKeys | None = None) -> dict[str, torch.Tensor]:
        """total = nelbo: sum over masked positions of CE / t, over all B x L positions (nats per
        token). uniform_t (validation): t over the whole range, not the training's clipped one."""
        batch, length = ids.shape
        device = ids.device
        size = self.block_size_for(length)
        groups = 1 if size is None else length // size
        rates = self.draw_rates(batch, groups, keys, generator, self.eval_range if uniform_t else self.rate_range)
        t = rates.repeat_interleave(length // groups, dim=1).to(device)  # (B, L)
        if keys is not None:
            u = per_window(keys.generators(), lambda g: torch.rand(length, generator=g)).to(device)
        else:
            u = torch.rand((batch, length), generator=generator).to(device) if generator else torch.rand_like(t)
        masked = u < t
        z = torch.where(masked, model.mask_id, ids)
        hidden = denoise_hidden(model, z, ids, size)
        ce = F.cross_entropy(model.logits(hidden[masked]), ids[masked], reduction="none")  # (masked,)
        nelbo = (ce / t[masked]).sum() / ids.numel()
        masked_ce = ce.mean() if ce.numel() else ce.sum()
        return {"total": nelbo, "nelbo": nelbo, "masked_ce": masked_ce}


def denoise_hidden(model: MaskedDiffusionLM, z: torch.Tensor, ids: torch.Tensor, block_size: int | None) -> torch.Tensor:
    """The network's hidden states (B, L, d) for masked windows z: the whole window at once, or
    for block diffusion every block at once, each reading the clean earlier blocks of `ids` beside
    it (the layout shared with the Gaussian family: `blocks.every_block_mask`, the window twice at
    the same positions)."""
    if block_size is None:
        return model.hidden(z)
    length = z.shape[1]
    positions = torch.arange(length, device=z.device).repeat(2)
    mask = every_block_mask(length, block_size, z.device)[None]
    return model.hidden(torch.cat([z, ids], dim=1), mask, positions)[:, :length]


# --- sampling ----------------------------------------------------------------------------------

# How a chain chooses what to unmask (`dlm sample --sampler`): MDLM's fixed grid of steps; the
# first-hitting sampler, the continuous-time chain itself at one network call per unmasked
# position; confidence-ordered unmasking (MaskGIT, LLaDA), which is not the chain's law.
SAMPLERS = ("grid", "first_hitting", "confidence")


def categorical(probs: torch.Tensor, generator: torch.Generator | None = None,
                dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """One draw per row of probs (..., K) by the Gumbel-max trick, the noise in `dtype`. float64 by
    default: low-precision Gumbel noise is truncated (its uniforms cannot come near 0 or 1), which
    under-draws unlikely tokens and lowers sample entropy (Zheng et al. 2024)."""
    u = torch.rand(probs.shape, generator=generator, dtype=dtype).to(probs.device)
    tiny = torch.finfo(dtype).tiny
    exponential = -torch.log(u.clamp_min(tiny))
    gumbel = -torch.log(exponential.clamp_min(tiny))
    return (torch.log(probs.to(dtype)) + gumbel.to(dtype)).argmax(-1)


def inverse_cdf(probs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One draw per row of probs (..., K), in float64: the first word whose cumulative probability
    passes a uniform draw scaled to the row's total. The law of the Gumbel-max draw (`categorical`)
    to float64's resolution, for one uniform a row where that pays K uniforms and 2K logarithms (at
    a word vocabulary, the masked chain's largest cost after the network). A word of probability 0
    is never drawn."""
    cdf = probs.double().cumsum(-1)
    total = cdf[..., -1:]
    u = torch.rand(total.shape, generator=generator, dtype=torch.float64).to(probs.device)
    # strictly below the total, so the search stops at or before the last word of nonzero probability
    point = torch.minimum(u * total, torch.nextafter(total, torch.zeros_like(total)))
    # a word id in any case: a row of nan (a diverged network) must not draw [MASK] and stall a chain
    return torch.searchsorted(cdf, point, right=True).squeeze(-1).clamp_max(probs.shape[-1] - 1)


def word_probs(logits: torch.Tensor, temperature: float, banned: Sequence[int] = ()) -> torch.Tensor:
    """The words' distribution (k, V) in float64 for logits (k, V) at `temperature` (0: the argmax),
    `banned` ids never drawn. float64 before the division: in float32 a temperature of 1e-39 makes
    every logit infinite, and every draw id 0."""
    logits = logits.to(torch.float64, copy=True)  # its own copy, edited in place
    if banned:
        logits[..., list(banned)] = -torch.inf
    if temperature == 0:
        return F.one_hot(logits.argmax(-1), logits.shape[-1]).double()
    if temperature != 1:
        logits /= temperature
    return torch.softmax(logits, dim=-1)


@dataclass
class UnmaskState:
    """One step of a chain: the ids after it (masks where still masked), which positions it
    unmasked (B, n), and the word probabilities they were drawn from (k, V), one row per unmasked
    position in row-major order."""
    index: int
    t: float  # the grid's time after the step; the other samplers: the share of positions still masked
    z: torch.Tensor
    unmasked: torch.Tensor
    probs: torch.Tensor | None  # None when the step unmasked nothing
    calls: int  # network calls so far


def _logits(features: torch.Tensor, where: torch.Tensor, head) -> torch.Tensor:
    return features[where] if head is None else head(features[where])


def _rows_output(predict, z: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """The network's output for the rows of z (B, n) where `rows` (B,) is True: the rows alone,
    which read nothing of each other (predict(z_rows, index) with their index in the batch), or
    the whole batch in one call when every row is asked."""
    if bool(rows.all()):
        return predict(z, None)
    index = rows.nonzero().flatten()
    return predict(z[index], index)


def unmask_chain(predict, z: torch.Tensor, mask_id: int, steps: int, generator: torch.Generator | None = None,
                 temperature: float = 1.0, banned: Sequence[int] = (), head=None) -> Iterator[UnmaskState]:
    """MDLM's ancestral sampler, from z (B, n) (masks where to generate) over `steps` steps of the
    log-linear schedule, t = 1 -> 0. predict(z_rows, index) -> logits (r, n, V) float32 for the rows
    `index` of the batch (None: all of them). From t to s a masked position unmasks with
    probability (t - s) / t and then takes a word drawn from the network's distribution (at
    `temperature`; 0: the argmax); unmasked positions never change. That is MDLM's one categorical
    over the words and [MASK] (probabilities p (t - s) / t and s / t), drawn in two float64 stages
    so that the words are drawn only where a position unmasks. The network reads a row only at a
    step where one of its positions unmasks (the window as its last change left it: a cached
    output would be the same), so a row costs at most one pass per position, however many the
    steps; the others' rows are not run. With `head`, predict returns features (r, n, d) and head
    maps the unmasking positions' features (k, d) to their logits (k, V): the vocabulary
    projection, which costs as much as the network at a word vocabulary, is paid for the k
    positions a step unmasks, not all B x n."""
    calls = 0
    for index in range(steps):
        t, s = 1 - index / steps, 1 - (index + 1) / steps
        coin = torch.rand(z.shape, generator=generator, dtype=torch.float64).to(z.device)
        unmasked = (z == mask_id) & (coin < (t - s) / t)
        probs, rows = None, unmasked.any(1)
        if rows.any():
            features = _rows_output(predict, z, rows)
            calls += 1
            probs = word_probs(_logits(features, unmasked[rows], head), temperature, banned)
            z = z.clone()
            z[unmasked] = inverse_cdf(probs, generator).to(z.device)
        yield UnmaskState(index, s, z, unmasked, probs, calls)


def first_hitting_chain(predict, z: torch.Tensor, mask_id: int, steps: int | None = None,
                        generator: torch.Generator | None = None, temperature: float = 1.0,
                        banned: Sequence[int] = (), head=None) -> Iterator[UnmaskState]:
    """The first-hitting sampler (Zheng et al. 2024, BD3-LM's default): the continuous-time chain
    exactly, at one network call per unmasking. In that chain each masked position unmasks at its
    own time, uniform below the current one: the next time any of a row's m masked positions
    unmasks is t u^(1/m), and which one is uniform among them. This network reads no time, so the
    times change nothing that is drawn and are not drawn: each call unmasks one position per row,
    chosen uniformly among the row's masked ones, its word drawn from the network at
    `temperature`. A row with m masked positions takes m calls (a batch: as many as its most masked
    row); `steps` is not read (the grid's chain comes to this one as its steps grow, `most_steps`).
    predict and head as for `unmask_chain`: a row with nothing left to unmask is not run."""
    calls, masked = 0, z == mask_id
    while masked.any():
        rows = masked.any(1)
        features = _rows_output(predict, z, rows)
        calls += 1
        key = torch.rand(z.shape, generator=generator, dtype=torch.float64).to(z.device)
        pick = key.masked_fill(~masked, -1.0).argmax(1, keepdim=True)  # uniform among the row's masked positions
        unmasked = torch.zeros_like(masked).scatter_(1, pick, True) & masked
        probs = word_probs(_logits(features, unmasked[rows], head), temperature, banned)
        z = z.clone()
        z[unmasked] = inverse_cdf(probs, generator).to(z.device)
        masked = z == mask_id
        yield UnmaskState(calls - 1, float(masked.double().mean()), z, unmasked, probs, calls)


def unmask_schedule(counts: torch.Tensor, steps: int) -> torch.Tensor:
    """How many positions each step of a confidence chain unmasks, (B, steps) for each row's count
    of masked positions (B,): the count split evenly over the steps, the remainder one more in the
    first steps (LLaDA's linear schedule); past a row's count, its steps unmask nothing."""
    first = torch.arange(steps, device=counts.device)[None] < (counts % steps)[:, None]
    return (counts // steps)[:, None] + first.long()


def confidence_chain(predict, z: torch.Tensor, mask_id: int, steps: int, generator: torch.Generator | None = None,
                     temperature: float = 1.0, banned: Sequence[int] = (), head=None) -> Iterator[UnmaskState]:
    """Confidence-ordered unmasking (MaskGIT, Chang et al. 2022; LLaDA's low-confidence remasking,
    Nie et al. 2025): at each step the network reads the window, a word is drawn at every masked
    position (at `temperature`; 0: the argmax), and a row keeps the k of them that the network
    gives the highest probability (its own distribution, temperature 1), masking the others again;
    k from `unmask_schedule`. It is NOT the chain's law: the chain unmasks positions in a uniformly
    random order, this one in the network's order of certainty, which favours the likely words and
    so does not sample the model's distribution. predict and head as for `unmask_chain`: a row
    that unmasks nothing at a step is not run, and a step where no row does skips the network."""
    schedule = unmask_schedule((z == mask_id).sum(1), steps)
    calls = 0
    for index in range(steps):
        unmasked, probs, take = torch.zeros_like(z, dtype=torch.bool), None, schedule[:, index]
        if take.any():
            rows, masked = take > 0, (z == mask_id) & (take > 0)[:, None]
            features = _rows_output(predict, z, rows)
            calls += 1
            logits = _logits(features, masked[rows], head)  # every masked position of those rows: (m, V)
            drawn_from = word_probs(logits, temperature, banned)
            words = inverse_cdf(drawn_from, generator)
            own = drawn_from if temperature == 1 else word_probs(logits, 1.0, banned)
            confidence = torch.full(z.shape, -1.0, dtype=torch.float64, device=z.device)  # unmasked rank last
            confidence[masked] = own.gather(-1, words[:, None]).squeeze(-1).to(z.device)
            rank = confidence.argsort(dim=1, descending=True, stable=True).argsort(dim=1)
            unmasked = masked & (rank < take[:, None].to(z.device))
            kept = unmasked[masked].to(words.device)
            z = z.clone()
            z[unmasked] = words[kept].to(z.device)
            probs = drawn_from[kept]
        yield UnmaskState(index, float((z == mask_id).double().mean()), z, unmasked, probs, calls)


CHAINS = {"grid": unmask_chain, "first_hitting": first_hitting_chain, "confidence": confidence_chain}


@dataclass(frozen=True)
class Unmasking:
    """How `sample_ids` unmasks: the sampler (SAMPLERS), its steps (a block's; first_hitting reads
    none), the words' temperature, the ids never drawn and the precision the network runs at."""
    sampler: str = "grid"
    steps: int = 200
    temperature: float = 1.0
    banned: tuple[int, ...] = ()
    precision: str = "fp32"

    def chain_steps(self, positions: int) -> int:
        """The states a chain over `positions` masked positions yields: first_hitting's one per position."""
        return positions if self.sampler == "first_hitting" else self.steps


def block_predictor(model: MaskedDiffusionLM, prefix: torch.Tensor, block_size: int, precision: str,
                    cache: PrefixCache | None = None):
    """predict(z_block, rows) -> hidden states (r, n, d) for the block after the clean `prefix`
    (B, first) in the batch's rows `rows` (None: all B), as training's layout reads it: the prefix
    block-causally, the block itself and everything before it (`word_head` turns them into logits).
    With `cache` (the prefix's keys and values, `extend_prefix_cache`), a call runs the block's own
    positions only; without it, the prefix is recomputed each call (the reference path)."""
    first = prefix.shape[1]

    def predict(z_block: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        with autocast(precision, z_block.device):
            if cache is not None:
                part = cache if rows is None else PrefixCache([(keys[rows], values[rows])
                                                              for keys, values in cache.layers])
                return model.transformer(model.embedding(z_block), None, cache=part)
            end = first + z_block.shape[1]
            attend = None if first == 0 else block_causal_mask(end, block_size, z_block.device)[None]
            context = prefix if rows is None else prefix[rows]
            return model.hidden(torch.cat([context, z_block], dim=1), attend)[:, first:]

    return predict


def word_head(model: MaskedDiffusionLM, precision: str):
    """head(hidden (k, d)) -> word logits (k, V) float32, at the precision the network ran at."""

    def head(hidden: torch.Tensor) -> torch.Tensor:
        with autocast(precision, hidden.device):
            return model.logits(hidden)

    return head


def extend_prefix_cache(model: MaskedDiffusionLM, cache: PrefixCache | None, block: torch.Tensor,
                        precision: str) -> PrefixCache:
    """The cache grown by a finished (clean) block, which reads the blocks before it and itself: the
    block-causal layout training used (`every_block_mask`), so cached and recomputed logits agree."""
    with autocast(precision, block.device):
        return model.transformer.cache_prefix(model.embedding(block), None, cache=cache)


@torch.inference_mode()
def sample_ids(model: MaskedDiffusionLM, objective: MaskedDiffusion, ids: torch.Tensor, known: torch.Tensor,
               unmasking: Unmasking, generator: torch.Generator | None = None, *,
               on_step: Callable[[int, float, torch.Tensor], None] | None = None,
               keep_scores: bool = False, prefix_cache: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Windows (B, L) with ids fixed where `known` (B, L) is True (infilling, a prefix: fixed
    positions are never masked) and the rest generated by the chain `unmasking` describes; block by
    block, left to right, with block_size. Returns the ids and, with keep_scores, the
    log-probabilities (B, L, V) each generated position's word was drawn from (for constraints
    applied after the chain). on_step(index, t, window): each state's window (masks included), the
    index counted over the blocks. prefix_cache: the finished blocks are run once and cached (False:
    recomputed at every call, the reference the cache is tested against)."""
    batch, length = ids.shape
    size = objective.block_size_for(length) or length
    chain, steps, precision = CHAINS[unmasking.sampler], unmasking.chain_steps(size), unmasking.precision
    z = torch.where(known, ids, model.mask_id)
    scores = torch.zeros(batch, length, model.vocab_size) if keep_scores else None
    cache = None  # the finished blocks' keys and values: a step costs its block's tokens, not the window's
    for first in range(0, length, size):
        predict = block_predictor(model, z[:, :first], size, precision, cache if prefix_cache else None)
        block = z[:, first: first + size]
        for state in chain(predict, block, model.mask_id, unmasking.steps, generator, unmasking.temperature,
                           unmasking.banned, word_head(model, precision)):
            block = state.z
            if keep_scores and state.unmasked.any():
                scores[:, first: first + size][state.unmasked.cpu()] = state.probs.log().float().cpu()
            if on_step is not None:
                on_step(first // size * steps + state.index, state.t,
                        torch.cat([z[:, :first], block, z[:, first + size:]], dim=1))
        z[:, first: first + size] = block
        if prefix_cache and first + size < length:
            cache = extend_prefix_cache(model, cache, block, precision)
    return z, scores


# --- the likelihood bound ----------------------------------------------------------------------

BOUND_TERMS = ("nelbo",)
BOUND_OPTIONS = frozenset()  # its NELBO has no x0 to choose and no shortened chain


@torch.inference_mode()
def window_bound(run: LoadedRun, ids: torch.Tensor, draws: int, generator: torch.Generator | None = None,
                 **_) -> dict[str, torch.Tensor]:
    """Each window's continuous-time NELBO summed over its positions (B,): for each of `draws`
    mask rates t stratified over (0, 1] (draw k in the k-th 1/draws of it), the 1/t-weighted
    cross-entropy at the masked positions; their mean. An unbiased estimate of the bound on
    -log p(window) (block runs: the sum of each block's given the clean blocks before it)."""
    model, objective = run.model, run.objective
    batch, length = ids.shape
    size = objective.block_size_for(length)
    groups = 1 if size is None else length // size
    total = torch.zeros(batch, dtype=torch.float64)
    for k in range(draws):
        t = ((k + torch.rand(batch, groups, generator=generator, dtype=torch.float64)) / draws).clamp_min(1e-6)
        t = t.repeat_interleave(length // groups, dim=1)
        masked = torch.rand(batch, length, generator=generator, dtype=torch.float64) < t
        device = ids.device
        z = torch.where(masked.to(device), model.mask_id, ids)
        with autocast(run.config.precision, device):
            logits = model.logits(denoise_hidden(model, z, ids, size))
        ce = F.cross_entropy(logits.transpose(1, 2), ids, reduction="none").double().cpu()
        total += (torch.where(masked, ce / t, 0.0)).sum(1)
    return {"nelbo": total / draws}


# --- the family interface (see dlm.families) ---------------------------------------------------

NAME = "masked"
TITLE = "masked diffusion"
DESCRIPTION = ("MDLM's absorbing-state diffusion (BD3-LM's in blocks): words masked at random, "
               "unmasked step by step by a bidirectional transformer")
SUPPORTS = frozenset({"likelihood_bound", "infill", "prefix", "length", "temperature", "probe"})
SAMPLE_OPTIONS = frozenset({"sampler", "steps", "temperature", "unk", "seed", "batch_size", "num_samples",
                            "record_every"})
# fixed words are never masked: fill gives them back as given, with nothing to round
ROUNDS_FIXED_WORDS = False
TERMS = Terms(
    name="masked (absorbing-state) diffusion (MDLM)",
    blocks="masked block diffusion (BD3-LM)",
    losses="The NELBO (the cross-entropy at masked positions weighted by 1/t, over all positions: a bound on "
           "-log p(w) in nats per token, and the total it minimises) and the plain cross-entropy at masked positions, "
           "on training batches and on fixed validation windows.",
    table="Mean row norm and mean nearest-neighbour distance of the embedding table's word rows (this family masks "
          "words and never noises the table, so there is no noise scale to hold the distances against), the "
          "learning rate schedule and training throughput.",
    likelihood="The NELBO, MDLM's bound on -log p(w), in nats per token",
    titles={"nelbo": "NELBO (nats/token)", "masked_ce": "CE at masked positions"},
    trajectory="The window at each recorded step: the words unmasked so far (positions still masked are left out); "
               "t is the mask rate (1: every position masked, down to 0).",
)
_GAUSSIAN_CHAIN = ("an option of the Gaussian chain (its timestep spacing, clamping, eta and x0 estimate); the masked "
                   "chain unmasks words at evenly spaced mask rates")
WHY_NOT = {
    "likelihood_exact": "its likelihood is a bound, the NELBO (dlm evaluate --nll)",
    "guidance": "its chain moves between discrete words, so there are no continuous latents for a classifier's "
                "gradient to move",
    "latent": "it noises words by masking them, not by adding noise to vectors: there are no noised latents for a "
              "classifier to read",
    "geometry": "its embedding rows are never noised (no q(x0|w), no sigma0) and it has no rounding decoder, so the "
                "Gaussian family's collapse and geometry signals do not apply; its samples are judged against "
                "held-out text on the samples page",
    "decoder": "it has no rounding step: its chain draws words, so there are no vectors for a cosine decoder to read",
    **{option: _GAUSSIAN_CHAIN for option in ("spacing", "clamp", "clamp_fraction", "eta", "x0")},
}

# The family-specific Config keys it reads (dlm.families.check_config refuses the others'): blocks,
# the training mask-rate range, and the sampling keys of its sampler.
CONFIG_KEYS = frozenset({"block_size", "block_training", "mask_rate_min", "mask_rate_max", "sample_steps",
                         "decode_temperature", "decode_unk"})


def likelihood_kind(config: Config) -> str:
    """The continuous-time NELBO, an upper bound on the NLL."""
    return "NELBO"


def recipe(config: Config) -> list[str]:
    """The run's masked recipe in words, the choices that tell one such run from another."""
    words = []
    blocks = config.block_size is not None and config.block_size < config.seq_len
    if blocks:
        words.append(f"blocks of {config.block_size}")
    default = Config()
    if (config.mask_rate_min, config.mask_rate_max) != (default.mask_rate_min, default.mask_rate_max):
        words.append(f"clipped mask rate {config.mask_rate_min:g}-{config.mask_rate_max:g}")
    words.append(f"sampled in {config.sample_steps} steps" + (" a block" if blocks else ""))
    return words


def check_config(config: Config) -> None:
    if config.block_size is not None and config.block_size < config.seq_len and config.block_training != "all":
        raise ConfigError("A masked run with block_size trains every block at once (BD3-LM): set block_training: all.")
    mask_rate_range(config)
    MaskedDiffusion(None, mask_rate_range(config))  # the range's own check


def new_model(config: Config, vocab_size: int, pretrained: torch.Tensor | None = None) -> MaskedDiffusionLM:
    return MaskedDiffusionLM(config, vocab_size, pretrained)


def objective(config: Config) -> MaskedDiffusion:
    return MaskedDiffusion(config.block_size, mask_rate_range(config))


def trunk(model: MaskedDiffusionLM) -> nn.Module:
    return model.transformer


# A chain of S steps unmasks each position at a step drawn uniformly from S: the expected number of
# the n positions of a block that share a step with another is n (n - 1) / (2 S). From S = 50 n^2
# on that is below 1 in 100 samples, so the chain is the continuous-time sampler to that precision;
# more steps change nothing but the time (the network still runs each row at most n times per block).
STEPS_PER_SQUARED_POSITION = 50


def most_steps(positions: int) -> int:
    """The most sampling steps that can still change a block of `positions` positions' samples."""
    return STEPS_PER_SQUARED_POSITION * positions ** 2


def chain_positions(config: Config) -> int:
    """The positions one chain unmasks: a block's, or the whole window's."""
    return MaskedDiffusion(config.block_size).block_size_for(config.seq_len) or config.seq_len


def chain(config: Config) -> Chain:
    """A chain per block (or the window), in continuous time: each step calls the network on the rows
    where something unmasks, so a batch's chain calls it at most once a step; first_hitting's chain
    takes one step per position (chain_steps)."""
    positions = chain_positions(config)
    return Chain(blocks=config.seq_len // positions, timesteps=None,
                 steps_for=lambda options: chain_steps(options, positions))


def unmasking_for(run: LoadedRun, options: SampleOptions) -> Unmasking:
    """The chain `options` ask of `run`: its sampler, steps and temperature, the run's <unk> ban
    (unless options.unk) and precision."""
    return Unmasking(options.sampler, options.steps, options.temperature, options.banned_ids(run.tokenizer),
                     run.config.precision)


def chain_steps(options: SampleOptions, positions: int) -> int:
    """The steps of a block's chain: options.steps, or first_hitting's one per position."""
    return Unmasking(options.sampler, options.steps).chain_steps(positions)


def check_steps(options: SampleOptions, config: Config) -> None:
    """The options' own ranges, the sampler's name and the steps its chain can take, before any draw."""
    options.validate()
    if options.sampler not in SAMPLERS:
        raise UserError(f"sampler must be one of {', '.join(SAMPLERS)}, got '{options.sampler}'.")
    positions = chain_positions(config)
    most = most_steps(positions)
    if options.steps < 1:
        raise UserError(f"steps must be at least 1, got {options.steps}.")
    if options.steps > most:
        where = "block" if positions < config.seq_len else "window"
        raise UserError(f"steps must be at most {most:,} for this run, got {options.steps:,}: a masked chain unmasks "
                        f"each of a {where}'s {positions} positions at one of its steps, and from "
                        f"{STEPS_PER_SQUARED_POSITION} x {positions}^2 = {most:,} steps on, fewer than 1 sample in "
                        f"100 has two positions unmasked at the same step: more steps change nothing but the time.")


def check_given_options(given: Mapping[str, object], flag: Callable[[str], str]) -> None:
    """The options a user gave (None: not given) that the samplers cannot take together."""
    if given.get("sampler") == "first_hitting" and given.get("steps") is not None:
        raise UserError(f"{flag('steps')} sets the steps of the grid and confidence samplers; first_hitting unmasks "
                        f"one position per denoiser call and takes no steps: drop {flag('steps')}.")


def generate(run: LoadedRun, options: SampleOptions, generator: torch.Generator,
             device: torch.device | str = "cpu") -> tuple[torch.Tensor, list[dict]]:
    """One batch of `run` sampled by the chain of options.sampler (options.steps steps per block, but
    for first_hitting: one per position), at options.temperature; frames of the window every
    options.record_every of a chain's steps ([MASK] shown as <pad>, t the mask rate)."""
    check_steps(options, run.config)
    positions = chain_positions(run.config)
    frames = Frames(replace(options, steps=chain_steps(options, positions)))  # first_hitting: a state per position

    def record(index: int, t: float, window: torch.Tensor) -> None:
        if frames.wants(index):
            frames.add(index, t, torch.where(window == run.model.mask_id, run.tokenizer.pad_id, window))

    blank = torch.zeros(options.num_samples, run.config.seq_len, dtype=torch.long, device=device)
    ids, _ = sample_ids(run.model, run.objective, blank, torch.zeros_like(blank, dtype=torch.bool),
                        unmasking_for(run, options), generator, on_step=record)
    return ids.cpu(), frames.frames


def fill(run: LoadedRun, ids: torch.Tensor, known: torch.Tensor, options: SampleOptions, generator: torch.Generator,
         device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor | None]:
    """Control, one batch: windows ids (N, L) generated where `known` is False; the ids and the
    scores (N, L, V) each position was drawn from (for the length constraint)."""
    check_steps(options, run.config)
    got, drawn_from = sample_ids(run.model, run.objective, ids.to(device), known.expand(len(ids), -1).to(device),
                                 unmasking_for(run, options), generator, keep_scores=True)
    return got.cpu(), drawn_from


def decode_again(run: LoadedRun, options: SampleOptions, device: torch.device | str = "cpu") -> None:
    """The temperature enters every step's draw: each temperature is sampled afresh."""
    return None
