"""The Gaussian family's training objective (Diffusion-LM): the one loss whose terms the config
switches, what the network's output means (x0, epsilon, logits, preconditioned), and CDCD's time
warping of the training timesteps. It knows the model only through `denoise`, `round`, `table`,
`embedding` and `rounding` (dlm.families.gaussian_model.DiffusionLM)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from dlm.core.noise import WindowKeys, per_window
from dlm.core.runtime import all_reduce_sum
from dlm.core.schedule import NoiseSchedule, position_timesteps, q_sample
from dlm.families.blocks import every_block_mask


def mean_flat(x: torch.Tensor) -> torch.Tensor:
    return x.flatten(1).mean(1)


@dataclass(kw_only=True)
class LossSettings:
    """The loss's switches: each field is the Config key of the same name (sections 'gaussian' and
    'blocks')."""
    predict: str = "x0"  # what the network outputs: x0, epsilon, or logits (through the rounding head)
    rounding_weight: float = 1.0
    rounding_target: str = "noisy"  # clean | noisy | predicted
    prior_loss: bool = True
    self_condition: float = 0.0
    left_to_right: float = 0.0  # AR-Diffusion's per-position delay (see position_timesteps)
    time_warp: bool = False  # draw training timesteps where the words' cross-entropy rises (TimeWarp)
    timestep_sampling: str = "uniform"  # uniform, or loss_second_moment (importance sampling: LossSecondMoment)
    block_size: int | None = None  # semi-autoregressive blocks (see GaussianDiffusion.block_size_for)
    block_training: str = "one"  # one block per window (SSD-LM) or all at once (BD3-LM)


PREDICTIONS = ("x0", "epsilon", "logits", "preconditioned")
TIMESTEP_SAMPLING = ("uniform", "loss_second_moment")


class BinnedTimesteps:
    """A density over the training timesteps, measured from the training losses in `bins` equal
    bins of t (the state of TimeWarp and LossSecondMoment): draws pick a bin by `density`, then a
    t uniformly inside it. Subclasses name their per-bin tensors in `state_names` (checkpointed)."""

    name = "timestep sampler"
    state_names: tuple[str, ...] = ()

    def __init__(self, steps: int, bins: int, uniform: float):
        bins = min(bins, steps)  # so that no bin is empty
        self.steps, self.bins, self.uniform = steps, bins, uniform
        # bin k holds the t with floor(t * bins / steps) = k: edges[k] <= t < edges[k + 1]
        self.edges = -torch.div(-torch.arange(bins + 1) * steps, bins, rounding_mode="floor")
        self.widths = torch.diff(self.edges).double()

    def bin_of(self, t: torch.Tensor) -> torch.Tensor:
        return torch.div(t.cpu() * self.bins, self.steps, rounding_mode="floor")

    def density(self) -> torch.Tensor:
        """Probability of each bin (bins,), float64."""
        raise NotImplementedError

    def mixed(self, shape: torch.Tensor, even: torch.Tensor) -> torch.Tensor:
        """`shape` normalised, with a `uniform` share of `even` mixed in (every bin keeps being drawn
        and measured)."""
        return self.uniform * even + (1 - self.uniform) * shape / shape.sum()

    def sample(self, batch: int, generator: torch.Generator | None = None) -> torch.Tensor:
        chosen = torch.multinomial(self.density(), batch, replacement=True, generator=generator)
        low, high = self.edges[chosen], self.edges[chosen + 1]
        return low + (torch.rand(batch, generator=generator, dtype=torch.float64) * (high - low)).long()

    def bin_sums(self, t: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per bin: the sum of `values` (B,) at timesteps t (B,), and how many there were. In a
        distributed run each process holds a shard of the batch: these are the whole batch's, so
        that every process keeps the same state (the one a single process would keep)."""
        bins, values = self.bin_of(t), values.detach().double().cpu()
        total = torch.zeros(self.bins, dtype=torch.float64).index_add_(0, bins, values)
        count = torch.zeros(self.bins, dtype=torch.float64).index_add_(0, bins, torch.ones_like(values))
        sums = all_reduce_sum(torch.stack([total, count]))
        return sums[0], sums[1]

    def state_dict(self) -> dict:
        return {key: getattr(self, key).clone() for key in self.state_names}

    def load_state_dict(self, state: dict) -> None:
        for key in self.state_names:
            mine = getattr(self, key)
            if state[key].shape != mine.shape:
                raise ValueError(f"{self.name} has {len(state[key])} bins, expected {self.bins}")
            setattr(self, key, state[key].clone().to(mine.dtype))


