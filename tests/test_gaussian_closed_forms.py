"""The Gaussian presets' maths at timesteps above 0, each against the textbook closed form written
out here, never against the code's own tables: the noise schedule (Diffusion-LM's sqrt schedule,
DDPM's linear betas), q(x_t | x_0), the x_0 an epsilon prediction implies, the DDPM posterior
q(x_{t-1} | x_t, x_0) (Ho et al. 2020, eq. 6-7) as the likelihood bound and the ancestral step use it,
and the posterior x0 (`sample_x0: posterior`) that the presets' sampling steps move toward.

Code index t = 0 .. T-1 is the papers' t + 1: alpha_bar[t] = prod_{i <= t} (1 - beta_i), and
alpha_bar[-1] = 1 stands before the first step."""

import math

import numpy as np
import pytest
import torch

from dlm.core.config import load_config
from dlm.core.schedule import NoiseSchedule, q_sample
from dlm.core.scheduler import DiffusionScheduler
from dlm.families.gaussian_bound import BoundTerms
from dlm.families.gaussian_model import DiffusionLM
from dlm.families.gaussian_objective import GaussianDiffusion, LossSettings
from dlm.families.gaussian_sampling import posterior_x0_hook, sample_progressive

from .conftest import ROOT

# The presets whose sampling steps move toward the posterior x0, and the epsilon-predicting seed recipe.
POSTERIOR_PRESETS = ("default.yaml", "blocks1.yaml")
PRESETS = (*POSTERIOR_PRESETS, "seed_naive.yaml")


# The schedule's tables are float32, which keeps 1 - alpha_bar to about 1e-7: a few parts in 1e4 of it
# where it is small (1e-4 at the linear schedule's t = 0), and coefficients built on it hold no better.
# A dropped factor or a swapped coefficient is off by far more at every t tested.
FLOAT32_TABLES = 1e-3


def close(got: torch.Tensor, expected: torch.Tensor, tolerance: float) -> bool:
    """got within tolerance of expected, relative to expected's largest entry."""
    return float((got.double() - expected).abs().max()) <= tolerance * float(expected.abs().max())


def preset(name: str):
    return load_config(ROOT / "params" / name)


def paper_betas(name: str, steps: int) -> np.ndarray:
    """The betas as the papers define them, float64. sqrt (Diffusion-LM, Li et al. 2022):
    alpha_bar(s) = 1 - sqrt(s + 1e-4) on s in [0, 1], discretised as improved-diffusion does,
    beta_i = 1 - alpha_bar((i + 1) / T) / alpha_bar(i / T) capped at 0.999 (alpha_bar(1) < 0 there).
    linear (DDPM): 1e-4 .. 2e-2 evenly over T = 1000, scaled by 1000 / T."""
    if name == "sqrt":
        f = [1 - math.sqrt(i / steps + 1e-4) for i in range(steps + 1)]
        return np.array([min(1 - f[i + 1] / f[i], 0.999) for i in range(steps)])
    assert name == "linear", name
    return np.linspace(1e-4, 2e-2, steps) * 1000 / steps


class PaperSchedule:
    """beta_t, alpha_t = 1 - beta_t and alpha_bar_t, float64, from `paper_betas`."""

    def __init__(self, name: str, steps: int):
        self.steps = steps
        self.beta = paper_betas(name, steps)
        self.alpha = 1 - self.beta
        self.alpha_bar = np.cumprod(self.alpha)

    def bar(self, t: int) -> float:
        """alpha_bar at code index t, with alpha_bar = 1 before the first step (t = -1)."""
        return 1.0 if t < 0 else float(self.alpha_bar[t])


def timesteps(steps: int) -> tuple[int, ...]:
    return 1, 10, steps // 2, steps - 1


def schedules(name: str) -> tuple[NoiseSchedule, PaperSchedule]:
    """The schedule the code builds for a preset, and the papers' schedule of the same name and T."""
    config = preset(name)
    return NoiseSchedule(config.schedule, config.diffusion_steps), PaperSchedule(config.schedule, config.diffusion_steps)


def test_the_presets_use_the_schedules_named_here():
    # If a preset moves to another schedule or T, the cases below follow it; this says which ones run.
    assert {name: (preset(name).schedule, preset(name).diffusion_steps) for name in PRESETS} == {
        "default.yaml": ("sqrt", 2000), "blocks1.yaml": ("sqrt", 2000), "seed_naive.yaml": ("linear", 1000)}
    assert all(preset(name).sample_x0 == "posterior" for name in POSTERIOR_PRESETS)
    assert preset("seed_naive.yaml").predict == "epsilon"


