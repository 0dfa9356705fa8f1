"""The denoiser's key/value cache of a clean prefix (TinyTransformer.cache_prefix): a block after
the cache gets what it gets with the prefix in its input under a mask where the prefix never reads
it, and block chains sample the same words with and without it."""

import pytest
import torch

from dlm.core.config import load_config
from dlm.core.nets import TinyTransformer
from dlm.families.blocks import block_causal_mask
from dlm.families.gaussian_model import DiffusionLM
from dlm.families.gaussian_sampling import posterior_x0_hook, sample_progressive
from dlm.runs.build import build_objective

LENGTH, VOCAB, T = 32, 13, 50


def net(causal=False, positions="learned"):
    torch.manual_seed(0)
    return TinyTransformer(8, 16, 2, 2, LENGTH, dropout=0.0, causal=causal, positions=positions).eval()


@pytest.mark.parametrize("positions", ["learned", "rotary"])
def test_a_block_after_a_cache_reads_what_the_block_causal_mask_shows_it(positions):
    model = net(positions=positions)
    x, t = torch.randn(3, 12, 8), torch.randint(0, T, (3, 12))
    whole = model(x, t, block_causal_mask(12, 4)[None])
    cache = model.cache_prefix(x[:, :4], t[:, :4])
    cache = model.cache_prefix(x[:, 4:8], t[:, 4:8], cache)  # the prefix grown block by block
    assert cache.length == 8
    assert torch.allclose(model(x[:, 8:], t[:, 8:], cache=cache), whole[:, 8:], atol=1e-5)
    in_one = model.cache_prefix(x[:, :8], t[:, :8], attend=block_causal_mask(8, 4)[None])
    assert torch.allclose(model(x[:, 8:], t[:, 8:], cache=in_one), whole[:, 8:], atol=1e-5)
    # positions after the cache are the window's, unless given
    shifted = model(x[:, 8:], t[:, 8:], cache=cache, positions=torch.arange(4))
    assert not torch.allclose(shifted, whole[:, 8:], atol=1e-3)


@pytest.mark.parametrize("positions", ["learned", "rotary"])
def test_a_causal_model_with_a_cache_is_the_causal_model(positions):
    model = net(causal=True, positions=positions)
    x = torch.randn(2, 10, 8)
    t = torch.zeros(2, dtype=torch.long)
    whole = model(x, t)
    cache = model.cache_prefix(x[:, :6], t)
    assert torch.allclose(model(x[:, 6:], t, cache=cache), whole[:, 6:], atol=1e-5)


def toy(block_size, block_training="all", **overrides):
    config = load_config(None, embed_dim=8, width=16, depth=2, heads=2, seq_len=LENGTH, diffusion_steps=T,
                         sample_steps=4, dropout=0.0, block_size=block_size, block_training=block_training, **overrides)
    torch.manual_seed(0)
    model = DiffusionLM(config, vocab_size=VOCAB).eval()
    # an untrained denoiser's outputs are near zero; scale them so the prefix matters to each step
    with torch.no_grad():
        model.denoiser.out_proj.weight.mul_(20)
    return model, build_objective(config)


def close(a, b):
    """Equal to float rounding, relative to the largest value (an untrained epsilon model's x0 at
    T-1, divided by sqrt(alpha_bar), runs to 1e4)."""
    return (a - b).abs().max() <= 1e-6 * max(a.abs().max(), 100)


def chain(model, diffusion, cached, **options):
    return list(sample_progressive(model, diffusion, (3, LENGTH), 4, clamp=False, temperature=1.0,
                                   generator=torch.Generator().manual_seed(0), prefix_cache=cached, **options))


@pytest.mark.parametrize("block_size", [1, 4, 16])
@pytest.mark.parametrize("predict", ["x0", "epsilon"])
def test_cached_and_uncached_block_chains_sample_the_same_words(monkeypatch, block_size, predict):
    model, diffusion = toy(block_size, predict=predict)
    lengths, forward = [], model.denoiser.forward

    def counted(x, *args, **kwargs):
        lengths.append(x.shape[1])
        return forward(x, *args, **kwargs)

    monkeypatch.setattr(model.denoiser, "forward", counted)
    reference = chain(model, diffusion, cached=False)
    assert max(lengths) == LENGTH
    lengths.clear()
    cached = chain(model, diffusion, cached=True)
    assert set(lengths) == {block_size}  # every step runs the block's positions only
    assert len(cached) == len(reference) == 4 * LENGTH // block_size
    assert torch.equal(cached[-1].words, reference[-1].words)
    for ours, theirs in zip(cached, reference):
        assert close(ours.x, theirs.x) and close(ours.pred_x0, theirs.pred_x0)
    # the prefix matters: other earlier words give the last block other predictions
    assert not torch.allclose(cached[-1].pred_x0[:, -block_size:], model.embed(cached[-1].words)[:, -block_size:],
                              atol=1e-3) or block_size == 16


@pytest.mark.parametrize("block_size", [1, 4])
@pytest.mark.parametrize("cached", [True, False])
def test_a_block_chain_moves_its_block_toward_the_posterior_x0_computed_on_the_block_alone(monkeypatch, block_size,
                                                                                         cached):
    """x0='posterior' in a block chain gives the words and the block's states of the posterior hook
    run over the whole prefix and block (given as an ordinary hook), but computes it on the block
    only; the finished blocks stay their clean embeddings."""
    model, diffusion = toy(block_size)
    whole_window = chain(model, diffusion, cached, hooks=(posterior_x0_hook(model, diffusion),))
    rows, expected = [], model.expected_embedding
    monkeypatch.setattr(model, "expected_embedding", lambda x: rows.append(x.shape[1]) or expected(x))
    on_block = chain(model, diffusion, cached, x0="posterior")
    assert set(rows) == {block_size}
    assert torch.equal(on_block[-1].words, whole_window[-1].words)
    for ours, theirs in zip(on_block, whole_window):
        first = ours.index // 4 * block_size  # 4 steps a block
        block = slice(first, first + block_size)
        assert close(ours.x[:, block], theirs.x[:, block]) and close(ours.pred_x0[:, block], theirs.pred_x0[:, block])
        assert torch.equal(ours.x[:, :first], model.embed(on_block[-1].words[:, :first]))


def test_a_run_trained_one_block_per_window_is_not_cached(monkeypatch):
    model, diffusion = toy(4, block_training="one")
    lengths, forward = [], model.denoiser.forward
    monkeypatch.setattr(model.denoiser, "forward", lambda x, *a, **k: lengths.append(x.shape[1]) or forward(x, *a, **k))
    chain(model, diffusion, cached=True)
    assert max(lengths) == LENGTH  # its context reads the noised block: the whole prefix runs every step
