"""The masked family (MDLM, and masked block diffusion): its time draws, the ancestral sampler with
caching and its float64 draws, carry-over of fixed words, and block size 1 as an autoregressive
model in likelihood terms."""

import itertools
import json
import math

import pytest
import torch
import torch.nn.functional as F

from dlm.core.config import load_config
from dlm.core.noise import WindowKeys
from dlm.families import masked
from tests.conftest import ROOT


def tiny(**overrides):
    return load_config(ROOT / "params" / "masked_smoke.yaml", **{"seq_len": 8, "embed_dim": 8, "width": 16, "heads": 2,
                                                                  "precision": "fp32", "device": "cpu", **overrides})


def model_and_objective(vocab=12, seed=0, **overrides):
    config = tiny(**overrides)
    torch.manual_seed(seed)
    model = masked.new_model(config, vocab).eval()
    return config, model, masked.objective(config)


def test_mask_rates_are_low_discrepancy_and_do_not_depend_on_the_split():
    objective = masked.MaskedDiffusion(None, (1e-3, 1.0))
    whole = objective.draw_rates(64, 1, WindowKeys.batch(3, 7, 64), None, (0.0, 1.0))[:, 0]
    halves = torch.cat([objective.draw_rates(32, 1, WindowKeys.batch(3, 7, 32, first), None, (0.0, 1.0))[:, 0]
                        for first in (0, 32)])
    assert torch.equal(whole, halves)  # a window's t is its own, however the batch is split
    gaps = torch.diff(torch.sort(whole).values)
    # the additive recurrence leaves no gap above 3/B; independent draws leave one of about log(B)/B
    assert gaps.max() < 3 / 64
    iid = torch.sort(torch.rand(64, generator=torch.Generator().manual_seed(0))).values
    assert torch.diff(iid).max() > gaps.max()
    clipped = objective.draw_rates(64, 4, WindowKeys.batch(3, 7, 64), None, (0.3, 0.8))
    assert clipped.min() >= 0.3 and clipped.max() <= 0.8 and clipped.shape == (64, 4)


def test_the_loss_is_the_one_over_t_weighted_masked_cross_entropy():
    """An oracle for one window: with every position masked (t drawn at 1 exactly), the loss is the
    plain CE of the all-mask window's logits; SUBS: the head never scores [MASK]."""
    config, model, objective = model_and_objective()
    objective.rate_range = (1.0 - 1e-9, 1.0)  # t = 1: every position masked, weight 1
    ids = torch.randint(0, 12, (3, 8), generator=torch.Generator().manual_seed(1))
    losses = objective.training_losses(model, ids, generator=torch.Generator().manual_seed(2))
    logits = model(torch.full_like(ids, model.mask_id))
    assert logits.shape[-1] == 12  # no [MASK] logit
    expected = F.cross_entropy(logits.transpose(1, 2), ids)
    assert losses["nelbo"].item() == pytest.approx(expected.item(), rel=1e-5)
    assert losses["masked_ce"].item() == pytest.approx(expected.item(), rel=1e-5)


def test_the_weight_one_over_t_makes_the_loss_unbiased():
    """With a network that ignores its input (an oracle whose CE at a position does not depend on
    what is masked), E[loss] over the masks is the mean CE for every t: the 1/t weight undoes the
    share t of positions masked."""
    config, model, objective = model_and_objective()
    ids = torch.randint(0, 12, (3, 8), generator=torch.Generator().manual_seed(1))
    fixed = torch.randn(3, 8, config.embed_dim, generator=torch.Generator().manual_seed(2))
    model.hidden = lambda z, *args, **kwargs: fixed
    expected = F.cross_entropy(model.logits(fixed).transpose(1, 2), ids).item()
    for t in (0.2, 0.7):
        objective.rate_range = (t - 1e-9, t)
        with torch.no_grad():
            losses = torch.tensor([objective.training_losses(model, ids, torch.Generator().manual_seed(seed))["nelbo"]
                                   for seed in range(400)])
        assert abs(losses.mean().item() - expected) < 4 * losses.std().item() / math.sqrt(400), t


