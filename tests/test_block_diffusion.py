"""Semi-autoregressive block diffusion (block_size): blocks left to right, each by the diffusion
chain with the earlier blocks given clean; the whole window as one block is Diffusion-LM as before."""

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from dlm.core.config import ConfigError, load_config
from dlm.core.noise import WindowKeys
from dlm.core.schedule import sampling_timesteps
from dlm.core.scheduler import DiffusionScheduler
from dlm.families.blocks import block_causal_mask, every_block_mask
from dlm.families.gaussian import generate
from dlm.families.gaussian_model import DiffusionLM
from dlm.families.gaussian_objective import denoise_every_block
from dlm.families.gaussian_sampling import chain_blocks, sample_progressive, x0_given_earlier_blocks
from dlm.runs.build import build_objective
from dlm.runs.sample import SampleOptions

LENGTH, VOCAB, T = 8, 11, 50


def toy(block_size=None, **overrides):
    config = load_config(None, embed_dim=8, width=16, depth=1, heads=2, seq_len=LENGTH, diffusion_steps=T,
                         sample_steps=10, rounding_target="predicted", dropout=0.0, block_size=block_size, **overrides)
    torch.manual_seed(0)
    return DiffusionLM(config, vocab_size=VOCAB), build_objective(config), config


def spy(monkeypatch, model):
    """Record every denoiser call's inputs and output."""
    calls, denoise = [], model.denoise

    def recorded(x_t, t, x0_estimate=None, attend=None, positions=None):
        out = denoise(x_t, t, x0_estimate, attend, positions)
        calls.append(SimpleNamespace(x=x_t.detach().clone(), t=t.clone(), attend=attend, out=out))
        return out

    monkeypatch.setattr(model, "denoise", recorded)
    return calls


# Captured from the code before block diffusion existed (same toy, seed and keys): the whole
# window as one block must reproduce it, in training and in sampling.
BEFORE_LOSSES = {"total": 4.007789611816406, "mse": 1.2741278409957886, "rounding": 2.733649253845215,
                 "prior": 1.2588872777996585e-05}
BEFORE_SAMPLE_ABS_SUM = 45.60926055908203
BEFORE_SAMPLE_ROW = [-0.43584170937538147, -0.11982735991477966, -0.1844429075717926, -0.28012964129447937,
                     -0.23374027013778687, -0.3288816213607788, -0.1401129961013794, 0.01216113567352295]


@pytest.mark.parametrize("block_size", [None, LENGTH])
def test_the_whole_window_as_one_block_is_plain_diffusion_as_before(block_size):
    model, diffusion, _ = toy(block_size)
    assert chain_blocks(diffusion, LENGTH) == 1
    ids = torch.randint(0, VOCAB, (4, LENGTH))
    losses = diffusion.training_losses(model, ids, keys=WindowKeys.batch(0, 3, 4))
    for name, value in BEFORE_LOSSES.items():
        assert losses[name].item() == pytest.approx(value, rel=1e-5), name
    states = list(sample_progressive(model, diffusion, (2, LENGTH), 10, clamp=False, spacing="logsnr_full",
                                     generator=torch.Generator().manual_seed(0)))
    assert len(states) == 10 and states[-1].words is None
    assert states[-1].x.abs().sum().item() == pytest.approx(BEFORE_SAMPLE_ABS_SUM, rel=1e-5)
    assert states[-1].x[0, :, 0].tolist() == pytest.approx(BEFORE_SAMPLE_ROW, rel=1e-4, abs=1e-6)


def test_earlier_blocks_enter_clean_and_only_the_current_block_is_scored(monkeypatch):
    model, diffusion, _ = toy(block_size=2)
    calls = spy(monkeypatch, model)
    ids = torch.randint(0, VOCAB, (8, LENGTH))
    losses = diffusion.training_losses(model, ids, keys=WindowKeys.batch(0, 5, 8))
    (call,) = calls
    block_of = torch.arange(LENGTH) // 2
    # the drawn block of each window: where the timesteps are neither 0 (earlier) nor T-1 (later)
    current = call.attend.sum(1) // 2 - 1
    assert len(set(current.tolist())) > 1  # windows draw their own blocks
    earlier, in_block = block_of < current[:, None], block_of == current[:, None]
    later = block_of > current[:, None]
    assert earlier.any() and later.any()
    assert torch.equal(call.x[earlier], model.embed(ids)[earlier])  # EMB(w) itself, not noised
    assert (call.t[earlier] == 0).all() and (call.t[later] == T - 1).all()
    assert torch.equal(call.attend, ~later)  # later blocks are masked out of attention
    block_t = call.t[in_block].view(8, 2)
    assert (block_t == block_t[:, :1]).all()  # one timestep per window's block
    # every term over the block's positions only
    picked_ids = ids[in_block]
    expected = F.cross_entropy(model.round(call.out[in_block]).float(), picked_ids)  # rounding on predicted x0
    assert losses["rounding"].item() == pytest.approx(expected.item(), rel=1e-5)


