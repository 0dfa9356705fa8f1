"""The scheduler's maths against closed forms written out here, and the pipeline around it."""

import math

import pytest
import torch

from dlm.core.config import load_config
from dlm.core.schedule import NoiseSchedule
from dlm.core.scheduler import DiffusionScheduler
from dlm.families.gaussian_model import DiffusionLM
from dlm.families.gaussian_sampling import reverse_chain, sample_progressive
from dlm.runs.build import build_objective


def two_step_chain(eta: float) -> tuple[DiffusionScheduler, list[float]]:
    """A 3-row chain 9 -> 4 -> 0 on a T = 10 sqrt schedule: two updates, then the final step."""
    schedule = NoiseSchedule("sqrt", 10)
    scheduler = DiffusionScheduler(schedule, eta=eta)
    scheduler.set_timesteps(3, length=4, spacing="quadratic")  # round(9 * [0, 1/4, 1]) = 0, 2, 9
    assert scheduler.timesteps[:, 0].tolist() == [9, 2, 0]
    return scheduler, [float(schedule.alphas_cumprod[t]) for t in (9, 2, 0)]


def inputs() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return torch.randn(2, 4, 3, generator=generator), 3 * torch.randn(2, 4, 3, generator=generator)


# Within 1e-4, not 1e-6: at t = 9 alpha_bar is 5e-5, and the step's float32 sqrt(1 - a_s - sigma^2)
# loses digits to cancellation (up to 2e-5 over 200 draws). A wrong coefficient is off by O(1).
@pytest.mark.parametrize("index", [0, 1])
def test_ddim_step_is_the_closed_form(index):
    scheduler, alpha_bar = two_step_chain(eta=0.0)
    a_t, a_s = alpha_bar[index], alpha_bar[index + 1]
    x0, x = inputs()
    # DDIM (Song et al. 2021, eq. 12 with sigma 0): keep the implied noise, move x0 to the next level.
    eps = (x - math.sqrt(a_t) * x0) / math.sqrt(1 - a_t)
    expected = math.sqrt(a_s) * x0 + math.sqrt(1 - a_s) * eps
    x_next, pred_x0 = scheduler.step(x0, index, x)
    assert torch.allclose(x_next, expected, atol=1e-4) and torch.equal(pred_x0, x0)


@pytest.mark.parametrize("index", [0, 1])
def test_ddpm_step_is_the_posterior_mean_plus_its_noise(index):
    scheduler, alpha_bar = two_step_chain(eta=1.0)
    a_t, a_s = alpha_bar[index], alpha_bar[index + 1]
    x0, x = inputs()
    # q(x_s | x_t, x0) of the shortened chain (DDPM eq. 7 with alpha_t -> a_t / a_s)
    beta = 1 - a_t / a_s
    mean = (math.sqrt(a_s) * beta / (1 - a_t)) * x0 + (math.sqrt(a_t / a_s) * (1 - a_s) / (1 - a_t)) * x
    std = math.sqrt((1 - a_s) / (1 - a_t) * beta)
    z = torch.randn(x.shape, generator=torch.Generator().manual_seed(3))
    x_next, _ = scheduler.step(x0, index, x, torch.Generator().manual_seed(3))
    assert torch.allclose(x_next, mean + std * z, atol=1e-4)


def test_the_last_step_returns_the_prediction():
    for eta in (0.0, 1.0):
        scheduler, _ = two_step_chain(eta)
        x0 = torch.randn(2, 4, 3)
        x_next, pred_x0 = scheduler.step(x0, 2, torch.randn(2, 4, 3))
        assert torch.equal(x_next, x0) and torch.equal(pred_x0, x0)


def test_a_chain_from_a_given_timestep_keeps_only_the_rows_below_it():
    scheduler = DiffusionScheduler(NoiseSchedule("sqrt", 100), eta=0.0)
    scheduler.set_timesteps(10, length=2, spacing="uniform", start_t=50)
    assert scheduler.timesteps[:, 0].tolist() == [50, 44, 33, 22, 11, 0] and scheduler.timesteps.shape == (6, 2)
    left_to_right = DiffusionScheduler(NoiseSchedule("sqrt", 100), left_to_right=1.0)
    with pytest.raises(ValueError, match="left_to_right"):
        left_to_right.set_timesteps(10, length=2, start_t=50)


def test_from_config_takes_the_runs_schedule_and_eta():
    config = load_config(None, diffusion_steps=30, sample_steps=30, schedule="cosine", sample_eta=0.5)
    scheduler = DiffusionScheduler.from_config(config)
    assert scheduler.schedule.steps == 30 and scheduler.schedule.name == "cosine" and scheduler.eta == 0.5


