"""Teacher perplexity at matched entropy: samples compared with held-out text at the same unigram
entropy, so that a model is not credited for fluency it bought by repeating common words.

Perplexity under a teacher falls as samples concentrate on frequent tokens, and two models (or two
checkpoints) seldom sample at the same entropy. The sampler's temperature is the knob that sets it
(where the family draws words: the Gaussian chain's final rounding, a discrete chain's every step,
the AR model's every token). `match_entropy` finds the temperature at which the
samples' unigram entropy equals held-out text's (to `tolerance`), and scores the samples drawn there.
Entropy cannot fall below the argmax's: a sampler that is above held-out entropy at temperature 0 is
scored there and flagged unmatched.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable

import torch

from dlm.core.errors import UserError
from dlm.core.textstats import sample_stats
from dlm.evaluation.evaluate import check_teacher, evaluate_samples, records_from_ids, sample_ids
from dlm.evaluation.rundata import validation_windows
from dlm.evaluation.tokens import ids_to_words
from dlm.families import not_available, supports
from dlm.runs.build import LoadedRun
from dlm.runs.sample import SampleOptions, check_options, generate

# What the issue asks of samples at held-out entropy: (metric, ratio to held-out, bound).
TARGETS = (("teacher_perplexity", "at most", 10.0), ("punctuation_share", "within", 0.15),
           ("types_at", "at least", 0.8), ("copy_rate_4gram", "at most", 2.0))
MAX_TEMPERATURE = 8.0


def temperature_sampler(run: LoadedRun, options: SampleOptions, device: str | torch.device = "cpu"
                        ) -> Callable[[float], torch.Tensor]:
    """draw(temperature) -> ids (N, L): the run's samples with the words drawn at that temperature,
    the same seed each time. Where the temperature enters only the final draw (the family's
    decode_again: a whole-window Gaussian chain) the chains run once and only their last state is
    decoded again; any other sampler (blocks, masked, uniform, AR) is drawn afresh. Each
    temperature is drawn once: the search, the scoring and the argmax entropy ask for the same ones
    again, and a fresh draw is a whole generation."""
    if not supports(run.config.model, "temperature"):
        raise UserError(not_available(run.config.model, "Sampling at a temperature (matched entropy)"))
    check_options(run.config, options)  # before anything is drawn, also where the draws come later
    again = run.family.decode_again(run, options, device)
    if again is not None:
        return functools.cache(again)
    return functools.cache(
        lambda temperature: generate(run, dataclasses.replace(options, temperature=temperature), device).ids)


def scoring_rows(run: LoadedRun, ids: torch.Tensor, teacher: LoadedRun | None = None) -> tuple[list[list[int]], object]:
    """The rows as the teacher reads them (decoded and encoded again when its tokenizer is another:
    a BPE run scored by a word teacher), with the tokenizer that reads them."""
    if teacher is None or teacher.tokenizer.fingerprint() == run.tokenizer.fingerprint():
        return ids.tolist(), run.tokenizer
    return sample_ids(records_from_ids(ids, run.tokenizer), teacher.tokenizer), teacher.tokenizer


def entropy_of(run: LoadedRun, ids: torch.Tensor, teacher: LoadedRun | None = None) -> float:
    """Unigram entropy (bits) of the words of `ids`, counted as `teacher` reads them (when given):
    the entropy that evaluate_samples then reports, so that matching and scoring agree."""
    rows, tokenizer = scoring_rows(run, ids, teacher)
    return sample_stats(ids_to_words(rows, tokenizer))["unigram_entropy"]


def heldout_entropy(run: LoadedRun, count: int, teacher: LoadedRun | None = None) -> float:
    """Unigram entropy (bits) of `count` held-out windows of the run's length: what samples match
    (read by `teacher` as its samples are, when given)."""
    return entropy_of(run, validation_windows(run, count), teacher)


def find_temperature(entropy_at: Callable[[float], float], target: float, tolerance: float = 0.01,
                     iterations: int = 30) -> tuple[float, float]:
    """The temperature whose samples' entropy is within `tolerance` (relative) of `target` (entropy
    rises with temperature); (temperature, entropy). Above the target already at temperature 0:
    (0, that entropy). Never reaching it by MAX_TEMPERATURE: (MAX_TEMPERATURE, ...).

    The target is bracketed by doubling, then found by regula falsi with the Illinois rule (the
    temperature where the line through the bracket's ends meets the target; an end kept twice has
    its distance to the target halved): entropy is smooth in temperature, so it takes two or three
    draws where bisection takes five or more, and a block run or the AR model draws afresh each time.
    scipy's brentq would do it, but it is not a dependency, and its xtol cannot say 'relative
    tolerance on the function', which is what matching needs."""
    low, low_entropy = 0.0, entropy_at(0.0)
    if low_entropy >= target * (1 - tolerance):
        return low, low_entropy
    high = 0.5
    while (high_entropy := entropy_at(high)) < target * (1 - tolerance) and high < MAX_TEMPERATURE:
        low, low_entropy, high = high, high_entropy, min(2 * high, MAX_TEMPERATURE)
    if high_entropy <= target * (1 + tolerance):  # within the tolerance, or the ceiling not enough
        return high, high_entropy
    # the bracket's ends as their distance to the target (halved by the Illinois rule)
    low_gap, high_gap, kept = low_entropy - target, high_entropy - target, None
    for _ in range(iterations):
        middle = low + (high - low) * -low_gap / (high_gap - low_gap) if high_gap > low_gap else (low + high) / 2
        entropy = entropy_at(middle)
        if abs(entropy / target - 1) <= tolerance:
            return middle, entropy
        if entropy < target:
            low, low_gap = middle, entropy - target
            high_gap = high_gap / 2 if kept == "high" else high_gap
            kept = "high"
        else:
            high, high_gap = middle, entropy - target
            low_gap = low_gap / 2 if kept == "low" else low_gap
            kept = "low"
    return middle, entropy