def test_later_blocks_contents_change_neither_the_loss_nor_the_gradient(monkeypatch):
    model, diffusion, _ = toy(block_size=2, predict="epsilon")
    calls = spy(monkeypatch, model)
    ids = torch.randint(0, VOCAB, (8, LENGTH))
    keys = WindowKeys.batch(0, 5, 8)
    first = diffusion.training_losses(model, ids, keys=keys)
    first["total"].backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    assert "embedding.weight" in grads or any("embedding" in name for name in grads)
    later = ~calls[0].attend
    assert later.any()
    changed = ids.clone()
    changed[later] = (ids[later] + 1 + torch.randint(0, VOCAB - 1, (int(later.sum()),))) % VOCAB
    assert (changed[later] != ids[later]).all()
    model.zero_grad()
    second = diffusion.training_losses(model, changed, keys=keys)
    second["total"].backward()
    for name in first:
        assert second[name].item() == pytest.approx(first[name].item(), rel=1e-6, abs=1e-9), name
    for name, p in model.named_parameters():
        assert (p.grad is None) == (name not in grads), name
        if p.grad is not None:
            assert torch.allclose(p.grad, grads[name], rtol=1e-5, atol=1e-7), name


def test_the_attention_mask_is_the_same_as_leaving_later_positions_out():
    """Why sampling may drop the later blocks from the input: under training's mask they are not read."""
    model, _, _ = toy()
    x, t = torch.randn(3, LENGTH, 8), torch.randint(0, T, (3, LENGTH))
    attend = (torch.arange(LENGTH) < 6).expand(3, -1)
    with torch.no_grad():
        masked = model.denoise(x, t, attend=attend)
        assert torch.allclose(masked[:, :6], model.denoise(x[:, :6], t[:, :6]), atol=1e-5)
        assert torch.allclose(model.denoise(x, t, attend=torch.ones(3, LENGTH, dtype=torch.bool)),
                              model.denoise(x, t), atol=1e-6)


def test_block_timesteps_run_the_chain_over_the_block_only():
    model, diffusion, _ = toy()
    scheduler = DiffusionScheduler(diffusion.schedule)
    scheduler.set_block_timesteps(10, 2, 6)
    rows = scheduler.timesteps
    assert rows.shape == (10, 6) and (rows[:, :2] == 0).all()
    assert rows[:, 2:].tolist() == [[t] * 4 for t in sampling_timesteps(diffusion.schedule, 10)]
    assert scheduler.frozen[:, :2].all() and not scheduler.frozen[:, 2:].any()
    # a finished block keeps its x bit for bit, whatever x0 a hook hands the step
    x, pred_x0 = torch.randn(64, 6, 8), torch.randn(64, 6, 8)
    x_next, _ = scheduler.step(pred_x0, 3, x, torch.Generator().manual_seed(0))
    assert torch.equal(x_next[:, :2], x[:, :2]) and not torch.allclose(x_next[:, 2:], x[:, 2:])
    scheduler.set_block_timesteps(10, 2, 6, start_t=20)
    assert rows.shape[0] > len(scheduler) and scheduler.timesteps[0, 2] == 20 and (scheduler.timesteps[1:, 2:] < 20).all()


