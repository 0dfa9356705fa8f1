"""The Gaussian family's classifier guidance, at its sampler's one hook point (Diffusion-LM sec. 5.2,
plug-and-play control; dlm.runs.guidance asks for it through the family contract).

The paper, at every reverse step t -> t-1, takes a few Adagrad steps on x_{t-1} toward

    lambda * log p(x_{t-1} | x_t) + log p(c | x_{t-1}),

p(x_{t-1} | x_t) = N(mu_theta(x_t, t), sigma_t^2) the denoiser's own step (the fluency term) and
p(c | x_{t-1}) a classifier on noised latents. What `guidance_hook` implements is that objective
written in the hook's variable, the predicted x0. The step's mean is affine in x0,

    mu(z) = sqrt(a_s) z + dir * (x_t - sqrt(a_t) z) / sqrt(1 - a_t)       (DiffusionScheduler.step)

so moving z moves the mean of x_{t-1}, and the Gaussian term of the moved mean is

    log p(mu(z) | x_t) = -||mu(z) - mu(x0_hat)||^2 / (2 sigma_t^2)   (+ const).

Per chain step the hook starts at z = x0_hat (the denoiser's prediction) and
takes `inner_steps` torch.optim.Adagrad steps of learning rate `strength` (a fresh optimizer each
chain step, as the reference code does) minimising, summed over the batch,

    -log p(c | mu(z), s) + fluency * ||mu(z) - mu(x0_hat)||^2 / (2 sigma_t^2),

s the chain's next timestep (the classifier reads the latent at x_{t-1}'s noise level); at the
last step, which returns x0 itself, mu(z) = z, s = 0 and sigma_t is q(x0 | w)'s sigma0. The
scheduler then steps with the returned z: x_{t-1} = mu(z) + sigma_t * noise. Differences from the
paper: the gradient moves the mean of x_{t-1} before the step's noise is added rather than the
drawn x_{t-1} (the hook runs before the step), and the classifier reads that mean. With eta = 0
(sigma_t = 0) the Gaussian term's variance is 1 - a_s instead. `fluency` is the paper's lambda;
`strength` is Adagrad's step (the reference code's step_size): Adagrad's first step moves every
coordinate by about `strength` whatever the loss's scale, so it is the knob that sets how far
guidance may pull.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from dlm.core.errors import UserError
from dlm.core.scheduler import DiffusionScheduler
from dlm.families.contract import FLUENCY, LoadedRun, SampleOptions
from dlm.families.gaussian_sampling import Hook, chain_blocks, plain_scheduler


def check_guidance(run: LoadedRun) -> None:
    """A run whose chain classifier guidance can steer: one timestep per step for every position,
    over the whole window."""
    if run.objective.settings.left_to_right > 0:
        raise UserError("Classifier guidance needs one timestep per step for every position; this run samples "
                        "left to right (left_to_right > 0).")
    if chain_blocks(run.objective, run.config.seq_len) > 1:
        raise UserError("Classifier guidance steers one chain over the whole window; this run samples in blocks "
                        f"(block_size {run.config.block_size}): guide a run trained without block_size.")


def chain_scheduler(run: LoadedRun, options: SampleOptions) -> DiffusionScheduler:
    """The scheduler sample_chain builds for `options` (gaussian_sampling.plain_scheduler, the same one)."""
    check_guidance(run)
    return plain_scheduler(run.objective, options.steps, run.config.seq_len, options.eta, options.spacing)


def guidance_hook(classifier: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], scheduler: DiffusionScheduler,
                  strength: float, fluency: float = FLUENCY, inner_steps: int = 3, target: int = 1) -> Hook:
    """The hook described in the module docstring; `scheduler` as the chain's (chain_scheduler);
    classifier(x, t) gives the logits (B, classes) of latents x at timesteps t."""
    if strength < 0 or fluency < 0 or inner_steps < 0:
        raise UserError("guidance strength, fluency and inner_steps must be 0 or more.")
    timesteps = scheduler.timesteps[:, 0].tolist()
    last = len(timesteps) - 1

    def guide(pred_x0: torch.Tensor, t: torch.Tensor, x: torch.Tensor, index: int) -> torch.Tensor:
        if strength == 0 or inner_steps == 0:
            return pred_x0
        if int(t.reshape(-1)[0]) != timesteps[index]:  # built for another chain: its coefficients would be wrong
            raise RuntimeError(f"guidance hook out of step with the chain: t {int(t.reshape(-1)[0])} at step {index}, "
                               f"expected {timesteps[index]}")
        device = pred_x0.device
        if index == last:
            # the last step returns x0 itself: the classifier reads z at t = 0, and the fluency term
            # is q(x0 | w)'s spread sigma0 around the prediction
            coefficients = (1.0, 0.0, 0.0, 1.0)
            variance, next_t = scheduler.schedule.sigma0 ** 2, 0
        else:
            coefficients = tuple(c[index].to(device) for c in (
                scheduler.sqrt_alpha_bar_next, scheduler.direction, scheduler.sqrt_alpha_bar,
                scheduler.sqrt_one_minus_alpha_bar))
            sigma = float(scheduler.sigma[index].max())
            variance = sigma**2 if sigma > 0 else float(1 - coefficients[0].max() ** 2)
            next_t = timesteps[index + 1]
        sqrt_a_s, direction, sqrt_a_t, sqrt_1m_a_t = coefficients
        s = torch.full((x.shape[0],), next_t, device=device, dtype=torch.long)
        # reverse_chain runs under inference_mode (and maybe autocast): gradients need both off, and
        # tensors cloned out of inference mode.
        with torch.inference_mode(False), torch.enable_grad(), torch.autocast(device.type, enabled=False):
            x_t = x.detach().clone().float()
            x0_hat = pred_x0.detach().clone().float()

            def mean(z):
                return sqrt_a_s * z + direction * (x_t - sqrt_a_t * z) / sqrt_1m_a_t

            anchor = mean(x0_hat)
            z = x0_hat.clone().requires_grad_(True)
            optimizer = torch.optim.Adagrad([z], lr=strength)
            for _ in range(inner_steps):
                optimizer.zero_grad(set_to_none=True)
                mu = mean(z)
                gaussian = ((mu - anchor) ** 2).flatten(1).sum(1) / (2 * variance)
                log_prob = torch.log_softmax(classifier(mu, s).float(), -1)[:, target]  # log p(target | mu, s)
                loss = (-log_prob + fluency * gaussian).sum()
                loss.backward()
                optimizer.step()
            return z.detach().to(pred_x0.dtype)

    return guide