def target_checks(samples: dict, heldout: dict, types_key: str) -> dict[str, bool]:
    """Each of TARGETS as met or not (samples' metric against held-out text's). Compared as
    products, not ratios: where held-out text's value is 0 (no 4-gram copied) a ratio is 0/0, and
    samples that copy nothing either meet "at most 2x" while any copying does not."""
    checks = {}
    for metric, kind, bound in TARGETS:
        key = types_key if metric == "types_at" else metric
        value, reference = samples[key], heldout[key]
        checks[metric] = {"at most": value <= bound * reference, "at least": value >= bound * reference,
                          "within": abs(value - reference) <= bound * reference}[kind]
    return checks


def score_at_entropy(run: LoadedRun, teacher: LoadedRun, draw: Callable[[float], torch.Tensor], target: float,
                     tolerance: float = 0.01) -> dict:
    """The samples `draw` gives at the temperature whose unigram entropy is `target` bits, scored:
    every number of evaluate_samples plus the temperature, whether it came within 5% of the target,
    the ratios to held-out text and which targets (TARGETS) they meet."""
    temperature, entropy = find_temperature(lambda t: entropy_of(run, draw(t), teacher), target, tolerance)
    ids = draw(temperature)
    # a teacher of another tokenizer reads the run's own held-out windows, as it reads the samples
    other = teacher.tokenizer.fingerprint() != run.tokenizer.fingerprint()
    heldout = records_from_ids(validation_windows(run, len(ids)), run.tokenizer) if other else None
    result = evaluate_samples(records_from_ids(ids, run.tokenizer), teacher, heldout)
    samples, heldout = result["samples"], result["heldout"]
    types_key = f"types_at_{result['types_count']}"
    # "types_at" names the types at the result's token count (types_count), which differs between draws
    ratios = {name: samples[key] / heldout[key] if heldout[key] else float("nan")
              for name, key in (("teacher_perplexity",) * 2, ("unigram_entropy",) * 2, ("punctuation_share",) * 2,
                                ("types_at", types_key), ("copy_rate_4gram",) * 2)}
    return {**result, "temperature": temperature, "target_entropy": target,
            "matched": abs(entropy / target - 1) <= 0.05, "ratios": ratios,
            "targets": target_checks(samples, heldout, types_key)}


def check_entropy(bits: float | None) -> None:
    if bits is not None and not (math.isfinite(bits) and bits > 0):
        raise UserError(f"--entropy is a unigram entropy in bits, a positive number, got {bits}.")


def match_entropy(run: LoadedRun, teacher: LoadedRun, options: SampleOptions, tolerance: float = 0.01,
                  device: str | torch.device = "cpu", entropy: float | None = None) -> dict:
    """The run's samples at held-out entropy, scored (score_at_entropy); at `entropy` bits instead
    when given: two samplers compared where the one whose argmax is above held-out entropy can be."""
    check_entropy(entropy)
    check_teacher(teacher)  # before the chain, not after it
    draw = temperature_sampler(run, options, device)
    target = heldout_entropy(run, options.num_samples, teacher) if entropy is None else entropy
    return score_at_entropy(run, teacher, draw, target, tolerance)
