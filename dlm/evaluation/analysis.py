"""Post-hoc collapse analysis of one run: sample every picked checkpoint, measure the samples'
token distribution (dlm.core.textstats) and the embedding table's geometry (dlm.evaluation.geometry),
judge each checkpoint and the run (dlm.evaluation.collapse), and write what the report index reads.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import torch

from dlm.core.data import atomic_write_bytes
from dlm.core.errors import UserError
from dlm.core.textstats import sample_stats
from dlm.evaluation.collapse import collapse_signals, run_collapse_verdict
from dlm.evaluation.geometry import embedding_geometry, geometry_summary, projection_2d
from dlm.evaluation.rundata import heldout_sequences, run_checkpoints, run_data, sample_checkpoint, train_token_counts
from dlm.evaluation.tokens import ids_to_words
from dlm.families import not_available, supports
from dlm.runs.build import load_run
from dlm.runs.rundir import RunDir

logger = logging.getLogger("dlm")


@dataclass(kw_only=True)
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
        return run_collapse_verdict(self.series, self.heldout, self.name)


def recorded_analysis(run_dir: str | Path, name: str | None = None) -> RunAnalysis:
    """The analysis a run without checkpoints recorded in its analysis/ folder (a committed report's
    run_10x/, whose checkpoints are not kept): its series over checkpoints and the held-out text it
    was judged against, without geometry, projections or sample texts (those need the checkpoints)."""
    run = RunDir(run_dir)
    if not (run.series.is_file() and run.verdict.is_file()):
        raise UserError(f"'{run.path}' holds no checkpoints and no recorded analysis (analysis/series.csv and "
                        "verdict.json): train into it first (dlm train), or give a run that has either.")
    series = pd.read_csv(run.series)
    series["run"] = name or run.path.name
    series["signals"] = series["signals"].fillna("")
    heldout = json.loads(run.verdict.read_text(encoding="utf-8"))["heldout"]
    logger.info("analysis: %s has no checkpoints; its recorded analysis/series.csv is shown", run.path)
    return RunAnalysis(name=name or run.path.name, run_dir=run.path, heldout=heldout, series=series)


def analyse_run(run_dir: str | Path, max_checkpoints: int = 6, num_samples: int = 64, steps: int | None = None,
                seed: int = 0, name: str | None = None, keep_samples: int = 3) -> RunAnalysis:
    """Sample every picked checkpoint of one run and measure samples and embedding geometry; a run
    without checkpoints is read from the analysis it recorded (`recorded_analysis`)."""
    run_dir = Path(run_dir)
    folder = RunDir(run_dir)
    if not folder.has_checkpoint() and folder.series.is_file():
        return recorded_analysis(run_dir, name)
    paths = run_checkpoints(run_dir, max_checkpoints)
    model = load_run(run_dir, paths[-1]).config.model if paths else None
    if model is not None and not supports(model, "geometry"):
        raise UserError(not_available(model, "The collapse and embedding-geometry analysis", "geometry"))
    analysis = None
    rows = []
    counts = None
    for path in paths:
        run = load_run(run_dir, path)
        if analysis is None:
            data = run_data(run)  # read and encode the corpus once per run
            heldout_tokens = heldout_sequences(run, num_samples, seed, data)
            analysis = RunAnalysis(name=name or run_dir.name, run_dir=run_dir, heldout=sample_stats(heldout_tokens),
                                   series=pd.DataFrame(), heldout_tokens=heldout_tokens)
            counts = train_token_counts(run, data)
        began = time.perf_counter()
        batch = sample_checkpoint(run, num_samples, steps, seed)
        tokens = ids_to_words(batch.ids, run.tokenizer)
        logger.info("analysis: %s (epoch %d), %d samples in %.1fs", path.name, run.epoch, num_samples,
                    time.perf_counter() - began)
        geometry = embedding_geometry(run, counts)
        stats = sample_stats(tokens)
        rows.append({"run": analysis.name, "checkpoint": path.name, "epoch": run.epoch, "step": run.step,
                     **stats, **geometry_summary(geometry, run.family.noise_scale(run.config))})
        analysis.geometry[run.epoch] = geometry
        analysis.projection[run.epoch] = projection_2d(run)
        analysis.sample_tokens[run.epoch] = tokens
        analysis.samples[run.epoch] = [text.replace("\n", " / ") for text in batch.texts[:keep_samples]]
    series = pd.DataFrame(rows)
    flags = [collapse_signals(row, analysis.heldout) for row in rows]
    series["collapsed"] = [any(f.values()) for f in flags]
    series["signals"] = [", ".join(k for k, v in f.items() if v) for f in flags]
    analysis.series = series
    return analysis


def with_geometry(analyses: Sequence[RunAnalysis]) -> list[RunAnalysis]:
    """The analyses that read checkpoints (what the geometry, projection and rounding-bias sections
    show), after one line for each that did not, saying why its sections are missing."""
    for a in analyses:
        if not a.geometry:
            print(f"{a.name}: its checkpoints are not kept, so its series over training comes from its recorded "
                  "analysis/series.csv, and its embedding geometry, projection, rounding bias and sample texts are "
                  "not available.")
    return [a for a in analyses if a.geometry]


def first_and_last(a: RunAnalysis) -> list[int]:
    """The first and the last analysed epoch of a run (one when it has one)."""
    epochs = sorted(a.geometry)
    return [epochs[0], epochs[-1]] if len(epochs) > 1 else epochs


def write_sample_summary(run_dir: str | Path, streams: dict[str, Sequence[Sequence[str]]], **meta) -> Path:
    """RUN/samples/summary.json: sample_stats of each named token stream (e.g. samples, heldout,
    cosine) plus `meta` (checkpoint, options); the report index reads it."""
    path = RunDir(run_dir).sample_summary
    path.parent.mkdir(parents=True, exist_ok=True)
    summary = {**meta, **{name: sample_stats(tokens) for name, tokens in streams.items()}}
    atomic_write_bytes(path, json.dumps(summary, indent=2, default=_json_default).encode())
    return path


def write_verdict(analyses: Sequence[RunAnalysis]) -> list[Path]:
    """Each run's series.csv and verdict.json into RUN/analysis/ (what the report index reads)."""
    written = []
    for analysis in analyses:
        run = RunDir(analysis.run_dir)
        folder = run.analysis
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(run.series, analysis.series.to_csv(index=False).encode())
        verdict = {**analysis.verdict(), "heldout": analysis.heldout}
        atomic_write_bytes(run.verdict, json.dumps(verdict, indent=2, default=_json_default).encode())
        written.append(run.verdict)
    return written


def _json_default(value):
    if hasattr(value, "item"):
        return value.item()
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")