@pytest.mark.parametrize("start", [False, True])
def test_sampling_never_changes_a_finished_block(monkeypatch, start):
    model, diffusion, config = toy(block_size=2)
    calls = spy(monkeypatch, model)
    generator = torch.Generator().manual_seed(0)
    begin = dict(start=torch.randn(3, LENGTH, 8), start_t=30) if start else {}
    # drawn at temperature 1: a chain that decoded a finished block again would redraw its words
    states = list(sample_progressive(model, diffusion, (3, LENGTH), 10, clamp=True, generator=generator,
                                     temperature=1.0, **begin))
    per_block = len(states) // 4
    assert [s.index for s in states] == list(range(len(states))) and len(states) == 4 * per_block
    finished = [s.words for s in states if s.words is not None]
    assert len(finished) == 4 and states[-1].words is finished[-1]
    words = finished[-1]
    clean = model.embed(words)
    for number, state in enumerate(states):
        first = 2 * (number // per_block)  # the block this state's chain runs
        call = calls[number]
        # the denoiser sees the finished blocks clean at t = 0, and nothing of the later ones
        t = call.t if call.t.ndim == 2 else call.t[:, None].expand(-1, call.x.shape[1])
        assert call.x.shape[1] == first + 2 and (t[:, :first] == 0).all()
        assert (t[:, first:] == states[number].t).all()
        assert torch.equal(call.x[:, :first], clean[:, :first])
        assert torch.equal(state.x[:, :first], clean[:, :first])  # and they never move
        if state.words is not None:
            assert torch.equal(state.words[:, :first + 2], words[:, :first + 2])

    # generate returns the chain's words, not a new decoding of its last x
    run = SimpleNamespace(model=model, objective=diffusion, config=config, tokenizer=SimpleNamespace(unk_id=1))
    options = SampleOptions.from_config(config, num_samples=3, temperature=1.0, clamp=True)
    ids, _ = generate(run, options, torch.Generator().manual_seed(0))
    repeat = list(sample_progressive(model, diffusion, (3, LENGTH), 10, clamp=True,
                                     generator=torch.Generator().manual_seed(0), temperature=1.0))
    assert torch.equal(ids, repeat[-1].words)


def test_block_size_must_divide_seq_len_and_order_the_chain_alone():
    with pytest.raises(ConfigError, match=r"'block_size' \(3\) must divide seq_len \(8\): use one of 1, 2, 4, 8"):
        toy(block_size=3)
    with pytest.raises(ConfigError, match="must divide seq_len"):
        toy(block_size=16)
    with pytest.raises(ConfigError, match="left_to_right"):
        toy(block_size=2, left_to_right=1.0)
    with pytest.raises(ConfigError, match="time_warp"):
        toy(block_size=2, time_warp=True)
    _, diffusion, _ = toy(block_size=4)
    assert chain_blocks(diffusion, LENGTH) == 2


def test_a_block_run_trains_samples_and_prints_its_chain_cost(tmp_path, capsys):
    from dlm.cli import main
    from tests.conftest import ROOT, make_corpus

    corpus = make_corpus(tmp_path / "corpus.txt")
    run_dir = tmp_path / "run"
    assert main(["train", str(ROOT / "params" / "smoke.yaml"), "--run_dir", str(run_dir), "--corpus", str(corpus),
                 "--max_steps", "2", "--precision", "fp32", "--device", "cpu", "--min_count", "1",
                 "--max_train_tokens", "none", "--block_size", "4"]) == 0
    out = tmp_path / "samples.jsonl"
    assert main(["sample", "--run_dir", str(run_dir), "--out", str(out), "--num_samples", "3", "--steps", "5"]) == 0
    assert "chain: 4 blocks x 5 steps = 20 denoiser calls" in capsys.readouterr().out
    assert len(out.read_text().splitlines()) == 3


def test_every_block_mask_reads_earlier_blocks_clean_and_never_noise():
    mask = every_block_mask(4, 2).int().tolist()
    # rows: queries [noised 0..3, clean 0..3]; columns: keys in the same order
    assert mask == [[1, 1, 0, 0, 0, 0, 0, 0],
                    [1, 1, 0, 0, 0, 0, 0, 0],
                    [0, 0, 1, 1, 1, 1, 0, 0],
                    [0, 0, 1, 1, 1, 1, 0, 0],
                    [0, 0, 0, 0, 1, 1, 0, 0],
                    [0, 0, 0, 0, 1, 1, 0, 0],
                    [0, 0, 0, 0, 1, 1, 1, 1],
                    [0, 0, 0, 0, 1, 1, 1, 1]]


def test_training_every_block_at_once_denoises_each_block_as_its_sampler_asks():
    """BD3-LM's one pass over [noised window, clean window] gives each block the output the
    sampler gets for it: the finished blocks clean at t = 0 before it, under the block-causal mask."""
    model, diffusion, _ = toy(block_size=2, block_training="all")
    ids = torch.randint(0, VOCAB, (3, LENGTH))
    emb = model.embed(ids)
    x_t = torch.randn(3, LENGTH, 8)
    t = torch.randint(1, T, (3, LENGTH // 2)).repeat_interleave(2, dim=1)
    with torch.no_grad():
        every = denoise_every_block(model, x_t, t, emb, 2)
        for first in range(0, LENGTH, 2):
            end = first + 2
            x = torch.cat([emb[:, :first], x_t[:, first:end]], dim=1)
            t_positions = torch.cat([torch.zeros(3, first, dtype=torch.long), t[:, first:end]], dim=1)
            alone = model.denoise(x, t_positions, None, block_causal_mask(end, 2)[None])
            assert torch.allclose(every[:, first:end], alone[:, first:], atol=1e-5), first


@pytest.mark.parametrize("training", ["one", "all"])
def test_scoring_asks_each_block_with_the_words_before_it_clean(training):
    """What the likelihood bound and the probe ask (`x0_given_earlier_blocks`): block by block,
    the earlier blocks clean at t = 0 and the later ones left out, under the run's own mask."""
    model, diffusion, _ = toy(block_size=2, block_training=training)
    ids = torch.randint(0, VOCAB, (3, LENGTH))
    emb = model.embed(ids)
    x_t, t = torch.randn(3, LENGTH, 8), torch.randint(1, T, (3,))
    with torch.no_grad():
        scored = x0_given_earlier_blocks(model, diffusion, x_t, t, emb)
        for first in range(0, LENGTH, 2):
            x = torch.cat([emb[:, :first], x_t[:, first:first + 2]], dim=1)
            t_positions = torch.cat([torch.zeros(3, first, dtype=torch.long), t[:, None].expand(3, 2)], dim=1)
            mask = block_causal_mask(first + 2, 2)[None] if training == "all" else None
            alone = model.denoise(x, t_positions, None, mask)
            assert torch.allclose(scored[:, first:first + 2], alone[:, first:], atol=1e-5), first


def test_training_every_block_scores_every_position(monkeypatch):
    model, diffusion, _ = toy(block_size=2, block_training="all")
    calls = spy(monkeypatch, model)
    ids = torch.randint(0, VOCAB, (4, LENGTH))
    losses = diffusion.training_losses(model, ids, keys=WindowKeys.batch(0, 3, 4))
    call = calls[-1]
    assert call.x.shape == (4, 2 * LENGTH, 8) and (call.t[:, LENGTH:] == 0).all()
    assert torch.equal(call.x[:, LENGTH:], model.embed(ids))  # the clean window beside the noised one
    noised_t = call.t[:, :LENGTH].view(4, LENGTH // 2, 2)
    assert (noised_t[..., 0] == noised_t[..., 1]).all()  # one timestep per block
    assert noised_t[..., 0].unique().numel() > 1  # and the blocks' timesteps differ
    # every position is scored: a loss taken over one block would not move when another block's words change
    changed = ids.clone()
    changed[:, 0] = (changed[:, 0] + 1) % VOCAB
    other = diffusion.training_losses(model, changed, keys=WindowKeys.batch(0, 3, 4))
    assert other["rounding"].item() != pytest.approx(losses["rounding"].item(), rel=1e-6)
    with pytest.raises(ConfigError, match="self_condition"):
        toy(block_size=2, block_training="all", self_condition=0.5)


def test_a_run_trained_on_every_block_samples_under_the_block_causal_mask(monkeypatch):
    model, diffusion, _ = toy(block_size=2, block_training="all")
    calls = spy(monkeypatch, model)
    list(sample_progressive(model, diffusion, (2, LENGTH), 4, clamp=False, generator=torch.Generator().manual_seed(0),
                            prefix_cache=False))  # the reference path; tests/test_prefix_cache.py: the same samples
    for call in calls:
        assert torch.equal(call.attend[0], block_causal_mask(call.x.shape[1], 2))
    one_model, one_diffusion, _ = toy(block_size=2)  # trained one block at a time: context and block read each other
    calls = spy(monkeypatch, one_model)
    list(sample_progressive(one_model, one_diffusion, (2, LENGTH), 4, clamp=False,
                            generator=torch.Generator().manual_seed(0)))
    assert all(call.attend is None for call in calls)
