"""The likelihood bound: its estimator against the exact sum over timesteps, against a toy whose
likelihood is known in closed form, and through `dlm evaluate --nll`."""

import json
import math

import pytest
import torch
from torch import nn

from dlm.cli import main
from dlm.core.config import load_config
from dlm.core.schedule import NoiseSchedule, sampling_timesteps
from dlm.evaluation.likelihood import summarise
from dlm.families.gaussian import new_model
from dlm.families.gaussian_bound import BoundTerms, window_terms, x0_errors
from dlm.families.gaussian_objective import GaussianDiffusion, LossSettings

from .conftest import ROOT


class Oracle(nn.Module):
    """The Bayes-optimal denoiser for iid uniform words over a fixed table (V, d), under the
    training loss: E[x_0 | x_t] at t >= 1, where x_0 = e_k + sigma0 z and x_t | k ~ N(sqrt(a) e_k,
    v = a sigma0^2 + 1 - a) (so x_t carries some of x_0's own noise, and the estimate keeps it), and
    E[EMB(w) | x_1] at t = 0 (the training loss's target there). The rounding is the exact
    posterior p(w | x_0). `shrink` < 1 pulls every estimate towards 0: a worse denoiser."""

    self_conditioned = False

    def __init__(self, table: torch.Tensor, schedule: NoiseSchedule, shrink: float = 1.0):
        super().__init__()
        self.tab, self.schedule, self.shrink = table.double(), schedule, shrink
        self.s0 = 1 - float(schedule.alphas_cumprod[0])

    def embed(self, ids):
        return self.tab[ids].float()

    def round(self, x):
        return (-((x.double()[..., None, :] - self.tab) ** 2).sum(-1) / (2 * self.s0)).float()

    def table(self):
        return self.tab.float()

    def expected_embedding(self, x):
        return torch.softmax(self.round(x), dim=-1) @ self.table()

    def denoise(self, x, t):
        a = self.schedule.alphas_cumprod.double()[t].view(-1, 1, 1, 1)
        x, e = x.double()[..., None, :], self.tab  # (B, L, 1, d) against (V, d)
        v = a * self.s0 + 1 - a
        posterior = torch.softmax(-((x - a.sqrt() * e) ** 2).sum(-1, keepdim=True) / (2 * v), dim=-2)
        gain = torch.where(t.view(-1, 1, 1, 1) == 0, torch.zeros_like(a), a.sqrt() * self.s0 / v)
        return (self.shrink * (posterior * (e + gain * (x - a.sqrt() * e))).sum(-2)).float()


def toy(steps: int, vocab: int = 16, dim: int = 8, schedule: str = "sqrt"):
    torch.manual_seed(0)
    table = nn.functional.normalize(torch.randn(vocab, dim), dim=-1) * math.sqrt(dim)
    noise = NoiseSchedule(schedule, steps)
    return table, noise, GaussianDiffusion(noise, LossSettings())


def bound(model, diffusion, ids, seed=1, **options):
    return summarise(window_terms(model, diffusion, ids, generator=torch.Generator().manual_seed(seed), **options),
                     ids.shape[1], options.get("draws", 1))


def fixed_variance_gap(schedule: NoiseSchedule, dim: int) -> float:
    """What the bound pays, per token, for p(x_{t-1} | x_t)'s fixed posterior variance once the
    word is known: q's reverse step then has variance var_t + coef1_t^2 Var(x_0 | x_t, w), p's var_t,
    a Gaussian KL of (r - 1 - log r) / 2 per dimension with r their ratio."""
    terms = BoundTerms(schedule)
    a, s0 = terms.a[1:], terms.sigma0_sq
    spread = a * s0 + 1 - a
    r = 1 + terms.coef1[1:] ** 2 * (s0 * (1 - a) / spread) / terms.var[1:]
    return float(dim / 2 * (r - 1 - torch.log(r)).sum())


