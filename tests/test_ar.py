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
