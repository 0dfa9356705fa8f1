import math

import pytest
import torch

from dlm.core.embeddings import LearnedEmbedding, LearnedRounding, pca_project, pretrained_table, read_word_vectors


def test_pca_keeps_the_directions_of_largest_variance():
    torch.manual_seed(0)
    signal = torch.randn(500, 1) * torch.tensor([[3.0, 3.0, 0.0, 0.0]])  # variance along (1, 1, 0, 0)
    noise = torch.randn(500, 4) * 0.1
    projected = pca_project(signal + noise, 1)
    assert projected.shape == (500, 1)
    corr = torch.corrcoef(torch.stack([projected[:, 0], signal[:, 0]]))[0, 1].abs()
    assert corr > 0.99
    assert pca_project(torch.randn(10, 2), 5).shape == (10, 5)  # fewer dims: zero-padded


def test_pretrained_table_covers_known_words_and_reports_coverage(tmp_path):
    path = tmp_path / "glove.txt"
    path.write_text("king 1 2 3\nqueen 1 2 4\nthe 0 0 1\n")
    vectors = read_word_vectors(path)
    table, covered = pretrained_table(vectors, ["<pad>", "<unk>", "the", "king", "rare"], 2, 1.0,
                                      torch.Generator().manual_seed(0))
    assert covered == 2 and table.shape == (5, 2)
    bad = tmp_path / "bad.txt"
    bad.write_text("king 1 2 3\nqueen 1 2\n")
    with pytest.raises(ValueError, match="expected 3"):
        read_word_vectors(bad)


@pytest.mark.parametrize("norm", ["l2", "layernorm"])
def test_normalised_tables_have_fixed_geometry(norm):
    embedding = LearnedEmbedding(50, 16, norm=norm, init_std=0.5)
    norms = embedding.table().norm(dim=-1)
    assert torch.allclose(norms, torch.full((50,), math.sqrt(16)), rtol=1e-3)


def test_frozen_table_gets_no_gradient():
    embedding = LearnedEmbedding(10, 4, trainable=False)
    assert not embedding.weight.requires_grad


def test_tied_rounding_decodes_each_row_to_itself():
    embedding = LearnedEmbedding(20, 32)
    tied = LearnedRounding(32, 20, tied_embedding=embedding)
    assert torch.equal(tied(embedding.table()).argmax(-1), torch.arange(20))
    untied = LearnedRounding(32, 20)
    assert untied(torch.randn(3, 32)).shape == (3, 20) and untied.output_bias.shape == (20,)


@pytest.mark.parametrize("norm, rounding", [("l2", "tied"), ("none", "untied")])
def test_chunked_rounding_loss_matches_plain_cross_entropy(norm, rounding):
    """LearnedRounding.loss gives F.cross_entropy's value and gradients, chunked or not."""
    import torch.nn.functional as F

    from dlm.core import embeddings

    torch.manual_seed(0)
    table = LearnedEmbedding(50, 8, norm=norm)
    head = LearnedRounding(8, 50, tied_embedding=table if rounding == "tied" else None)
    x = torch.randn(3, 7, 8, requires_grad=True)
    ids = torch.randint(0, 50, (3, 7))
    params = [x, *(p for p in head.parameters() if p.requires_grad)]  # tied: the table is among them

    plain = F.cross_entropy(head(x).reshape(-1, 50), ids.reshape(-1))
    expected = torch.autograd.grad(plain, params)
    for chunk in (50, 4 * 50, 10**6):  # one row per chunk, a few rows, everything at once
        loss = embeddings.linear_cross_entropy(*head._weights(x.reshape(-1, 8)), ids.reshape(-1), chunk_elements=chunk)
        assert loss.item() == pytest.approx(plain.item(), rel=1e-6)
        for got, want in zip(torch.autograd.grad(loss, params), expected):
            assert torch.allclose(got, want, rtol=1e-5, atol=1e-7)
    assert head.loss(x, ids).item() == pytest.approx(plain.item(), rel=1e-6)
    with torch.no_grad():
        assert head.loss(x, ids).item() == pytest.approx(plain.item(), rel=1e-6)
    x.requires_grad_(False)  # only the table and bias need gradients
    assert head.loss(x, ids).requires_grad


def test_chunked_expectation_matches_the_softmax_weighted_sum():
    """LearnedRounding.expectation is sum_w p(w | x) values[w] with p the rounding softmax, computed
    here by hand from the logits, for chunks that split the rows unevenly, under bf16 autocast, and
    with gradients."""
    torch.manual_seed(0)
    table = LearnedEmbedding(50, 8, norm="l2")
    head = LearnedRounding(8, 50, tied_embedding=table)
    with torch.no_grad():
        head.bias.copy_(torch.randn(50))
        head.log_scale.fill_(1.5)  # a peaked softmax: a misplaced chunk row shows
    x = torch.randn(3, 7, 8)
    values = torch.randn(50, 5)
    logits = x @ table.table().T * math.exp(1.5) + head.bias
    weights = logits.exp() / logits.exp().sum(-1, keepdim=True)
    by_hand = (weights[..., :, None] * values).sum(-2)
    with torch.no_grad():
        for chunk in (50, 4 * 50, 10**6):  # one row per chunk, 4 rows (21 rows: the last chunk of 1), all at once
            got = head.expectation(x, values, chunk_elements=chunk)
            assert got.shape == (3, 7, 5) and got.dtype == torch.float32
            assert torch.allclose(got, by_hand, atol=1e-5)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert torch.allclose(head.expectation(x, values, chunk_elements=4 * 50), by_hand, atol=1e-5)
    x.requires_grad_(True)
    got = head.expectation(x, values)
    assert torch.allclose(got, by_hand, atol=1e-5)
    got.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_weighted_rounding_loss_matches_weighted_plain_cross_entropy():
    """LearnedRounding.weighted_loss: the mean of weight * CE with its gradients, and each
    position's CE, against F.cross_entropy(reduction='none') (one row per chunk and all at once)."""
    import torch.nn.functional as F

    from dlm.core import embeddings

    torch.manual_seed(0)
    table = LearnedEmbedding(50, 8, norm="l2")
    head = LearnedRounding(8, 50, tied_embedding=table)
    x = torch.randn(3, 7, 8, requires_grad=True)
    ids = torch.randint(0, 50, (3, 7))
    weights = torch.rand(3, 7) * 4
    params = [x, *(p for p in head.parameters() if p.requires_grad)]
    each = F.cross_entropy(head(x).transpose(1, 2), ids, reduction="none")  # (3, 7)
    plain = (each * weights).mean()
    expected = torch.autograd.grad(plain, params)
    for chunk in (50, 10**6):
        mean, rows = embeddings.linear_cross_entropy_rows(*head._weights(x.reshape(-1, 8)), ids.reshape(-1),
                                                          weights.reshape(-1), chunk_elements=chunk)
        assert mean.item() == pytest.approx(plain.item(), rel=1e-6)
        assert torch.allclose(rows, each.detach().reshape(-1), atol=1e-5) and not rows.requires_grad
        for got, want in zip(torch.autograd.grad(mean, params), expected):
            assert torch.allclose(got, want, rtol=1e-5, atol=1e-7)
    with torch.no_grad():
        mean, rows = head.weighted_loss(x, ids, weights)
    assert mean.item() == pytest.approx(plain.item(), rel=1e-6) and torch.allclose(rows, each, atol=1e-5)
