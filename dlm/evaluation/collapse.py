"""When samples count as collapsed: the signals and their thresholds, each checkpoint's signals,
the geometry warnings, and the verdict over a run's analysed checkpoints.

The seed report's failure (samples of commas and colons while the losses looked excellent) shows
in the samples' token distribution first and in the table's geometry before that. Every signal
compares samples with held-out text of the same shape, so one rule holds wherever a run is judged
(the collapse analysis here, `dlm evaluate` in dlm.evaluation.evaluate).
"""

from __future__ import annotations

import math

import pandas as pd

# --- verdict thresholds -------------------------------------------------------------------------
# A checkpoint's samples count as COLLAPSED when any of these signals trips. Each compares the
# samples with held-out text of the same shape (same number of windows, same length), so the
# thresholds hold for word and char tokenizers alike. Word-level tiny_shakespeare held-out text has
# about 22% punctuation; the seed's collapsed samples had 85% or more.
PUNCTUATION_RATIO = 2.0  # punctuation share above twice held-out's ...
PUNCTUATION_MIN = 0.4  # ... and above 40% of all tokens
TOP1_SHARE_MIN = 0.25  # one token is more than a quarter of all tokens (held-out's top token: ~8%)
ENTROPY_RATIO = 0.6  # unigram entropy (bits) below 60% of held-out's
DISTINCT2_RATIO = 0.3  # distinct bigrams per bigram below 30% of held-out's (the same few pairs repeat)
# Geometry WARNINGS: they explain or predict a collapse but do not make one on their own.
NN_SIGMA_RATIO = 2.0  # mean nearest-neighbour distance below 2 * sigma0: q(x0|w) noise blurs neighbours
NORM_SHRINK_RATIO = 0.5  # mean row norm fell below half of the first analysed checkpoint's

SIGNALS = {
    "punctuation": "punctuation share > max(2 x held-out, 0.4)",
    "one token dominates": "top-1 token share > 0.25",
    "low entropy": "unigram entropy < 0.6 x held-out",
    "repetition": "distinct-2 < 0.3 x held-out",
}
WARNINGS = {
    "rows within noise": "mean nearest-neighbour distance < 2 x sigma0",
    "table shrank": "mean embedding norm < 0.5 x the first checkpoint's",
}


def collapse_signals(row: dict, heldout: dict) -> dict[str, bool]:
    """Which collapse signals trip for one checkpoint's sample stats (see the thresholds above)."""
    return {
        "punctuation": row["punctuation_share"] > max(PUNCTUATION_RATIO * heldout["punctuation_share"], PUNCTUATION_MIN),
        "one token dominates": row["top1_share"] > TOP1_SHARE_MIN,
        "low entropy": row["unigram_entropy"] < ENTROPY_RATIO * heldout["unigram_entropy"],
        "repetition": row["distinct_2"] < DISTINCT2_RATIO * heldout["distinct_2"],
    }


def geometry_warnings(series: pd.DataFrame) -> dict[str, bool]:
    last, first = series.iloc[-1], series.iloc[0]
    return {
        "rows within noise": bool(last["nn_over_sigma0"] < NN_SIGMA_RATIO),
        "table shrank": bool(last["embedding_norm"] < NORM_SHRINK_RATIO * first["embedding_norm"]),
    }


def run_collapse_verdict(series: pd.DataFrame, heldout: dict, name: str = "") -> dict:
    """A run judged over its analysed checkpoints: collapsed or not (at the last checkpoint), since
    when (the first checkpoint of the final unbroken stretch of collapsed ones), which signals say
    so, and the geometry warnings."""
    if series.empty:
        raise ValueError("No checkpoints were analysed.")
    collapsed = list(series["collapsed"])
    began = None
    if collapsed[-1]:
        start = len(collapsed) - 1
        while start > 0 and collapsed[start - 1]:
            start -= 1
        began = int(series["epoch"].iloc[start])
    last = series.iloc[-1]
    warnings = geometry_warnings(series)
    return {
        "run": name,
        "checkpoints": len(series),
        "last_epoch": int(last["epoch"]),
        "collapsed": bool(collapsed[-1]),
        "began_epoch": began,
        "signals": last["signals"],
        "warnings": ", ".join(k for k, v in warnings.items() if v),
        "punctuation_share": float(last["punctuation_share"]),
        "heldout_punctuation_share": float(heldout["punctuation_share"]),
        "unigram_entropy": float(last["unigram_entropy"]),
        "heldout_unigram_entropy": float(heldout["unigram_entropy"]),
        "top1_token": str(last["top1_token"]),
        "top1_share": float(last["top1_share"]),
        "nn_over_sigma0": float(last["nn_over_sigma0"]),
    }


def signal_table(series: pd.DataFrame, heldout: dict) -> pd.DataFrame:
    """Each signal at the last checkpoint: its value, held-out's, the threshold and whether it trips."""
    last = series.iloc[-1]
    first = series.iloc[0]
    trips = collapse_signals(last, heldout)
    warnings = geometry_warnings(series)
    rows = [
        ("punctuation", "punctuation share", last["punctuation_share"], heldout["punctuation_share"],
         max(PUNCTUATION_RATIO * heldout["punctuation_share"], PUNCTUATION_MIN), trips["punctuation"]),
        ("one token dominates", f"top-1 share ({last['top1_token']!r})", last["top1_share"], heldout["top1_share"],
         TOP1_SHARE_MIN, trips["one token dominates"]),
        ("low entropy", "unigram entropy (bits)", last["unigram_entropy"], heldout["unigram_entropy"],
         ENTROPY_RATIO * heldout["unigram_entropy"], trips["low entropy"]),
        ("repetition", "distinct-2", last["distinct_2"], heldout["distinct_2"],
         DISTINCT2_RATIO * heldout["distinct_2"], trips["repetition"]),
        ("rows within noise (warning)", "nearest-neighbour distance / sigma0", last["nn_over_sigma0"], math.nan,
         NN_SIGMA_RATIO, warnings["rows within noise"]),
        ("table shrank (warning)", "mean embedding norm", last["embedding_norm"], first["embedding_norm"],
         NORM_SHRINK_RATIO * first["embedding_norm"], warnings["table shrank"]),
    ]
    return pd.DataFrame(rows, columns=["signal", "measure", "value", "reference", "threshold", "tripped"])
