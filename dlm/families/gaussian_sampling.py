"""The Gaussian family's sampling pipeline: the reverse chain (a scheduler, a visible loop and
the hooks that edit its x0 prediction), the block chains of semi-autoregressive block diffusion
with their prefix cache, and the x0 a block run's denoiser gives each block after the earlier ones."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch

from dlm.core.embeddings import nearest_rows
from dlm.core.nets import PrefixCache
from dlm.core.scheduler import DiffusionScheduler
from dlm.families.blocks import block_causal_mask
from dlm.families.contract import SampleOptions
from dlm.families.gaussian_model import DiffusionLM, decode
from dlm.families.gaussian_objective import GaussianDiffusion, denoise_every_block


def x0_given_earlier_blocks(model, diffusion: GaussianDiffusion, x_t: torch.Tensor, t: torch.Tensor,
                            emb: torch.Tensor) -> torch.Tensor:
    """The denoiser's x0 (B, L, d) for every position of x_t at timesteps t (B,), asked as the
    sampler asks: the whole window at once, or for a block run each block at t with the blocks
    before it clean (`emb`, the words' embeddings at t = 0) and the later ones left out, so a score
    over all positions is the sum of each block's score given the words before it. A run trained
    on every block at once gets them all in its training pass (`denoise_every_block`)."""
    batch, length = x_t.shape[:2]
    size = diffusion.block_size_for(length)
    if size is None:
        return diffusion.x0_from_output(model, model.denoise(x_t, t), x_t, t)
    t_positions = t[:, None].expand(batch, length)
    if diffusion.settings.block_training == "all":
        output = denoise_every_block(model, x_t, t_positions, emb, size)
        return diffusion.x0_from_output(model, output, x_t, t_positions)
    blocks = []
    for first in range(0, length, size):
        x = torch.cat([emb[:, :first].to(x_t.dtype), x_t[:, first: first + size]], dim=1)
        block_t = torch.zeros(x.shape[:2], dtype=torch.long, device=x_t.device)
        block_t[:, first:] = t[:, None]
        output = model.denoise(x, block_t, None, block_context_mask(diffusion, first + size, size, x_t.device))
        blocks.append(diffusion.x0_from_output(model, output, x, block_t)[:, first:])
    return torch.cat(blocks, dim=1)


@dataclass
class SampleState:
    """One step of the reverse chain: x at the next (lower) noise level and the predicted x0."""

    index: int  # 0 .. steps-1, in sampling order
    t: int  # the timestep the network was evaluated at (the highest one, when it differs by position)
    x: torch.Tensor
    pred_x0: torch.Tensor
    # Block chains: the words fixed so far (B, L), set on each block's last step (the final words
    # on the chain's last step; decoding x again would redraw the earlier blocks at a temperature).
    words: torch.Tensor | None = None


# A hook sees the denoiser's x0 prediction (B, L, d) at every step, with the timesteps the denoiser
# was given (B,) or (B, L), the current x_t and the step's index, and returns the x0 the step uses:
# the one place where guidance, infilling and clamping plug into the chain.
Hook = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, int], torch.Tensor]


def clamp_hook(model: DiffusionLM, first_index: int = 0) -> Hook:
    """Diffusion-LM's clamping trick: the predicted x0 replaced by its nearest embedding row, from
    step `first_index` on."""
    table = None

    def clamp(pred_x0: torch.Tensor, t: torch.Tensor, x: torch.Tensor, index: int) -> torch.Tensor:
        nonlocal table
        if index < first_index:
            return pred_x0
        if table is None:  # once per chain, inside the chain's autocast like the steps
            table = model.table()
        return table[nearest_rows(pred_x0, table)]

    return clamp


def expected_x0_hook(model: DiffusionLM) -> Hook:
    """The step moves toward E[EMB(w)] under the rounding softmax of the predicted x0, not toward
    the prediction itself. Measured on the default run (docs/journal.md, "Fidelity"): the raw x0 is
    a blend the rounding reads right, but ancestral steps toward it drift off the table, and the
    chain from held-out x_400 kept 70% of the words its first step knew 94% of; with this x0 it
    keeps what the first step knows. It is the soft form of clamping (clamping takes the argmax row),
    so at high noise, where the softmax is broad, it stays a blend and does not snap to punctuation."""

    def expected(pred_x0: torch.Tensor, t: torch.Tensor, x: torch.Tensor, index: int) -> torch.Tensor:
        return model.expected_embedding(pred_x0.float())  # float32, autocast or not

    return expected


def posterior_x0_hook(model: DiffusionLM, diffusion: GaussianDiffusion) -> Hook:
    """The step moves toward E[x_0 | x_t], the words weighed by the rounding softmax of the predicted
    x0 (as `expected_x0_hook`) and each word's x_0 = EMB(w) + sigma0 z given x_t: Gaussian
    conditioning adds gain_t (x_t - sqrt(a_t) E[EMB(w)]), gain_t = sqrt(a_t) s0 / (a_t s0 + 1 - a_t)
    with s0 = sigma0^2 (0 at t = 0, where the target is EMB(w) itself). The expected x0 leaves that
    term out and pays x_0's own noise, d s0 per token, at every low-noise step of the bound
    (docs/journal.md, "The posterior x0"). At t = 0 the words are read from x_t itself (rescaled to
    x_0's scale, Diffusion-LM's rounding p(w | x_0)): its noise there is far below the rows'
    spacing, and a denoiser trained there once in T draws garbles some of them as training goes on."""
    expected = expected_x0_hook(model)
    schedule = diffusion.schedule
    s0 = schedule.sigma0 ** 2
    first_scale = float(schedule.sqrt_alphas_cumprod[0])

    def posterior(pred_x0: torch.Tensor, t: torch.Tensor, x: torch.Tensor, index: int) -> torch.Tensor:
        first = (t == 0).view(*t.shape, *([1] * (pred_x0.ndim - t.ndim)))
        mean = expected(torch.where(first, x.float() / first_scale, pred_x0.float()), t, x, index)
        a = schedule.at(schedule.alphas_cumprod.float(), t, mean.ndim)
        gain = torch.where(first, 0.0, a.sqrt() * s0 / (a * s0 + 1 - a))
        return mean + gain * (x.float() - a.sqrt() * mean)

    return posterior


def known_positions_hook(model: DiffusionLM, ids: torch.Tensor, known: torch.Tensor) -> Hook:
    """Fixed words (infilling, a prefix, earlier blocks): at the positions where `known` (B, L) is
    True the predicted x0 is replaced by the words' clean embeddings EMB(ids). The step then draws
    those positions from q(x_s | x_t, x0 = EMB(w)), so their x stays a noised copy of the word at the
    chain's current level: Diffusion-LM's replacement method, written as an x0 edit."""
    known = known.bool()
    clean = None

    def keep(pred_x0: torch.Tensor, t: torch.Tensor, x: torch.Tensor, index: int) -> torch.Tensor:
        nonlocal clean
        if clean is None:  # once per chain, inside the chain's autocast like the steps
            clean = model.embed(ids.to(pred_x0.device)).to(pred_x0.dtype)
        width = pred_x0.shape[1]  # a block chain's x covers the window's positions up to its block's end
        return torch.where(known[:, :width].to(pred_x0.device)[..., None], clean[:, :width], pred_x0)

    keep.fixed_words = (ids, known)  # what a block chain's later blocks read there (_block_chain)
    return keep


@torch.inference_mode()
def reverse_chain(model: DiffusionLM, diffusion: GaussianDiffusion, scheduler: DiffusionScheduler, x: torch.Tensor,
                  generator: torch.Generator | None = None, hooks: Sequence[Hook] = (),
                  attend: torch.Tensor | None = None,
                  estimate_x0: Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor] | None = None
                  ) -> Iterator[SampleState]:
    """The pipeline: from x (B, L, d) at scheduler.timesteps[0] down the scheduler's chain, yielding
    every state. The network's output becomes x0 here (`x0_from_output`), the hooks then edit it
    in order, and the scheduler steps with what they return. With self-conditioning the step's
    x0 is fed back to the denoiser at the next step. estimate_x0(x, t, x0_estimate), optional:
    the x0 in place of the denoiser's over all of x (a block chain's cached prefix)."""
    batch = x.shape[0]
    timesteps = scheduler.timesteps.cpu()
    peaks = timesteps.amax(1).tolist()
    # One timestep per sequence when the positions share it (the time MLP runs once per row).
    shared = (timesteps == timesteps[:, :1]).all(1).tolist()
    x0_estimate = None
    for index, t_row in enumerate(scheduler.timesteps):
        t = t_row[:1].expand(batch) if shared[index] else t_row.expand(batch, -1)
        if estimate_x0 is None:
            pred_x0 = diffusion.x0_from_output(model, model.denoise(x, t, x0_estimate, attend), x, t)
        else:
            pred_x0 = estimate_x0(x, t, x0_estimate)
        for hook in hooks:
            pred_x0 = hook(pred_x0, t, x, index)
        x0_estimate = pred_x0 if model.self_conditioned else None
        x, pred_x0 = scheduler.step(pred_x0, index, x, generator)
        yield SampleState(index, peaks[index], x, pred_x0)


def sample_chain(model: DiffusionLM, diffusion: GaussianDiffusion, options: SampleOptions, shape: tuple[int, int], *,
                 generator: torch.Generator | None = None, device: torch.device | str = "cpu",
                 start: torch.Tensor | None = None, start_t: int | None = None,
                 hooks: Sequence[Hook] = (), banned: Sequence[int] = (), prefix_cache: bool = True
                 ) -> Iterator[SampleState]:
    """The reverse chain as sampling options (dlm.runs.sample.SampleOptions: steps, spacing, eta,
    x0, clamp, clamp_fraction) describe it: the one way `dlm sample`, the probes and the speed
    benchmark build their chains, so none of them copies the recipe's keys by hand.
    prefix_cache: see `sample_progressive`."""
    return sample_progressive(model, diffusion, shape, options.steps, eta=options.eta, clamp=options.clamp,
                              clamp_fraction=options.clamp_fraction, spacing=options.spacing, generator=generator,
                              device=device, start=start, start_t=start_t, hooks=hooks,
                              decoder=options.decoder, temperature=options.temperature, banned=banned,
                              prefix_cache=prefix_cache, x0=options.x0)


@dataclass(frozen=True, kw_only=True)
class ChainSettings:
    """What one reverse chain is (`sample_progressive`'s keywords, travelling together): its steps
    and how each moves, and for a block chain how a finished block becomes words and whether the
    finished blocks are cached."""

    steps: int
    eta: float = 1.0  # 1 ancestral (DDPM), 0 deterministic DDIM
    clamp: bool = True  # Diffusion-LM's clamping trick (clamp_hook), over the last clamp_fraction of the steps
    clamp_fraction: float = 1.0
    spacing: str = "logsnr"  # which timesteps (dlm.core.schedule.sampling_timesteps)
    x0: str = "predicted"  # what each step moves toward: the prediction, or a kind of X0_HOOKS
    decoder: str = "learned"  # a block chain's finished block: decoded so (gaussian_model.decode),
    temperature: float = 0.0  # at this temperature,
    banned: Sequence[int] = ()  # never to these ids
    prefix_cache: bool = True  # see sample_progressive

    def clamp_from(self, steps: int) -> int:
        """The first step index clamping acts on, of a chain of `steps` steps."""
        return steps - math.ceil(self.clamp_fraction * steps)


# What each sample_x0 but 'predicted' puts in place of the denoiser's x0 (hook builders).
X0_HOOKS = {"expected": lambda model, diffusion: expected_x0_hook(model), "posterior": posterior_x0_hook}


def chain_blocks(diffusion: GaussianDiffusion, length: int) -> int:
    """How many blocks a chain over `length` positions runs one after the other (1: Diffusion-LM);
    each runs the whole chain, so a sample costs blocks x steps denoiser calls."""
    size = diffusion.block_size_for(length)
    return 1 if size is None else length // size


def sample_progressive(model: DiffusionLM, diffusion: GaussianDiffusion, shape: tuple[int, int], steps: int, *,
                       eta: float = 1.0, clamp: bool = True, clamp_fraction: float = 1.0,
                       spacing: str = "logsnr", generator: torch.Generator | None = None,
                       device: torch.device | str = "cpu", start: torch.Tensor | None = None,
                       start_t: int | None = None, hooks: Sequence[Hook] = (), decoder: str = "learned",
                       temperature: float = 0.0, banned: Sequence[int] = (), prefix_cache: bool = True,
                       x0: str = "predicted") -> Iterator[SampleState]:
    """The reverse chain of `steps` steps (see `DiffusionScheduler.set_timesteps`) from pure noise,
    every state yielded: how `dlm sample`, the probes and the speed benchmark all sample.

    eta = 1 is ancestral (DDPM posterior) sampling on the shortened chain, eta = 0 deterministic DDIM.
    clamp: Diffusion-LM's clamping trick (`clamp_hook`), during the last `clamp_fraction` of the
    steps only, after any other `hooks`. A position whose timestep does not change in a step (a
    left-to-right chain's clean or not-yet-started positions) keeps its x.
    start, start_t: begin from this x_t (B, L, d) at timestep start_t instead of pure noise,
    running only the chain's steps below start_t (SDEdit; `dlm.evaluation.probe` uses it).
    x0: what each step moves toward ('predicted', or a kind of X0_HOOKS), before any other hook, so
    that fixed words and clamping act on what the step uses.

    With block diffusion (the objective's block_size below L) the chain runs once per block, left
    to right (`_block_chain`); decoder, temperature and banned then turn each finished block into
    its words (the plain chain leaves that to the caller). prefix_cache: a run trained on every
    block at once runs its finished blocks through the denoiser once, not at every step (the same
    samples to float rounding; False runs the whole prefix at every step, the reference).
    """
    batch, length = shape
    chain = ChainSettings(steps=steps, eta=eta, clamp=clamp, clamp_fraction=clamp_fraction, spacing=spacing, x0=x0,
                          decoder=decoder, temperature=temperature, banned=banned, prefix_cache=prefix_cache)
    block_size = diffusion.block_size_for(length)
    if block_size is not None:
        return _block_chain(model, diffusion, shape, block_size, chain, generator=generator, device=device,
                            start=start, start_t=start_t, hooks=hooks)
    if chain.x0 != "predicted":
        hooks = (X0_HOOKS[chain.x0](model, diffusion), *hooks)
    scheduler = plain_scheduler(diffusion, chain.steps, length, chain.eta, chain.spacing,
                                None if start is None else start_t, device)
    # Drawn even when the chain starts from `start`, so that a seed's later draws do not move.
    x = torch.randn(batch, length, model.embed_dim, generator=generator).to(device)
    if start is not None:
        x = start.to(device)
    if chain.clamp:
        hooks = (*hooks, clamp_hook(model, chain.clamp_from(len(scheduler))))
    return reverse_chain(model, diffusion, scheduler, x, generator, hooks)


def block_context_mask(diffusion: GaussianDiffusion, end: int, block_size: int,
                       device: torch.device | str = "cpu") -> torch.Tensor | None:
    """What the denoiser may read when it denoises the block ending at `end` after the finished
    blocks: everything (None) for a run trained one block at a time, where context and block
    attend to each other; block-causal for one trained on every block at once, whose clean
    positions never read noise (`every_block_mask`)."""
    if diffusion.settings.block_training != "all":
        return None
    return block_causal_mask(end, block_size, device)[None]


def cached_x0(model: DiffusionLM, diffusion: GaussianDiffusion, cache: PrefixCache):
    """reverse_chain's estimate_x0 for a block after a cached clean prefix of P positions: the
    denoiser runs on the block's positions (x[:, P:]) only; the prefix's x0 is its x, its clean
    embedding (which `known_positions_hook` puts there too)."""
    first = cache.length

    def estimate(x: torch.Tensor, t: torch.Tensor, x0_estimate: torch.Tensor | None) -> torch.Tensor:
        block_x = x[:, first:]
        block_t = t[:, first:] if t.ndim == 2 else t
        output = model.denoise(block_x, block_t, cache=cache)
        return torch.cat([x[:, :first].float(), diffusion.x0_from_output(model, output, block_x, block_t)], dim=1)

    return estimate


def from_position_hook(hook: Hook, first: int) -> Hook:
    """A position-wise x0 hook (X0_HOOKS) run on the positions from `first` on: a block chain's
    block, not its finished prefix, whose x0 `known_positions_hook` sets to the clean words anyway."""

    def from_first(pred_x0: torch.Tensor, t: torch.Tensor, x: torch.Tensor, index: int) -> torch.Tensor:
        if first == 0:
            return hook(pred_x0, t, x, index)
        block = hook(pred_x0[:, first:], t[:, first:] if t.ndim == 2 else t, x[:, first:], index)
        return torch.cat([pred_x0[:, :first], block], dim=1)

    return from_first


def plain_scheduler(diffusion: GaussianDiffusion, steps: int, length: int, eta: float = 1.0,
                    spacing: str = "logsnr", start_t: int | None = None,
                    device: torch.device | str = "cpu") -> DiffusionScheduler:
    """The scheduler of a whole-window chain (no blocks): its timesteps and coefficients. Built
    here only, so that a hook that needs the coefficients (classifier guidance) reads the chain's own."""
    scheduler = DiffusionScheduler(diffusion.schedule, eta, diffusion.settings.left_to_right)
    scheduler.set_timesteps(steps, length, spacing, start_t=start_t, device=device)
    return scheduler


def with_fixed_words(block: torch.Tensor, hooks: Sequence[Hook], first: int, end: int) -> torch.Tensor:
    """A finished block's decoded words (B, end - first) with the words a hook fixes there in place
    (`known_positions_hook`): what the later blocks read, whatever the rounding made of them."""
    for hook in hooks:
        fixed = getattr(hook, "fixed_words", None)
        if fixed is not None:
            ids, known = (tensor[:, first:end].to(block.device) for tensor in fixed)
            block = torch.where(known, ids, block)
    return block


def _block_chain(model: DiffusionLM, diffusion: GaussianDiffusion, shape: tuple[int, int], block_size: int,
                 chain: ChainSettings, *, generator: torch.Generator | None, device: torch.device | str,
                 start: torch.Tensor | None, start_t: int | None, hooks: Sequence[Hook]) -> Iterator[SampleState]:
    """Semi-autoregressive block diffusion (SSD-LM): block b runs the whole reverse chain of
    chain.steps steps over the positions 0 .. end of block b, as in training: the finished blocks
    are their words' clean embeddings at t = 0 (`known_positions_hook` keeps their x0, the
    scheduler keeps their x exactly), and the later blocks are left out of the denoiser's input,
    which is what training's attention mask makes of them (and half the cost). When its chain
    ends the block is decoded and its words never change again. States are yielded over the whole
    window (the later blocks' x: their initial noise), indexed on over the blocks.

    A run trained on every block at once reads its finished blocks through a block-causal mask:
    they never read the block being denoised, so with prefix_cache their keys and values are
    computed once, when each block is finished (`DiffusionLM.cache_prefix`), and a step runs only
    the block's own positions (`cached_x0`). A run trained one block per window lets the context
    read the noised block, so its prefix changes with every step and is run every step. The x0
    hook (chain.x0) runs on the block's positions only: the finished blocks' x0 is their clean words."""
    batch, length = shape
    cached = chain.prefix_cache and diffusion.settings.block_training == "all" and not model.self_conditioned
    cache = None
    position_x0 = None if chain.x0 == "predicted" else X0_HOOKS[chain.x0](model, diffusion)
    noise = torch.randn(batch, length, model.embed_dim, generator=generator).to(device)
    initial = noise if start is None else start.to(device)
    decoded = torch.zeros(batch, length, dtype=torch.long, device=device)  # what the rounding made of each block
    words = decoded.clone()  # what the later blocks read: the decoded words, a hook's fixed words in place
    offset = 0
    for first in range(0, length, block_size):
        end = first + block_size
        scheduler = DiffusionScheduler(diffusion.schedule, chain.eta)
        scheduler.set_block_timesteps(chain.steps, first, end, chain.spacing, start_t=None if start is None else start_t,
                                      device=device)
        known = torch.zeros(batch, end, dtype=torch.bool, device=device)
        known[:, :first] = True
        context = words[:, :first].clone()
        block_hooks = (known_positions_hook(model, words[:, :end].clone(), known), *hooks)
        if position_x0 is not None:
            block_hooks = (from_position_hook(position_x0, first), *block_hooks)
        if chain.clamp:
            block_hooks = (*block_hooks, clamp_hook(model, chain.clamp_from(len(scheduler))))
        prefix = model.embed(context).to(initial.dtype)
        x = torch.cat([prefix, initial[:, first:end]], dim=1)
        rest = initial[:, end:]
        attend = block_context_mask(diffusion, end, block_size, device)
        estimate_x0 = None
        if cached and first > 0:
            with torch.inference_mode():  # the newest finished block joins the cache
                cache = model.cache_prefix(prefix[:, first - block_size:], cache)
            estimate_x0 = cached_x0(model, diffusion, cache)
        for state in reverse_chain(model, diffusion, scheduler, x, generator, block_hooks, attend, estimate_x0):
            finished = None
            if state.index == len(scheduler) - 1:
                # decoded as the caller decodes a plain chain's x: in float32, outside the autocast
                with torch.autocast(state.x.device.type, enabled=False):
                    decoded[:, first:end] = decode(model, state.x[:, first:end].float(), chain.decoder,
                                                   chain.temperature, generator, chain.banned)
                words[:, first:end] = with_fixed_words(decoded[:, first:end], hooks, first, end)
                finished = decoded.clone()
            yield SampleState(offset + state.index, state.t, torch.cat([state.x, rest], dim=1),
                              torch.cat([state.pred_x0, rest], dim=1), finished)
        offset += len(scheduler)
