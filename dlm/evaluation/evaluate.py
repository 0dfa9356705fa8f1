"""Sample-quality numbers that catch collapse and word salad alike, always next to held-out text.

Perplexity under a teacher alone rewards repetitive, low-entropy text, so it is read together with
the token distribution: entropy against held-out text, punctuation share, Jensen-Shannon divergence
of unigram distributions, distinct-n, the vocabulary spread at a fixed token count, adjacent
repetition and the share of 4-grams copied from the training split.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import logging
import math
import time
from collections.abc import Sequence
from pathlib import Path

import pandas as pd
import torch

from dlm.core.data import CorpusData, Tokenizer
from dlm.core.errors import UserError
from dlm.core.textstats import content_tokens, heldout_windows, sample_stats
from dlm.evaluation.collapse import collapse_signals
from dlm.evaluation.rundata import run_data
from dlm.evaluation.tokens import ids_to_words
from dlm.families import supports
from dlm.runs.build import LoadedRun
from dlm.runs.sample import SampleOptions, generate

logger = logging.getLogger("dlm")


def unigram_distribution(tokens: Sequence[str]) -> dict[str, float]:
    counts = collections.Counter(tokens)
    total = sum(counts.values())
    return {t: c / total for t, c in counts.items()} if total else {}


def js_divergence(p: dict[str, float], q: dict[str, float]) -> float:
    """Jensen-Shannon divergence in bits (0: same distribution, 1: disjoint support)."""
    def kl_to_mixture(a: dict[str, float], b: dict[str, float]) -> float:
        return sum(pa * math.log2(pa / ((pa + b.get(t, 0.0)) / 2)) for t, pa in a.items() if pa > 0)

    return 0.5 * kl_to_mixture(p, q) + 0.5 * kl_to_mixture(q, p)


def types_at(tokens: Sequence[str], count: int) -> int:
    """Distinct types among the first `count` tokens: vocabulary spread at a fixed length."""
    return len(set(tokens[:count]))


def adjacent_repetition(sequences: Sequence[Sequence[str]]) -> float:
    """Share of tokens equal to the token right before them (within a sequence)."""
    repeats = total = 0
    for seq in sequences:
        tokens = content_tokens([seq])
        repeats += sum(a == b for a, b in zip(tokens, tokens[1:]))
        total += max(0, len(tokens) - 1)
    return repeats / total if total else 0.0


def ngram_set(tokens: Sequence[str], n: int) -> set[tuple[str, ...]]:
    return {tuple(tokens[i: i + n]) for i in range(len(tokens) - n + 1)}


def copy_rate(sequences: Sequence[Sequence[str]], train_ngrams: set[tuple[str, ...]], n: int = 4) -> float:
    """Share of the samples' n-grams that occur verbatim in the training split (memorisation)."""
    grams = [tuple(toks[i: i + n]) for seq in sequences for toks in [content_tokens([seq])]
             for i in range(len(toks) - n + 1)]
    return sum(g in train_ngrams for g in grams) / len(grams) if grams else 0.0


def text_metrics(sequences: Sequence[Sequence[str]], train_ngrams: set[tuple[str, ...]], types_count: int) -> dict:
    stats = sample_stats(sequences)
    tokens = content_tokens(sequences)
    return {
        **{k: stats[k] for k in ("tokens", "types", "punctuation_share", "unigram_entropy", "top1_token",
                                 "top1_share", "top10_share", "distinct_1", "distinct_2")},
        f"types_at_{types_count}": types_at(tokens, types_count),
        "adjacent_repetition": adjacent_repetition(sequences),
        "copy_rate_4gram": copy_rate(sequences, train_ngrams, 4),
    }


def compare(samples: Sequence[Sequence[str]], heldout: Sequence[Sequence[str]], train_tokens: Sequence[str]) -> dict:
    """Every metric for the samples and for held-out text, the ratios between them, and the verdict."""
    train_ngrams = ngram_set([t for t in train_tokens if t != "\n"], 4)
    sample_tokens, heldout_tokens = content_tokens(samples), content_tokens(heldout)
    types_count = max(1, min(len(sample_tokens), len(heldout_tokens)))
    mine = text_metrics(samples, train_ngrams, types_count)
    ref = text_metrics(heldout, train_ngrams, types_count)
    mine["js_divergence"] = js_divergence(unigram_distribution(sample_tokens), unigram_distribution(heldout_tokens))
    ref["js_divergence"] = 0.0
    verdict = samples_collapse_verdict(mine, ref)
    return {"samples": mine, "heldout": ref, "types_count": types_count, **verdict}