@pytest.mark.parametrize("name", PRESETS)
def test_alpha_bar_is_the_papers_at_every_timestep(name):
    schedule, paper = schedules(name)
    assert np.allclose(schedule.alphas_cumprod.double().numpy(), paper.alpha_bar, rtol=1e-5, atol=0)
    assert np.allclose(schedule.betas.double().numpy(), paper.beta, rtol=1e-5, atol=0)


@pytest.mark.parametrize("name", PRESETS)
def test_q_sample_is_sqrt_alpha_bar_x0_plus_sqrt_one_minus_alpha_bar_noise(name):
    schedule, paper = schedules(name)
    generator = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(4, 5, 6, generator=generator), torch.randn(4, 5, 6, generator=generator)
    for t in timesteps(paper.steps):
        a = paper.bar(t)
        expected = math.sqrt(a) * x0.double() + math.sqrt(1 - a) * noise.double()
        x_t = q_sample(schedule, x0, torch.full((4,), t), noise)
        assert close(x_t, expected, 1e-6), t


@pytest.mark.parametrize("name", PRESETS)
def test_x0_from_an_epsilon_prediction_is_the_closed_form(name):
    schedule, paper = schedules(name)
    # x_0 = (x_t - sqrt(1 - alpha_bar_t) eps) / sqrt(alpha_bar_t) (DDPM eq. 4 solved for x_0). x_t and
    # eps are drawn apart, so that nothing cancels and float32 keeps every digit the test looks at.
    diffusion = GaussianDiffusion(schedule, LossSettings(predict="epsilon"))
    generator = torch.Generator().manual_seed(1)
    x_t, eps = torch.randn(4, 5, 6, generator=generator), torch.randn(4, 5, 6, generator=generator)
    for t in timesteps(paper.steps):
        a = paper.bar(t)
        expected = (x_t.double() - math.sqrt(1 - a) * eps.double()) / math.sqrt(a)
        x0 = diffusion.x0_from_output(None, eps, x_t, torch.full((4,), t))
        assert close(x0, expected, 1e-5), t


def ddpm_posterior(paper: PaperSchedule, t: int) -> tuple[float, float, float]:
    """q(x_{t-1} | x_t, x_0) = N(c_x0 x_0 + c_xt x_t, var) at code index t >= 1 (Ho et al. eq. 7):
    c_x0 = beta_t sqrt(alpha_bar_{t-1}) / (1 - alpha_bar_t), c_xt = sqrt(alpha_t) (1 - alpha_bar_{t-1})
    / (1 - alpha_bar_t), var = beta_t (1 - alpha_bar_{t-1}) / (1 - alpha_bar_t)."""
    beta, alpha, a, a_prev = paper.beta[t], paper.alpha[t], paper.bar(t), paper.bar(t - 1)
    return (beta * math.sqrt(a_prev) / (1 - a), math.sqrt(alpha) * (1 - a_prev) / (1 - a),
            beta * (1 - a_prev) / (1 - a))


@pytest.mark.parametrize("name", PRESETS)
def test_the_bounds_reverse_step_is_the_ddpm_posterior(name):
    schedule, paper = schedules(name)
    terms = BoundTerms(schedule)
    for t in timesteps(paper.steps):
        c_x0, c_xt, var = ddpm_posterior(paper, t)
        assert float(terms.coef1[t]) == pytest.approx(c_x0, rel=FLOAT32_TABLES), t
        assert float(terms.coef2[t]) == pytest.approx(c_xt, rel=FLOAT32_TABLES), t
        assert float(terms.var[t]) == pytest.approx(var, rel=FLOAT32_TABLES), t
    # step_kl: two Gaussians of that variance, means c_x0 x_0 + c_xt x_t and c_x0 x0_hat + c_xt x_t
    generator = torch.Generator().manual_seed(2)
    x0, x_t, pred = (torch.randn(3, 4, 5, generator=generator) for _ in range(3))
    for t in timesteps(paper.steps):
        c_x0, c_xt, var = ddpm_posterior(paper, t)
        q = torch.distributions.Normal(c_x0 * x0.double() + c_xt * x_t.double(), math.sqrt(var))
        p = torch.distributions.Normal(c_x0 * pred.double() + c_xt * x_t.double(), math.sqrt(var))
        expected = torch.distributions.kl_divergence(q, p).flatten(1).sum(1)
        assert torch.allclose(terms.step_kl(x0, x_t, pred, torch.full((3,), t)), expected, rtol=FLOAT32_TABLES), t