def naive_chain(predict, z, mask_id, steps, generator):
    """The ancestral sampler without caching: the network asked at every step (the oracle), the
    same two-stage draws (unmask or not, then the word, by the inverse CDF)."""
    for index in range(steps):
        t, s = 1 - index / steps, 1 - (index + 1) / steps
        probs = torch.softmax(predict(z).double(), -1)
        unmask = (z == mask_id) & (torch.rand(z.shape, generator=generator, dtype=torch.float64) < (t - s) / t)
        if unmask.any():
            z = z.clone()
            z[unmask] = masked.inverse_cdf(probs[unmask], generator)
    return z


def test_the_network_reads_only_the_rows_that_unmask_and_changes_no_draw():
    """The network runs at a step only on the rows where a position unmasks (on the window as the
    row's last change left it), so no row is run more often than it has masked positions; the
    draws are those of the chain that asks the network for every row at every step (the oracle)."""
    config, model, _ = model_and_objective()
    calls = []

    def predict(z, rows):
        calls.append((z.clone(), rows))
        return model(z)

    start = torch.full((4, 8), model.mask_id)
    start[:, 2] = 5  # a fixed word: never changed
    states = list(masked.unmask_chain(predict, start, model.mask_id, 100, torch.Generator().manual_seed(0)))
    final = states[-1].z
    assert (final != model.mask_id).all() and (final[:, 2] == 5).all()
    steps_that_unmask = [state for state in states if state.unmasked.any()]
    assert len(calls) == len(steps_that_unmask) < 100
    before = start
    for (z, rows), state in zip(calls, steps_that_unmask):
        expected = state.unmasked.any(1).nonzero().flatten()
        if len(expected) == len(start):
            assert rows is None and torch.equal(z, before)
        else:
            assert torch.equal(rows, expected) and torch.equal(z, before[expected])
        before = state.z
    assert sum(len(z) for z, _ in calls) <= 7 * 4  # a row pass per masked position at most
    reference = naive_chain(model, start, model.mask_id, 100, torch.Generator().manual_seed(0))
    assert torch.equal(final, reference)


def tail_distribution(tail=4000, top=0.9):
    """One likely word and a long tail of unlikely ones holding 10% of the mass between them."""
    return torch.cat([torch.tensor([top]), torch.full((tail,), (1 - top) / tail)]).double()


def test_a_draw_follows_its_probabilities_and_never_takes_a_zero():
    """Oracle: the probabilities themselves."""
    probs = torch.tensor([0.0, 0.5, 0.0, 0.3, 0.2], dtype=torch.float64)
    drawn = masked.categorical(probs.expand(20000, -1), torch.Generator().manual_seed(0))
    counts = torch.bincount(drawn, minlength=5).double() / 20000
    assert counts[0] == 0 and counts[2] == 0
    for word, p in ((1, 0.5), (3, 0.3), (4, 0.2)):
        assert abs(counts[word] - p) < 4 * math.sqrt(p * (1 - p) / 20000)


def test_draws_are_float64_low_precision_gumbel_noise_loses_the_tail():
    """Zheng et al. 2024: truncated Gumbel noise under-draws unlikely tokens. With float16 noise the
    largest Gumbel value (about 7.6) minus the smallest (about -2.3) cannot bridge the log-odds of
    10.5 between the tail words and the top word: a tail holding 10% of the mass is never drawn.
    The sampler's float64 draw gives the tail its share."""
    probs = tail_distribution().expand(1000, -1)
    tail_share = {dtype: float((masked.categorical(probs, torch.Generator().manual_seed(0), dtype) > 0).double().mean())
                  for dtype in (torch.float16, torch.float64)}
    assert tail_share[torch.float16] == 0.0
    assert abs(tail_share[torch.float64] - 0.1) < 4 * math.sqrt(0.1 * 0.9 / 1000)

    # the sampler itself: one step from all masks draws every position from the network's distribution
    log_p = tail_distribution().log().float()
    states = list(masked.unmask_chain(lambda z, rows: log_p.expand(*z.shape, -1), torch.full((1, 1000), 4001), 4001, 1,
                                      torch.Generator().manual_seed(1)))
    drawn = states[-1].z
    assert abs(float((drawn > 0).double().mean()) - 0.1) < 4 * math.sqrt(0.1 * 0.9 / 1000)


