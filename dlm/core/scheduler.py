"""The reverse chain's steps (DDPM and DDIM), in the diffusers scheduler style: `set_timesteps`
once, then `step` per chain step. It knows nothing of networks: `step` is given the predicted x0
(the family turns the network's output, x0, epsilon or logits, into x0 before the step; see
`GaussianDiffusion.x0_from_output`)."""

from __future__ import annotations

import torch

from dlm.core.schedule import NoiseSchedule, position_timesteps, sampling_timesteps


class DiffusionScheduler:
    """x_t -> x_s on a shortened chain, s the chain's next timestep (improved-diffusion's DDIM step):

        eps = (x_t - sqrt(a_t) x0) / sqrt(1 - a_t)
        x_s = sqrt(a_s) x0 + sqrt(1 - a_s - sigma^2) eps + sigma z,
        sigma = eta sqrt((1 - a_s) / (1 - a_t) (1 - a_t / a_s)),

    a = alpha_bar. eta = 1 is ancestral (the DDPM posterior) sampling, eta = 0 deterministic DDIM.
    Every coefficient is computed once per chain step by `set_timesteps`.
    """

    def __init__(self, schedule: NoiseSchedule, eta: float = 1.0, left_to_right: float = 0.0):
        self.schedule = schedule
        self.eta = eta
        self.left_to_right = left_to_right  # AR-Diffusion's per-position delay (see position_timesteps)
        self.timesteps: torch.Tensor | None = None  # (steps, L), set by set_timesteps
        self.frozen: torch.Tensor | None = None  # positions each step keeps (set_block_timesteps)

    @classmethod
    def from_config(cls, config) -> DiffusionScheduler:
        """The run's own noise schedule, eta and left-to-right skew (a dlm.core.config.Config)."""
        return cls(NoiseSchedule(config.schedule, config.diffusion_steps), config.sample_eta, config.left_to_right)

    def set_timesteps(self, steps: int, length: int = 1, spacing: str = "logsnr", start_t: int | None = None,
                      device: torch.device | str = "cpu") -> None:
        """The chain's timesteps per step and position, (steps, L), from T-1 to 0, and the step
        coefficients between each row and the next.

        Every position shares `sampling_timesteps` unless the scheduler runs left to right; then the
        chain's progress runs evenly from 0 to 1 and `position_timesteps` spreads it over the
        positions (the spacing does not apply: its t is linear, as in training).
        start_t: the chain starts from an x_t at start_t (SDEdit) and keeps only the timesteps
        below it; the chain may then be shorter than `steps`.
        """
        if self.left_to_right > 0:
            if steps < 2:
                raise ValueError("A left-to-right chain needs at least 2 sampling steps.")
            if start_t is not None:
                raise ValueError("A chain from a given x_t needs one timestep for every position (left_to_right 0).")
            timesteps = position_timesteps(self.schedule, torch.linspace(0, 1, steps), length, self.left_to_right)
        else:
            timesteps = torch.tensor(sampling_timesteps(self.schedule, steps, spacing))[:, None].expand(steps, length)
        if start_t is not None:
            timesteps = torch.cat([torch.full_like(timesteps[:1], start_t), timesteps[timesteps[:, 0] < start_t]])
        self.frozen = None
        self._set_rows(timesteps, device)

    def set_block_timesteps(self, steps: int, start: int, end: int, spacing: str = "logsnr",
                            start_t: int | None = None, device: torch.device | str = "cpu") -> None:
        """A chain over the positions start..end-1 of a window of `end` positions (one block of
        semi-autoregressive block diffusion): those run the chain set_timesteps would give them,
        the earlier positions (finished blocks, clean) stay at t = 0 and keep their x exactly."""
        if self.left_to_right > 0:
            raise ValueError("Block diffusion chains need left_to_right 0.")
        chain = torch.tensor(sampling_timesteps(self.schedule, steps, spacing))
        if start_t is not None:
            chain = torch.cat([torch.tensor([start_t]), chain[chain < start_t]])
        timesteps = torch.zeros(len(chain), end, dtype=torch.long)
        timesteps[:, start:] = chain[:, None]
        self._set_rows(timesteps, device)
        # Step i leaves these positions as they are (B, L, 1): the step's arithmetic at a_t = a_s
        # returns x only up to rounding, and a finished block must not move at all.
        self.frozen = (timesteps[:-1] == timesteps[1:])[..., None].to(device)

    def _set_rows(self, timesteps: torch.Tensor, device: torch.device | str) -> None:
        self.timesteps = timesteps.to(device)

        # Step i goes from row i (a_t) to row i + 1 (a_s); (steps - 1, L, 1), broadcast over (B, L, d).
        alpha_bar = self.schedule.alphas_cumprod[timesteps][..., None]
        a_t, a_s = alpha_bar[:-1], alpha_bar[1:]
        sigma = self.eta * ((1 - a_s) / (1 - a_t) * (1 - a_t / a_s)).clamp_min(0).sqrt()
        self.sqrt_alpha_bar = a_t.sqrt().to(device)
        self.sqrt_one_minus_alpha_bar = (1 - a_t).sqrt().to(device)
        self.sqrt_alpha_bar_next = a_s.sqrt().to(device)
        self.direction = (1 - a_s - sigma**2).clamp_min(0).sqrt().to(device)  # the weight of eps in x_s
        self.sigma = sigma.to(device)

    def __len__(self) -> int:
        return len(self.timesteps)

    def step(self, pred_x0: torch.Tensor, index: int, x: torch.Tensor,
             generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Chain step `index` (the row of `timesteps` x is at): (x at the next row, pred_x0).

        The step is named by its index, not its t: a left-to-right chain's t is a row of per-position
        values. The last step returns the clean estimate itself. The noise is drawn on the CPU from
        `generator`, so a seed gives the same chain on every device.
        """
        if self.timesteps is None:
            raise RuntimeError("Call set_timesteps before step.")
        if index == len(self.timesteps) - 1:
            return pred_x0, pred_x0
        # The same arithmetic in the same order as the formula above, so a seed keeps its samples.
        eps = (x - self.sqrt_alpha_bar[index] * pred_x0) / self.sqrt_one_minus_alpha_bar[index]
        x_next = self.sqrt_alpha_bar_next[index] * pred_x0 + self.direction[index] * eps
        if self.eta > 0:
            x_next = x_next + self.sigma[index] * torch.randn(x.shape, generator=generator).to(x.device)
        if self.frozen is not None:
            x_next = torch.where(self.frozen[index], x, x_next)
        return x_next, pred_x0
