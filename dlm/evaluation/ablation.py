"""Ablations at equal CPU budget: train each recipe for the same wall-clock seconds, sample it, and
score the samples with `dlm evaluate`'s numbers, next to held-out text and the AR baseline.

An arm is a set of overrides on one base preset: training overrides (a new run) and sampling
overrides (the same run, sampled differently). Arms with the same training overrides share one
trained run, so decoding ablations (cosine vs learned, clamping, temperature, steps) cost only
their sampling. `benchmarks/quality.py` is the command line around this module.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import torch

from dlm.core.config import Config
from dlm.core.errors import UserError
from dlm.evaluation.evaluate import pick_metrics, score_ids
from dlm.evaluation.matched import match_entropy
from dlm.runs.build import load_run
from dlm.runs.control import mbr_indices
from dlm.runs.sample import SampleOptions, generate
from dlm.runs.train import train


@dataclass(frozen=True)
class Arm:
    name: str
    group: str  # which question the arm answers (the table is grouped by it)
    train: dict = field(default_factory=dict)  # Config overrides on the base preset
    sample: dict = field(default_factory=dict)  # SampleOptions overrides on the run's own recipe
    budget_factor: float = 1.0  # training length: a multiple of the common budget
    mbr: int = 1  # decoding: each sample the minimum-Bayes-risk pick of this many (Diffusion-LM's MBR)

    def train_key(self) -> str:
        return json.dumps({"train": self.train, "budget": self.budget_factor}, sort_keys=True)


# The questions issue 4 asks, each answered against the base recipe (params/default.yaml).
ARMS = [
    Arm("base", "base"),
    Arm("decode cosine", "decoding", sample={"decoder": "cosine"}),
    Arm("clamp every step", "decoding", sample={"clamp": True, "clamp_fraction": 1.0}),
    Arm("clamp last 10%", "decoding", sample={"clamp": True, "clamp_fraction": 0.1}),
    Arm("draw at T=1", "decoding", sample={"temperature": 1.0}),
    Arm("draw at T=0.5", "decoding", sample={"temperature": 0.5}),
    Arm("DDIM (eta 0)", "decoding", sample={"eta": 0.0}),
    Arm("x0 predicted", "decoding", sample={"x0": "predicted"}),  # the default moves toward the expected x0
    Arm("x0 predicted, DDIM", "decoding", sample={"x0": "predicted", "eta": 0.0}),
    Arm("MBR of 4", "decoding", mbr=4),
    Arm("50 steps", "decoding", sample={"steps": 50}),
    Arm("50 steps, uniform spacing", "decoding", sample={"steps": 50, "spacing": "uniform"}),
    Arm("rounding on clean", "rounding target", {"rounding_target": "clean"}),
    Arm("rounding on noisy", "rounding target", {"rounding_target": "noisy"}),
    Arm("predict epsilon", "parameterisation", {"predict": "epsilon"}),
    Arm("predict logits (CDCD)", "parameterisation", {"predict": "logits"}),
    Arm("left to right, delay 1", "generation order", {"left_to_right": 1.0}),
    Arm("left to right, delay 4", "generation order", {"left_to_right": 4.0}),
    # semi-autoregressive blocks (SSD-LM, BD3-LM): every block runs the whole chain, so sampling
    # costs seq_len / block_size times the base's; the last arm spends the base's sampling budget
    Arm("blocks of 16", "generation order", {"block_size": 16}),
    Arm("blocks of 4", "generation order", {"block_size": 4}),
    Arm("blocks of 4 at 13 steps", "generation order", {"block_size": 4}, {"steps": 13}),
    Arm("no embedding norm", "embedding geometry", {"embedding_norm": "none", "embedding_lr_scale": 1.0}),
    Arm("layernorm embeddings", "embedding geometry", {"embedding_norm": "layernorm"}),
    Arm("weight decay on table", "embedding geometry", {"weight_decay": 0.01, "weight_decay_scope": "matrices+embeddings"}),
    Arm("self-conditioning 50%", "self-conditioning", {"self_condition": 0.5}),
    Arm("embed_dim 16", "embed_dim", {"embed_dim": 16}),
    Arm("embed_dim 64", "embed_dim", {"embed_dim": 64}),
    Arm("embed_dim 128", "embed_dim", {"embed_dim": 128}),
    Arm("embed_dim 256", "embed_dim", {"embed_dim": 256}),
    Arm("cosine schedule", "noise", {"schedule": "cosine"}),
    Arm("embedding scale 0.5", "noise", {"embedding_scale": 0.5}),
    Arm("time warping", "noise", {"time_warp": True}),
    Arm("2x training", "training length", budget_factor=2.0),
    # issue 13's levers, each at the same wall-clock budget: 3x the tokens per step (so about a third
    # of the steps: equal tokens), the denoiser's capacity, and a frequency-capped vocabulary
    Arm("batch 192", "batch", {"batch_size": 192}),
    Arm("depth 8", "capacity", {"depth": 8}),
    Arm("width 512", "capacity", {"width": 512, "heads": 8}),
    Arm("width 128", "capacity", {"width": 128, "heads": 2}),
    # its samples hold ~12% <unk>, which the teacher scores cheaply: read with docs/journal.md's caveat,
    # or the same run with <unk> masked in the final draw (words only)
    Arm("vocabulary: words seen 10+ times", "vocabulary", {"min_count": 10}),
    Arm("vocabulary: words seen 10+ times, <unk> masked", "vocabulary", {"min_count": 10}, {"unk": False}),
]

def mbr_picks(ids: torch.Tensor, candidates: int) -> torch.Tensor:
    """Every `candidates` consecutive samples (N * k, L) reduced to their MBR pick (N, L)."""
    return ids if candidates == 1 else ids[mbr_indices(ids, candidates)]


# The competitor a user would otherwise pick: the AR baseline on the same budget, at two temperatures.
AR_ARMS = [
    Arm("AR T=1.0", "autoregressive", {"model": "ar"}, {"temperature": 1.0}),
    Arm("AR T=0.8", "autoregressive", {"model": "ar"}, {"temperature": 0.8}),
]

# What the table shows of each arm, in order, with held-out text's value as the first row.
COLUMNS = ["teacher_perplexity", "unigram_entropy", "punctuation_share", "distinct_2", "types_at",
           "top10_share", "js_divergence", "copy_rate_4gram", "collapsed"]


def arm_config(base: Config, arm: Arm, ar_preset: Config | None = None) -> Config:
    """The arm's training recipe: an arm of another model family starts from that family's preset
    (the AR baseline's, params/ar.yaml) on the base's data, batch, device and seed; any other arm is
    the base with the overrides."""
    if arm.train.get("model", base.model) != base.model:
        if ar_preset is None:
            raise UserError(f"Arm '{arm.name}' needs an AR preset (params/ar.yaml).")
        shared = {**base.section("data"), "batch_size": base.batch_size, "threads": base.threads,
                  "device": base.device, "seed": base.seed}
        return ar_preset.replace(**shared, **{k: v for k, v in arm.train.items() if k != "model"})
    return base.replace(**arm.train)


def flatten(arm: Arm, result: dict, train_info: dict, sample_s: float, matched: dict | None = None) -> dict:
    return {"arm": arm.name, "group": arm.group, **train_info, "sample_s": round(sample_s, 1),
            **pick_metrics(result, "samples", COLUMNS), "types_count": result["types_count"],
            "collapse_reasons": ", ".join(result["collapse_reasons"]), **(matched or {})}


def at_heldout_entropy(run, teacher, options: SampleOptions) -> dict:
    """The arm's teacher perplexity at held-out entropy (dlm evaluate --matched): every arm that is
    not collapsed lies on one fluency-entropy curve, so only this column compares them. The final
    draw's temperature sets the entropy, so an arm's own temperature is replaced."""
    result = match_entropy(run, teacher, options)
    return {"matched_perplexity": result["samples"]["teacher_perplexity"],
            "matched_temperature": result["temperature"], "matched_within_5pct": result["matched"]}


def heldout_row(result: dict) -> dict:
    return {"arm": "held-out text", "group": "reference", **pick_metrics(result, "heldout", COLUMNS),
            "types_count": result["types_count"]}


def run_ablation(base: Config, arms: list[Arm], teacher_dir: str | Path, out_dir: str | Path, budget_s: float, *,
                 num_samples: int = 64, ar_preset: Config | None = None, log=print,
                 matched: bool = False) -> pd.DataFrame:
    """Train (or reuse) one run per distinct training recipe, sample every arm, score every sample
    set with the teacher, and return one row per arm plus held-out text's row first. matched: also
    each arm's perplexity at held-out entropy (`at_heldout_entropy`; not for MBR arms, whose pick is
    not a temperature's draw)."""
    out_dir = Path(out_dir)
    teacher = load_run(teacher_dir)
    trained: dict[str, dict] = {}
    rows: list[dict] = []
    heldout = None
    for arm in arms:
        config = arm_config(base, arm, ar_preset)
        key = arm.train_key()
        if key not in trained:
            run_dir = out_dir / "runs" / f"run{len(trained):02d}"
            seconds = budget_s * arm.budget_factor
            log(f"[{arm.name}] training {seconds:g} s into {run_dir}")
            # On the clock, not in steps estimated up front (a 5-step timing missed by up to 2x):
            # every arm trains the same wall-clock seconds, its lr decaying over them.
            # no calibration: each arm samples at its own fixed setting, which is what the arms compare
            result = train(config.replace(max_train_seconds=seconds, max_steps=None, epochs=10**6, progress=False,
                                          checkpoint_every=10**6, calibrate_temperature=False), run_dir)
            trained[key] = {"run_dir": str(run_dir), "steps": result.step, "train_s": round(result.wall_s, 1)}
        info = trained[key]
        run = load_run(info["run_dir"])
        options = SampleOptions.from_config(run.config, num_samples=num_samples * arm.mbr, **arm.sample)
        start = time.perf_counter()
        batch = generate(run, options)
        ids = mbr_picks(batch.ids, arm.mbr)
        texts = [run.tokenizer.decode(row) for row in ids]
        sample_s = time.perf_counter() - start
        result = score_ids(run, ids, teacher)
        if heldout is None:
            heldout = heldout_row(result)
            rows.append(heldout)
        at_entropy = at_heldout_entropy(run, teacher, options) if matched and arm.mbr == 1 else None
        rows.append(flatten(arm, result, {"steps": info["steps"], "train_s": info["train_s"]}, sample_s, at_entropy))
        log(f"[{arm.name}] ppl {rows[-1]['teacher_perplexity']:.1f} | entropy {rows[-1]['unigram_entropy']:.2f} | "
            f"punct {rows[-1]['punctuation_share']:.3f} | types {rows[-1]['types_at']} | collapsed {rows[-1]['collapsed']}"
            + (f" | ppl at held-out entropy {at_entropy['matched_perplexity']:.1f} (T {at_entropy['matched_temperature']:.2f})"
               if at_entropy else ""))
        (out_dir / "samples").mkdir(parents=True, exist_ok=True)
        (out_dir / "samples" / f"{slug(arm.name)}.txt").write_text("\n\n".join(texts[:16]) + "\n", encoding="utf-8")
    return pd.DataFrame(rows)


def slug(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name.lower()).strip("_")


def markdown_table(table: pd.DataFrame) -> str:
    """The ablation table (benchmarks/results/quality.md): one line per arm, ratios to held-out text where they read better."""
    header = ["arm", "group", "steps", "train s", "teacher ppl", "entropy (bits)", "punct", "distinct-2",
              "types", "top-10", "JS", "4-gram copy", "collapsed"]
    matched = "matched_perplexity" in table
    if matched:
        header += ["ppl at held-out entropy", "T there"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]

    def fmt(value, digits=3):
        if isinstance(value, float) and math.isnan(value):
            return ""
        if isinstance(value, (bool,)) or value is None:
            return "yes" if value else "no"
        if isinstance(value, float):
            return f"{value:,.1f}" if abs(value) >= 100 else f"{value:.{digits}g}"
        return f"{value:,}" if isinstance(value, int) else str(value)

    for record in table.to_dict("records"):
        steps = record.get("steps")
        cells = [record["arm"], record["group"],
                 "" if steps is None or (isinstance(steps, float) and math.isnan(steps)) else f"{int(steps):,}",
                 fmt(record.get("train_s", float("nan"))), fmt(record["teacher_perplexity"]),
                 fmt(record["unigram_entropy"]), fmt(record["punctuation_share"]), fmt(record["distinct_2"]),
                 fmt(int(record["types_at"])), fmt(record["top10_share"]), fmt(record["js_divergence"]),
                 fmt(record["copy_rate_4gram"]), fmt(bool(record["collapsed"]))]
        if matched:
            within = record.get("matched_within_5pct")
            flag = " (not within 5%)" if pd.notna(within) and not bool(within) else ""
            cells += [fmt(record.get("matched_perplexity", float("nan"))) + flag,
                      fmt(record.get("matched_temperature", float("nan")))]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
