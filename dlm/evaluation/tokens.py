"""Token lists: ids decoded to tokens or to words, and the counts a token-distribution plot needs."""

from __future__ import annotations

import collections
from collections.abc import Sequence

import torch

from dlm.core.textstats import content_tokens


def ids_to_tokens(ids: torch.Tensor | Sequence[Sequence[int]], itos: Sequence[str]) -> list[list[str]]:
    rows = ids.tolist() if isinstance(ids, torch.Tensor) else ids
    return [[itos[int(i)] for i in row] for row in rows]


def ids_to_words(ids: torch.Tensor | Sequence[Sequence[int]], tokenizer) -> list[list[str]]:
    """Each row of ids as the words of its decoded text: what every text statistic counts, so a BPE,
    character and word run (and held-out text) are measured on the same words."""
    rows = ids.tolist() if isinstance(ids, torch.Tensor) else ids
    return [tokenizer.words(row) for row in rows]


def rank_frequency(sequences: Sequence[Sequence[str]]) -> list[int]:
    """Token counts, most frequent first (for a rank-frequency plot)."""
    return sorted(collections.Counter(content_tokens(sequences)).values(), reverse=True)


def top_tokens(sequences: Sequence[Sequence[str]], count: int = 15) -> list[tuple[str, float]]:
    """The `count` most frequent content tokens with their share of all content tokens."""
    tokens = content_tokens(sequences)
    total = max(1, len(tokens))
    return [(t, c / total) for t, c in collections.Counter(tokens).most_common(count)]