@pytest.mark.parametrize("name", PRESETS)
def test_the_ancestral_step_through_every_timestep_draws_from_the_ddpm_posterior(name):
    schedule, paper = schedules(name)
    # A chain over all T timesteps (T-1, T-2, .., 0) at eta 1: step index T-1-t goes from t to t-1,
    # and must draw x_{t-1} = c_x0 x0 + c_xt x_t + sqrt(var) z with the step's own noise z. x_t is
    # drawn from q(x_t | x_0) as in a chain: far from it the implied noise is huge, and the float32
    # tables' few digits of 1 - alpha_bar at the linear schedule's t = 1 would be all the test saw.
    scheduler = DiffusionScheduler(schedule, eta=1.0)
    scheduler.set_timesteps(paper.steps, length=5, spacing="uniform")
    generator = torch.Generator().manual_seed(3)
    x0 = torch.randn(2, 5, 6, generator=generator, dtype=torch.float64)
    for t in timesteps(paper.steps):
        index = paper.steps - 1 - t
        assert scheduler.timesteps[index, 0] == t and scheduler.timesteps[index + 1, 0] == t - 1
        a = paper.bar(t)
        x_t = math.sqrt(a) * x0 + math.sqrt(1 - a) * torch.randn(x0.shape, generator=generator, dtype=torch.float64)
        c_x0, c_xt, var = ddpm_posterior(paper, t)
        z = torch.randn(x_t.shape, generator=torch.Generator().manual_seed(t)).double()
        expected = c_x0 * x0 + c_xt * x_t + math.sqrt(var) * z
        x_next, _ = scheduler.step(x0.float(), index, x_t.float(), torch.Generator().manual_seed(t))
        # 1e-4: the step's float32 coefficients cancel (1 - a_s - sigma^2; see test_scheduler); a
        # wrong coefficient is off by more than the step's noise
        assert torch.allclose(x_next.double(), expected, atol=1e-4), (t, float((x_next - expected).abs().max()))


def posterior_mean_of_x0(weights: torch.Tensor, table: torch.Tensor, x_t: torch.Tensor, a: torch.Tensor,
                         s0: float) -> torch.Tensor:
    """E[x_0 | x_t] when the word is w with probability weights (..., V), x_0 | w ~ N(EMB(w), s0 I)
    (Diffusion-LM's q(x_0 | w)) and x_t | x_0 ~ N(sqrt(a) x_0, (1 - a) I), a broadcasting against
    x_t: for each word the product of two Gaussians in x_0, the prior N(EMB(w), s0) and x_t / sqrt(a)
    ~ N(x_0, (1 - a) / a), whose mean weighs each by its precision; then the mixture over words."""
    prior_precision, data_precision = 1 / s0, a / (1 - a)  # a: (..., 1)
    per_word = ((table * prior_precision + (x_t / a.sqrt() * data_precision)[..., None, :])
                / (prior_precision + data_precision)[..., None, :])  # (..., V, d)
    return (weights[..., None] * per_word).sum(-2)


def preset_model(name: str, vocab: int = 12) -> tuple[DiffusionLM, GaussianDiffusion, PaperSchedule]:
    config = preset(name)
    torch.manual_seed(0)
    model = DiffusionLM(config, vocab_size=vocab).eval()
    schedule = NoiseSchedule(config.schedule, config.diffusion_steps)
    return model, GaussianDiffusion(schedule, LossSettings()), PaperSchedule(config.schedule, config.diffusion_steps)


def noised_words(model: DiffusionLM, paper: PaperSchedule, t: torch.Tensor, generator: torch.Generator):
    """(x_t drawn from q(x_t | w) for random words, a blurred x0 prediction of them) (B, L, d): the
    prediction leaves the rounding softmax spread over several words, so the mixture is tested too."""
    table = model.table().detach().double()
    ids = torch.randint(0, len(table), t.shape, generator=generator)
    s0 = paper.beta[0]
    a = torch.tensor(paper.alpha_bar)[t][..., None]
    x0 = table[ids] + math.sqrt(s0) * torch.randn(*t.shape, table.shape[1], generator=generator, dtype=torch.float64)
    x_t = a.sqrt() * x0 + (1 - a).sqrt() * torch.randn(x0.shape, generator=generator, dtype=torch.float64)
    pred_x0 = 0.1 * table[ids] + 0.1 * torch.randn(x0.shape, generator=generator, dtype=torch.float64)
    return x_t.float(), pred_x0.float()


