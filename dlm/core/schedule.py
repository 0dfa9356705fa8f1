"""The noise schedule: every per-timestep quantity of the Gaussian forward process, q_sample, and
which timesteps a shortened reverse chain visits. It knows nothing of networks or tokens."""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch


def betas_for_alpha_bar(steps: int, alpha_bar: Callable[[float], float], max_beta: float = 0.999) -> np.ndarray:
    """Discretise a continuous alpha_bar(s), s in [0, 1], into per-step betas (improved-diffusion)."""
    betas = [min(1 - alpha_bar((i + 1) / steps) / alpha_bar(i / steps), max_beta) for i in range(steps)]
    return np.array(betas, dtype=np.float64)


def make_betas(name: str, steps: int) -> np.ndarray:
    if name == "sqrt":  # Diffusion-LM: alpha_bar(s) = 1 - sqrt(s + 1e-4); noise rises fast early on
        return betas_for_alpha_bar(steps, lambda s: 1 - math.sqrt(s + 1e-4))
    if name == "cosine":  # improved-diffusion
        return betas_for_alpha_bar(steps, lambda s: math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2)
    if name == "linear":  # DDPM's 1e-4..2e-2 at T=1000, rescaled so other T keep the same shape
        scale = 1000 / steps
        return np.linspace(scale * 1e-4, scale * 2e-2, steps, dtype=np.float64)
    raise ValueError(f"Unknown noise schedule '{name}': use sqrt, linear or cosine.")


class NoiseSchedule:
    """Every per-timestep quantity, precomputed once (index t = 0 .. T-1)."""

    def __init__(self, name: str = "sqrt", steps: int = 2000):
        self.name = name
        self.steps = steps
        betas = make_betas(name, steps)
        alphas_cumprod = np.cumprod(1.0 - betas)
        self.betas = torch.tensor(betas, dtype=torch.float32)
        self.alphas_cumprod = torch.tensor(alphas_cumprod, dtype=torch.float32)
        self.sqrt_alphas_cumprod = self.alphas_cumprod.sqrt()
        self.sqrt_one_minus_alphas_cumprod = (1.0 - self.alphas_cumprod).sqrt()

    @property
    def sigma0(self) -> float:
        """Std of q(x0 | w) = EMB(w) + sigma0 * noise: the noise level of the first step."""
        return float(self.sqrt_one_minus_alphas_cumprod[0])

    def at(self, values: torch.Tensor, t: torch.Tensor, ndim: int) -> torch.Tensor:
        """Gather per-timestep values for t, (B,) or per position (B, L), broadcast to `ndim` dims."""
        out = values.to(t.device)[t]
        return out.view(*t.shape, *([1] * (ndim - t.ndim)))


def q_sample(schedule: NoiseSchedule, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """x_t = sqrt(alpha_bar_t) x0 + sqrt(1 - alpha_bar_t) noise."""
    return (schedule.at(schedule.sqrt_alphas_cumprod, t, x0.ndim) * x0
            + schedule.at(schedule.sqrt_one_minus_alphas_cumprod, t, x0.ndim) * noise)


def position_timesteps(schedule: NoiseSchedule, progress: torch.Tensor, length: int, skew: float) -> torch.Tensor:
    """Per-position timesteps (..., L) at chain progress in [0, 1] (0: pure noise, 1: clean).

    AR-Diffusion (Wu et al. 2023): position i runs the chain late by skew * i / (L - 1) of it, so
    at any moment the words to its left are less noisy than it is, and generation sweeps from
    left to right. Each position's noise fraction is clip(1 - (1 + skew) progress + skew i/(L-1)),
    linear in t; skew = 0 puts every position at (T - 1)(1 - progress).
    """
    place = torch.arange(length, dtype=torch.float64) / max(length - 1, 1)
    fraction = 1 - (1 + skew) * progress.double()[..., None] + skew * place
    return torch.round(fraction.clamp(0, 1) * (schedule.steps - 1)).long()


SPACINGS = ("logsnr", "logsnr_full", "quadratic", "uniform")

# Where `logsnr` spacing stops spacing: log(alpha_bar / (1 - alpha_bar)) = -5, alpha_bar = 0.0067, so
# the words' embedding is 8% of x_t's amplitude. Below it the input is noise for the denoiser, yet a
# clipped last beta (sqrt, cosine) can stretch the range below it far past the rest: the sqrt
# schedule at T = 2000 falls from -5 to -15 within its last 28 timesteps, where `logsnr_full`
# spends about half of its steps.
LOGSNR_FLOOR = -5.0


def sampling_timesteps(schedule: NoiseSchedule, steps: int, spacing: str = "logsnr") -> list[int]:
    """`steps` distinct timesteps of `schedule`, from T-1 down to 0 (one step: just 0).

    logsnr: T-1 (the chain starts from pure noise), then the other steps evenly spaced in
    log(alpha_bar / (1 - alpha_bar)), the signal-to-noise ratio's log (as DPM-Solver spaces its
    steps), from the higher of LOGSNR_FLOOR and the log-SNR of T-2 down to t = 0;
    logsnr_full: evenly over the schedule's whole log-SNR range, T-1 included, which under a
    clipped last beta crowds the steps into the last timesteps (kept to compare against);
    quadratic: t_i = (T-1) (i / (steps-1))^2 (the DDIM paper); uniform: an even stride
    (Diffusion-LM's respacing). Under the sqrt schedule the uniform stride jumps from t = T/steps
    straight to 0, across the low-noise end where the words are chosen. Measurements of each
    against steps: docs/journal.md ("Sampling steps against quality").
    """
    total_steps = schedule.steps
    if not 1 <= steps <= total_steps:
        raise ValueError(f"Sampling steps must be between 1 and {total_steps}, got {steps}.")
    if spacing not in SPACINGS:
        raise ValueError(f"Unknown timestep spacing '{spacing}': use {', '.join(SPACINGS)}.")
    if spacing in ("logsnr", "logsnr_full"):
        alpha_bar = schedule.alphas_cumprod.double().clamp(1e-12, 1 - 1e-12).numpy()
        log_snr = np.log(alpha_bar / (1 - alpha_bar))  # falls with t
        if spacing == "logsnr_full" or steps == 1 or total_steps < 3:
            spaced, lowest = steps, log_snr[-1]
        else:  # T-1 is added below; the rest end at the floor
            spaced, lowest = steps - 1, max(LOGSNR_FLOOR, log_snr[-2])
        targets = log_snr[0] + np.linspace(0, 1, spaced) * (lowest - log_snr[0])
        positions = np.interp(-targets, -log_snr, np.arange(total_steps))  # interp wants rising x
        if spaced < steps:
            positions = np.append(positions, total_steps - 1)
    else:
        grid = np.linspace(0, 1, steps)
        positions = (total_steps - 1) * (grid if spacing == "uniform" else grid**2)
    ts = np.rint(positions).astype(int)
    # Rounding merges neighbours at the dense end: push each one up past its predecessor, then
    # each one down below its successor, so there are exactly `steps` distinct values in range.
    for i in range(1, steps):
        ts[i] = max(ts[i], ts[i - 1] + 1)
    for i in range(steps - 1, -1, -1):
        ts[i] = min(ts[i], total_steps - steps + i)
    return ts[::-1].tolist()
