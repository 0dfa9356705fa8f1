"""The uniform-state family (UDLM): its forward marginals by counting, its continuous-time NELBO
against the exact NLL of a toy distribution by enumeration, the reverse step against Bayes' rule on
the forward kernels, the sampler's float64 draws, and fixed words held in place."""

import itertools
import math

import numpy as np
import pytest
import torch

from dlm.core.config import load_config
from dlm.core.errors import UserError
from dlm.core.noise import WindowKeys
from dlm.families import uniform
from tests.conftest import ROOT


def tiny(**overrides):
    return load_config(ROOT / "params" / "uniform_smoke.yaml", **{"seq_len": 8, "embed_dim": 8, "width": 16, "heads": 2,
                                                                   "precision": "fp32", "device": "cpu", **overrides})


def kernel(alpha: float, vocab: int) -> torch.Tensor:
    """The forward kernel as a matrix, K[x, z] = q(z | x) = alpha [z = x] + (1 - alpha) / V (float64)."""
    return alpha * torch.eye(vocab, dtype=torch.float64) + (1 - alpha) / vocab


def within(count: float, total: int, p: float) -> bool:
    return abs(count / total - p) < 4 * math.sqrt(p * (1 - p) / total)


# --- the forward process -------------------------------------------------------------------------

@pytest.mark.parametrize("t", [0.1, 0.5, 0.9])
def test_a_token_is_kept_with_alpha_plus_its_uniform_share(t):
    """Oracle: q(z_t | x) = alpha_t [z = x] + (1 - alpha_t) / V, alpha_t = 1 - t, by counting draws."""
    vocab, count = 5, 200_000
    ids = torch.full((count // 100, 100), 2)
    coins, words = uniform.noise_draws(tuple(ids.shape), vocab, torch.Generator().manual_seed(0))
    z = uniform.corrupt(ids, torch.tensor(t), coins, words)
    counts = torch.bincount(z.flatten(), minlength=vocab).double()
    alpha = 1 - t
    assert within(float(counts[2]), count, alpha + (1 - alpha) / vocab)
    for other in (0, 1, 3, 4):
        assert within(float(counts[other]), count, (1 - alpha) / vocab), other


def test_a_windows_noise_does_not_depend_on_the_split():
    whole = uniform.noise_draws((8, 6), 11, keys=WindowKeys.batch(3, 7, 8))
    halves = [uniform.noise_draws((4, 6), 11, keys=WindowKeys.batch(3, 7, 4, first)) for first in (0, 4)]
    for part in range(2):
        assert torch.equal(whole[part], torch.cat([h[part] for h in halves]))


# --- the NELBO by enumeration --------------------------------------------------------------------

VOCAB, LENGTH = 3, 3
SEQUENCES = torch.tensor(list(itertools.product(range(VOCAB), repeat=LENGTH)))  # every window, (V^L, L)


def toy_distribution(seed: int = 0) -> torch.Tensor:
    """A peaked distribution over the V^L windows, every window possible."""
    p = torch.rand(len(SEQUENCES), generator=torch.Generator().manual_seed(seed), dtype=torch.float64) ** 4 + 1e-3
    return p / p.sum()


def denoiser(p: torch.Tensor, t: float, exact: bool = True) -> torch.Tensor:
    """log x_theta (Z, L, V) at every noisy window z (the rows of SEQUENCES), by Bayes' rule on p
    and the forward kernel. exact: p(x^l | z at the other positions), the x_theta under which the
    reverse step is the true reverse chain; else the posterior p(x^l | z) (all of z)."""
    likelihood = kernel(1 - t, VOCAB)[SEQUENCES[None, :, :], SEQUENCES[:, None, :]]  # (Z, X, L): q(z^k | x^k)
    out = torch.empty(len(SEQUENCES), LENGTH, VOCAB, dtype=torch.float64)
    for position in range(LENGTH):
        others = likelihood.clone()
        if exact:
            others[:, :, position] = 1
        joint = p[None] * others.prod(-1)  # (Z, X)
        per_word = torch.stack([joint[:, SEQUENCES[:, position] == v].sum(1) for v in range(VOCAB)], -1)
        out[:, position] = (per_word / per_word.sum(-1, keepdim=True)).log()
    return out


def nelbo_by_enumeration(p: torch.Tensor, log_x_theta, nodes: int = 80) -> torch.Tensor:
    """Each window's NELBO (X,): the integral over t in (0, 1) (Gauss-Legendre after t = u^4, which
    smooths the integrand's log t at 0) of the expectation over every z of q(z | x) times the summed
    integrand, all in float64."""
    u, w = (torch.from_numpy(a) for a in np.polynomial.legendre.leggauss(nodes))
    u, w = (u + 1) / 2, w / 2
    total = torch.zeros(len(SEQUENCES), dtype=torch.float64)
    for ui, wi in zip(u.tolist(), w.tolist()):
        t = ui ** 4
        q_z = kernel(1 - t, VOCAB)[SEQUENCES[:, None, :], SEQUENCES[None, :, :]].prod(-1)  # (X, Z): q(z | x)
        log_x = log_x_theta(p, t)  # (Z, L, V)
        for index, x in enumerate(SEQUENCES):
            integrand = uniform.nelbo_integrand(log_x, SEQUENCES, x.expand(len(SEQUENCES), -1),
                                                torch.full((len(SEQUENCES), 1), t, dtype=torch.float64))
            total[index] += wi * 4 * ui ** 3 * (q_z[index] * integrand.sum(1)).sum()
    return total


def test_the_nelbo_of_an_exact_denoiser_is_the_exact_nll():
    """The continuous-time NELBO is tight for the exact reverse chain: for every window of a toy
    vocabulary (V = 3, L = 3) it equals -log p(window), the oracle, to quadrature accuracy."""
    p = toy_distribution()
    nelbo = nelbo_by_enumeration(p, denoiser)
    assert torch.allclose(nelbo, -p.log(), atol=1e-8, rtol=0), (nelbo + p.log()).abs().max()


def test_a_perturbed_denoiser_rises_above_the_nll():
    """Any other denoiser pays: in expectation over the data the NELBO exceeds the entropy (the
    exact NLL), for the exact denoiser mixed with noise, and for the posterior p(x^l | z_t) read
    with all of z_t, which is not the x_theta the reverse step asks for."""
    p = toy_distribution()
    entropy = float(-(p * p.log()).sum())
    noise = torch.rand(len(SEQUENCES), LENGTH, VOCAB, generator=torch.Generator().manual_seed(1), dtype=torch.float64)

    def mixed(p, t):
        return (0.8 * denoiser(p, t).exp() + 0.2 * noise / noise.sum(-1, keepdim=True)).log()

    for perturbed in (mixed, lambda p, t: denoiser(p, t, exact=False)):
        expected = float((p * nelbo_by_enumeration(p, perturbed, nodes=40)).sum())
        assert expected > entropy + 0.01, (expected, entropy)


def udlm_expression(log_x: torch.Tensor, z: torch.Tensor, ids: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """UDLM's continuous-time NELBO integrand as the paper writes it, term by term in float64:
    alpha'_t / (V alpha_t) (V / x_bar_i - V / x_bar_theta_i - sum_j x_bar_j / x_bar_i
    log(x_bar_theta_i x_bar_j / (x_bar_theta_j x_bar_i))), alpha'_t = -1."""
    log_x, t = log_x.double(), t.double()
    vocab = log_x.shape[-1]
    alpha = (1 - t)[..., None]
    bar = vocab * alpha * torch.nn.functional.one_hot(ids, vocab) + 1 - alpha
    bar_theta = vocab * alpha * log_x.exp() + 1 - alpha
    bar_i, bar_theta_i = bar.gather(-1, z[..., None]), bar_theta.gather(-1, z[..., None])
    logs = bar_theta_i.log() - bar_theta.log() + bar.log() - bar_i.log()
    return -1 / (vocab * alpha[..., 0]) * ((vocab / bar_i - vocab / bar_theta_i)[..., 0] - (bar / bar_i * logs).sum(-1))


def integrand_inputs(vocab: int, times: list[float], length: int = 5, sharpness: float = 1.0, seed: int = 2):
    """Denoiser log-probabilities (sharper toward the clean word), clean ids, noised ids and times."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(vocab, (len(times), length), generator=generator)
    logits = sharpness * torch.randn(len(times), length, vocab, generator=generator, dtype=torch.float64)
    logits.scatter_add_(-1, ids[..., None], torch.full((len(times), length, 1), 2 * sharpness, dtype=torch.float64))
    t = torch.tensor(times, dtype=torch.float64)[:, None]
    noise = torch.randint(vocab, ids.shape, generator=generator)
    z = torch.where(torch.rand(ids.shape, generator=generator, dtype=torch.float64) < t, noise, ids)
    return logits.log_softmax(-1), z, ids, t


def test_the_integrand_is_udlms_expression():
    """Oracle: the paper's expression (`udlm_expression`); the module sums it another way."""
    log_x, z, ids, t = integrand_inputs(7, [0.01, 0.3, 0.7, 0.999], length=6)
    ours = uniform.nelbo_integrand(log_x, z, ids, t)
    assert torch.allclose(ours, udlm_expression(log_x, z, ids, t), rtol=1e-9, atol=1e-12)
    assert (ours >= 0).all() and (z != ids).any() and (z == ids).any()


def test_the_integrand_in_float32_at_a_word_vocabulary():
    """In float32 (training's precision) at a word-level vocabulary the integrand stays within
    1e-4 of its value, or 3e-7 / alpha_t nats where alpha_t is small (terms of size V cancel)."""
    times = [1e-6, 1e-3, 0.1, 0.5, 0.9, 0.999, 1 - 1e-5]
    for sharpness in (0.5, 4.0):
        log_x, z, ids, t = integrand_inputs(5000, times, length=16, sharpness=sharpness)
        exact = udlm_expression(log_x, z, ids, t)
        ours = uniform.nelbo_integrand(log_x.float(), z, ids, t.float()).double()
        assert ((ours - exact).abs() <= 1e-4 * exact.abs() + 3e-7 / (1 - t)).all(), (ours - exact).abs().max()


# --- the reverse step ----------------------------------------------------------------------------

@pytest.mark.parametrize("t,s", [(1.0, 0.7), (0.7, 0.4), (0.4, 0.0), (0.05, 0.0)])
def test_the_reverse_step_is_the_posterior_given_the_denoisers_distribution(t, s):
    """Oracle: Bayes' rule on the forward kernels, q(z_s | z_t) under a prior pi on x:
    sum_x pi(x) q(z_s | x) q(z_t | z_s) / sum_x pi(x) q(z_t | x); with pi one-hot it is
    q(z_s | z_t, x_0), the closed form the step plugs x_theta into."""
    vocab = 6
    alpha_t, alpha_s = 1 - t, 1 - s
    to_s, s_to_t = kernel(alpha_s, vocab), kernel(alpha_t / alpha_s, vocab)  # q(z_s | x), q(z_t | z_s)
    pis = torch.cat([torch.eye(vocab, dtype=torch.float64),
                     torch.rand(5, vocab, generator=torch.Generator().manual_seed(3), dtype=torch.float64)])
    pis = pis / pis.sum(-1, keepdim=True)
    for z_t in range(vocab):
        oracle = (pis @ to_s) * s_to_t[:, z_t][None]  # (P, V): pi-weighted q(z_s | x) q(z_t | z_s)
        oracle = oracle / oracle.sum(-1, keepdim=True)
        got = uniform.reverse_probs(pis, torch.full((len(pis),), z_t), t, s)
        assert torch.allclose(got, oracle, atol=1e-12), (z_t, got - oracle)
    if s > 0:  # a word already there can still change: the chain revises
        assert (uniform.reverse_probs(torch.eye(vocab, dtype=torch.float64), torch.arange(vocab), t, s)
                < 1 - 1e-3).all()


@pytest.mark.parametrize("t,s", [(1.0, 0.6), (0.6, 0.3), (0.3, 0.0)])
def test_the_sampler_draws_from_the_reverse_step(t, s):
    """The sampler's two-stage draw (keep, a word from x_theta, or a uniform word) has the law
    of reverse_probs, by counting."""
    vocab, count = 5, 100_000
    x_theta = torch.tensor([0.5, 0.05, 0.3, 0.1, 0.05], dtype=torch.float64)
    for z_t in (0, 1):
        z = torch.full((count // 100, 100), z_t)
        drawn = uniform.reverse_step(x_theta.log().expand(*z.shape, -1), z, t, s, torch.Generator().manual_seed(4))
        counts = torch.bincount(drawn.flatten(), minlength=vocab).double()
        probs = uniform.reverse_probs(x_theta[None], torch.tensor([z_t]), t, s)[0]
        for word in range(vocab):
            assert within(float(counts[word]), count, float(probs[word])), (z_t, word)


def tail_distribution(tail=4000, top=0.9):
    """One likely word and a long tail of unlikely ones holding 10% of the mass between them."""
    return torch.cat([torch.tensor([top]), torch.full((tail,), (1 - top) / tail)]).double()


def test_the_last_step_draws_in_float64_and_keeps_the_tail():
    """From t = 1 to 0 in one step every word comes from x_theta: a tail holding 10% of the mass
    gets its share (float16 Gumbel noise never draws it: tests/test_masked.py)."""
    log_x = tail_distribution().log()
    z = torch.randint(4001, (1, 2000), generator=torch.Generator().manual_seed(5))
    drawn = uniform.reverse_step(log_x.expand(1, 2000, -1), z, 1.0, 0.0, torch.Generator().manual_seed(6))
    assert within(float((drawn > 0).double().sum()), 2000, 0.1)


def test_the_per_step_softmax_is_float64():
    """At temperature 1e-39 the step's distribution is the argmax's, as at temperature 0; in float32,
    logits / 1e-39 overflow (inf - inf: nan), and every draw became id 0 in the masked family."""
    logits = torch.tensor([[0.5, 2.0, -1.0, 1.5]])
    tiny_t = uniform.word_log_probs(logits, 1e-39)
    assert torch.equal(tiny_t.exp(), uniform.word_log_probs(logits, 0.0).exp())
    assert tiny_t.exp()[0, 1] == 1 and tiny_t.dtype == torch.float64
    banned = uniform.word_log_probs(logits, 1.0, banned=[1])
    assert banned.exp()[0, 1] == 0 and torch.isclose(banned.exp().sum(), torch.tensor(1.0, dtype=torch.float64))


@pytest.mark.parametrize("temperature", [0.3, 0.9, 1.0, 2.0])
def test_the_step_scores_are_x_theta_at_the_temperature(temperature):
    """Oracle: torch's float64 log-softmax of logits / T. The step's log-weights less their
    normaliser are it, at logits far from 0 (a row's shift must not change its law) and with a
    banned word at -inf."""
    logits = torch.randn(3, 7, 50, generator=torch.Generator().manual_seed(8)) * 8 + 300
    oracle = torch.log_softmax(logits.double() / temperature, dim=-1)
    weights, normaliser = uniform.word_scores(logits, temperature)
    assert torch.allclose(weights.double() - normaliser[..., None], oracle, atol=1e-5)
    banned = logits.double().clone()
    banned[..., 4] = -torch.inf
    assert torch.allclose(uniform.word_log_probs(logits, temperature, banned=[4]),
                          torch.log_softmax(banned / temperature, dim=-1), atol=1e-5)


# --- the chain ------------------------------------------------------------------------------------

def test_fixed_words_are_held_and_scores_are_the_last_steps():
    config = tiny()
    torch.manual_seed(0)
    model = uniform.new_model(config, 12).eval()
    ids = torch.randint(0, 12, (5, 8), generator=torch.Generator().manual_seed(3))
    known = torch.zeros(5, 8, dtype=torch.bool)
    known[:, [0, 3, 7]] = True
    frames = []
    out, scores = uniform.sample_ids(model, ids, known, 6, generator=torch.Generator().manual_seed(0), keep_scores=True,
                                     on_step=lambda i, s, z: frames.append((i, s, z.clone())))
    assert torch.equal(out[known], ids[known]) and int(out.max()) < 12
    assert [(i, round(s, 6)) for i, s, _ in frames] == [(i, round(1 - (i + 1) / 6, 6)) for i in range(6)]
    assert all(torch.equal(z[known], ids[known]) for _, _, z in frames)
    assert scores.shape == (5, 8, 12) and (scores[known] == 0).all()
    assert torch.allclose(scores[~known].exp().sum(-1), torch.ones(int((~known).sum())), atol=1e-5)
    # each generated word had probability under its scores
    assert (scores[~known].gather(-1, out[~known][:, None]) > -torch.inf).all()
    # the scores are the last step's, t = 1/6 -> 0: Bayes' rule with x_theta as the prior on the word,
    # x_theta(v) q(z_t | v), at the window the step started from
    z_t, t = frames[-2][2], 1 / 6
    with torch.no_grad():
        x_theta = model(z_t, torch.full((5,), t)).double().softmax(-1)
    posterior = x_theta * kernel(1 - t, 12)[:, z_t].permute(1, 2, 0)
    posterior = posterior / posterior.sum(-1, keepdim=True)
    assert torch.allclose(scores[~known].exp().double(), posterior[~known], atol=1e-5)


def test_the_training_loss_is_finite_where_a_draw_of_t_rounds_to_1():
    """A draw of t just below 1 is 1 in float32 (alpha_t = 0): the loss stays finite, as its gradient."""
    config = tiny()
    torch.manual_seed(0)
    model, objective = uniform.new_model(config, 12), uniform.objective(config)
    objective.times.draw_rates = lambda *args: torch.tensor([[1 - 1e-9], [1.0], [1e-3]], dtype=torch.float64).float()
    losses = objective.training_losses(model, torch.randint(12, (3, 8)), torch.Generator().manual_seed(0))
    assert all(torch.isfinite(value) for value in losses.values())
    losses["total"].backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_uniform_presets():
    config = load_config(ROOT / "params" / "uniform.yaml")
    reference = load_config(ROOT / "params" / "masked.yaml")
    assert config.model == "uniform" and config.positions == "rotary"
    for key in ("width", "depth", "heads", "seq_len", "batch_size", "epochs", "embed_dim", "lr", "sample_steps"):
        assert getattr(config, key) == getattr(reference, key), key  # the masked preset's size and budget
    from dlm import families
    families.check_config(config)
    families.check_config(load_config(ROOT / "params" / "uniform_smoke.yaml"))


def test_a_bound_of_a_shortened_chain_is_refused_in_one_line(tmp_path, capsys):
    """`dlm evaluate --nll --steps N` scores a shortened chain's bound: for a family whose bound has
    none (its BOUND_OPTIONS) it is one line naming the fix, not a traceback from another family's schedule."""
    from dlm.cli import main
    from tests.conftest import toy_run_dir

    run = toy_run_dir(tmp_path / "uniform", model="uniform", diffusion_steps=2000)
    assert main(["evaluate", "--nll", "--run_dir", str(run), "--windows", "2", "--steps", "5"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "dlm evaluate: error: --steps scores the bound of a shortened chain; the 'uniform' family's bound has no such "
        "chain: drop --steps."]


@pytest.mark.parametrize("steps, message", [(0, "steps must be at least 1, got 0."),
                                            (100_001, "steps must be at most 100,000, got 100,001")])
def test_the_uniform_chain_checks_its_step_count(steps, message):
    from dlm.runs.sample import SampleOptions

    config = load_config(None, model="uniform")
    with pytest.raises(UserError, match=message):
        uniform.check_steps(SampleOptions.from_config(config, steps=steps), config)