def toy(predict="x0"):
    config = load_config(None, embed_dim=8, width=16, depth=1, heads=2, seq_len=6, diffusion_steps=50,
                         schedule="cosine", sample_steps=50, predict=predict, dropout=0.0)
    torch.manual_seed(0)
    return DiffusionLM(config, vocab_size=11).eval(), build_objective(config)


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_a_perfect_denoiser_brings_the_chain_back_to_the_data(eta, monkeypatch):
    """The denoiser predicts epsilon and knows x0: it returns the noise that x_t holds. The chain
    must invert that (x0_from_output) and end on the data; with eta 0 it keeps the noise eps that
    x_T holds: x_s = sqrt(a_s) x0 + sqrt(1 - a_s) eps at every state."""
    model, diffusion = toy(predict="epsilon")
    ac = diffusion.schedule.alphas_cumprod
    data = torch.randn(2, 6, 8)

    def perfect(x_t, t, x0_estimate=None, attend=None):
        a = ac[t].view(-1, 1, 1)
        return (x_t - a.sqrt() * data) / (1 - a).sqrt()

    monkeypatch.setattr(model, "denoise", perfect)
    states = list(sample_progressive(model, diffusion, (2, 6), 8, eta=eta, clamp=False, spacing="uniform",
                                     generator=torch.Generator().manual_seed(0)))
    assert torch.allclose(states[-1].x, data, atol=1e-4)
    assert all(torch.allclose(s.pred_x0, data, atol=1e-3) for s in states)
    if eta == 0:
        x_start = torch.randn(2, 6, 8, generator=torch.Generator().manual_seed(0))  # the chain's first draw
        a_start = ac[states[0].t]
        eps = (x_start - a_start.sqrt() * data) / (1 - a_start).sqrt()  # the noise x_T holds, kept by DDIM
        for state, t_next in zip(states[:-1], [s.t for s in states[1:]]):
            a = float(ac[t_next])
            assert torch.allclose(state.x, math.sqrt(a) * data + math.sqrt(1 - a) * eps, atol=1e-4)

def test_the_hook_sees_every_step_once_and_the_step_uses_what_it_returns():
    model, diffusion = toy()
    scheduler = DiffusionScheduler(diffusion.schedule, eta=0.0)
    scheduler.set_timesteps(5, length=6, spacing="uniform")
    replacements = [torch.full((2, 6, 8), float(i)) for i in range(5)]
    calls = []

    def hook(pred_x0, t, x, index):
        calls.append((index, t.tolist(), x.clone()))
        return replacements[index]

    x = torch.randn(2, 6, 8)
    states = list(reverse_chain(model, diffusion, scheduler, x, hooks=[hook]))
    expected_t = [[t, t] for t in scheduler.timesteps[:, 0].tolist()]
    assert [(i, t) for i, t, _ in calls] == list(enumerate(expected_t))
    assert torch.equal(calls[0][2], x) and all(torch.equal(c[2], s.x) for c, s in zip(calls[1:], states))
    for state, replacement, (index, _, x_t) in zip(states, replacements, calls):
        assert torch.equal(state.pred_x0, replacement)
        assert torch.equal(state.x, scheduler.step(replacement, index, x_t)[0])
    assert torch.equal(states[-1].x, replacements[-1])


def test_clamping_is_a_hook_after_the_others():
    model, diffusion = toy()
    table = model.table().detach()
    far = torch.full((2, 6, 8), 100.0)
    states = list(sample_progressive(model, diffusion, (2, 6), 4, clamp=True, clamp_fraction=0.5,
                                     hooks=[lambda pred_x0, t, x, index: far]))
    nearest_to_far = table[((far[0, 0] - table) ** 2).sum(-1).argmin()]
    assert all(torch.equal(s.pred_x0, far) for s in states[:2])
    assert all(torch.equal(s.pred_x0, nearest_to_far.expand(2, 6, 8)) for s in states[2:])


def test_known_positions_hook_keeps_the_fixed_words_through_the_chain():
    from dlm.families.gaussian_sampling import known_positions_hook, sample_chain
    from dlm.runs.sample import SampleOptions

    config = load_config(None, seq_len=6, embed_dim=8, width=16, depth=1, heads=2, diffusion_steps=50,
                         sample_steps=10)
    torch.manual_seed(0)
    model, diffusion = DiffusionLM(config, 12).eval(), build_objective(config)
    ids = torch.tensor([[3, 4, 5, 6, 7, 8]])
    known = torch.tensor([[True, False, False, True, False, True]])
    options = SampleOptions.from_config(config, steps=10, clamp=False)
    states = list(sample_chain(model, diffusion, options, (1, 6), generator=torch.Generator().manual_seed(0),
                               hooks=[known_positions_hook(model, ids, known)]))
    clean = model.embed(ids)
    for state in states:  # the step used the clean words ...
        assert torch.allclose(state.pred_x0[known], clean[known])
    # ... so the chain ends on them exactly, while the free positions are the untrained model's own
    assert torch.allclose(states[-1].x[known], clean[known])
    assert not torch.allclose(states[-1].x[~known], clean[~known], atol=1e-2)