def samples_collapse_verdict(mine: dict, ref: dict) -> dict:
    """One set of samples' metrics against held-out text's: collapsed or not, and which signals
    say so. The signals and thresholds of dlm.evaluation.collapse (whose run_collapse_verdict judges
    a run over its checkpoints), so a run is called collapsed by one rule wherever it is looked at."""
    reasons = [name for name, tripped in collapse_signals(mine, ref).items() if tripped]
    return {"collapsed": bool(reasons), "collapse_reasons": reasons}


def read_samples(path: str | Path) -> list[dict]:
    """The records of a samples file (dlm sample's .jsonl, or hand-written lines {"text": ...}):
    anything else is one line naming the file, the line and the fix."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"No samples file at '{path}'. Write one with: dlm sample --run_dir RUN --out FILE.jsonl")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise UserError(f"'{path}' is not UTF-8 text (byte {error.start}); give the .jsonl that dlm sample wrote.") from None
    records = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise UserError(f"'{path}' is not JSON lines (line {number}: {error}); give the .jsonl that dlm sample "
                            f"wrote.") from None
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            got = type(record.get("text")).__name__ if isinstance(record, dict) and "text" in record else "no 'text'"
            raise UserError(f"'{path}' line {number}: each line must be a JSON object whose 'text' is a string "
                            f"(got {got if isinstance(record, dict) else type(record).__name__}).")
        records.append(record)
    if not records:
        raise UserError(f"'{path}' holds no samples (each line needs at least a 'text').")
    if not any(r["text"].strip() for r in records):
        raise UserError(f"'{path}' holds only empty texts: there is nothing to score.")
    return records


def sample_ids(records: list[dict], tokenizer: Tokenizer) -> list[list[int]]:
    """Token ids under the teacher's vocabulary: the recorded ids when the samples were made with
    the same vocabulary, else the texts encoded again (an <unk> then no longer reads as one token)."""
    if all(r.get("vocab") == tokenizer.fingerprint() and "ids" in r for r in records):
        return [list(r["ids"]) for r in records]
    return [tokenizer.encode(r["text"]) for r in records]


def check_teacher(teacher: LoadedRun) -> None:
    """A teacher is a run whose family has an exact likelihood (its token_nll scores the words)."""
    if not supports(teacher.config.model, "likelihood_exact"):
        raise UserError("The teacher must be an autoregressive run: train one with dlm train-ar params/ar.yaml.")


def teacher_nll(teacher: LoadedRun, rows: list[list[int]], batch_size: int = 64) -> float:
    """Mean per-token NLL (nats) of the rows under the AR teacher; each row is scored in windows of
    the teacher's length (the first token of a window has no context and is not scored)."""
    check_teacher(teacher)
    length = teacher.config.seq_len
    windows = [row[i: i + length] for row in rows for i in range(0, max(1, len(row) - 1), length - 1)]
    windows = [w for w in windows if len(w) > 1]
    total, count = 0.0, 0
    for first in range(0, len(windows), batch_size):
        batch = windows[first: first + batch_size]
        width = max(map(len, batch))
        ids = torch.full((len(batch), width), teacher.tokenizer.pad_id, dtype=torch.long)
        mask = torch.zeros(len(batch), width - 1, dtype=torch.bool)  # which next-token predictions count
        for i, w in enumerate(batch):
            ids[i, : len(w)] = torch.tensor(w)
            mask[i, : len(w) - 1] = True
        nll = teacher.family.token_nll(teacher, ids)
        total += nll[mask].sum().item()
        count += int(mask.sum())
    return total / max(1, count)


def evaluate_samples(records: list[dict], teacher: LoadedRun, heldout_records: list[dict] | None = None) -> dict:
    """Every number of `compare`, plus generative perplexity under the teacher, for the samples and
    for as many held-out windows of the samples' length; or, given `heldout_records` (held-out
    windows in the samples' own tokenizer), for those, read by the teacher as the samples are: a
    run of another tokenizer is then compared with the same held-out text, read the same way."""
    check_teacher(teacher)
    rows = sample_ids(records, teacher.tokenizer)
    heldout = sample_ids(heldout_records, teacher.tokenizer) if heldout_records is not None else None
    result, heldout_rows = compare_with_heldout(teacher, rows, heldout_rows=heldout)
    result["samples"]["teacher_perplexity"] = math.exp(teacher_nll(teacher, rows))
    result["heldout"]["teacher_perplexity"] = math.exp(teacher_nll(teacher, heldout_rows))
    return result


