"""Distribution statistics of token streams: the first signals of collapse (punctuation taking
over, the unigram entropy falling) measured the same way on samples and on held-out text."""

from __future__ import annotations

import collections
import math
from collections.abc import Iterable, Sequence

import torch


def is_punctuation(token: str) -> bool:
    return not any(ch.isalnum() for ch in token) and token != "\n" and not token.startswith("<")


def content_tokens(sequences: Iterable[Iterable[str]]) -> list[str]:
    """All tokens except newlines and <pad> (line breaks are layout, not vocabulary)."""
    return [t for seq in sequences for t in seq if t not in ("\n", "<pad>")]


def punctuation_share(tokens: list[str]) -> float:
    return sum(map(is_punctuation, tokens)) / max(1, len(tokens))


def unigram_entropy(tokens: list[str]) -> float:
    """Shannon entropy of the token distribution, in bits."""
    counts = collections.Counter(tokens)
    total = sum(counts.values())
    return -sum(c / total * math.log2(c / total) for c in counts.values()) if total else 0.0


def distinct_n(sequences: Iterable[Sequence[str]], n: int) -> float:
    """Distinct n-grams / all n-grams, counted inside each sequence over its content tokens."""
    grams: collections.Counter = collections.Counter()
    for seq in sequences:
        tokens = content_tokens([seq])
        grams.update(tuple(tokens[i: i + n]) for i in range(len(tokens) - n + 1))
    total = sum(grams.values())
    return len(grams) / total if total else 0.0


def sample_stats(sequences: Sequence[Sequence[str]], top: int = 10) -> dict:
    """The token-distribution numbers of a batch of token sequences (samples or held-out text)."""
    tokens = content_tokens(sequences)
    counts = collections.Counter(tokens)
    total = max(1, len(tokens))
    common = counts.most_common(top)
    return {
        "tokens": len(tokens),
        "types": len(counts),
        "punctuation_share": punctuation_share(tokens),
        "unigram_entropy": unigram_entropy(tokens),
        "distinct_1": distinct_n(sequences, 1),
        "distinct_2": distinct_n(sequences, 2),
        "top1_token": common[0][0] if common else "",
        "top1_share": common[0][1] / total if common else 0.0,
        "top10_share": sum(c for _, c in common) / total,
    }


def heldout_windows(val_ids: torch.Tensor, seq_len: int, count: int, seed: int = 0) -> torch.Tensor:
    """`count` random windows of held-out text, the same shape as a batch of samples."""
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(val_ids) - seq_len + 1, (count,), generator=generator)
    return torch.stack([val_ids[s: s + seq_len] for s in starts.tolist()])
