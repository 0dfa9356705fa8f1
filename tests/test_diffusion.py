import math

import pytest
import torch
import torch.nn.functional as F

from dlm.core.config import load_config
from dlm.core.embeddings import CosineRounding, LearnedEmbedding, nearest_rows
from dlm.core.schedule import (
    LOGSNR_FLOOR,
    SPACINGS,
    NoiseSchedule,
    position_timesteps,
    q_sample,
    sampling_timesteps,
)
from dlm.core.scheduler import DiffusionScheduler
from dlm.families.gaussian_model import DiffusionLM
from dlm.families.gaussian_objective import GaussianDiffusion, LossSecondMoment, LossSettings, TimeWarp
from dlm.families.gaussian_sampling import sample_progressive
from dlm.runs.build import build_objective


def sqrt_alpha_bar(s: float) -> float:
    return 1 - math.sqrt(s + 1e-4)


def test_sqrt_schedule_follows_its_formula():
    T = 2000
    schedule = NoiseSchedule("sqrt", T)
    for t in (0, T // 2):
        expected = sqrt_alpha_bar((t + 1) / T) / sqrt_alpha_bar(0)
        assert schedule.alphas_cumprod[t].item() == pytest.approx(expected, rel=1e-5)
    assert schedule.alphas_cumprod[T - 1].item() < 1e-4  # alpha_bar(1) < 0: the last beta is clipped
    assert schedule.sigma0 == pytest.approx(0.12, abs=0.01)


@pytest.mark.parametrize("name", ["sqrt", "linear", "cosine"])
def test_schedules_decrease_from_clean_to_noise(name):
    schedule = NoiseSchedule(name, 1000)
    ac = schedule.alphas_cumprod
    assert torch.all(ac[1:] < ac[:-1]) and ac[0] > 0.9 and ac[-1] < 0.05
    assert torch.all(schedule.betas <= 0.999)
    if name == "linear":
        assert schedule.betas[0].item() == pytest.approx(1e-4) and schedule.betas[-1].item() == pytest.approx(0.02)


def test_q_sample_has_the_right_mean_and_std():
    schedule = NoiseSchedule("sqrt", 2000)
    x0 = torch.full((20000, 4), 2.0)
    for t in (10, 1000):
        tt = torch.full((20000,), t)
        xt = q_sample(schedule, x0, tt, torch.randn_like(x0))
        assert xt.mean().item() == pytest.approx(2.0 * schedule.sqrt_alphas_cumprod[t].item(), abs=0.02)
        assert xt.std().item() == pytest.approx(schedule.sqrt_one_minus_alphas_cumprod[t].item(), rel=0.02)


def toy(predict="x0", rounding_target="clean", **overrides):
    config = load_config(None, embed_dim=8, width=16, depth=1, heads=2, seq_len=6, diffusion_steps=50,
                         sample_steps=50, predict=predict, rounding_target=rounding_target, dropout=0.0, **overrides)
    torch.manual_seed(0)
    return DiffusionLM(config, vocab_size=11), build_objective(config)


def test_loss_terms_on_a_toy_batch():
    model, diffusion = toy()
    ids = torch.randint(0, 11, (4, 6))
    losses = diffusion.training_losses(model, ids)
    emb = model.embedding(ids)
    expected_ce = F.cross_entropy(model.rounding(emb).reshape(-1, 11), ids.reshape(-1))
    assert losses["rounding"].item() == pytest.approx(expected_ce.item(), rel=1e-5)
    last_ab = diffusion.schedule.alphas_cumprod[-1]
    assert losses["prior"].item() == pytest.approx((last_ab * emb.pow(2)).mean().item(), rel=1e-4)
    total = losses["mse"] + losses["rounding"] + losses["prior"]
    assert losses["total"].item() == pytest.approx(total.item(), rel=1e-6)
    diffusion.settings.prior_loss, diffusion.settings.rounding_weight = False, 0.5
    losses = diffusion.training_losses(model, ids, generator=torch.Generator().manual_seed(1))
    assert losses["total"].item() == pytest.approx((losses["mse"] + 0.5 * losses["rounding"]).item(), rel=1e-6)


@pytest.mark.parametrize("predict", ["x0", "epsilon"])
def test_an_oracle_denoiser_has_zero_mse(predict, monkeypatch):
    model, diffusion = toy(predict=predict)
    ids = torch.randint(0, 11, (4, 6))
    emb = model.embedding(ids).detach()
    s = diffusion.schedule

    def oracle(x_t, t, x0_estimate=None, attend=None):
        if predict == "x0":
            return emb
        return (x_t - s.at(s.sqrt_alphas_cumprod, t, 3) * emb) / s.at(s.sqrt_one_minus_alphas_cumprod, t, 3)

    monkeypatch.setattr(model, "denoise", oracle)
    assert diffusion.training_losses(model, ids)["mse"].item() < 1e-8


def test_logits_prediction_is_cross_entropy_and_a_softmax_weighted_x0(monkeypatch):
    model, diffusion = toy(predict="logits", rounding_target="noisy", embedding_norm="l2")
    ids = torch.randint(0, 11, (4, 6))
    output = torch.randn(4, 6, 8)
    monkeypatch.setattr(model, "denoise", lambda x_t, t, x0_estimate=None, attend=None: output)
    losses = diffusion.training_losses(model, ids)
    expected_ce = F.cross_entropy(model.rounding(output).reshape(-1, 11), ids.reshape(-1))
    assert losses["rounding"].item() == pytest.approx(expected_ce.item(), rel=1e-5)
    assert losses["total"].item() == pytest.approx((losses["rounding"] + losses["prior"]).item(), rel=1e-6)
    # x0 is the expected row under the rounding softmax: a confident logit gives the row itself
    t = torch.zeros(4, dtype=torch.long)
    x0 = diffusion.x0_from_output(model, output, output, t)
    probs = torch.softmax(model.rounding(output), -1)
    assert torch.allclose(x0, probs @ model.embedding.table(), atol=1e-5)
    table = model.embedding.table().detach()
    sharp = table[ids] * 50.0  # equal-norm rows: x @ E^T peaks at the row itself
    assert torch.allclose(diffusion.x0_from_output(model, sharp, sharp, t), table[ids], atol=1e-3)


def test_logits_prediction_trains_the_denoiser_and_samples():
    model, diffusion = toy(predict="logits", rounding_target="noisy")
    ids = torch.randint(0, 11, (4, 6))
    diffusion.training_losses(model, ids)["total"].backward()
    assert model.denoiser.out_proj.weight.grad.abs().sum() > 0
    x = list(sample_progressive(model, diffusion, (2, 6), 10, clamp=False, generator=torch.Generator().manual_seed(0)))[-1].x
    assert x.shape == (2, 6, 8) and torch.isfinite(x).all()


def test_time_warp_draws_timesteps_where_the_loss_rises():
    warp = TimeWarp(steps=100, bins=10, uniform=0.2)
    assert torch.allclose(warp.density(), torch.full((10,), 0.1, dtype=torch.float64))  # nothing measured yet
    # A loss curve flat at both ends that rises only over t in [30, 60): the shape measured
    # for Diffusion-LM, where words are chosen in a middle band of noise levels.
    t = torch.arange(100)
    loss = (t.div(10, rounding_mode="floor") - 2).clamp(0, 3).double() / 3
    warp.update(t, loss)
    density = warp.density()
    assert density.sum().item() == pytest.approx(1.0)
    assert density[3:6].sum().item() == pytest.approx(0.86)  # the band where the loss rises
    assert density[0].item() == pytest.approx(0.02)  # the uniform floor elsewhere
    drawn = warp.sample(20000, torch.Generator().manual_seed(0))
    assert drawn.min() >= 0 and drawn.max() <= 99
    assert ((drawn >= 30) & (drawn < 60)).double().mean().item() == pytest.approx(density[3:6].sum().item(), abs=0.01)
    # a moving average: one new batch moves a measured bin by (1 - decay) of the difference
    before = warp.loss[4].item()
    warp.update(torch.tensor([45]), torch.tensor([before + 1.0]))
    assert warp.loss[4].item() == pytest.approx(before + (1 - warp.decay))
    restored = TimeWarp(steps=100, bins=10)
    restored.load_state_dict(warp.state_dict())
    assert torch.equal(restored.density(), warp.density())
    with pytest.raises(ValueError, match="bins"):
        TimeWarp(steps=100, bins=5).load_state_dict(warp.state_dict())


def test_time_warp_in_training_losses(monkeypatch):
    model, diffusion = toy(rounding_target="predicted", time_warp=True)
    ids = torch.randint(0, 11, (8, 6))
    for seed in range(30):  # uniform draws until every bin has been measured
        diffusion.training_losses(model, ids, generator=torch.Generator().manual_seed(seed))
    warp = diffusion.time_warp
    assert warp.seen.all() and (warp.loss > 0).all()
    # the signal: the rounding CE at four evenly spread positions of each sequence
    decoded = torch.randn(8, 6, 8)
    logits = model.rounding(decoded)[:, [0, 2, 3, 5]]
    expected = F.cross_entropy(logits.transpose(1, 2), ids[:, [0, 2, 3, 5]], reduction="none").mean(1)
    assert torch.allclose(diffusion.word_loss_per_sequence(model, decoded, ids), expected, atol=1e-6)
    seen = []
    denoise = model.denoise
    monkeypatch.setattr(model, "denoise", lambda x_t, t, x0_estimate=None, attend=None:
                        seen.append(t) or denoise(x_t, t, x0_estimate, attend))
    warp.loss = torch.linspace(0, 1, warp.bins, dtype=torch.float64).clamp(max=0.1)  # rises in the first bins only
    diffusion.training_losses(model, torch.randint(0, 11, (400, 6)), generator=torch.Generator().manual_seed(0))
    first_five_bins = -(-warp.steps * 5 // warp.bins)  # t below this: 80% of draws + the uniform floor's share
    assert (seen[0] < first_five_bins).double().mean() > 0.7
    before = warp.state_dict()
    diffusion.training_losses(model, ids, generator=torch.Generator().manual_seed(0), uniform_t=True)
    assert torch.equal(warp.loss, before["loss"])  # validation neither warps nor measures
    with pytest.raises(ValueError, match="left_to_right"):
        toy(time_warp=True, left_to_right=1.0)


def test_loss_second_moment_density_follows_the_losses_it_was_fed():
    sampler = LossSecondMoment(steps=100, bin_width=10, uniform=0.1, history=2)
    assert sampler.bins == 10
    uniform = torch.full((10,), 0.1, dtype=torch.float64)
    assert torch.allclose(sampler.density(), uniform)  # nothing measured yet
    assert torch.equal(sampler.weights(torch.arange(100)), torch.ones(100))
    centres = torch.arange(10) * 10 + 5
    # bin 0 sees losses 0 then 2, bin 1 sees 1 then 1, bins 2-9 see 3 then 4
    first = torch.tensor([0.0, 1.0] + [3.0] * 8)
    second = torch.tensor([2.0, 1.0] + [4.0] * 8)
    sampler.update(centres, first)
    assert torch.allclose(sampler.density(), uniform)  # one loss a bin: below the history of 2
    sampler.update(centres, second)
    # by hand: sqrt(E[loss^2]) is sqrt((0 + 4) / 2), sqrt((1 + 1) / 2), sqrt((9 + 16) / 2); bins of
    # equal width, so the 90% not uniform is shared in those proportions
    rms = [math.sqrt(2.0), 1.0] + [math.sqrt(12.5)] * 8
    expected = torch.tensor([0.1 * 0.1 + 0.9 * r / sum(rms) for r in rms], dtype=torch.float64)
    assert torch.allclose(sampler.density(), expected)
    assert sampler.density()[0] > sampler.density()[1]  # equal mean losses; the spread counts
    # 1 / (T p(t)) with p(t) = p(bin) / 10 timesteps
    assert sampler.weights(torch.tensor([95, 3])).tolist() == pytest.approx(
        [1 / (100 * expected[9].item() / 10), 1 / (100 * expected[0].item() / 10)], rel=1e-6)
    drawn = sampler.sample(40000, torch.Generator().manual_seed(0))
    assert drawn.min() >= 0 and drawn.max() <= 99
    frequency = torch.bincount(drawn // 10, minlength=10).double() / len(drawn)
    assert torch.allclose(frequency, expected, atol=0.01)
    # a moving average: a new loss moves a bin's E[loss^2] by 1 / history of the way, two by 3/4
    sampler.update(torch.tensor([15]), torch.tensor([6.0]))
    assert sampler.square[1].item() == pytest.approx(0.5 * 1.0 + 0.5 * 36.0)
    sampler.update(torch.tensor([25, 26]), torch.tensor([2.0, 2.0]))
    assert sampler.square[2].item() == pytest.approx(0.25 * 12.5 + 0.75 * 4.0)
    restored = LossSecondMoment(steps=100, bin_width=10)
    restored.load_state_dict(sampler.state_dict())
    assert torch.equal(restored.square, sampler.square) and torch.equal(restored.count, sampler.count)
    with pytest.raises(ValueError, match="bins"):
        LossSecondMoment(steps=100, bin_width=20).load_state_dict(sampler.state_dict())


def test_loss_second_moment_weights_keep_the_uniform_mean():
    """Importance sampling is unbiased: drawn from the measured density and weighted by
    1 / (T p(t)), a per-timestep function's mean is its mean over uniform t. Here the density was
    measured on losses that rise with t while the function falls with t (the hard case: its mass
    is where few draws go, with the largest weights). Tolerance: 4 standard errors of the mean of
    the weighted draws (their own spread); a mean without the weights misses by far more."""
    steps = 100
    sampler = LossSecondMoment(steps=steps, bin_width=10, uniform=0.05, history=1)
    t = torch.arange(steps)
    sampler.update(t, (t + 1).double() / 10)
    assert sampler.density()[9] > 5 * sampler.density()[0]  # far from uniform
    f = torch.exp(-t.double() / 10)
    truth = f.mean().item()  # the uniform mean, exactly
    drawn = sampler.sample(200_000, torch.Generator().manual_seed(0))
    weighted = sampler.weights(drawn).double() * f[drawn]
    standard_error = weighted.std().item() / math.sqrt(len(drawn))
    assert standard_error < 0.02 * truth  # 4 of them: within 5% of the truth
    assert abs(weighted.mean().item() - truth) < 4 * standard_error
    assert abs(f[drawn].mean().item() - truth) > 20 * standard_error  # the weights matter


def test_loss_second_moment_in_training_losses(monkeypatch):
    model, diffusion = toy(rounding_target="clean", timestep_sampling="loss_second_moment")
    sampler = diffusion.importance
    assert diffusion.timestep_sampler is sampler and sampler.bins == 5  # T = 50 in bins of 10
    ids = torch.randint(0, 11, (64, 6))
    for seed in range(5):  # uniform draws until every bin holds its history
        diffusion.training_losses(model, ids, generator=torch.Generator().manual_seed(seed))
    assert (sampler.count >= sampler.history).all() and (sampler.square > 0).all()
    sampler.square = torch.tensor([100.0, 1.0, 1.0, 1.0, 1.0], dtype=torch.float64)  # the first bin's losses: 10x
    density = sampler.density()
    before = sampler.state_dict()
    seen, output = [], torch.randn(64, 6, 8)
    monkeypatch.setattr(model, "denoise", lambda x_t, t, x0_estimate=None, attend=None: seen.append(t) or output)
    losses = diffusion.training_losses(model, ids, generator=torch.Generator().manual_seed(9))
    t = seen[0]
    assert (t < 10).double().mean() > 0.5  # the first bin: 95% of 10 / 19 of the draws, and its uniform share
    weights = 1 / (50 * density[t // 10] / 10)
    emb = model.embedding(ids).detach()
    mse_each = ((output - emb) ** 2).mean((1, 2)).double()  # x0 prediction of clean x0
    ce_each = F.cross_entropy(model.rounding(emb).transpose(1, 2), ids, reduction="none").mean(1).double()
    assert losses["mse"].item() == pytest.approx((mse_each * weights).mean().item(), rel=1e-5)
    assert losses["rounding"].item() == pytest.approx((ce_each * weights).mean().item(), rel=1e-5)
    # each sequence's unweighted loss, mse + rounding, is what the bins measured
    counted = torch.bincount(t // 10, minlength=5).double()
    assert torch.equal(sampler.count - before["count"], counted)
    in_first = t < 10
    square = ((mse_each + ce_each)[in_first] ** 2).mean().item()
    kept = (1 - 1 / sampler.history) ** counted[0].item()
    assert sampler.square[0].item() == pytest.approx(kept * 100.0 + (1 - kept) * square, rel=1e-5)
    # validation: uniform, unweighted, and measures nothing
    state = sampler.state_dict()
    seen.clear()
    losses = diffusion.training_losses(model, ids, generator=torch.Generator().manual_seed(9), uniform_t=True)
    assert torch.equal(sampler.count, state["count"]) and torch.equal(sampler.square, state["square"])
    mse_each = ((output - emb) ** 2).mean((1, 2))
    assert losses["mse"].item() == pytest.approx(mse_each.mean().item(), rel=1e-5)


def test_loss_second_moment_with_blocks(monkeypatch):
    model, diffusion = toy(rounding_target="predicted", timestep_sampling="loss_second_moment", block_size=2)
    losses = diffusion.training_losses(model, torch.randint(0, 11, (16, 6)), generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(losses["total"]) and diffusion.importance.count.sum() == 16  # one t a window
    # every block at once (BD3-LM): each block draws its own t and is weighted and measured by it
    model, diffusion = toy(rounding_target="clean", timestep_sampling="loss_second_moment", block_size=2,
                           block_training="all")
    sampler = diffusion.importance
    sampler.load_state_dict({"square": torch.tensor([100.0, 1.0, 1.0, 1.0, 1.0], dtype=torch.float64),
                             "count": torch.full((5,), 10.0, dtype=torch.float64)})
    density = sampler.density()
    ids = torch.randint(0, 11, (16, 6))
    seen, output = [], torch.randn(16, 12, 8)  # the noised window beside the clean one
    monkeypatch.setattr(model, "denoise", lambda x_t, t, x0_estimate=None, attend=None, positions=None:
                        seen.append(t) or output)
    losses = diffusion.training_losses(model, ids, generator=torch.Generator().manual_seed(0))
    t = seen[0][:, :6]  # (16, 6): each block's t on its two positions
    assert torch.equal(t[:, 0::2], t[:, 1::2]) and (t[:, 0::2] != t[:, [0]]).any()
    weights = 1 / (50 * density[t // 10] / 10)  # per position: its block's
    emb = model.embedding(ids).detach()
    error = ((output[:, :6] - emb) ** 2).mean(-1).double()
    assert losses["mse"].item() == pytest.approx((error * weights).mean().item(), rel=1e-5)
    assert sampler.count.sum().item() == 50 + 16 * 3  # one measurement a block


@pytest.mark.parametrize("overrides, message", [
    ({"left_to_right": 1.0}, "left_to_right"), ({"time_warp": True}, "use one of them")])
def test_loss_second_moment_refuses_other_timestep_draws(overrides, message):
    settings = LossSettings(timestep_sampling="loss_second_moment", **overrides)
    with pytest.raises(ValueError, match=message):
        GaussianDiffusion(NoiseSchedule("sqrt", 50), settings)
    with pytest.raises(ValueError, match="timestep_sampling must be one of uniform, loss_second_moment"):
        GaussianDiffusion(NoiseSchedule("sqrt", 50), LossSettings(timestep_sampling="importance"))


def test_left_to_right_timesteps_lag_along_the_sequence():
    schedule = NoiseSchedule("sqrt", 2000)
    progress = torch.linspace(0, 1, 101)
    t = position_timesteps(schedule, progress, 8, skew=1.0)  # (101, 8)
    assert (t[0] == 1999).all() and (t[-1] == 0).all()
    assert (t[:, 1:] >= t[:, :-1]).all()  # words to the left are never noisier
    assert (t[1:] <= t[:-1]).all()  # and every position only ever gets cleaner
    assert t[50, 0] == 0 and t[50, -1] == 1999  # halfway: the first word is done, the last not begun
    plain = position_timesteps(schedule, progress, 8, skew=0.0)
    assert (plain == plain[:, :1]).all()  # no skew: the positions share the timestep


def test_left_to_right_training_and_sampling(monkeypatch):
    model, diffusion = toy(rounding_target="predicted", left_to_right=1.0)
    ids = torch.randint(0, 11, (4, 6))
    seen = []
    denoise = model.denoise
    monkeypatch.setattr(model, "denoise", lambda x_t, t, x0_estimate=None, attend=None:
                        seen.append(t) or denoise(x_t, t, x0_estimate, attend))
    losses = diffusion.training_losses(model, ids, generator=torch.Generator().manual_seed(0))
    assert seen[0].shape == (4, 6) and torch.isfinite(losses["total"])
    losses["total"].backward()
    # per-position time conditioning: a constant row means the same as one timestep per sequence
    t_row = torch.full((2,), 7)
    x = torch.randn(2, 6, 8)
    assert torch.allclose(denoise(x, t_row), denoise(x, t_row[:, None].expand(2, 6)), atol=1e-5)

    scheduler = DiffusionScheduler(diffusion.schedule, left_to_right=1.0)
    scheduler.set_timesteps(20, 6)
    table = scheduler.timesteps
    assert table.shape == (20, 6) and (table[0] == 49).all() and (table[-1] == 0).all()
    states = list(sample_progressive(model, diffusion, (3, 6), 20, clamp=False,
                                     generator=torch.Generator().manual_seed(0)))
    first, second = states[0].x, states[1].x
    waiting = table[2] == table[1]  # positions whose chain has not begun keep their x
    assert waiting.any() and torch.allclose(first[:, waiting], second[:, waiting], atol=1e-5)
    assert not torch.allclose(first[:, ~waiting], second[:, ~waiting])
    with pytest.raises(ValueError, match="at least 2"):
        scheduler.set_timesteps(1, 6)


def test_rounding_target_decides_what_the_cross_entropy_trains():
    ids = torch.randint(0, 11, (4, 6))
    for target, reaches_denoiser in [("clean", False), ("noisy", False), ("predicted", True)]:
        model, diffusion = toy(rounding_target=target)
        diffusion.training_losses(model, ids)["rounding"].backward()
        grad = model.denoiser.out_proj.weight.grad
        assert (grad is not None and grad.abs().sum() > 0) == reaches_denoiser, target


def test_clamping_picks_the_nearest_row():
    table = torch.tensor([[0.0, 0.0], [3.0, 0.0], [0.0, 3.0], [10.0, 10.0]])
    x = torch.tensor([[[0.4, -0.2], [2.2, 0.9], [0.1, 2.0], [6.0, 6.5]]])
    assert nearest_rows(x, table).tolist() == [[0, 1, 2, 3]]
    brute = torch.cdist(x[0], table).argmin(-1)
    assert nearest_rows(x, table)[0].tolist() == brute.tolist()


def test_cosine_decoding_uses_direction_not_distance():
    embedding = LearnedEmbedding(3, 2, pretrained_embeddings=torch.tensor([[1.0, 0.0], [0.0, 1.0], [5.0, 4.0]]))
    x = torch.tensor([[0.9, 0.05], [0.5, 0.45]])
    assert CosineRounding(embedding)(x).argmax(-1).tolist() == [0, 2]
    assert nearest_rows(x, embedding.table()).tolist() == [0, 0]  # L2 would say otherwise


@pytest.mark.parametrize("spacing", SPACINGS)
def test_timesteps_are_distinct_and_span_the_chain(spacing):
    for total, steps in [(2000, 50), (2000, 1000), (100, 99), (10, 2), (10, 1)]:
        ts = sampling_timesteps(NoiseSchedule("sqrt", total), steps, spacing)
        assert len(ts) == steps and ts[0] == (total - 1 if steps > 1 else 0) and ts[-1] == 0
        assert all(a > b for a, b in zip(ts, ts[1:]))
    assert sampling_timesteps(NoiseSchedule("sqrt", 2000), 2000, spacing) == list(range(1999, -1, -1))
    with pytest.raises(ValueError, match="between 1 and 100"):
        sampling_timesteps(NoiseSchedule("sqrt", 100), 101, spacing)


def well_formed(ts: list[int], steps: int, total: int) -> bool:
    """`steps` distinct timesteps, strictly falling, from T-1 (0 for a single step) to 0."""
    first = total - 1 if steps > 1 else 0
    return len(ts) == steps and ts[0] == first and ts[-1] == 0 and all(a > b for a, b in zip(ts, ts[1:]))


@pytest.mark.parametrize("schedule", ["sqrt", "cosine", "linear"])
def test_every_step_count_gives_a_well_formed_chain(schedule):
    # the linear schedule's rescaled betas pass 1 below T = 20 (alpha_bar 0): not a schedule
    totals = (100,) if schedule == "linear" else (2, 3, 10, 100)
    for spacing in SPACINGS:
        for total in totals:
            for steps in range(1, total + 1):
                assert well_formed(sampling_timesteps(NoiseSchedule(schedule, total), steps, spacing), steps, total)
    long = NoiseSchedule(schedule, 2000)
    for steps in range(1, 2001):
        assert well_formed(sampling_timesteps(long, steps, "logsnr"), steps, 2000), steps


def test_logsnr_spacing_spends_one_step_below_its_floor():
    """Only the chain's first step, T-1, is below LOGSNR_FLOOR: the rest of the steps are spaced over
    the range where x_t still carries the words; the whole-range spacing spends half of them there."""
    schedule = NoiseSchedule("sqrt", 2000)
    alpha_bar = schedule.alphas_cumprod.double()
    log_snr = (alpha_bar / (1 - alpha_bar)).log()
    for steps in (10, 25, 50, 200):
        below = [t for t in sampling_timesteps(schedule, steps, "logsnr") if log_snr[t] < LOGSNR_FLOOR]
        assert below == [1999], steps
    full = sampling_timesteps(schedule, 200, "logsnr_full")
    assert sum(log_snr[t] < LOGSNR_FLOOR for t in full) > 20
    # the last 100 timesteps (alpha_bar <= 0.025): half of a 200-step chain before, a sixth now
    assert sum(t >= 1900 for t in full) >= 100
    assert sum(t >= 1900 for t in sampling_timesteps(schedule, 200, "logsnr")) <= 200 // 6
    # between the floor and the dense low-noise end, steps change the log-SNR by equal amounts (up
    # to rounding to whole timesteps)
    chain = sampling_timesteps(schedule, 50, "logsnr")
    gaps = [float(log_snr[b] - log_snr[a]) for a, b in zip(chain[1:], chain[2:40])]
    assert max(gaps) < 1.2 * min(gaps)
    assert abs(float(log_snr[chain[1]]) - LOGSNR_FLOOR) < 0.1


def test_spacings_place_the_steps_where_they_say():
    schedule = NoiseSchedule("sqrt", 2000)
    uniform = sampling_timesteps(schedule, 50, "uniform")
    quadratic = sampling_timesteps(schedule, 50, "quadratic")
    logsnr = sampling_timesteps(schedule, 50, "logsnr_full")
    assert uniform[-2] == 41 and uniform[0] - uniform[1] == 41  # an even stride
    assert quadratic[-5:] == [13, 7, 3, 1, 0]  # round((T-1)(i/49)^2) for i = 4 .. 0
    assert sum(t < 100 for t in quadratic) == 11 and sum(t < 100 for t in uniform) == 3
    # logsnr_full: consecutive steps change log(alpha_bar / (1 - alpha_bar)) by the same amount,
    # except at both ends, where steps are whole timesteps: t = 0, 1, 2 and the last ~28
    # timesteps, where the clipped last beta sends the log-SNR from -6 to -15
    alpha_bar = schedule.alphas_cumprod.double()
    log_snr = (alpha_bar / (1 - alpha_bar)).log()
    gaps = [float(log_snr[b] - log_snr[a]) for a, b in zip(logsnr, logsnr[1:])]
    assert max(gaps[27:45]) < 1.2 * min(gaps[27:45])
    assert logsnr[-3:] == [2, 1, 0] and logsnr[:3] == [1999, 1998, 1997] and sum(t < 100 for t in logsnr) == 8
    with pytest.raises(ValueError, match="use logsnr, logsnr_full, quadratic, uniform"):
        sampling_timesteps(schedule, 50, "cosine")


@pytest.mark.parametrize("eta, clamp", [(1.0, True), (0.0, False)])
def test_sampler_yields_every_state_with_the_right_shapes(eta, clamp):
    model, diffusion = toy()
    model.eval()
    states = list(sample_progressive(model, diffusion, (3, 6), 10, eta=eta, clamp=clamp,
                                     generator=torch.Generator().manual_seed(0)))
    assert [s.index for s in states] == list(range(10))
    assert [s.t for s in states] == sampling_timesteps(diffusion.schedule, 10)
    assert all(s.x.shape == (3, 6, 8) and s.pred_x0.shape == (3, 6, 8) for s in states)
    if clamp:  # the final sample is made of embedding rows
        table = model.table()
        assert torch.allclose(states[-1].x, table[nearest_rows(states[-1].x, table)])
    else:  # DDIM: each x keeps the noise the previous x held around its predicted x0
        ac = diffusion.schedule.alphas_cumprod
        for before, after, t_next in zip(states, states[1:], [s.t for s in states[2:]]):
            a_t, a_s = ac[after.t], ac[t_next]
            eps = (before.x - a_t.sqrt() * after.pred_x0) / (1 - a_t).sqrt()
            assert torch.allclose(after.x, a_s.sqrt() * after.pred_x0 + (1 - a_s).sqrt() * eps, atol=1e-4)
    again = list(sample_progressive(model, diffusion, (3, 6), 10, eta=eta, clamp=clamp,
                                    generator=torch.Generator().manual_seed(0)))
    assert torch.equal(states[-1].x, again[-1].x)


def test_clamping_only_in_the_last_steps():
    model, diffusion = toy()
    model.eval()
    table = model.table()

    def chain(clamp):
        return list(sample_progressive(model, diffusion, (2, 6), 10, clamp=clamp, clamp_fraction=0.3,
                                       generator=torch.Generator().manual_seed(0)))

    clamped, free = chain(True), chain(False)
    on_rows = [torch.allclose(s.pred_x0, table[nearest_rows(s.pred_x0, table)]) for s in clamped]
    assert on_rows[-3:] == [True] * 3 and not any(on_rows[:7])
    # the same chain as without clamping until step 7, whose prediction is snapped to its nearest rows
    assert all(torch.equal(c.x, f.x) for c, f in zip(clamped[:7], free[:7]))
    assert torch.equal(clamped[7].pred_x0, table[nearest_rows(free[7].pred_x0, table)])


def test_bf16_autocast_keeps_the_loss_terms_close_and_float32(monkeypatch):
    from dlm.core import runtime as model_module
    from dlm.core.runtime import autocast

    model, diffusion = toy(rounding_target="predicted")
    ids = torch.randint(0, 11, (4, 6))
    plain = diffusion.training_losses(model, ids, generator=torch.Generator().manual_seed(0))
    with autocast("bf16", "cpu"):
        mixed = diffusion.training_losses(model, ids, generator=torch.Generator().manual_seed(0))
        assert model.denoise(torch.randn(2, 6, 8), torch.zeros(2, dtype=torch.long)).dtype == torch.float32
    for term in ("mse", "rounding", "total"):
        assert mixed[term].dtype == torch.float32
        assert mixed[term].item() == pytest.approx(plain[term].item(), rel=0.05), term
    with autocast("fp32", "cpu"):
        assert not torch.is_autocast_enabled("cpu")
    for speedup in (1.0, 2.0):  # auto: bf16 only on a CPU where the timed probe found bf16 faster by the margin
        probe = model_module.PrecisionProbe("this machine", fp32_s=speedup, bf16_s=1.0)
        monkeypatch.setattr(model_module, "cpu_precision_probe", lambda probe=probe: probe)
        with autocast("auto", "cpu"):
            assert torch.is_autocast_enabled("cpu") == (speedup > 1)


def test_sample_options_take_the_runs_spacing_and_reject_an_unknown_one():
    from dlm.runs.sample import SampleOptions

    config = load_config(None)
    assert SampleOptions.from_config(config).spacing == "logsnr"
    assert SampleOptions.from_config(config.replace(sample_spacing="uniform")).spacing == "uniform"
    assert SampleOptions.from_config(config, spacing="uniform").spacing == "uniform"
    with pytest.raises(ValueError, match="spacing must be one of logsnr, logsnr_full, quadratic, uniform, got 'cosine'"):
        SampleOptions(spacing="cosine").validate(2000)


def test_preconditioning_returns_the_skip_path_when_the_network_says_nothing():
    """predict 'preconditioned' (EDM): with F = 0 the x0 is c_skip x_t exactly, which at the lowest
    noise is x_t rescaled (c_skip -> 1 / sqrt(alpha_bar)): nearly x0 itself, where an x0 predictor
    that outputs zero is off by all of x0."""
    model, diffusion = toy("preconditioned")
    schedule = diffusion.schedule
    x0 = model.embed(torch.randint(0, 11, (64, 6))).detach()
    silent = torch.zeros_like(x0)
    for step in (0, 10, 49):
        t = torch.full((64,), step)
        x_t = q_sample(schedule, x0, t, torch.randn_like(x0))
        assert torch.equal(diffusion.x0_from_output(model, silent, x_t, t), schedule.sqrt_alphas_cumprod[step] * x_t)
    lowest = NoiseSchedule("sqrt", 2000)
    a0 = float(lowest.alphas_cumprod[0])
    skip, _ = GaussianDiffusion(lowest, LossSettings(predict="preconditioned")).preconditioning(torch.zeros(1).long(), 1)
    assert abs(float(skip) * math.sqrt(a0) - 1) <= 1 - a0 + 1e-6 < 0.02  # c_skip sqrt(a) = a -> 1
    t = torch.zeros(64, dtype=torch.long)
    x_t = q_sample(schedule, x0, t, torch.randn_like(x0))
    skipped = ((diffusion.x0_from_output(model, silent, x_t, t) - x0) ** 2).mean()
    identity = ((x_t / schedule.sqrt_alphas_cumprod[0] - x0) ** 2).mean()
    assert skipped < identity  # EDM's c_skip shrinks x_t a little, as E[x0 | x_t] does for unit-scale x0
    assert skipped < 0.2 * (x0**2).mean()  # what predict x0 with F = 0 (returning 0) would be off by


def test_preconditioned_training_target_gives_back_x0():
    """The loss's target for F is the one output that x0_from_output turns into x0 exactly."""
    model, diffusion = toy("preconditioned", rounding_target="noisy")
    ids = torch.randint(0, 11, (4, 6))
    losses = diffusion.training_losses(model, ids, generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(losses["total"])
    x0 = torch.randn(4, 6, 8)
    t = torch.randint(1, 50, (4,))
    x_t = q_sample(diffusion.schedule, x0, t, torch.randn_like(x0))
    skip, out = diffusion.preconditioning(t, 3)
    assert torch.allclose(diffusion.x0_from_output(model, (x0 - skip * x_t) / out, x_t, t), x0, atol=1e-5)


def test_decode_draws_in_float64_so_a_small_temperature_gives_the_argmax():
    """A temperature near 0 (where the matched-entropy search can land) draws the argmax of the
    rounding logits; in float32 the scaled logits overflow and the draw fails on NaN."""
    from dlm.core.config import load_config
    from dlm.families.gaussian_model import decode

    torch.manual_seed(0)
    model = DiffusionLM(load_config(None, embed_dim=8, width=16, depth=1, heads=2, seq_len=6), vocab_size=20).eval()
    x0 = torch.randn(3, 6, 8) * 5
    argmax = model.round(x0).argmax(-1)
    drawn = decode(model, x0, temperature=1e-37, generator=torch.Generator().manual_seed(0))
    assert torch.equal(drawn, argmax)
