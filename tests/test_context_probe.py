"""The masked family's context probe: a bag-of-words model scores the same at every mask rate, a
model that reads its neighbours scores far better when few positions are masked."""

import math

import torch

from dlm.families.masked_probe import masked_context_use

VOCAB = 10


class Fixed(torch.nn.Module):
    """Logits that ignore the input: a unigram model over the vocabulary."""
    mask_id = VOCAB

    def __init__(self, log_p):
        super().__init__()
        self.log_p = log_p

    def forward(self, z):
        return self.log_p.expand(*z.shape, -1)


class Neighbour(Fixed):
    """Pairs (a a b b ...): reads the pair's other position when it is visible, else the unigram."""

    def forward(self, z):
        partner = z.view(z.shape[0], -1, 2).flip(-1).reshape(z.shape)
        logits = self.log_p.expand(*z.shape, -1).clone()
        seen = partner != self.mask_id
        logits[seen] = torch.where(torch.arange(VOCAB) == partner[seen][:, None], 0.0, -30.0)
        return logits


def test_a_bag_of_words_scores_the_same_at_every_rate_and_a_reader_of_context_does_not():
    ids = torch.randint(0, VOCAB, (200, 8), generator=torch.Generator().manual_seed(0)).repeat_interleave(2, dim=1)
    uniform = torch.full((VOCAB,), -math.log(VOCAB))
    bag = masked_context_use(Fixed(uniform), ids, uniform, rates=(0.1, 1.0))
    # oracle: a uniform model's cross-entropy is log V wherever it is asked, as is the unigram's
    for column in ("cross_entropy", "unigram"):
        assert all(abs(value - math.log(VOCAB)) < 1e-5 for value in bag[column])
    reader = masked_context_use(Neighbour(uniform), ids, uniform, rates=(0.1, 1.0)).set_index("mask_rate")
    # at rate 0.1 the partner is visible 90% of the time: about 0.1 * log V; at rate 1 never
    assert abs(reader.loc[0.1, "cross_entropy"] - 0.1 * math.log(VOCAB)) < 0.1
    assert abs(reader.loc[1.0, "cross_entropy"] - math.log(VOCAB)) < 1e-5
