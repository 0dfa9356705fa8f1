"""Post-hoc collapse analysis: sample every kept checkpoint of a run, measure the samples' token
distribution and the embedding table's geometry, and give a verdict with the signal behind it.

The seed report's failure (samples of commas and colons while the losses looked excellent) shows
in the samples' token distribution first and in the table's geometry (rows shrinking or merging
below the noise scale sigma0 of q(x0 | w)) before that; the rounding decoder's bias says where a
sample lands when its vector carries no information (the most frequent tokens).
"""

from __future__ import annotations

import collections
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import torch

from dlm.core.data import CorpusData, atomic_write_bytes, prepare_data
from dlm.core.textstats import content_tokens, distinct_n, heldout_windows, is_punctuation, sample_stats  # noqa: F401 (re-exported)
from dlm.runs.build import LoadedRun, load_run
from dlm.runs.rundir import RunDir
from dlm.runs.sample import SampleOptions, generate

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


def ids_to_tokens(ids: torch.Tensor | Sequence[Sequence[int]], itos: Sequence[str]) -> list[list[str]]:
    rows = ids.tolist() if isinstance(ids, torch.Tensor) else ids
    return [[itos[int(i)] for i in row] for row in rows]


def rank_frequency(sequences: Sequence[Sequence[str]]) -> list[int]:
    """Token counts, most frequent first (for a rank-frequency plot)."""
    return sorted(collections.Counter(content_tokens(sequences)).values(), reverse=True)


def top_tokens(sequences: Sequence[Sequence[str]], count: int = 15) -> list[tuple[str, float]]:
    """The `count` most frequent content tokens with their share of all content tokens."""
    tokens = content_tokens(sequences)
    total = max(1, len(tokens))
    return [(t, c / total) for t, c in collections.Counter(tokens).most_common(count)]


def run_data(run: LoadedRun) -> CorpusData:
    """The run's corpus encoded with its vocabulary, its train split cut as it was trained."""
    return prepare_data(run.config.corpus, tokenizer=run.tokenizer, max_train_tokens=run.config.max_train_tokens)


def heldout_sequences(run: LoadedRun, count: int, seed: int = 0, data: CorpusData | None = None) -> list[list[str]]:
    """`count` random held-out windows of the run's length, as tokens of the run's vocabulary."""
    data = data or run_data(run)
    windows = heldout_windows(data.val_ids, run.config.seq_len, count, seed)
    return ids_to_tokens(windows, run.tokenizer.itos)


def train_token_counts(run: LoadedRun, data: CorpusData | None = None) -> torch.Tensor:
    """How often each vocabulary id occurs in the text the run trained on, (V,)."""
    data = data or run_data(run)
    return torch.bincount(data.train_ids, minlength=len(run.tokenizer))


@torch.no_grad()
def nearest_neighbour_distances(table: torch.Tensor, chunk: int = 1024) -> torch.Tensor:
    """Euclidean distance from every row to its nearest other row, (V,), in chunks of rows so a
    large vocabulary never needs a V x V matrix."""
    table = table.detach().float()
    out = torch.empty(len(table))
    for first in range(0, len(table), chunk):
        rows = table[first: first + chunk]
        distances = torch.cdist(rows, table)
        index = torch.arange(len(rows))
        distances[index, index + first] = float("inf")
        out[first: first + len(rows)] = distances.min(dim=-1).values
    return out


@torch.no_grad()
def embedding_geometry(run: LoadedRun, counts: torch.Tensor) -> pd.DataFrame:
    """One row per vocabulary entry: training count, frequency rank, row norm, nearest-neighbour
    distance, the rounding decoder's bias, and whether the token is punctuation."""
    table = run.model.embedding.table().detach().float().cpu()
    itos = run.tokenizer.itos
    order = torch.argsort(counts, descending=True, stable=True)
    rank = torch.empty_like(order)
    rank[order] = torch.arange(1, len(order) + 1)
    return pd.DataFrame({
        "id": range(len(itos)),
        "token": itos,
        "count": counts.tolist(),
        "rank": rank.tolist(),
        "norm": table.norm(dim=-1).tolist(),
        "nn_distance": nearest_neighbour_distances(table).tolist(),
        "bias": run.model.rounding.output_bias.detach().float().cpu().tolist(),
        "punctuation": [is_punctuation(t) for t in itos],
    })