@pytest.mark.parametrize("sampler", masked.SAMPLERS)
def test_fixed_words_are_carried_over(sampler):
    """SUBS: a position given unmasked is never masked again, so infilling keeps every fixed word
    without a correction afterwards."""
    config, model, objective = model_and_objective()
    ids = torch.randint(0, 12, (5, 8), generator=torch.Generator().manual_seed(3))
    known = torch.zeros(5, 8, dtype=torch.bool)
    known[:, [0, 3, 7]] = True
    out, scores = masked.sample_ids(model, objective, ids, known, masked.Unmasking(sampler, steps=6),
                                    torch.Generator().manual_seed(0), keep_scores=True)
    assert torch.equal(out[known], ids[known]) and (out != model.mask_id).all()
    assert scores.shape == (5, 8, 12)
    # each generated word was drawn from its scores (a distribution), the fixed ones have none
    assert torch.allclose(scores[~known].exp().sum(-1), torch.ones(int((~known).sum())), atol=1e-4)
    assert (scores[known] == 0).all()


@pytest.mark.parametrize("sampler, steps", [("grid", 3), ("confidence", 3), ("first_hitting", 2)])
def test_blocks_are_generated_left_to_right(sampler, steps):
    """Each block's chain runs after the one before it: `steps` states a block (first_hitting: one
    per position of the block, 2 here)."""
    config, model, objective = model_and_objective(block_size=2, block_training="all")
    frames = []
    ids = torch.zeros(3, 8, dtype=torch.long)
    masked.sample_ids(model, objective, ids, torch.zeros_like(ids, dtype=torch.bool), masked.Unmasking(sampler, 3),
                      torch.Generator().manual_seed(0), on_step=lambda i, t, z: frames.append((i, z.clone())))
    assert [i for i, _ in frames] == list(range(4 * steps))  # 4 blocks x their steps
    for index, window in frames:
        block = index // steps
        done = window != model.mask_id
        assert done[:, : 2 * block].all() and not done[:, 2 * (block + 1):].any()


def exact_block_one_nll(model, ids):
    """The oracle: with blocks of one token, the model is autoregressive: -log p(x_l | x_<l) read
    at a [MASK] after the clean prefix under a plain causal mask, summed over l (nats per token)."""
    batch, length = ids.shape
    total = torch.zeros(batch, dtype=torch.float64)
    for position in range(length):
        window = torch.cat([ids[:, :position], torch.full((batch, 1), model.mask_id)], dim=1)
        causal = torch.ones(position + 1, position + 1, dtype=torch.bool).tril()[None]
        logits = model(window, causal)[:, -1]
        total += F.cross_entropy(logits.double(), ids[:, position], reduction="none")
    return total / length


def test_block_size_one_is_an_autoregressive_model_in_likelihood():
    """The masked NELBO of a block-size-1 run estimates the exact AR likelihood of its conditionals
    (each block's mask weight 1/t has expectation 1): the estimate lies within four standard
    errors of the oracle, window by window."""
    from types import SimpleNamespace

    config, model, objective = model_and_objective(vocab=12, seed=4, block_size=1, block_training="all")
    ids = torch.randint(0, 12, (6, 8), generator=torch.Generator().manual_seed(5))
    copies = 200  # each window scored 200 times per call, each with 20 stratified mask rates
    with torch.no_grad():
        exact = exact_block_one_nll(model, ids)
        run = SimpleNamespace(model=model, objective=objective, config=config)
        bound = masked.window_bound(run, ids.repeat(copies, 1), 20, torch.Generator().manual_seed(0))["nelbo"] / 8
    estimates = bound.view(copies, 6)  # independent estimates of each window's bound
    mean, se = estimates.mean(0), estimates.std(0) / math.sqrt(copies)
    assert ((mean - exact).abs() < 4 * se).all(), (mean, exact, se)
    assert se.max() < 0.1  # tight enough that a model reading the words after a block fails (checked)


def test_masked_config_keys_and_presets():
    config = load_config(ROOT / "params" / "masked.yaml")
    default = load_config(ROOT / "params" / "default.yaml")
    assert config.model == "masked"
    for key in ("width", "depth", "heads", "seq_len", "batch_size", "epochs"):  # the default's size and budget
        assert getattr(config, key) == getattr(default, key), key
    masked.check_config(config)
    masked.check_config(load_config(ROOT / "params" / "masked_smoke.yaml"))