def compare_with_heldout(run: LoadedRun, rows: list[list[int]], data: CorpusData | None = None,
                         heldout_rows: list[list[int]] | None = None) -> tuple[dict, list[list[int]]]:
    """`compare` of id rows (in the run's vocabulary) against as many held-out windows of the same
    length from the run's corpus (`data`: the run's corpus already read), or against `heldout_rows`;
    returns the result and those held-out rows. Every row is measured in words (its decoded text's),
    whatever the tokenizer."""
    tokenizer = run.tokenizer
    data = data or run_data(run)
    longest = max(len(r) for r in rows)
    if longest > len(data.val_ids):  # there is no held-out window that long to compare with
        raise UserError(f"A sample of {longest} tokens is longer than the held-out text it is compared with "
                        f"({len(data.val_ids)} tokens): give samples of at most that many tokens (dlm sample "
                        f"writes windows of the run's seq_len).")
    if heldout_rows is None:
        heldout_rows = heldout_windows(data.val_ids, longest, len(rows)).tolist()
    result = compare(ids_to_words(rows, tokenizer), ids_to_words(heldout_rows, tokenizer),
                     tokenizer.words(data.train_ids.tolist()))
    result["num_samples"] = len(rows)
    return result, heldout_rows


def records_from_ids(ids: torch.Tensor, tokenizer: Tokenizer) -> list[dict]:
    """Samples held in memory as the records `dlm sample` writes (text, ids, vocabulary)."""
    fingerprint = tokenizer.fingerprint()
    return [{"text": tokenizer.decode(row), "ids": row.tolist(), "vocab": fingerprint} for row in ids]


def score_ids(run: LoadedRun, ids: torch.Tensor, teacher: LoadedRun | None = None,
              data: CorpusData | None = None) -> dict:
    """`evaluate_samples` of a batch of sampled ids; without a teacher, every number but the
    generative perplexity (which is then NaN), against the run's own held-out text."""
    if teacher is not None:
        return evaluate_samples(records_from_ids(ids, run.tokenizer), teacher)
    result, _ = compare_with_heldout(run, ids.tolist(), data)
    result["samples"]["teacher_perplexity"] = result["heldout"]["teacher_perplexity"] = float("nan")
    return result


def pick_metrics(result: dict, side: str, names: Sequence[str]) -> dict:
    """The named numbers of one side ('samples' or 'heldout') of a `compare` result; 'types_at'
    means the types at the result's fixed token count, 'collapsed' the verdict (held-out: False)."""
    values = result[side]
    picked = {}
    for name in names:
        if name == "types_at":
            picked[name] = values[f"types_at_{result['types_count']}"]
        elif name == "collapsed":
            picked[name] = result["collapsed"] if side == "samples" else False
        else:
            picked[name] = values[name]
    return picked


CURVE_METRICS = ("teacher_perplexity", "unigram_entropy", "punctuation_share", "distinct_2", "types_at", "top10_share")


def quality_vs_steps(run: LoadedRun, step_counts: Sequence[int], options: SampleOptions,
                     teacher: LoadedRun | None = None) -> pd.DataFrame:
    """Sample the same seeds at each number of reverse steps and score every set: one row per
    step count, plus held-out text's row (steps NaN). `agreement` is the share of tokens equal to
    those of the longest chain (same seed, so same starting noise)."""
    rows, longest, heldout = [], None, None
    data = run_data(run)  # read and encode the corpus once, not once per step count
    for steps in sorted(set(step_counts), reverse=True):
        start = time.perf_counter()
        batch = generate(run, dataclasses.replace(options, steps=steps, record_every=0))
        seconds = time.perf_counter() - start
        result = score_ids(run, batch.ids, teacher, data)
        logger.info("quality vs steps: %d steps, %d samples in %.1fs", steps, len(batch.ids), seconds)
        longest = batch.ids if longest is None else longest
        row = {"steps": steps, "seconds": seconds, "seconds_per_step": seconds / steps,
               "agreement": float((batch.ids == longest).float().mean()), "collapsed": result["collapsed"]}
        rows.append({**row, **pick_metrics(result, "samples", CURVE_METRICS)})
        heldout = heldout or pick_metrics(result, "heldout", CURVE_METRICS)
    frame = pd.DataFrame(sorted(rows, key=lambda r: r["steps"]))
    return pd.concat([frame, pd.DataFrame([{"steps": float("nan"), **heldout}])], ignore_index=True)