@torch.no_grad()
def projection_2d(run: LoadedRun) -> torch.Tensor:
    """The embedding table on its top two principal components, (V, 2)."""
    table = run.model.embedding.table().detach().float().cpu()
    centred = table - table.mean(0, keepdim=True)
    _, _, v = torch.linalg.svd(centred, full_matrices=False)
    return centred @ v[:2].T


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Rank correlation (ties averaged); nan when either side is constant."""
    rx, ry = pd.Series(x).rank(), pd.Series(y).rank()
    value = rx.corr(ry)
    return float(value) if value == value else math.nan


def geometry_summary(geometry: pd.DataFrame, sigma0: float) -> dict:
    """Table-wide geometry numbers over the tokens seen in training."""
    seen = geometry[geometry["count"] > 0]
    mean_nn = float(seen["nn_distance"].mean())
    return {
        "embedding_norm": float(seen["norm"].mean()),
        "nn_distance": mean_nn,
        "sigma0": sigma0,
        "nn_over_sigma0": mean_nn / sigma0 if sigma0 > 0 else math.inf,
        "bias_frequency_spearman": spearman(seen["bias"], seen["count"]),
        "punctuation_norm": float(seen.loc[seen["punctuation"], "norm"].mean()) if seen["punctuation"].any() else math.nan,
    }


def pick_checkpoints(paths: Sequence[Path], max_count: int) -> list[Path]:
    """At most `max_count` of `paths`, evenly spaced; the first and last are always kept."""
    paths = list(paths)
    if max_count <= 0 or len(paths) <= max_count:
        return paths
    if max_count == 1:
        return [paths[-1]]
    picks = sorted({round(i * (len(paths) - 1) / (max_count - 1)) for i in range(max_count)})
    return [paths[i] for i in picks]


def run_checkpoints(run_dir: str | Path, max_count: int = 0) -> list[Path]:
    """A run's kept checkpoints (oldest first), or its last.pt when none were kept."""
    run = RunDir(run_dir)
    kept = run.kept_checkpoints()
    if not kept and run.last_checkpoint.exists():
        kept = [run.last_checkpoint]
    if not kept:
        raise FileNotFoundError(f"'{run.path}' holds no checkpoints. Train into it first (train.ipynb or dlm train).")
    return pick_checkpoints(kept, max_count)


def sample_checkpoint(run: LoadedRun, num_samples: int, steps: int | None = None, seed: int = 0,
                      **options) -> list[list[str]]:
    """Samples from a loaded checkpoint with the run's own sampling recipe, as token lists."""
    sample_options = SampleOptions.from_config(run.config, num_samples=num_samples, steps=steps, seed=seed, **options)
    batch = generate(run, sample_options)
    return ids_to_tokens(batch.ids, run.tokenizer.itos)


def checkpoint_samples_table(run_dir: str | Path, num_samples: int = 3, steps: int | None = None,
                             max_checkpoints: int = 0, seed: int = 0) -> pd.DataFrame:
    """A few decoded samples from each kept checkpoint: epoch, step, sample number, text."""
    rows = []
    for path in run_checkpoints(run_dir, max_checkpoints):
        run = load_run(run_dir, path)
        batch = generate(run, SampleOptions.from_config(run.config, num_samples=num_samples, steps=steps, seed=seed))
        for index, text in enumerate(batch.texts):
            rows.append({"epoch": run.epoch, "step": run.step, "sample": index, "text": text.replace("\n", " / ")})
    return pd.DataFrame(rows, columns=["epoch", "step", "sample", "text"])