def test_prior_term_is_the_gaussian_kl():
    _, schedule, _ = toy(30, schedule="linear")
    terms = BoundTerms(schedule)
    x0 = torch.randn(3, 4, 5)
    a_T = schedule.alphas_cumprod[-1].double()
    expected = torch.distributions.kl_divergence(torch.distributions.Normal(a_T.sqrt() * x0.double(), (1 - a_T).sqrt()),
                                                 torch.distributions.Normal(0.0, 1.0)).flatten(1).sum(1)
    assert torch.allclose(terms.prior(x0), expected)


@pytest.mark.parametrize("proposal, draws", [("uniform", 1), ("uniform", 3), ("importance", 2)])
def test_estimator_agrees_with_the_exact_sum_over_timesteps(proposal, draws):
    # A small real model (random weights: its terms are large and uneven over t) with T = 20: each
    # window's estimate against the sum over all 19 steps, same x_0 (same seed); the paired
    # difference is zero in expectation.
    config = load_config(ROOT / "params" / "smoke.yaml", diffusion_steps=20, seq_len=6, embed_dim=4, width=16)
    model = new_model(config, vocab_size=11).eval()
    diffusion = GaussianDiffusion(NoiseSchedule("sqrt", 20), LossSettings())
    ids = torch.randint(0, 11, (400, 6), generator=torch.Generator().manual_seed(0))
    estimate = bound(model, diffusion, ids, draws=draws, proposal=proposal)
    exact = bound(model, diffusion, ids, all_timesteps=True)
    difference = estimate.per_window - exact.per_window
    se = float(difference.std()) / math.sqrt(len(difference))
    assert abs(float(difference.mean())) < 4 * se
    assert se < 0.1 * exact.total  # and the test has the power to see a wrong weight


def test_a_chain_through_every_timestep_is_the_exact_sum():
    # jump_kl's general step against step_kl's DDPM posterior coefficients, same x_0 and noise
    config = load_config(ROOT / "params" / "smoke.yaml", diffusion_steps=20, seq_len=6, embed_dim=4, width=16)
    model = new_model(config, vocab_size=11).eval()
    diffusion = GaussianDiffusion(NoiseSchedule("sqrt", 20), LossSettings())
    ids = torch.randint(0, 11, (8, 6), generator=torch.Generator().manual_seed(0))
    exact = bound(model, diffusion, ids, all_timesteps=True)
    chained = bound(model, diffusion, ids, chain=list(range(19, -1, -1)))
    assert torch.allclose(chained.per_window, exact.per_window, rtol=1e-9)
    with pytest.raises(ValueError, match="from 19 down to 0"):
        bound(model, diffusion, ids, chain=[18, 0])


def test_a_shorter_chain_of_the_bayes_optimal_denoiser_costs_more_and_stays_a_bound():
    table, schedule, diffusion = toy(200)
    ids = torch.randint(0, len(table), (256, 8), generator=torch.Generator().manual_seed(0))
    oracle = Oracle(table, schedule)
    full = bound(oracle, diffusion, ids, chain=sampling_timesteps(schedule, 200))
    short = bound(oracle, diffusion, ids, chain=sampling_timesteps(schedule, 5))
    assert full.total > math.log(len(table)) - 3 * full.se
    assert short.total > full.total + 3 * (short.se + full.se)


def test_bound_on_a_toy_is_the_data_entropy_plus_the_fixed_variance_gap():
    # iid uniform words: -log p(w) of the data is log V per token, and the bound of any model is at
    # least that (cross-entropy >= entropy). With the Bayes-optimal denoiser it is log V plus what
    # the fixed posterior variance costs at the lowest steps (closed form above, about 0.14 nats
    # at d = 8 under the sqrt schedule, where the SNR falls fastest); the rest (discretisation
    # while the word is still uncertain) is below 0.03 nats at T = 2000.
    table, schedule, diffusion = toy(2000)
    ids = torch.randint(0, len(table), (1024, 8), generator=torch.Generator().manual_seed(0))
    good = bound(Oracle(table, schedule), diffusion, ids, draws=8)
    entropy, gap = math.log(len(table)), fixed_variance_gap(schedule, table.shape[1])
    assert 0.05 < gap < 0.3
    assert good.se < 0.05
    assert good.total > entropy - 3 * good.se
    assert abs(good.total - (entropy + gap)) < 3 * good.se + 0.03
    assert good.terms["rounding"] < 0.01 and abs(good.terms["prior"]) < 1e-3
    bad = bound(Oracle(table, schedule, shrink=0.9), diffusion, ids, draws=8)
    assert bad.total > good.total + 1.0