class TimeWarp(BinnedTimesteps):
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

    name = "time warp"
    state_names = ("loss", "seen")

    def __init__(self, steps: int, bins: int = 40, uniform: float = 0.2, decay: float = 0.98):
        super().__init__(steps, bins, uniform)
        self.decay = decay
        self.loss = torch.zeros(self.bins, dtype=torch.float64)
        self.seen = torch.zeros(self.bins, dtype=torch.bool)

    def density(self) -> torch.Tensor:
        """Probability of each bin: uniform until every bin has been measured."""
        even = torch.full((self.bins,), 1.0 / self.bins, dtype=torch.float64)
        if not self.seen.all():
            return even
        curve = torch.cummax(self.loss, dim=0).values
        rise = torch.diff(curve, prepend=curve.new_zeros(1))
        if rise.sum() <= 0:
            return even
        return self.mixed(rise, even)

    def update(self, t: torch.Tensor, loss: torch.Tensor) -> None:
        """Fold a batch's per-sequence losses (B,) at timesteps t (B,) into the curve."""
        total, count = self.bin_sums(t, loss)
        hit = count > 0
        mean = total[hit] / count[hit]
        self.loss[hit] = torch.where(self.seen[hit], self.decay * self.loss[hit] + (1 - self.decay) * mean, mean)
        self.seen |= hit