@pytest.mark.parametrize("block_size", [1, 4, 16])
@pytest.mark.parametrize("sampler", masked.SAMPLERS)
def test_the_prefix_cache_gives_the_recomputed_logits_and_samples(block_size, sampler):
    """A block reads the finished blocks through their cached keys and values: the same logits as
    running the whole prefix through the block-causal layout (the reference path), and so the same
    samples for the same seed, for blocks of 1, 4 and 16."""
    config, model, objective = model_and_objective(block_size=block_size, block_training="all", seq_len=32)
    prefix = torch.randint(0, 12, (3, 16), generator=torch.Generator().manual_seed(1))
    block = torch.randint(0, 13, (3, block_size), generator=torch.Generator().manual_seed(2))  # masks included
    cache = None
    for first in range(0, 16, block_size):
        cache = masked.extend_prefix_cache(model, cache, prefix[:, first: first + block_size], "fp32")
    cached = masked.block_predictor(model, prefix, block_size, "fp32", cache)(block)
    recomputed = masked.block_predictor(model, prefix, block_size, "fp32")(block)
    assert torch.allclose(cached, recomputed, atol=1e-5)
    ids, known = torch.zeros(3, 32, dtype=torch.long), torch.zeros(3, 32, dtype=torch.bool)
    unmasking = masked.Unmasking(sampler, steps=4)
    with_cache, _ = masked.sample_ids(model, objective, ids, known, unmasking, torch.Generator().manual_seed(0))
    without, _ = masked.sample_ids(model, objective, ids, known, unmasking, torch.Generator().manual_seed(0),
                                   prefix_cache=False)
    assert torch.equal(with_cache, without)


def test_the_word_head_runs_only_where_a_position_unmasks_and_draws_the_same_samples():
    """The sampler projects to the vocabulary only the positions a step unmasks: the same chain as
    projecting every position (the oracle: predict returns the model's full logits), with the
    head's rows summing to the positions generated."""
    _, model, _ = model_and_objective(seq_len=32)
    start = torch.full((3, 32), model.mask_id)
    rows = []

    def head(hidden):
        rows.append(hidden.shape[0])
        return model.logits(hidden)

    with torch.no_grad():
        full = list(masked.unmask_chain(lambda z, rows: model(z), start, model.mask_id, 20,
                                        torch.Generator().manual_seed(3)))
        split = list(masked.unmask_chain(lambda z, rows: model.hidden(z), start, model.mask_id, 20,
                                         torch.Generator().manual_seed(3),
                                         head=head))
    assert torch.equal(full[-1].z, split[-1].z)
    assert not (split[-1].z == model.mask_id).any()
    assert sum(rows) == 3 * 32


# --- the samplers against the chain's exact law -------------------------------------------------
# A toy network over 3 words and 3 positions whose predictions depend on the words already
# unmasked (each position leans toward the words next to it), so that the order and grouping of
# the unmaskings change the law; the law of every sequence is enumerated.

WORDS, POSITIONS, MASK = 3, 3, 3


