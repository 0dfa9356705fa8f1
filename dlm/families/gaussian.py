"""The Gaussian diffusion family (Diffusion-LM): the model that owns the embedding table, the
denoiser and the rounding decoder; the one training loss; the reverse chain."""

from __future__ import annotations

import collections
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn

from dlm.core.config import Config
from dlm.core.embeddings import CosineRounding, LearnedEmbedding, LearnedRounding, nearest_rows
from dlm.core.nets import PrefixCache, TinyTransformer
from dlm.core.noise import WindowKeys, per_window
from dlm.core.runtime import all_reduce_sum, autocast
from dlm.core.schedule import NoiseSchedule, position_timesteps, q_sample
from dlm.core.scheduler import DiffusionScheduler


def mean_flat(x: torch.Tensor) -> torch.Tensor:
    return x.flatten(1).mean(1)


@dataclass
class LossSettings:
    """The loss's switches: each field is the Config key of the same name (section 'diffusion')."""
    predict: str = "x0"  # what the network outputs: x0, epsilon, or logits (through the rounding head)
    rounding_weight: float = 1.0
    rounding_target: str = "noisy"  # clean | noisy | predicted
    prior_loss: bool = True
    self_condition: float = 0.0
    left_to_right: float = 0.0  # AR-Diffusion's per-position delay (see position_timesteps)
    time_warp: bool = False  # draw training timesteps where the words' cross-entropy rises (TimeWarp)
    block_size: int | None = None  # semi-autoregressive blocks (see GaussianDiffusion.block_size_for)
    block_training: str = "one"  # one block per window (SSD-LM) or all at once (BD3-LM)


PREDICTIONS = ("x0", "epsilon", "logits", "preconditioned")


class TimeWarp:
    """CDCD-style time warping (Dieleman et al. 2022): draw training timesteps where the loss is
    still changing with t instead of uniformly.

    CDCD learns a monotone map from uniform u to t so that the cross-entropy is linear in u: t then
    has density proportional to dCE/dt. Here that curve is measured, not learned: an exponential
    moving average of each sequence's word cross-entropy (`word_loss_per_sequence`) in `bins`
    equal bins of t, made monotone. Below the band where words are chosen it is near zero and
    flat; at pure noise the prediction is the mean embedding and it flattens again; both ends get
    few draws. A `uniform` share of the draws stays uniform, so every bin keeps being measured.
    (The x0 MSE would be the cheaper signal, but it rises evenly over all t and warps nothing.)
    """

    def __init__(self, steps: int, bins: int = 40, uniform: float = 0.2, decay: float = 0.98):
        bins = min(bins, steps)  # so that no bin is empty
        self.steps, self.bins, self.uniform, self.decay = steps, bins, uniform, decay
        # bin k holds the t with floor(t * bins / steps) = k: edges[k] <= t < edges[k + 1]
        self.edges = -torch.div(-torch.arange(bins + 1) * steps, bins, rounding_mode="floor")
        self.loss = torch.zeros(bins, dtype=torch.float64)
        self.seen = torch.zeros(bins, dtype=torch.bool)

    def bin_of(self, t: torch.Tensor) -> torch.Tensor:
        return torch.div(t.cpu() * self.bins, self.steps, rounding_mode="floor")

    def density(self) -> torch.Tensor:
        """Probability of each bin: uniform until every bin has been measured."""
        even = torch.full((self.bins,), 1.0 / self.bins, dtype=torch.float64)
        if not self.seen.all():
            return even
        curve = torch.cummax(self.loss, dim=0).values
        rise = torch.diff(curve, prepend=curve.new_zeros(1))
        if rise.sum() <= 0:
            return even
        return self.uniform * even + (1 - self.uniform) * rise / rise.sum()

    def sample(self, batch: int, generator: torch.Generator | None = None) -> torch.Tensor:
        chosen = torch.multinomial(self.density(), batch, replacement=True, generator=generator)
        low, high = self.edges[chosen], self.edges[chosen + 1]
        return low + (torch.rand(batch, generator=generator, dtype=torch.float64) * (high - low)).long()

    def update(self, t: torch.Tensor, loss: torch.Tensor) -> None:
        """Fold a batch's per-sequence losses (B,) at timesteps t (B,) into the curve."""
        bins, loss = self.bin_of(t), loss.detach().double().cpu()
        total = torch.zeros(self.bins, dtype=torch.float64).index_add_(0, bins, loss)
        count = torch.zeros(self.bins, dtype=torch.float64).index_add_(0, bins, torch.ones_like(loss))
        # In a distributed run each process holds a shard of the batch: fold in the whole batch,
        # so that every process keeps the same curve (the one a single process would keep).
        sums = all_reduce_sum(torch.stack([total, count]))
        total, count = sums[0], sums[1]
        hit = count > 0
        mean = total[hit] / count[hit]
        self.loss[hit] = torch.where(self.seen[hit], self.decay * self.loss[hit] + (1 - self.decay) * mean, mean)
        self.seen |= hit

    def state_dict(self) -> dict:
        return {"loss": self.loss.clone(), "seen": self.seen.clone()}

    def load_state_dict(self, state: dict) -> None:
        if state["loss"].shape != self.loss.shape:
            raise ValueError(f"time warp has {len(state['loss'])} bins, expected {self.bins}")
        self.loss, self.seen = state["loss"].clone().double(), state["seen"].clone().bool()