class LossSecondMoment(BinnedTimesteps):
    """Importance sampling of the training timesteps by the loss's second moment, as
    improved-diffusion's LossSecondMomentResampler does (Nichol & Dhariwal 2021): t has density
    proportional to sqrt(E[loss(t)^2]), so the timesteps whose losses are large and noisy are
    drawn often, and each sequence's loss is weighted by 1 / (T p(t)) (`weights`), so the
    objective's expectation is the uniform one's: the same objective, a lower-variance estimate.

    Measured per bin of `bin_width` timesteps rather than per timestep: with a history of 10
    losses a timestep, T = 2000 timesteps would need about 800 steps at batch 64 before every one
    was measured (uniform draws until then); its 200 bins of 10 are measured in about 65. E[loss^2]
    is a moving average in which each new loss moves the bin's mean by 1 / history of the way
    (about the last `history` losses, improved-diffusion's history of 10 a timestep). The
    `uniform` share keeps every bin measured and bounds every weight by 1 / uniform.
    """

    name = "loss second moment"
    state_names = ("square", "count")

    def __init__(self, steps: int, bin_width: int = 10, uniform: float = 0.05, history: int = 10):
        super().__init__(steps, -(-steps // bin_width), uniform)
        self.history = history
        self.square = torch.zeros(self.bins, dtype=torch.float64)  # the moving E[loss^2] of each bin
        self.count = torch.zeros(self.bins, dtype=torch.float64)  # losses folded into it

    def density(self) -> torch.Tensor:
        """Probability of each bin: uniform in t until every bin holds `history` losses."""
        even = self.widths / self.steps
        if (self.count < self.history).any() or self.square.sum() <= 0:
            return even
        return self.mixed(self.widths * self.square.sqrt(), even)

    def weights(self, t: torch.Tensor) -> torch.Tensor:
        """1 / (T p(t)) for timesteps t (B,) under the current density, float32 on t's device."""
        bins = self.bin_of(t)
        p_t = self.density()[bins] / self.widths[bins]
        return (1.0 / (self.steps * p_t)).float().to(t.device)

    def update(self, t: torch.Tensor, loss: torch.Tensor) -> None:
        """Fold a batch's per-sequence losses (B,) at timesteps t (B,) into E[loss^2]."""
        total, count = self.bin_sums(t, loss.detach().double() ** 2)
        hit = count > 0
        mean = total[hit] / count[hit]
        kept = (1 - 1 / self.history) ** count[hit]  # n new losses: each moves the mean 1 / history
        self.square[hit] = torch.where(self.count[hit] > 0, kept * self.square[hit] + (1 - kept) * mean, mean)
        self.count[hit] += count[hit]


class GaussianDiffusion:
    terms = ("total", "mse", "rounding", "prior")  # what training_losses returns, in log order

    def __init__(self, schedule: NoiseSchedule, settings: LossSettings):
        if settings.predict not in PREDICTIONS:
            raise ValueError(f"predict must be one of {', '.join(PREDICTIONS)}, got '{settings.predict}'.")
        if settings.rounding_target not in ("clean", "noisy", "predicted"):
            raise ValueError(f"rounding_target must be clean, noisy or predicted, got '{settings.rounding_target}'.")
        if settings.timestep_sampling not in TIMESTEP_SAMPLING:
            raise ValueError(f"timestep_sampling must be one of {', '.join(TIMESTEP_SAMPLING)}, "
                             f"got '{settings.timestep_sampling}'.")
        importance = settings.timestep_sampling == "loss_second_moment"
        if (settings.time_warp or importance) and settings.left_to_right > 0:
            raise ValueError("time_warp and timestep_sampling draw one timestep per sequence; they cannot be "
                             "combined with left_to_right.")
        if settings.time_warp and importance:
            raise ValueError("time_warp and timestep_sampling loss_second_moment both choose the training "
                             "timesteps: use one of them.")
        self.schedule = schedule
        self.settings = settings
        self.time_warp = TimeWarp(schedule.steps) if settings.time_warp else None
        self.importance = LossSecondMoment(schedule.steps) if importance else None

    @property
    def timestep_sampler(self) -> BinnedTimesteps | None:
        """The measured density the training timesteps are drawn from (checkpointed), if any."""
        return self.time_warp if self.time_warp is not None else self.importance

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
            # float32 like the rest of the diffusion arithmetic (expected_embedding turns autocast off).
            return model.expected_embedding(output.float())
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

        Timesteps are uniform, or drawn and measured by the time warp or the loss's second moment
        when the run has one and uniform_t is False (validation passes True, so its losses compare
        across runs). Under the second moment's importance sampling every term taken per position
        (mse, rounding) is weighted by 1 / (T p(t)) of its window's t (of its block's, block_training
        all), so each has the uniform draw's expectation; the prior does not depend on t and is not
        weighted.

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
        draws = BatchDraws(ids, generator, keys)
        emb = model.embedding(ids)  # (B, L, d)
        if cfg.rounding_target == "clean":
            x0 = emb  # the seed: diffuse the clean embeddings themselves
        else:
            x0 = emb + s.sigma0 * draws.randn_like(emb)  # x0 ~ q(x0 | w)
        importance = self.importance if not uniform_t else None
        batch = self._noised_batch(ids, emb, x0, draws, importance, uniform_t)
        output = self._denoise(model, batch, draws)
        last = torch.full_like(batch.t, s.steps - 1)
        prior = mean_flat(batch.pick(s.at(s.sqrt_alphas_cumprod, last, x0.ndim) * x0) ** 2).mean()
        terms = (self._logits_terms if cfg.predict == "logits" else self._regression_terms)(model, batch, output)
        if importance is not None:  # reads the losses on the CPU: one sync per step on CUDA
            importance.update(batch.drawn_t.flatten(), terms.unit_loss)
        if self.time_warp is not None and not uniform_t:
            # reads the losses on the CPU: one sync per step on CUDA
            self.time_warp.update(batch.t, self.word_loss_per_sequence(model, terms.decoded, ids))
        total = terms.total + prior if cfg.prior_loss else terms.total
        return {"total": total, "mse": terms.mse, "rounding": terms.rounding, "prior": prior}

    def _noised_batch(self, ids: torch.Tensor, emb: torch.Tensor, x0: torch.Tensor, draws: BatchDraws,
                      importance: LossSecondMoment | None, uniform_t: bool) -> NoisedBatch:
        """The batch's timesteps (and a block run's layout), and x0 noised to them."""
        length = ids.shape[1]
        block_size = self.block_size_for(length)
        every_block = block_size is not None and self.settings.block_training == "all"
        drawn_t = self._draw_timesteps(draws, length, block_size if every_block else None, importance, uniform_t)
        # the drawn timesteps, one per window (B,) or per block (B, blocks), each a unit of the
        # second moment's measurements and weights, 1 / (T p(t))
        batch = NoisedBatch(ids=ids, emb=emb, x0=x0, t=drawn_t, drawn_t=drawn_t, block_size=block_size,
                            weights=importance.weights(drawn_t) if importance is not None else None)
        if every_block:
            batch.every_block = True
            batch.t = drawn_t.repeat_interleave(block_size, dim=1)  # (B, L)
        elif block_size is not None:  # SSD-LM: one block per window
            self._draw_one_block(batch, draws)
        batch.noise = draws.randn_like(x0)
        batch.x_t = q_sample(self.schedule, x0, batch.t, batch.noise)
        if batch.earlier is not None:
            batch.x_t = torch.where(batch.earlier[..., None], emb, batch.x_t)  # the finished blocks: clean, not noised
        return batch

    def _draw_timesteps(self, draws: BatchDraws, length: int, every_block_size: int | None,
                        importance: LossSecondMoment | None, uniform_t: bool) -> torch.Tensor:
        """Each window's timestep (B,); AR-Diffusion's, one per position (B, L); with every block
        trained at once (`every_block_size`), one per block (B, blocks)."""
        s, device = self.schedule, draws.device
        if self.settings.left_to_right > 0:
            progress = draws.draw(lambda n, g: torch.rand((n,), generator=g))
            return position_timesteps(s, progress, length, self.settings.left_to_right).to(device)  # (B, L)
        if every_block_size is not None:  # BD3-LM: each block at its own timestep
            blocks = length // every_block_size
            if importance is not None:
                return draws.draw(lambda n, g: importance.sample(n * blocks, g).view(n, blocks)).to(device)
            return draws.draw(lambda n, g: torch.randint(0, s.steps, (n, blocks), generator=g)).to(device)
        if self.timestep_sampler is not None and not uniform_t:
            return draws.draw(self.timestep_sampler.sample).to(device)
        return draws.draw(lambda n, g: torch.randint(0, s.steps, (n,), generator=g)).to(device)

    def _draw_one_block(self, batch: NoisedBatch, draws: BatchDraws) -> None:
        """SSD-LM: each window's block b. Earlier blocks enter clean (t = 0), later ones are masked
        out of attention (at T - 1); the loss reads block b's positions."""
        length = batch.ids.shape[1]
        current = draws.draw(lambda n, g: torch.randint(0, length // batch.block_size, (n,), generator=g)).to(draws.device)
        block_of = torch.arange(length, device=draws.device) // batch.block_size
        batch.earlier = block_of[None] < current[:, None]  # (B, L)
        batch.in_block = block_of[None] == current[:, None]
        batch.attend = block_of[None] <= current[:, None]  # SSD-LM: context and block, bidirectionally
        batch.t = torch.where(batch.earlier, 0, torch.where(batch.in_block, batch.t[:, None], self.schedule.steps - 1))

    def _denoise(self, model, batch: NoisedBatch, draws: BatchDraws) -> torch.Tensor:
        """The denoiser's output on x_t (every block at once: `denoise_every_block`)."""
        x0_estimate = None
        if self.settings.self_condition > 0:
            # Self-conditioning (Analog Bits): on a share of batches, first predict x0 without
            # gradient and feed that estimate back in as an extra input. One coin per step.
            use = torch.rand((), generator=draws.coin()).item() < self.settings.self_condition
            if use:
                with torch.no_grad():
                    first = model.denoise(batch.x_t, batch.t, None, batch.attend)
                    x0_estimate = self.x0_from_output(model, first, batch.x_t, batch.t).detach()
        if batch.every_block:
            return denoise_every_block(model, batch.x_t, batch.t, batch.emb, batch.block_size)
        return model.denoise(batch.x_t, batch.t, x0_estimate, batch.attend)

    def _rounding_loss(self, model, batch: NoisedBatch, x: torch.Tensor,
                       weights: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The mean CE over the loss's positions, and each position's (weighted only). The same
        value as F.cross_entropy(model.rounding(x), ids), without the (B, L, V) logits."""
        if weights is None:
            return model.rounding.loss(batch.pick(x), batch.pick(batch.ids)), None
        return model.rounding.weighted_loss(batch.pick(x), batch.pick(batch.ids), weights)

    def _logits_terms(self, model, batch: NoisedBatch, output: torch.Tensor) -> LossTerms:
        """predict logits, CDCD's categorical reparameterisation: the denoiser classifies every
        position and is trained by cross-entropy alone; its x0 is the softmax-weighted embedding.
        The MSE of that x0 is reported, not trained (it needs the (B, L, V) logits)."""
        weights = batch.position_weights()
        rounding, rounding_each = self._rounding_loss(model, batch, output, weights)
        with torch.no_grad():
            error = batch.pick(self.x0_from_output(model, output, batch.x_t, batch.t) - batch.x0) ** 2
            mse = mean_flat(error).mean() if weights is None else (error.mean(-1) * weights).mean()
        unit_loss = batch.per_unit(rounding_each) if weights is not None else None
        return LossTerms(total=rounding, mse=mse, rounding=rounding, decoded=output, unit_loss=unit_loss)

    def _regression_terms(self, model, batch: NoisedBatch, output: torch.Tensor) -> LossTerms:
        """predict x0, epsilon or preconditioned: the output regressed onto its target, plus the
        rounding CE on the configured x0."""
        cfg = self.settings
        weights = batch.position_weights()
        pred_x0 = self.x0_from_output(model, output, batch.x_t, batch.t)
        if cfg.predict == "preconditioned":  # EDM's loss weight 1 / c_out^2 makes F's target unit-scale
            skip, out = self.preconditioning(batch.t, batch.x0.ndim)
            target = (batch.x0 - skip * batch.x_t) / out
        else:
            target = batch.x0 if cfg.predict == "x0" else batch.noise
        # Per position, so that t may differ along the sequence; at t = 0 the predicted x0 is
        # scored against EMB(w) itself.
        t_per_position = batch.t if batch.t.ndim == 2 else batch.t[:, None]
        mse_per_position = batch.pick(torch.where(t_per_position == 0, ((pred_x0 - batch.emb) ** 2).mean(-1),
                                                  ((output - target) ** 2).mean(-1)))
        mse = (mse_per_position if weights is None else mse_per_position * weights).mean()
        rounding_input = {"clean": batch.emb, "noisy": batch.x0, "predicted": pred_x0}[cfg.rounding_target]
        rounding, rounding_each = self._rounding_loss(model, batch, rounding_input, weights)
        unit_loss = (None if weights is None
                     else batch.per_unit(mse_per_position.detach() + cfg.rounding_weight * rounding_each))
        return LossTerms(total=mse + cfg.rounding_weight * rounding, mse=mse, rounding=rounding, decoded=pred_x0,
                         unit_loss=unit_loss)


class BatchDraws:
    """Where one batch's random draws come from: each window's own generator when keyed (see
    dlm.core.noise), else `generator`, else torch's global RNG."""

    def __init__(self, ids: torch.Tensor, generator: torch.Generator | None, keys: WindowKeys | None):
        self.windows = keys.generators() if keys is not None else None
        self.generator, self.keys = generator, keys
        self.batch, self.device = ids.shape[0], ids.device

    def randn_like(self, x: torch.Tensor) -> torch.Tensor:
        if self.windows is not None:
            return per_window(self.windows, lambda g: torch.randn(x.shape[1:], generator=g)).to(self.device)
        if self.generator:
            return torch.randn(x.shape, generator=self.generator, device="cpu").to(self.device)
        return torch.randn_like(x)

    def draw(self, sample) -> torch.Tensor:
        """sample(count, generator) -> (count, ...): (batch, ...) of them, per window when keyed."""
        if self.windows is not None:
            return per_window(self.windows, lambda g: sample(1, g)[0])
        return sample(self.batch, self.generator)

    def coin(self) -> torch.Generator | None:
        """The generator of a draw made once per step (self-conditioning's coin)."""
        return self.keys.step_generator() if self.keys is not None else self.generator


@dataclass(kw_only=True)
class NoisedBatch:
    """A batch as the loss sees it: the embeddings, x0 and x_t, the timesteps the denoiser reads
    (t) and those drawn (one per window or per block: the second moment's units, with their
    weights 1 / (T p(t)) under importance sampling), and a block run's layout."""
    ids: torch.Tensor
    emb: torch.Tensor
    x0: torch.Tensor
    t: torch.Tensor
    drawn_t: torch.Tensor
    weights: torch.Tensor | None
    block_size: int | None
    every_block: bool = False  # BD3-LM: every block noised at its own timestep
    attend: torch.Tensor | None = None  # one block (SSD-LM): what each position may read
    earlier: torch.Tensor | None = None  # one block: the finished blocks' positions (entered clean)
    in_block: torch.Tensor | None = None  # one block: the positions the loss is taken over
    noise: torch.Tensor | None = None
    x_t: torch.Tensor | None = None

    def pick(self, z: torch.Tensor) -> torch.Tensor:
        """(B, L, ...) -> the positions the loss is taken over: all of them, or (B, block_size, ...)."""
        if self.in_block is None:
            return z
        return z[self.in_block].view(z.shape[0], self.block_size, *z.shape[2:])

    def position_weights(self) -> torch.Tensor | None:
        """(B, positions the loss is taken over): each its window's or block's weight."""
        if self.weights is None:
            return None
        units = self.weights.view(self.ids.shape[0], -1)
        return units.repeat_interleave(self.pick(self.ids).shape[1] // units.shape[1], dim=1)

    def per_unit(self, each: torch.Tensor) -> torch.Tensor:
        """(B, positions) -> the mean over each window or block, (B * units,)."""
        units = self.weights.view(self.ids.shape[0], -1)
        return each.reshape(*units.shape, -1).mean(-1).flatten()


@dataclass
class LossTerms:
    """What one prediction's terms give the loss (before the prior)."""
    total: torch.Tensor
    mse: torch.Tensor
    rounding: torch.Tensor
    decoded: torch.Tensor  # what the time warp decodes: the logits, or the predicted x0
    unit_loss: torch.Tensor | None  # each window's or block's loss (importance sampling's measurement)


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