def toy_network(seed: int = 0):
    """predict(z (B, 3)) -> logits (B, 3, 3): a fixed table per position, plus a pull of 1.5 toward
    each word already unmasked elsewhere in the window and a fixed random term per (position,
    other position, its word)."""
    generator = torch.Generator().manual_seed(seed)
    base = 0.5 * torch.randn(POSITIONS, WORDS, generator=generator)
    pair = 0.5 * torch.randn(POSITIONS, POSITIONS, WORDS + 1, WORDS, generator=generator)
    pair[:, :, :WORDS] += 1.5 * torch.eye(WORDS)
    pair[:, :, WORDS] = 0  # a masked neighbour says nothing
    pair[torch.arange(POSITIONS), torch.arange(POSITIONS)] = 0  # nor does the position itself

    def predict(z: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        return base + torch.einsum("bjw,ijwv->biv", F.one_hot(z, WORDS + 1).float(), pair)

    return predict


def ordered_partitions(items: tuple[int, ...]):
    """Every ordered partition of `items` into non-empty groups: which positions unmask together,
    in which order."""
    if not items:
        yield []
        return
    for size in range(1, len(items) + 1):
        for group in itertools.combinations(items, size):
            rest = tuple(item for item in items if item not in group)
            for tail in ordered_partitions(rest):
                yield [group, *tail]


def enumerated_law(predict, steps: int | None) -> torch.Tensor:
    """The exact law (WORDS ** POSITIONS,) of the chain from an all-masked window. On a grid of
    `steps` steps each position unmasks at a step drawn uniformly from them, independently, so an
    ordered partition into k groups has probability C(steps, k) / steps^n, each group drawn from the
    window the earlier groups left; steps None: the continuous-time chain, one position at a time
    in a uniformly random order (n! orders)."""
    law = torch.zeros(WORDS ** POSITIONS, dtype=torch.float64)
    for code, words in enumerate(itertools.product(range(WORDS), repeat=POSITIONS)):
        for partition in ordered_partitions(tuple(range(POSITIONS))):
            if steps is None:
                weight = 1 / math.factorial(POSITIONS) if len(partition) == POSITIONS else 0.0
            else:
                weight = math.comb(steps, len(partition)) / steps ** POSITIONS
            z, chance = torch.full((1, POSITIONS), MASK), weight
            for group in partition:
                probs = torch.softmax(predict(z)[0].double(), -1)
                for position in group:
                    chance *= float(probs[position, words[position]])
                z = z.clone()
                z[0, list(group)] = torch.tensor([words[position] for position in group])
            law[code] += chance
    return law


def drawn_law(chain, predict, draws: int, steps: int, seed: int = 0) -> tuple[torch.Tensor, list]:
    """The empirical law of `draws` windows drawn by `chain` (a batch of them), and its states."""
    start = torch.full((draws, POSITIONS), MASK)
    states = list(chain(predict, start, MASK, steps, torch.Generator().manual_seed(seed)))
    z = states[-1].z
    assert (z != MASK).all()
    codes = (z * torch.tensor([WORDS ** 2, WORDS, 1])).sum(1)
    return torch.bincount(codes, minlength=WORDS ** POSITIONS).double() / draws, states


def chi_square(drawn: torch.Tensor, law: torch.Tensor, draws: int) -> float:
    return float((draws * (drawn - law) ** 2 / law).sum())


def chi_square_999(freedom: int) -> float:
    """The 0.999 quantile of chi-square with `freedom` degrees (Wilson-Hilferty, ample at 26)."""
    term = 2 / (9 * freedom)
    return freedom * (1 - term + 3.09 * math.sqrt(term)) ** 3


DRAWS = 40000


def test_the_enumerated_laws_are_laws_and_the_grid_comes_to_the_continuous_chain():
    predict = toy_network()
    continuous = enumerated_law(predict, None)
    assert continuous.sum().item() == pytest.approx(1.0, abs=1e-12)
    assert enumerated_law(predict, 2).sum().item() == pytest.approx(1.0, abs=1e-12)
    distance = [0.5 * float((enumerated_law(predict, steps) - continuous).abs().sum()) for steps in (2, 20, 2000)]
    assert distance[0] > 0.03 and distance[0] > distance[1] > distance[2] and distance[2] < 1e-3, distance


def test_the_grid_sampler_draws_its_enumerated_law():
    """Two steps: positions often unmask together, which the law counts (the oracle the grid must meet)."""
    predict = toy_network()
    law = enumerated_law(predict, 2)
    drawn, _ = drawn_law(masked.unmask_chain, predict, DRAWS, 2)
    assert chi_square(drawn, law, DRAWS) < chi_square_999(law.numel() - 1)


def test_first_hitting_draws_the_continuous_chain_at_one_call_per_position():
    """First-hitting is the chain's own law (the grid's as its steps grow), not two steps' law;
    each call unmasks one position per row, so its calls are the masked positions' number."""
    predict = toy_network()
    law, grid_law = enumerated_law(predict, None), enumerated_law(predict, 2)
    drawn, states = drawn_law(masked.first_hitting_chain, predict, DRAWS, 2)
    assert chi_square(drawn, law, DRAWS) < chi_square_999(law.numel() - 1)
    assert chi_square(drawn, grid_law, DRAWS) > 10 * chi_square_999(law.numel() - 1)  # the test tells them apart
    assert states[-1].calls == POSITIONS == len(states)
    assert all(bool((state.unmasked.sum(1) == 1).all()) for state in states)


def test_first_hitting_calls_at_most_once_per_masked_position():
    """Rows with 3, 1 and 0 masked positions (the rest given): 3 calls, each unmasking one position
    of each row that still has one, and running those rows alone; the given words are kept."""
    calls = []

    def predict(z, rows):
        calls.append(len(z))
        return toy_network()(z)

    start = torch.tensor([[MASK, MASK, MASK], [2, MASK, 0], [1, 1, 1]])
    states = list(masked.first_hitting_chain(predict, start, MASK, None, torch.Generator().manual_seed(0)))
    assert calls == [2, 1, 1] and sum(calls) == int((start == MASK).sum())
    assert [state.unmasked.sum(1).tolist() for state in states] == [[1, 1, 0], [1, 0, 0], [1, 0, 0]]
    final = states[-1].z
    assert (final != MASK).all() and final[1, 0] == 2 and final[1, 2] == 0 and final[2].tolist() == [1, 1, 1]


# --- confidence-ordered unmasking ---------------------------------------------------------------


def test_the_confidence_schedule_splits_each_rows_count_over_the_steps():
    counts = torch.tensor([7, 4, 2, 0])
    schedule = masked.unmask_schedule(counts, 3)
    assert schedule.tolist() == [[3, 2, 2], [2, 1, 1], [1, 1, 0], [0, 0, 0]]
    assert torch.equal(schedule.sum(1), counts)


def test_confidence_unmasks_the_most_confident_positions_in_their_order():
    """A network whose confidence at each masked position is known (its top word's probability,
    made to depend on how many positions are still masked, so the order is read afresh each step):
    at temperature 0 each step keeps the top word at the k most confident masked positions, k from
    the schedule, per row (the second row has 3 positions given)."""
    positions, vocab = 7, 5
    generator = torch.Generator().manual_seed(0)
    peaks = torch.rand(2, positions, generator=generator) * 4  # the top word's logit over the others' 0
    top = torch.randint(1, vocab, (positions,), generator=generator)
    mask_id = vocab

    def predict(z, rows=None):  # a row's peaks reversed once fewer than 4 of its positions are masked: a new order
        still, mine = (z == mask_id).sum(1, keepdim=True), peaks if rows is None else peaks[rows]
        logits = torch.zeros(*z.shape, vocab)
        logits.scatter_(2, top.expand(len(z), -1)[..., None], torch.where(still >= 4, mine, mine.flip(1))[..., None])
        return logits

    start = torch.full((2, positions), mask_id)
    start[1, [0, 3, 5]] = 0
    steps = 3
    schedule = masked.unmask_schedule((start == mask_id).sum(1), steps)
    states = list(masked.confidence_chain(predict, start, mask_id, steps, torch.Generator().manual_seed(1),
                                          temperature=0.0))
    z = start
    for index, state in enumerate(states):
        for row in range(2):
            still = (z[row] == mask_id).nonzero().flatten()
            confidence = torch.softmax(predict(z)[row].double(), -1).max(-1).values
            order = still[confidence[still].argsort(descending=True)]
            expected = set(order[: int(schedule[row, index])].tolist())
            assert set(state.unmasked[row].nonzero().flatten().tolist()) == expected, (index, row)
        z = state.z
    assert (z != mask_id).all() and torch.equal(z[0], top) and torch.equal(z[1, [1, 2, 4, 6]], top[[1, 2, 4, 6]])
    assert [state.unmasked.sum(1).tolist() for state in states] == schedule.T.tolist()


def test_confidence_skips_the_network_on_steps_that_unmask_nothing():
    calls = []

    def predict(z, rows):
        calls.append(1)
        return toy_network()(z)

    states = list(masked.confidence_chain(predict, torch.full((4, POSITIONS), MASK), MASK, 10,
                                          torch.Generator().manual_seed(0)))
    assert len(states) == 10 and len(calls) == POSITIONS == states[-1].calls
    assert (states[-1].z != MASK).all()


# --- what every sampler shares --------------------------------------------------------------------


def test_an_inverse_cdf_draw_follows_its_probabilities_and_never_takes_a_zero():
    """Oracle: the probabilities themselves, the zeros first and last too; weights that do not sum
    to 1 are read as their shares."""
    probs = torch.tensor([0.0, 0.5, 0.0, 0.3, 0.2, 0.0], dtype=torch.float64)
    drawn = masked.inverse_cdf(3 * probs.expand(20000, -1), torch.Generator().manual_seed(0))
    counts = torch.bincount(drawn, minlength=6).double() / 20000
    assert counts[[0, 2, 5]].sum() == 0 and drawn.max() < 6
    for word, p in ((1, 0.5), (3, 0.3), (4, 0.2)):
        assert abs(counts[word] - p) < 4 * math.sqrt(p * (1 - p) / 20000)


@pytest.mark.parametrize("sampler", masked.SAMPLERS)
def test_the_softmax_runs_in_float64(sampler):
    """At temperature 1e-39 the draw is the argmax: in float64 the logits over it stay finite; in
    float32 every one is infinite and the draw would be id 0 (never the argmax here)."""
    logits = torch.rand(6, 4, 9, generator=torch.Generator().manual_seed(0)) + 1
    logits[..., 0] = 0  # id 0 is never the argmax
    start = torch.full((6, 4), 9)
    states = list(masked.CHAINS[sampler](lambda z, rows: logits if rows is None else logits[rows], start, 9, 4,
                                         torch.Generator().manual_seed(1),
                                         temperature=1e-39))
    assert torch.equal(states[-1].z, logits.argmax(-1))
    assert all(state.probs is None or state.probs.dtype == torch.float64 for state in states)


@pytest.mark.parametrize("sampler", ["first_hitting", "confidence"])
def test_dlm_sample_takes_the_sampler_and_records_it(sampler, tmp_path, capsys):
    import json

    from dlm.cli import main
    from tests.conftest import toy_run_dir

    run = toy_run_dir(tmp_path / "run", model="masked")
    out = tmp_path / "s.jsonl"
    assert main(["sample", "--run_dir", str(run), "--num_samples", "3", "--sampler", sampler, "--out", str(out)]) == 0
    steps = 16 if sampler == "first_hitting" else 5  # the window's positions; the run's sample_steps
    assert f"chain: 1 block x {steps} steps = " in capsys.readouterr().out
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(records) == 3 and all(record["sampler"] == sampler for record in records)


# --- --sampler at every command that samples a masked run -----------------------------------------

@pytest.fixture(scope="module")
def masked_runs(tmp_path_factory):
    """Untrained masked runs (seq_len 16, the whole window and blocks of 4) and an AR teacher, on a
    made-up corpus of the words their vocabulary holds."""
    from tests.conftest import make_corpus, toy_run_dir

    root = tmp_path_factory.mktemp("masked_runs")
    corpus = str(make_corpus(root / "corpus.txt"))
    return {"whole": toy_run_dir(root / "whole", model="masked", corpus=corpus),
            "blocks": toy_run_dir(root / "blocks", model="masked", corpus=corpus, block_size=4, block_training="all"),
            "ar": toy_run_dir(root / "ar", model="ar", corpus=corpus)}


@pytest.fixture
def chains_run(monkeypatch) -> list[str]:
    """The names of the masked chains sample_ids runs, in order (each chain spied on, then run)."""
    ran = []
    for name, chain in list(masked.CHAINS.items()):
        def spy(*args, name=name, chain=chain, **kwargs):
            ran.append(name)
            yield from chain(*args, **kwargs)

        monkeypatch.setitem(masked.CHAINS, name, spy)
    return ran


# What each control fixes, as (argv, {position: word}): the oracle is the words typed here
CONTROLS = {"infill": (["--template", "To be , __ __ __ not to be"], {0: "To", 1: "be", 2: ",", 6: "not", 7: "to",
                                                                       8: "be"}),
            "prefix": (["--prefix", "To be , or"], {0: "To", 1: "be", 2: ",", 3: "or"}),  # blocks of 4: one all fixed
            "length": (["--length", "4"], {0: "\n", 1: "\n", 6: "\n", 7: "\n"})}


def steps_for(sampler: str) -> list[str]:
    return [] if sampler == "first_hitting" else ["--steps", "4"]  # first_hitting takes no steps


@pytest.mark.parametrize("sampler", masked.SAMPLERS)
@pytest.mark.parametrize("command", ["infill", "prefix", "length", "matched"])
def test_every_command_that_samples_a_masked_run_runs_the_sampler_asked(masked_runs, chains_run, tmp_path, capsys,
                                                                        command, sampler):
    from dlm.cli import main

    run = str(masked_runs["whole"])
    if command == "matched":
        out = tmp_path / "m.json"
        argv = ["evaluate", "--matched", "--run_dir", run, "--teacher", str(masked_runs["ar"]), "--num_samples", "4",
                "--json", str(out)]
    else:
        out = tmp_path / "c.jsonl"
        argv = ["infill", "--run_dir", run, *CONTROLS[command][0], "--num_samples", "2", "--out", str(out)]
    assert main([*argv, "--sampler", sampler, *steps_for(sampler)]) == 0
    assert chains_run and set(chains_run) == {sampler}
    if command == "matched":
        assert json.loads(out.read_text())["sampler"] == sampler
        assert f"sampler {sampler}" in capsys.readouterr().out
    else:
        assert all(json.loads(line)["sampler"] == sampler for line in out.read_text().splitlines())


@pytest.mark.parametrize("sampler", masked.SAMPLERS)
@pytest.mark.parametrize("mode", list(CONTROLS))
@pytest.mark.parametrize("which", ["whole", "blocks"])
def test_infill_keeps_the_fixed_words_and_draws_the_blanks_under_every_sampler(masked_runs, chains_run, monkeypatch,
                                                                               tmp_path, which, mode, sampler):
    """What the masked family's fill gives back, before dlm infill sets the fixed words again: every
    fixed word at its position, every other position a drawn word (never [MASK])."""
    from dlm.cli import main
    from dlm.runs.build import load_run

    filled = []
    real_fill = masked.fill

    def spy(run, ids, known, options, generator, device="cpu"):
        got, scores = real_fill(run, ids, known, options, generator, device)
        filled.append(got.clone())
        return got, scores

    monkeypatch.setattr(masked, "fill", spy)
    argv, fixed = CONTROLS[mode]
    status = main(["infill", "--run_dir", str(masked_runs[which]), *argv, "--num_samples", "3", "--sampler", sampler,
                   *steps_for(sampler), "--out", str(tmp_path / "c.jsonl")])
    assert set(chains_run) == {sampler}
    tokenizer = load_run(masked_runs[which]).tokenizer
    got = torch.cat(filled)
    assert got.shape == (3, 16)
    free = torch.ones(16, dtype=torch.bool)
    for position, word in fixed.items():
        assert (got[:, position] == tokenizer.stoi[word]).all(), (position, got[:, position])
        free[position] = False
    assert ((got[:, free] >= 0) & (got[:, free] < len(tokenizer))).all()  # words; [MASK] is len(tokenizer)
    assert status == 0  # after the fill's own checks: a [MASK] left in would fail decoding first


@pytest.mark.parametrize("sampler", masked.SAMPLERS)
def test_the_control_notebook_s_sampler_reaches_every_control(masked_runs, chains_run, monkeypatch, tmp_path, sampler):
    """notebooks/control.ipynb's `sampler` parameter, run in this process: the infill, prefix and
    length controls each run that chain."""
    from dlm.runs import control
    from tests.test_family_contract import execute_here

    infills = []
    real_infill = control.infill
    monkeypatch.setattr(control, "infill", lambda *args, **kwargs: infills.append(1) or real_infill(*args, **kwargs))
    execute_here(ROOT / "notebooks" / "control.ipynb", tmp_path / "out.ipynb",
                 {"run_dir": str(masked_runs["whole"]), "task": "infill,prefix,length", "sampler": sampler,
                  "num_samples": 2, "length": 4, "threads": 1})
    assert len(infills) == 3 and chains_run and set(chains_run) == {sampler}
