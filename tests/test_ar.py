import pytest
import torch

from dlm.core.config import load_config
from dlm.families.autoregressive import AutoregressiveLM


def tiny_ar():
    config = load_config(None, embed_dim=16, width=32, depth=1, heads=2, seq_len=8, dropout=0.0)
    torch.manual_seed(0)
    return AutoregressiveLM(config, vocab_size=13)


def test_the_causal_mask_hides_the_future():
    model = tiny_ar().eval()
    ids = torch.randint(0, 13, (2, 8))
    changed = ids.clone()
    changed[:, 5:] = (changed[:, 5:] + 1) % 13
    assert torch.allclose(model(ids)[:, :5], model(changed)[:, :5], atol=1e-6)
    assert not torch.allclose(model(ids)[:, 5:], model(changed)[:, 5:])


def test_losses_and_token_nll_agree():
    model = tiny_ar().eval()
    ids = torch.randint(0, 13, (3, 8))
    loss = model.losses(ids)["nll"].item()
    assert abs(model.token_nll(ids).mean().item() - loss) < 1e-5
    assert model.token_nll(ids).shape == (3, 7)


def test_a_trained_model_learns_a_cycle_and_generates_it():
    model = tiny_ar()
    ids = torch.arange(8).repeat(16, 1) % 5 + 2  # 2 3 4 5 6 2 3 4 ...
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(150):
        optimizer.zero_grad()
        model.losses(ids)["total"].backward()
        optimizer.step()
    model.eval()
    assert model.losses(ids)["nll"].item() < 0.05
    out = model.generate(4, 6, start_id=2, temperature=0.5, generator=torch.Generator().manual_seed(0))
    assert out.shape == (4, 6) and out[:, :4].tolist() == [[3, 4, 5, 6]] * 4


@pytest.mark.parametrize("positions", ["learned", "rotary"])
def test_the_kv_cache_gives_the_uncached_samples(positions):
    """Cached decoding (one token's forward per token) draws what re-running the prefix draws, with
    the same generator: from a start token, after per-sequence prompts, and past the window, where
    the uncached window slides and the cache is left."""
    torch.manual_seed(0)
    model = AutoregressiveLM(load_config(None, model="ar", seq_len=12, embed_dim=8, width=16, depth=2, heads=2,
                                         dropout=0.0, positions=positions), 30).eval()
    prompts = torch.randint(0, 30, (5, 3))
    for kwargs in ({"count": 5, "length": 12}, {"count": 5, "length": 9, "prompt": prompts},
                   {"count": 5, "length": 16, "prompt": prompts}):
        draws = [model.generate(start_id=1, temperature=1.3, generator=torch.Generator().manual_seed(7),
                                cached=cached, **kwargs) for cached in (True, False)]
        assert torch.equal(draws[0], draws[1]), kwargs


def test_extend_equals_the_full_causal_forward():
    torch.manual_seed(0)
    model = AutoregressiveLM(load_config(None, model="ar", seq_len=10, embed_dim=8, width=16, depth=2, heads=2,
                                         dropout=0.0, positions="rotary"), 30).eval()
    x = model.embedding(torch.randint(0, 30, (3, 10)))
    full = model.transformer(x)
    out, cache = model.transformer.extend(x[:, :4])
    pieces = [out]
    for i in range(4, 10):
        out, cache = model.transformer.extend(x[:, i:i + 1], cache)
        pieces.append(out)
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, atol=1e-5, rtol=1e-5)
    assert cache.length == 10