@dataclass
class RunAnalysis:
    """Everything the collapse notebook shows for one run."""

    name: str
    run_dir: Path
    heldout: dict  # sample_stats of held-out text of the samples' shape
    series: pd.DataFrame  # one row per checkpoint: epoch, step, sample stats, geometry summary
    geometry: dict[int, pd.DataFrame] = field(default_factory=dict)  # epoch -> per-token geometry
    projection: dict[int, torch.Tensor] = field(default_factory=dict)  # epoch -> (V, 2)
    samples: dict[int, list[str]] = field(default_factory=dict)  # epoch -> a few sample texts
    sample_tokens: dict[int, list[list[str]]] = field(default_factory=dict)
    heldout_tokens: list[list[str]] = field(default_factory=list)

    def verdict(self) -> dict:
        return collapse_verdict(self.series, self.heldout, self.name)


def analyse_run(run_dir: str | Path, max_checkpoints: int = 6, num_samples: int = 64, steps: int | None = None,
                seed: int = 0, name: str | None = None, keep_samples: int = 3) -> RunAnalysis:
    """Sample every picked checkpoint of one run and measure samples and embedding geometry."""
    run_dir = Path(run_dir)
    paths = run_checkpoints(run_dir, max_checkpoints)
    analysis = None
    rows = []
    counts = None
    for path in paths:
        run = load_run(run_dir, path)
        if analysis is None:
            data = run_data(run)  # read and encode the corpus once per run
            heldout_tokens = heldout_sequences(run, num_samples, seed, data)
            analysis = RunAnalysis(name or run_dir.name, run_dir, sample_stats(heldout_tokens), pd.DataFrame(),
                                   heldout_tokens=heldout_tokens)
            counts = train_token_counts(run, data)
        tokens = sample_checkpoint(run, num_samples, steps, seed)
        geometry = embedding_geometry(run, counts)
        stats = sample_stats(tokens)
        rows.append({"run": analysis.name, "checkpoint": path.name, "epoch": run.epoch, "step": run.step,
                     **stats, **geometry_summary(geometry, run.objective.schedule.sigma0)})
        analysis.geometry[run.epoch] = geometry
        analysis.projection[run.epoch] = projection_2d(run)
        analysis.sample_tokens[run.epoch] = tokens
        analysis.samples[run.epoch] = [run.tokenizer.decode([run.tokenizer.stoi[t] for t in seq]).replace("\n", " / ")
                                       for seq in tokens[:keep_samples]]
    series = pd.DataFrame(rows)
    flags = [collapse_signals(row, analysis.heldout) for row in rows]
    series["collapsed"] = [any(f.values()) for f in flags]
    series["signals"] = [", ".join(k for k, v in f.items() if v) for f in flags]
    analysis.series = series
    return analysis


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


def collapse_verdict(series: pd.DataFrame, heldout: dict, name: str = "") -> dict:
    """Collapsed or not (at the last checkpoint), since when (the first checkpoint of the final
    unbroken stretch of collapsed ones), which signals say so, and the geometry warnings."""
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


def write_sample_summary(run_dir: str | Path, streams: dict[str, Sequence[Sequence[str]]], **meta) -> Path:
    """RUN/samples/summary.json: sample_stats of each named token stream (e.g. samples, heldout,
    cosine) plus `meta` (checkpoint, options); the report index reads it."""
    path = Path(run_dir) / "samples" / "summary.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    summary = {**meta, **{name: sample_stats(tokens) for name, tokens in streams.items()}}
    atomic_write_bytes(path, json.dumps(summary, indent=2, default=_json_default).encode())
    return path


def write_verdict(analyses: Sequence[RunAnalysis]) -> list[Path]:
    """Each run's series.csv and verdict.json into RUN/analysis/ (what the report index reads)."""
    written = []
    for analysis in analyses:
        folder = analysis.run_dir / "analysis"
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(folder / "series.csv", analysis.series.to_csv(index=False).encode())
        verdict = {**analysis.verdict(), "heldout": analysis.heldout}
        atomic_write_bytes(folder / "verdict.json", json.dumps(verdict, indent=2, default=_json_default).encode())
        written.append(folder / "verdict.json")
    return written


def _json_default(value):
    if hasattr(value, "item"):
        return value.item()
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")