@pytest.mark.parametrize("name", POSTERIOR_PRESETS)
def test_the_posterior_x0_is_the_mean_of_x0_given_x_t_above_t0(name):
    model, diffusion, paper = preset_model(name)
    hook = posterior_x0_hook(model, diffusion)
    table, s0 = model.table().detach().double(), paper.beta[0]
    generator = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for t in timesteps(paper.steps):
            t_batch = torch.full((6,), t)
            x_t, pred_x0 = noised_words(model, paper, t_batch[:, None].expand(6, 8), generator)
            weights = torch.softmax(model.round(pred_x0).double(), dim=-1)
            assert float(weights.max(-1).values.mean()) < 0.9  # a mixture, not one word
            a = torch.full((6, 8, 1), paper.bar(t), dtype=torch.float64)
            expected = posterior_mean_of_x0(weights, table, x_t.double(), a, s0)
            got = hook(pred_x0, t_batch, x_t, 0).double()
            assert torch.allclose(got, expected, atol=2e-5), (t, float((got - expected).abs().max()))
            # and it is not simply the expected embedding (at T-1 x_t says almost nothing of x_0)
            if t < paper.steps // 2 + 1:
                assert not torch.allclose(got, weights @ table, atol=1e-3), t


@pytest.mark.parametrize("name", POSTERIOR_PRESETS)
def test_the_posterior_x0_takes_each_positions_own_timestep(name):
    # A block chain gives the hook per-position timesteps (B, L): each position gets its own
    # alpha_bar; at t = 0 the words are read from x_t itself (rescaled by 1 / sqrt(alpha_bar_0)) and
    # the target is EMB(w), so there it is the expected embedding of x_t / sqrt(alpha_bar_0).
    model, diffusion, paper = preset_model(name)
    hook = posterior_x0_hook(model, diffusion)
    table, s0 = model.table().detach().double(), paper.beta[0]
    row = torch.tensor([0, *timesteps(paper.steps), 0, 10])
    t = row.expand(3, len(row))
    x_t, pred_x0 = noised_words(model, paper, t, torch.Generator().manual_seed(5))
    with torch.no_grad():
        got = hook(pred_x0, t, x_t, 0).double()
        weights = torch.softmax(model.round(pred_x0).double(), dim=-1)
        first = torch.softmax(model.round(x_t / math.sqrt(paper.bar(0))).double(), dim=-1)
    a = torch.tensor(paper.alpha_bar)[t][..., None]
    expected = torch.where((t == 0)[..., None], first @ table, posterior_mean_of_x0(weights, table, x_t.double(), a, s0))
    assert torch.allclose(got, expected, atol=2e-5), float((got - expected).abs().max())


def test_the_default_presets_chain_steps_toward_the_posterior_x0(monkeypatch):
    # The whole path `dlm sample` takes on the default preset (sample_progressive with x0 'posterior',
    # no clamping, DDIM here so each state follows from the last): every step's x0 is the closed form
    # given the state it started from and the denoiser's prediction there.
    model, diffusion, paper = preset_model("default.yaml")
    table, s0 = model.table().detach().double(), paper.beta[0]
    outputs = {}

    def denoise(x_t, t, x0_estimate=None, attend=None):
        blurred = 0.3 * table[torch.arange(x_t.shape[1]) % len(table)] + 0.05 * x_t.double()
        outputs[int(t[0])] = blurred.float().expand_as(x_t).clone()
        return outputs[int(t[0])]

    monkeypatch.setattr(model, "denoise", denoise)
    states = list(sample_progressive(model, diffusion, (2, 8), 6, eta=0.0, clamp=False, x0="posterior",
                                     generator=torch.Generator().manual_seed(0)))
    x_t = torch.randn(2, 8, model.embed_dim, generator=torch.Generator().manual_seed(0))  # the chain's first draw
    assert len(states) == 6 and states[-1].t == 0 and states[0].t == paper.steps - 1
    for state in states:
        with torch.no_grad():
            if state.t == 0:
                expected = torch.softmax(model.round(x_t / math.sqrt(paper.bar(0))).double(), dim=-1) @ table
            else:
                weights = torch.softmax(model.round(outputs[state.t]).double(), dim=-1)
                a = torch.full((2, 8, 1), paper.bar(state.t), dtype=torch.float64)
                expected = posterior_mean_of_x0(weights, table, x_t.double(), a, s0)
        assert torch.allclose(state.pred_x0.double(), expected, atol=2e-5), state.t
        x_t = state.x