def test_bound_stays_above_the_entropy_when_the_chain_ends_short_of_pure_noise():
    # A schedule stopped at t = 300 of 2000: x_T still knows the word, so the prior term carries a
    # large share of the bound (leaving it out falls below log V).
    table, full, _ = toy(2000)
    short = NoiseSchedule("sqrt", 2000)
    short.steps = 300
    for name in ("betas", "alphas_cumprod", "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod"):
        setattr(short, name, getattr(full, name)[:300])
    diffusion = GaussianDiffusion(short, LossSettings())
    ids = torch.randint(0, len(table), (256, 8), generator=torch.Generator().manual_seed(0))
    result = bound(Oracle(table, short), diffusion, ids, draws=4)
    assert result.terms["prior"] > 1.0
    assert result.total > math.log(len(table)) - 3 * result.se


class CopyingOracle(Oracle):
    """A block model for windows that repeat one word: the first block is the iid oracle's (it
    has no context), every later block copies the word of the clean context before it and is then
    the Bayes-optimal denoiser of a known word (x_0's own noise kept, as in `Oracle`)."""

    def __init__(self, table, schedule, block_size):
        super().__init__(table, schedule)
        self.block_size = block_size

    def denoise(self, x, t, x0_estimate=None, attend=None, positions=None):
        t = t if t.ndim == 1 else t[:, -1]  # a block's timestep (the context sits at t = 0)
        prefix = x.shape[1] - self.block_size
        if prefix == 0:
            return super().denoise(x, t)
        word = ((x[:, 0, None].double() - self.tab) ** 2).sum(-1).argmin(-1)  # the clean first word
        e = self.tab[word][:, None]
        a = self.schedule.alphas_cumprod.double()[t].view(-1, 1, 1)
        gain = torch.where(t.view(-1, 1, 1) == 0, torch.zeros_like(a), a.sqrt() * self.s0 / (a * self.s0 + 1 - a))
        block = e + gain * (x[:, prefix:].double() - a.sqrt() * e)
        return torch.cat([x[:, :prefix], block.float()], dim=1)


def test_a_block_runs_bound_scores_each_block_given_the_words_before_it():
    # Windows that repeat one uniform word: -log p(w) is log V per WINDOW. A block model that reads
    # the clean words before each block pays the iid price only for its first block (the oracle
    # does not know its two words are equal: 2 log V), then only the fixed-variance gap; asked for
    # the whole noised window at once (the bound before blocks were scored block by block), the
    # same model has no clean word to copy and pays log V per token.
    table, schedule, _ = toy(2000)
    length, size = 8, 2
    diffusion = GaussianDiffusion(schedule, LossSettings(block_size=size))
    words = torch.randint(0, len(table), (1024, 1), generator=torch.Generator().manual_seed(0))
    ids = words.expand(-1, length).contiguous()
    result = bound(CopyingOracle(table, schedule, size), diffusion, ids, draws=8)
    entropy, gap = math.log(len(table)), fixed_variance_gap(schedule, table.shape[1])
    assert result.total > entropy / length - 3 * result.se  # still a bound on the data's entropy
    assert abs(result.total - (size * entropy / length + gap)) < 3 * result.se + 0.03


def train_args(corpus, run_dir, *extra):
    return ["train", str(ROOT / "params" / "smoke.yaml"), "--run_dir", str(run_dir), "--corpus", str(corpus),
            "--min_count", "1", "--max_train_tokens", "none", *extra]