class GaussianDiffusion:
    terms = ("total", "mse", "rounding", "prior")  # what training_losses returns, in log order

    def __init__(self, schedule: NoiseSchedule, settings: LossSettings):
        if settings.predict not in PREDICTIONS:
            raise ValueError(f"predict must be one of {', '.join(PREDICTIONS)}, got '{settings.predict}'.")
        if settings.rounding_target not in ("clean", "noisy", "predicted"):
            raise ValueError(f"rounding_target must be clean, noisy or predicted, got '{settings.rounding_target}'.")
        if settings.time_warp and settings.left_to_right > 0:
            raise ValueError("time_warp draws one timestep per sequence; it cannot be combined with left_to_right.")
        self.schedule = schedule
        self.settings = settings
        self.time_warp = TimeWarp(schedule.steps) if settings.time_warp else None

    @property
    def steps(self) -> int:
        return self.schedule.steps

    def block_size_for(self, length: int) -> int | None:
        """The block size of semi-autoregressive block diffusion (SSD-LM, BD3-LM) for windows of
        `length` tokens, or None when the whole window is one block (Diffusion-LM: every position
        noised together, the plain path, untouched)."""
        size = self.settings.block_size
        if size is None or size >= length:
            return None
        if size < 1 or length % size:
            raise ValueError(f"block_size ({size}) must divide the window length ({length}).")
        if self.settings.left_to_right > 0 or self.time_warp is not None:
            raise ValueError("block_size below the window length cannot be combined with left_to_right or time_warp.")
        return size

    def x0_from_output(self, model, output: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if self.settings.predict == "x0":
            return output
        if self.settings.predict == "preconditioned":
            skip, out = self.preconditioning(t, x_t.ndim)
            return skip * x_t + out * output
        if self.settings.predict == "logits":
            # Score interpolation (CDCD): the expected embedding under the rounding softmax, in
            # float32 like the rest of the diffusion arithmetic.
            with torch.autocast(output.device.type, enabled=False):
                return torch.softmax(model.round(output.float()), dim=-1) @ model.table().float()
        s = self.schedule
        return ((x_t - s.at(s.sqrt_one_minus_alphas_cumprod, t, x_t.ndim) * output)
                / s.at(s.sqrt_alphas_cumprod, t, x_t.ndim))

    def preconditioning(self, t: torch.Tensor, ndim: int) -> tuple[torch.Tensor, torch.Tensor]:
        """EDM's c_skip and c_out (Karras et al. 2022) at timesteps t, for predict 'preconditioned':
        x0 = c_skip x_t + c_out F(x_t, t). In EDM's terms x_t / sqrt(a) = x0 + sigma eps with
        sigma^2 = (1 - a) / a (a = alpha_bar), and with sigma_data = 1 (the scale of embedding rows of
        norm sqrt(d)) its c_in is 1 on x_t, c_skip sqrt(a) and c_out sqrt(1 - a). As the noise
        vanishes c_skip x_t tends to x_t / sqrt(a), x_t itself rescaled: the denoiser gets the
        identity for free and learns only the correction (F is then minus the v of v-prediction)."""
        s = self.schedule
        return s.at(s.sqrt_alphas_cumprod, t, ndim), s.at(s.sqrt_one_minus_alphas_cumprod, t, ndim)

    @torch.no_grad()
    def word_loss_per_sequence(self, model, decoded: torch.Tensor, ids: torch.Tensor, positions: int = 4) -> torch.Tensor:
        """The rounding decoder's cross-entropy on `positions` evenly spread positions of each
        sequence, (B,): how well the words are known at each sequence's t (the time warp's signal;
        a few positions keep the (B, positions, V) logits small)."""
        picked = torch.linspace(0, ids.shape[1] - 1, min(positions, ids.shape[1])).round().long().to(ids.device)
        logits = model.round(decoded[:, picked]).float()
        return F.cross_entropy(logits.transpose(1, 2), ids[:, picked], reduction="none").mean(1)

    def training_losses(self, model, ids: torch.Tensor, generator: torch.Generator | None = None,
                        uniform_t: bool = False, keys: WindowKeys | None = None) -> dict[str, torch.Tensor]:
        """The one loss. Returns every term (scalars): mse, rounding, prior, total.

        Timesteps are uniform, or drawn and measured by the time warp when the run has one and
        uniform_t is False (validation passes True, so its losses compare across runs).

        What is drawn (the timesteps, the noise, the self-conditioning coin) comes from `keys` when
        given (training and validation pass them): each window's from its own generator seeded by
        (seed, step, its index in the global batch), the coin from the step's, so a batch split over
        processes draws exactly what it draws whole. Else from `generator`, else torch's global RNG.

        mse: ||f(x_t, t) - target||^2 with target x0 (or epsilon), and at t = 0 the predicted x0
        against EMB(w); rounding: CE of the rounding decoder on the configured x0; prior (tT):
        ||sqrt(alpha_bar_T) x0||^2, which keeps the table from growing without bound.

        Block diffusion (block_size below the window), block_training one (SSD-LM): each window
        also draws a block b (after its timestep). The positions of earlier blocks enter clean,
        EMB(w) at t = 0; block b's are noised to t as usual; later blocks are masked out of
        attention (and put at T - 1), so their words cannot matter. Every term is taken over block
        b's positions only. block_training all (BD3-LM): every block is noised at its own timestep
        and each reads the earlier blocks clean from a clean copy of the window
        (`denoise_every_block`); every term is taken over every position.
        """
        cfg, s = self.settings, self.schedule
        device = ids.device
        emb = model.embedding(ids)  # (B, L, d)
        batch = ids.shape[0]

        windows = keys.generators() if keys is not None else None

        def randn_like(x):
            if windows is not None:
                return per_window(windows, lambda g: torch.randn(x.shape[1:], generator=g)).to(device)
            return torch.randn(x.shape, generator=generator, device="cpu").to(device) if generator else torch.randn_like(x)

        def draw(sample):  # sample(count, generator) -> (count,): (batch,) of them, per window when keyed
            if windows is not None:
                return per_window(windows, lambda g: sample(1, g)[0])
            return sample(batch, generator)

        if cfg.rounding_target == "clean":
            x0 = emb  # the seed: diffuse the clean embeddings themselves
        else:
            x0 = emb + s.sigma0 * randn_like(emb)  # x0 ~ q(x0 | w)
        length = ids.shape[1]
        block_size = self.block_size_for(length)
        every_block = block_size is not None and cfg.block_training == "all"
        one_block = block_size is not None and not every_block  # SSD-LM: one block per window
        if cfg.left_to_right > 0:
            progress = draw(lambda n, g: torch.rand((n,), generator=g))
            t = position_timesteps(s, progress, ids.shape[1], cfg.left_to_right).to(device)  # (B, L)
        elif every_block:  # BD3-LM: each block at its own timestep
            t = draw(lambda n, g: torch.randint(0, s.steps, (n, length // block_size), generator=g)).to(device)
            t = t.repeat_interleave(block_size, dim=1)  # (B, L)
        elif self.time_warp is not None and not uniform_t:
            t = draw(self.time_warp.sample).to(device)
        else:
            t = draw(lambda n, g: torch.randint(0, s.steps, (n,), generator=g)).to(device)
        attend = None
        pick = _identity  # the positions the loss is taken over: all of them, or the current block's
        if one_block:
            current = draw(lambda n, g: torch.randint(0, length // block_size, (n,), generator=g)).to(device)
            block_of = torch.arange(length, device=device) // block_size
            earlier = block_of[None] < current[:, None]  # (B, L)
            in_block = block_of[None] == current[:, None]
            attend = block_of[None] <= current[:, None]  # SSD-LM: context and block, bidirectionally
            t = torch.where(earlier, 0, torch.where(in_block, t[:, None], s.steps - 1))

            def pick(z):  # (B, L, ...) -> (B, block_size, ...)
                return z[in_block].view(batch, block_size, *z.shape[2:])
        noise = randn_like(x0)
        x_t = q_sample(s, x0, t, noise)
        if one_block:
            x_t = torch.where(earlier[..., None], emb, x_t)  # the finished blocks: clean, not noised

        x0_estimate = None
        if cfg.self_condition > 0:
            # Self-conditioning (Analog Bits): on a share of batches, first predict x0 without
            # gradient and feed that estimate back in as an extra input. One coin per step.
            coin = keys.step_generator() if keys is not None else generator
            use = torch.rand((), generator=coin).item() < cfg.self_condition
            if use:
                with torch.no_grad():
                    x0_estimate = self.x0_from_output(model, model.denoise(x_t, t, None, attend), x_t, t).detach()
        if every_block:
            output = denoise_every_block(model, x_t, t, emb, block_size)
        else:
            output = model.denoise(x_t, t, x0_estimate, attend)
        last = torch.full_like(t, s.steps - 1)
        prior = mean_flat(pick(s.at(s.sqrt_alphas_cumprod, last, x0.ndim) * x0) ** 2).mean()

        if cfg.predict == "logits":
            # CDCD's categorical reparameterisation: the denoiser classifies every position and is
            # trained by cross-entropy alone; its x0 is the softmax-weighted embedding. The MSE of
            # that x0 is reported, not trained (it needs the (B, L, V) logits).
            rounding = model.rounding.loss(pick(output), pick(ids))
            with torch.no_grad():
                mse = mean_flat(pick(self.x0_from_output(model, output, x_t, t) - x0) ** 2).mean()
            total = rounding
        else:
            pred_x0 = self.x0_from_output(model, output, x_t, t)
            if cfg.predict == "preconditioned":  # EDM's loss weight 1 / c_out^2 makes F's target unit-scale
                skip, out = self.preconditioning(t, x0.ndim)
                target = (x0 - skip * x_t) / out
            else:
                target = x0 if cfg.predict == "x0" else noise
            # Per position, so that t may differ along the sequence; at t = 0 the predicted x0 is
            # scored against EMB(w) itself.
            t_per_position = t if t.ndim == 2 else t[:, None]
            mse = pick(torch.where(t_per_position == 0, ((pred_x0 - emb) ** 2).mean(-1),
                                   ((output - target) ** 2).mean(-1))).mean()
            rounding_input = {"clean": emb, "noisy": x0, "predicted": pred_x0}[cfg.rounding_target]
            # The same value as F.cross_entropy(model.rounding(x), ids), without the (B, L, V) logits.
            rounding = model.rounding.loss(pick(rounding_input), pick(ids))
            total = mse + cfg.rounding_weight * rounding
        if self.time_warp is not None and not uniform_t:
            decoded = output if cfg.predict == "logits" else pred_x0
            # reads the losses on the CPU: one sync per step on CUDA
            self.time_warp.update(t, self.word_loss_per_sequence(model, decoded, ids))
        if cfg.prior_loss:
            total = total + prior
        return {"total": total, "mse": mse, "rounding": rounding, "prior": prior}


def _identity(z: torch.Tensor) -> torch.Tensor:
    return z


def block_causal_mask(length: int, block_size: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """(L, L) bool: position q may read position k when k's block is not after q's."""
    block = torch.arange(length, device=device) // block_size
    return block[None, :] <= block[:, None]


def every_block_mask(length: int, block_size: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """(2L, 2L) bool over [noised window, clean window] (BD3-LM's training mask): a noised
    position reads its own block's noised positions and the clean positions of earlier blocks;
    a clean position reads the clean positions of its own and earlier blocks, never noise. So
    each block sees what it sees when it is sampled: the finished blocks clean, itself noised."""
    block = torch.arange(length, device=device) // block_size
    same, earlier = block[None, :] == block[:, None], block[None, :] < block[:, None]
    top = torch.cat([same, earlier], dim=1)
    bottom = torch.cat([torch.zeros_like(same), block_causal_mask(length, block_size, device)], dim=1)
    return torch.cat([top, bottom], dim=0)


def denoise_every_block(model, x_t: torch.Tensor, t: torch.Tensor, emb: torch.Tensor, block_size: int) -> torch.Tensor:
    """The denoiser's output for every block of x_t (B, L, d) at once, each block at its own
    timesteps t (B, L), given the earlier blocks clean: one pass over the noised window beside the
    clean one (EMB(w) at t = 0, at the same positions) under `every_block_mask`."""
    length = x_t.shape[1]
    inputs = torch.cat([x_t, emb.to(x_t.dtype)], dim=1)
    timesteps = torch.cat([t, torch.zeros_like(t)], dim=1)
    positions = torch.arange(length, device=x_t.device).repeat(2)
    mask = every_block_mask(length, block_size, x_t.device)[None]
    return model.denoise(inputs, timesteps, None, mask, positions)[:, :length]


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
    the prediction itself. Measured on the default run (docs/results.md, "Fidelity"): the raw x0 is
    a blend the rounding reads right, but ancestral steps toward it drift off the table, and the
    chain from held-out x_400 kept 70% of the words its first step knew 94% of; with this x0 it
    keeps what the first step knows. It is the soft form of clamping (clamping takes the argmax row),
    so at high noise, where the softmax is broad, it stays a blend and does not snap to punctuation."""
    table = None

    def expected(pred_x0: torch.Tensor, t: torch.Tensor, x: torch.Tensor, index: int) -> torch.Tensor:
        nonlocal table
        if table is None:  # once per chain, inside the chain's autocast like the steps
            table = model.table()
        # float32 like the rest of the diffusion arithmetic
        with torch.autocast(pred_x0.device.type, enabled=False):
            return torch.softmax(model.round(pred_x0.float()).float(), dim=-1) @ table.float()

    return expected


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
        return torch.where(known.to(pred_x0.device)[..., None], clean, pred_x0)

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


def sample_chain(model: DiffusionLM, diffusion: GaussianDiffusion, options, shape: tuple[int, int],
                 generator: torch.Generator | None = None, device: torch.device | str = "cpu",
                 start: torch.Tensor | None = None, start_t: int | None = None,
                 hooks: Sequence[Hook] = (), banned: Sequence[int] = (), prefix_cache: bool = True
                 ) -> Iterator[SampleState]:
    """The reverse chain as sampling options (dlm.runs.sample.SampleOptions: steps, spacing, eta,
    x0, clamp, clamp_fraction) describe it: the one way `dlm sample`, the probes and the speed
    benchmark build their chains, so none of them copies the recipe's keys by hand.
    prefix_cache: see `sample_progressive`."""
    if options.x0 == "expected":  # first, so that fixed words and clamping act on what the step uses
        hooks = (expected_x0_hook(model), *hooks)
    return sample_progressive(model, diffusion, shape, options.steps, eta=options.eta, clamp=options.clamp,
                              clamp_fraction=options.clamp_fraction, spacing=options.spacing, generator=generator,
                              device=device, start=start, start_t=start_t, hooks=hooks,
                              decoder=options.decoder, temperature=options.temperature, banned=banned,
                              prefix_cache=prefix_cache)


def chain_blocks(diffusion: GaussianDiffusion, length: int) -> int:
    """How many blocks a chain over `length` positions runs one after the other (1: Diffusion-LM);
    each runs the whole chain, so a sample costs blocks x steps denoiser calls."""
    size = diffusion.block_size_for(length)
    return 1 if size is None else length // size


def sample_progressive(model: DiffusionLM, diffusion: GaussianDiffusion, shape: tuple[int, int], steps: int,
                       eta: float = 1.0, clamp: bool = True, clamp_fraction: float = 1.0,
                       spacing: str = "logsnr", generator: torch.Generator | None = None,
                       device: torch.device | str = "cpu", start: torch.Tensor | None = None,
                       start_t: int | None = None, hooks: Sequence[Hook] = (), decoder: str = "learned",
                       temperature: float = 0.0, banned: Sequence[int] = (), prefix_cache: bool = True
                       ) -> Iterator[SampleState]:
    """The reverse chain of `steps` steps (see `DiffusionScheduler.set_timesteps`) from pure noise,
    every state yielded: how `dlm sample`, the probes and the speed benchmark all sample.

    eta = 1 is ancestral (DDPM posterior) sampling on the shortened chain, eta = 0 deterministic DDIM.
    clamp: Diffusion-LM's clamping trick (`clamp_hook`), during the last `clamp_fraction` of the
    steps only, after any other `hooks`. A position whose timestep does not change in a step (a
    left-to-right chain's clean or not-yet-started positions) keeps its x.
    start, start_t: begin from this x_t (B, L, d) at timestep start_t instead of pure noise,
    running only the chain's steps below start_t (SDEdit; `dlm.evaluation.probe` uses it).

    With block diffusion (the objective's block_size below L) the chain runs once per block, left
    to right (`_block_chain`); decoder, temperature and banned then turn each finished block into
    its words (the plain chain leaves that to the caller). prefix_cache: a run trained on every
    block at once runs its finished blocks through the denoiser once, not at every step (the same
    samples to float rounding; False runs the whole prefix at every step, the reference).
    """
    batch, length = shape
    block_size = diffusion.block_size_for(length)
    if block_size is not None:
        return _block_chain(model, diffusion, shape, block_size, steps, eta, clamp, clamp_fraction, spacing,
                            generator, device, start, start_t, hooks, decoder, temperature, banned, prefix_cache)
    scheduler = plain_scheduler(diffusion, steps, length, eta, spacing, None if start is None else start_t, device)
    # Drawn even when the chain starts from `start`, so that a seed's later draws do not move.
    x = torch.randn(batch, length, model.embed_dim, generator=generator).to(device)
    if start is not None:
        x = start.to(device)
    if clamp:
        hooks = (*hooks, clamp_hook(model, len(scheduler) - math.ceil(clamp_fraction * len(scheduler))))
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


def plain_scheduler(diffusion: GaussianDiffusion, steps: int, length: int, eta: float = 1.0,
                    spacing: str = "logsnr", start_t: int | None = None,
                    device: torch.device | str = "cpu") -> DiffusionScheduler:
    """The scheduler of a whole-window chain (no blocks): its timesteps and coefficients. Built
    here only, so that a hook that needs the coefficients (classifier guidance) reads the chain's own."""
    scheduler = DiffusionScheduler(diffusion.schedule, eta, diffusion.settings.left_to_right)
    scheduler.set_timesteps(steps, length, spacing, start_t=start_t, device=device)
    return scheduler


def _block_chain(model: DiffusionLM, diffusion: GaussianDiffusion, shape: tuple[int, int], block_size: int,
                 steps: int, eta: float, clamp: bool, clamp_fraction: float, spacing: str,
                 generator: torch.Generator | None, device: torch.device | str, start: torch.Tensor | None,
                 start_t: int | None, hooks: Sequence[Hook], decoder: str, temperature: float,
                 banned: Sequence[int], prefix_cache: bool = True) -> Iterator[SampleState]:
    """Semi-autoregressive block diffusion (SSD-LM): block b runs the whole reverse chain of
    `steps` steps over the positions 0 .. end of block b, as in training: the finished blocks
    are their words' clean embeddings at t = 0 (`known_positions_hook` keeps their x0, the
    scheduler keeps their x exactly), and the later blocks are left out of the denoiser's input,
    which is what training's attention mask makes of them (and half the cost). When its chain
    ends the block is decoded and its words never change again. States are yielded over the whole
    window (the later blocks' x: their initial noise), indexed on over the blocks.

    A run trained on every block at once reads its finished blocks through a block-causal mask:
    they never read the block being denoised, so with prefix_cache their keys and values are
    computed once, when each block is finished (`DiffusionLM.cache_prefix`), and a step runs only
    the block's own positions (`cached_x0`). A run trained one block per window lets the context
    read the noised block, so its prefix changes with every step and is run every step."""
    batch, length = shape
    cached = prefix_cache and diffusion.settings.block_training == "all" and not model.self_conditioned
    cache = None
    noise = torch.randn(batch, length, model.embed_dim, generator=generator).to(device)
    initial = noise if start is None else start.to(device)
    words = torch.zeros(batch, length, dtype=torch.long, device=device)
    offset = 0
    for first in range(0, length, block_size):
        end = first + block_size
        scheduler = DiffusionScheduler(diffusion.schedule, eta)
        scheduler.set_block_timesteps(steps, first, end, spacing, start_t=None if start is None else start_t,
                                      device=device)
        known = torch.zeros(batch, end, dtype=torch.bool, device=device)
        known[:, :first] = True
        context = words[:, :first].clone()
        block_hooks = (known_positions_hook(model, words[:, :end].clone(), known), *hooks)
        if clamp:
            block_hooks = (*block_hooks, clamp_hook(model, len(scheduler) - math.ceil(clamp_fraction * len(scheduler))))
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
                    words[:, first:end] = decode(model, state.x[:, first:end].float(), decoder, temperature,
                                                     generator, banned)
                finished = words.clone()
            yield SampleState(offset + state.index, state.t, torch.cat([state.x, rest], dim=1),
                              torch.cat([state.pred_x0, rest], dim=1), finished)
        offset += len(scheduler)


class DiffusionLM(nn.Module):
    """Everything trained jointly: EMB(w), the denoiser f(x_t, t) and the rounding p(w | x)."""

    def __init__(self, config: Config, vocab_size: int, pretrained_embeddings: torch.Tensor | None = None):
        super().__init__()
        d = config.embed_dim
        self.embedding = LearnedEmbedding(
            vocab_size, d, pretrained_embeddings, trainable=config.use_learned_embeddings,
            norm=config.embedding_norm, init_std=config.embedding_init_std, scale=config.embedding_scale,
        )
        self.self_conditioned = config.self_condition > 0
        # With self-conditioning the denoiser also reads its previous x0 estimate, concatenated.
        self.denoiser = TinyTransformer(
            d, config.width, config.depth, config.heads, config.seq_len, config.dropout,
            in_dim=2 * d if self.self_conditioned else d,
        )
        tied = self.embedding if config.rounding == "tied" else None
        self.rounding = LearnedRounding(d, vocab_size, tied_embedding=tied)

    def denoise(self, x_t: torch.Tensor, t: torch.Tensor, x0_estimate: torch.Tensor | None = None,
                attend: torch.Tensor | None = None, positions: torch.Tensor | None = None,
                cache: PrefixCache | None = None) -> torch.Tensor:
        """attend: what each position may read, (B, L) or (B or 1, L, L) bool (block diffusion's
        masks); positions (L,): each input's window position; cache: a clean prefix x_t reads
        (`cache_prefix`; TinyTransformer.forward)."""
        if self.self_conditioned:
            if x0_estimate is None:
                x0_estimate = torch.zeros_like(x_t)
            x_t = torch.cat([x_t, x0_estimate], dim=-1)
        # float32 out whatever autocast ran inside, so the diffusion arithmetic stays float32.
        return self.denoiser(x_t, t, attend, positions, cache).float()

    def cache_prefix(self, clean: torch.Tensor, cache: PrefixCache | None = None) -> PrefixCache:
        """`cache` grown by the clean embeddings (B, L, d) of the words after it, at t = 0, as a
        block-causal mask shows finished blocks (TinyTransformer.cache_prefix)."""
        if self.self_conditioned:  # the prefix would read an x0 estimate that changes every step
            raise ValueError("A prefix cache needs a denoiser without self-conditioning.")
        t = torch.zeros(clean.shape[0], dtype=torch.long, device=clean.device)
        return self.denoiser.cache_prefix(clean, t, cache)

    # The rest of the denoiser interface: what samplers and probes use instead of the modules.

    @property
    def embed_dim(self) -> int:
        return self.embedding.embed_dim

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """EMB(w): token ids (..., L) to vectors (..., L, d)."""
        return self.embedding(ids)

    def table(self) -> torch.Tensor:
        """The embedding table as the diffusion sees it, (V, d)."""
        return self.embedding.table()

    def round(self, x: torch.Tensor) -> torch.Tensor:
        """The rounding decoder p(w | x): vectors (..., d) to logits (..., V)."""
        return self.rounding(x)

    def rounding_bias(self) -> torch.Tensor:
        """The rounding decoder's per-word bias (V,): where a vector that carries nothing lands."""
        return self.rounding.output_bias


# --- the family interface (see dlm.families) ---------------------------------------------------

NAME = "diffusion"
SCORES_TOKENS = False  # no exact likelihood: the NLL bound is the closest thing
SUPPORTS = frozenset({"likelihood_bound", "infill", "prefix", "length", "guidance", "latent", "temperature",
                      "geometry"})
SAMPLE_OPTIONS = frozenset({"steps", "spacing", "clamp", "clamp_fraction", "eta", "x0", "temperature", "unk",
                            "decoder", "seed", "batch_size", "num_samples", "record_every"})


def check_config(config: Config) -> None:
    """Every key means something to the Gaussian family (Config's own checks cover their values)."""


def new_model(config: Config, vocab_size: int, pretrained: torch.Tensor | None = None) -> DiffusionLM:
    return DiffusionLM(config, vocab_size, pretrained)


def objective(config: Config) -> GaussianDiffusion:
    # LossSettings' fields are diffusion keys of the Config, read by name
    settings = LossSettings(**{f.name: getattr(config, f.name) for f in fields(LossSettings)})
    return GaussianDiffusion(NoiseSchedule(config.schedule, config.diffusion_steps), settings)


def trunk(model: DiffusionLM) -> nn.Module:
    return model.denoiser


@torch.inference_mode()
def rounding_logits(model: DiffusionLM, x0: torch.Tensor, decoder: str = "learned",
                    banned: Sequence[int] = ()) -> torch.Tensor:
    """Vectors (B, L, d) to float32 scores (B, L, V): the learned rounding's logits or the cosine
    baseline's similarities (what `decode` takes the argmax of, and constrained decoding masks),
    the `banned` ids' scores -inf."""
    logits = (model.round(x0) if decoder == "learned" else CosineRounding(model.embedding)(x0)).float()
    if banned:
        logits[..., list(banned)] = -torch.inf
    return logits


@torch.inference_mode()
def decode(model: DiffusionLM, x0: torch.Tensor, decoder: str = "learned", temperature: float = 0.0,
           generator: torch.Generator | None = None, banned: Sequence[int] = ()) -> torch.Tensor:
    """Vectors (B, L, d) to token ids (B, L): the learned rounding (argmax, or drawn at a
    temperature) or the cosine baseline, never a `banned` id."""
    logits = rounding_logits(model, x0, decoder, banned)
    if decoder == "cosine" or temperature == 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits / temperature, dim=-1).cpu()
    flat = torch.multinomial(probs.view(-1, probs.shape[-1]), 1, generator=generator)
    return flat.view(logits.shape[:-1]).to(x0.device)


def batch_chains(run, options, count: int, generator: torch.Generator, device: torch.device | str = "cpu",
                 hooks_for: Callable[[int, int], Sequence[Hook]] | None = None) -> Iterator[tuple[int, Iterator[SampleState]]]:
    """`count` samples of `run` as options describe them, in batches of options.batch_size:
    (index of the batch's first sample, its chain's states advanced under the run's autocast).
    hooks_for(first, size): the hooks of that batch's chain. Each chain is built (its noise drawn)
    only when the previous batch is done, so what the caller draws in between keeps its order."""
    for first in range(0, count, options.batch_size):
        size = min(options.batch_size, count - first)
        hooks = hooks_for(first, size) if hooks_for is not None else ()
        states = sample_chain(run.model, run.objective, options, (size, run.config.seq_len), generator, device,
                              hooks=hooks, banned=options.banned_ids(run.tokenizer))
        yield first, _under_autocast(states, run.config.precision, device)


def last_state(states: Iterator[SampleState]) -> SampleState:
    """Run a chain to its end, keeping only the final state."""
    return collections.deque(states, maxlen=1)[0]


def final_words(run, state: SampleState, options, generator: torch.Generator | None) -> torch.Tensor:
    """A chain's last state as token ids (B, L) on the CPU: a block chain's words as each block was
    decoded when it finished, else x decoded with the options' decoder, temperature and ban."""
    if state.words is not None:
        return state.words.cpu()
    return decode(run.model, state.x, options.decoder, options.temperature, generator,
                  options.banned_ids(run.tokenizer)).cpu()


def generate(run, options, generator: torch.Generator, device: torch.device | str = "cpu") -> tuple[torch.Tensor, list[dict]]:
    """`run` (model, objective, config) sampled: options.num_samples samples (N, L) in batches of
    options.batch_size, and the trajectory of decoded states every options.record_every steps
    (frames [{"index", "t", "ids"}])."""
    model = run.model
    options.validate(run.objective.steps)
    all_ids, trajectory = [], []
    total = options.steps * chain_blocks(run.objective, run.config.seq_len)
    banned = options.banned_ids(run.tokenizer)  # the slider's frames too
    for first, states in batch_chains(run, options, options.num_samples, generator, device):
        for state in states:
            last = state.index == total - 1
            if options.record_every and (state.index % options.record_every == 0 or last):
                _record(trajectory, first, state.index, state.t,
                        decode(model, state.pred_x0, options.decoder, banned=banned).cpu())
        all_ids.append(final_words(run, state, options, generator))
    return torch.cat(all_ids), trajectory


def _under_autocast(states, precision: str, device):
    """Advance the reverse chain under the run's autocast (bf16 with precision bf16, or auto on
    CUDA); what the caller does with each state (decoding) runs outside it, in float32."""
    while True:
        with autocast(precision, device):
            state = next(states, None)
        if state is None:
            return
        yield state


def _record(trajectory: list[dict], first: int, index: int, t: int, ids: torch.Tensor) -> None:
    """Frames are per step; later batches append their rows to the frame of the same step."""
    if first == 0:
        trajectory.append({"index": index, "t": t, "ids": ids.tolist()})
    else:
        frame = next(f for f in trajectory if f["index"] == index)
        frame["ids"].extend(ids.tolist())


def fill(run, ids: torch.Tensor, known: torch.Tensor, options, generator: torch.Generator,
         device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Control: windows ids (N, L) generated where `known` (L,) is False, through the reverse
    chain with `known_positions_hook` (Diffusion-LM's replacement method), in batches; the words
    and the final rounding scores (N, L, V) (for constraints applied after the chain)."""
    def hooks_for(first: int, size: int) -> list:
        return [known_positions_hook(run.model, ids[first: first + size].to(device), known.expand(size, -1).to(device))]

    words, scores = [], []
    for _, states in batch_chains(run, options, len(ids), generator, device, hooks_for):
        state = last_state(states)
        words.append(final_words(run, state, options, generator))
        scores.append(rounding_logits(run.model, state.x, options.decoder, options.banned_ids(run.tokenizer)).cpu())
    return torch.cat(words), torch.cat(scores)