def test_cli_prints_the_bound_and_the_ar_ratio(corpus, tmp_path, capsys):
    diffusion_run, ar_run = tmp_path / "d", tmp_path / "ar"
    assert main(train_args(corpus, diffusion_run, "--max_steps", "2")) == 0
    assert main(["train-ar", *train_args(corpus, ar_run, "--max_steps", "2")[1:]]) == 0
    capsys.readouterr()
    out = tmp_path / "nll.json"
    assert main(["evaluate", "--nll", "--run_dir", str(diffusion_run), "--ar_run", str(ar_run),
                 "--windows", "8", "--draws", "2", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "NLL bound" in printed and "nats/token" in printed and "bound / AR" in printed
    assert all(name in printed for name in ("prior", "diffusion", "decoder", "rounding"))
    numbers = json.loads(out.read_text())
    assert numbers["nll_bound"] > numbers["nll_bound_se"] > 0 and numbers["ar_nll"] > 0
    assert numbers["ratio"] == pytest.approx(numbers["nll_bound"] / numbers["ar_nll"])
    assert numbers["chain"] is None
    # the bound of the chain a 5-step sampler runs
    assert main(["evaluate", "--nll", "--run_dir", str(diffusion_run), "--windows", "8", "--steps", "5",
                 "--spacing", "logsnr_full", "--json", str(out)]) == 0
    assert "every step of the 5-step logsnr_full chain" in capsys.readouterr().out
    chained = json.loads(out.read_text())
    assert chained["chain"] == {"steps": 5, "spacing": "logsnr_full"} and chained["nll_bound"] != numbers["nll_bound"]


def test_bound_stays_above_the_entropy_when_the_words_overlap_under_the_embedding_noise():
    # A table crowded within a few sigma0: x_0 no longer tells the word, so the rounding term
    # -log p(w | x_0) carries a large share of the bound (leaving it out falls below log V).
    table, schedule, diffusion = toy(2000, dim=2)
    crowded = table * 0.15 / math.sqrt(2)
    ids = torch.randint(0, len(table), (512, 8), generator=torch.Generator().manual_seed(0))
    result = bound(Oracle(crowded, schedule), diffusion, ids, draws=4)
    assert result.terms["rounding"] > 1.0
    assert result.total > math.log(len(table)) - 3 * result.se


def test_nll_bad_inputs_give_one_clear_line(corpus, tmp_path, capsys):
    run, other = tmp_path / "d", tmp_path / "lower"
    assert main(train_args(corpus, run, "--max_steps", "1")) == 0
    assert main(["train-ar", *train_args(corpus, other, "--max_steps", "1", "--lowercase")[1:]]) == 0
    capsys.readouterr()
    cases = [
        (["--nll", "--run_dir", str(tmp_path / "missing")], "does not exist"),
        (["--nll"], "--nll needs --run_dir"),
        (["--nll", "--run_dir", str(run), "--draws", "0"], "--draws must be a positive"),
        (["--nll", "--run_dir", str(run), "--windows", "1"], "--windows must be at least 2"),
        (["--nll", "--run_dir", str(run), "--ar_run", str(other), "--windows", "2"], "another vocabulary"),
        (["--nll", "--run_dir", str(run), "--ar_run", str(run), "--windows", "2"], "not an autoregressive run"),
        (["--nll", "--run_dir", str(other), "--windows", "2"], "A likelihood bound is not available for the 'ar' family"),
        ([], "give --samples"),
        (["--nll", "--run_dir", str(run), "--json", str(run / "config.yaml" / "x.json")], "config.yaml"),
    ]
    for args, message in cases:
        assert main(["evaluate", *args]) == 2, args
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, (args, err)


def test_x0_errors_locate_a_denoiser_worse_than_its_input_at_low_noise():
    # Closed forms, independent of the code: for a known word at low noise the Bayes-optimal x0
    # error is d Var(x_0 | x_t, w) = d s0 (1 - a) / (a s0 + 1 - a), the identity's d (1 - a) / a
    # (against x_0) and at t = 0, against EMB(w), d (s0 + (1 - a) / a). A denoiser that shrinks
    # its estimate by 20% is worse than its own input there (what the blocks-of-one run's bound
    # rose by between 390 and 910 steps, docs/journal.md), and the table says by how many nats.
    table, schedule, diffusion = toy(2000)
    dim = table.shape[1]
    ids = torch.randint(0, len(table), (512, 8), generator=torch.Generator().manual_seed(0))
    timesteps = [0, 1, 3, 300]  # at t = 300 only the identity's closed form is checked
    good = x0_errors(Oracle(table, schedule), diffusion, ids, timesteps, torch.Generator().manual_seed(1))
    a, s0 = schedule.alphas_cumprod.double(), 1 - float(schedule.alphas_cumprod[0])
    for row in good.itertuples():
        at = float(a[row.t])
        best = 0.0 if row.t == 0 else dim * s0 * (1 - at) / (at * s0 + 1 - at)
        identity = dim * ((s0 if row.t == 0 else 0.0) + (1 - at) / at)
        if row.t <= 3:
            assert row.error == pytest.approx(best, rel=0.05, abs=1e-6)
        assert row.identity_error == pytest.approx(identity, rel=0.05)
        assert row.excess_nats < 0
    terms = BoundTerms(schedule)
    assert good.weight[1] == pytest.approx(float(terms.coef1[1] ** 2 / (2 * terms.var[1])))
    shrunk = x0_errors(Oracle(table, schedule, shrink=0.8), diffusion, ids, timesteps, torch.Generator().manual_seed(1))
    assert (shrunk.error > shrunk.identity_error)[:3].all()
    assert shrunk.excess_nats[0] == pytest.approx(good.weight[0] * (0.04 * dim - good.identity_error[0]), rel=0.1)
    # The expected x0 (the rounding softmax's mean row) snaps the shrunk estimate back onto its word
    # at low noise: at t = 0 EMB(w) itself, at t >= 1 x_0's own noise d s0 is all that is left.
    snapped = x0_errors(Oracle(table, schedule, shrink=0.8), diffusion, ids, timesteps,
                        torch.Generator().manual_seed(1), x0_kind="expected")
    assert snapped.error[0] == pytest.approx(0.0, abs=1e-3)
    for row in snapped[snapped.t.between(1, 3)].itertuples():
        assert row.error == pytest.approx(dim * s0, rel=0.1) and row.error < row.identity_error
    # The posterior x0 adds x_t's share of that noise back: the Bayes-optimal error, from the closed
    # form above, at low noise, where the softmax knows the word (the shrunk denoiser only chose it)
    posterior = x0_errors(Oracle(table, schedule, shrink=0.8), diffusion, ids, timesteps,
                          torch.Generator().manual_seed(1), x0_kind="posterior")
    assert posterior.error[0] == pytest.approx(0.0, abs=1e-3)
    for row in posterior[posterior.t.between(1, 3)].itertuples():
        at = float(a[row.t])
        assert row.error == pytest.approx(dim * s0 * (1 - at) / (at * s0 + 1 - at), rel=0.05)


class Garbling(Oracle):
    """The Bayes-optimal denoiser, except at t = 0, where it returns the row of another word: what a
    denoiser trained at t = 0 once in T draws drifted toward (the blocks-of-one run at 3x its steps)."""

    def denoise(self, x, t):
        out = super().denoise(x, t)
        wrong = self.tab[(self.round(out).argmax(-1) + 1) % len(self.tab)].float()
        return torch.where((t == 0).view(-1, 1, 1), wrong, out)


def test_the_posterior_x0_reads_the_words_at_t0_from_x_t_itself():
    # at t = 0 x_t is x_0 up to noise far below the rows' spacing: the posterior x0 is EMB(w) (error
    # 0 against it) whatever the denoiser says, where the expected x0 follows the denoiser's word
    table, schedule, diffusion = toy(2000)
    ids = torch.randint(0, len(table), (256, 8), generator=torch.Generator().manual_seed(0))
    garbling = Garbling(table, schedule)
    kinds = {kind: x0_errors(garbling, diffusion, ids, [0, 1], torch.Generator().manual_seed(1), x0_kind=kind)
             for kind in ("expected", "posterior")}
    assert kinds["posterior"].error[0] == pytest.approx(0.0, abs=1e-3)
    next_row = (table[(ids + 1) % len(table)] - table[ids]).pow(2).sum(-1).mean()  # every word the next one
    assert kinds["expected"].error[0] == pytest.approx(float(next_row), rel=0.05)
    # above t = 0 the denoiser's words are kept: both equal the optimal denoiser's own
    assert kinds["posterior"].error[1] < kinds["expected"].error[1]
