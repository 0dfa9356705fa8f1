"""Where runs stand on the likelihood bound and on teacher perplexity at matched entropy: one table.

    python benchmarks/scaling.py --teacher runs/ar default=runs/default long=runs/long \\
        10x=runs/x10 "10x at 3x=runs/x10/checkpoints/epoch_0042.pt" [--seeds 2] [--samples 64]

Each LABEL=PATH is a run folder (its last checkpoint) or a checkpoint file inside one. A row gives
the optimizer steps, the tokens seen (steps x batch x seq_len), the training wall seconds its
metrics.csv recorded, the NLL bound (dlm evaluate --nll) with the AR's exact NLL on the same
windows, and the samples at held-out entropy or --entropy BITS (dlm evaluate --matched): final-token temperature,
teacher perplexity (mean over --seeds, with min-max), the ratios to held-out text and how many of
the issue's four targets they meet, and sampling speed: samples per wall second and per process CPU
second at --speed_steps reverse steps (a block run at its own steps per block; the AR model has no
steps). The AR teacher's own samples at matched entropy follow (scored by itself, which flatters
them: a floor), then held-out text. With runs of several families (the AR, Gaussian and masked
families, whole window and blocks) this is the family comparison of docs/results.md.

Writes scaling.csv and scaling.md to --out (default benchmarks/results/) and prints the table.
"""

from __future__ import annotations

import argparse
import math
import platform
import statistics
import sys
import time
from pathlib import Path

import pandas as pd
import torch

from dlm.cli import handled
from dlm.core.data import check_destination
from dlm.core.errors import UserError
from dlm.evaluation.likelihood import check_ar_run, check_counts, check_has_bound, compare_with_ar
from dlm.evaluation.matched import (
    check_entropy,
    check_teacher,
    entropy_of,
    heldout_entropy,
    score_at_entropy,
    temperature_sampler,
)
from dlm.families import families_named, supports, with_capability
from dlm.runs.build import load_run
from dlm.runs.rundir import RunDir, run_and_checkpoint
from dlm.runs.sample import X0_CHOICES, SampleOptions, check_options, generate

ROOT = Path(__file__).resolve().parents[1]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", metavar="LABEL=PATH", help="a run folder or one of its checkpoints")
    parser.add_argument("--teacher", required=True, help="the AR run that scores samples (same vocabulary)")
    parser.add_argument("--samples", type=int, default=64, help="samples per seed (default 64)")
    parser.add_argument("--seeds", type=int, default=1, help="sampling seeds per row: the ppl spread (default 1)")
    parser.add_argument("--steps", type=int, help="sampling steps (default: each run's sample_steps)")
    parser.add_argument("--windows", type=int, default=256, help="held-out windows for the bound (default 256)")
    parser.add_argument("--draws", type=int, default=4, help="timesteps per window for the bound (default 4)")
    parser.add_argument("--speed_steps", type=int, default=50,
                        help="reverse steps for the samples/s columns (default 50; block runs: their own steps per block)")
    parser.add_argument("--x0", choices=X0_CHOICES,
                        help="the x0 a Gaussian run's steps move toward, in its samples and its bound (default: each "
                             "run's sample_x0; other families have no such choice and ignore it)")
    parser.add_argument("--entropy", type=float, metavar="BITS",
                        help="score the samples at this unigram entropy instead of held-out text's: where a "
                             "sampler's argmax is above held-out entropy (the posterior x0), rows scored in separate "
                             "calls still compare")
    parser.add_argument("--tolerance", type=float, default=0.01,
                        help="how close to the target entropy the temperature search stops, a fraction of it "
                             "(default 0.01; rows compared at equal entropy want 0.002)")
    parser.add_argument("--no_ar", action="store_true", help="leave out the AR teacher's own row")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"), help="where scaling.csv/.md go")
    return parser.parse_args(argv)


def split_label(text: str) -> tuple[str, Path | None, Path | None]:
    """'LABEL=PATH' as (label, run folder, checkpoint or None)."""
    label, sep, path = text.partition("=")
    if not sep or not label or not path:
        raise UserError(f"'{text}' is not LABEL=PATH (e.g. default=runs/default).")
    return label, *run_and_checkpoint(path)


def check_numbers(args: argparse.Namespace) -> None:
    """The counts and bits asked, before any run is loaded (the CLI's own checks where it has them)."""
    check_entropy(args.entropy)
    if not 0 < args.tolerance < 1:
        raise UserError(f"--tolerance is a fraction of the target entropy between 0 and 1, got {args.tolerance}.")
    for flag, value in (("--seeds", args.seeds), ("--samples", args.samples), ("--speed_steps", args.speed_steps)):
        if value < 1:
            raise UserError(f"{flag} must be at least 1, got {value}.")
    check_counts(args.windows, args.draws)
    check_destination(Path(args.out) / "scaling.csv", "--out")


def check_row(run, teacher, args: argparse.Namespace) -> None:
    """A row's run against what it is asked, before anything is sampled: a likelihood bound to compare
    with the teacher's (same vocabulary), the --steps its sampler can take."""
    if supports(run.config.model, "likelihood_exact"):
        raise UserError("an autoregressive run is the --teacher's row (scored by itself, unless --no_ar), not a "
                        f"LABEL=PATH row: give runs of {families_named(with_capability('likelihood_bound'))} as rows.")
    check_has_bound(run)
    check_ar_run(run, teacher, "--teacher")
    check_options(run.config, SampleOptions.from_config(run.config, num_samples=args.samples, steps=args.steps,
                                                 x0=x0_of(run, args.x0)))
    try:
        check_options(run.config, speed_options(run, args.samples, args.speed_steps))
    except UserError as error:
        raise UserError(f"--speed_steps: {error}") from None


def training_seconds(run_dir: Path, step: int) -> float:
    """The wall seconds metrics.csv recorded at the last row up to `step` (NaN when absent)."""
    path = RunDir(run_dir).metrics
    if not path.is_file():
        return float("nan")
    metrics = pd.read_csv(path)
    logged = metrics[(metrics["step"] <= step) & metrics["elapsed_s"].notna()]
    return float(logged["elapsed_s"].iloc[-1]) if len(logged) else float("nan")


def x0_of(run, asked: str | None) -> str | None:
    """The x0 a row uses: for a family that has the choice (Gaussian) the asked one, else the run's
    own sample_x0; None for the others."""
    return (asked or run.config.sample_x0) if "x0" in run.family.SAMPLE_OPTIONS else None


def speed_options(run, samples: int, steps: int, x0: str | None = None) -> SampleOptions:
    """One batch of `samples` at `steps` reverse steps (a block run: its own steps per block)."""
    chain_steps = None if run.config.block_size is not None and run.config.block_size < run.config.seq_len else steps
    return SampleOptions.from_config(run.config, num_samples=samples, batch_size=samples, steps=chain_steps, seed=0,
                                     x0=x0)


def sampling_speed(run, samples: int, steps: int, x0: str | None = None) -> dict:
    """Samples per wall second and per process CPU second (the VM's clock drifts: both are given) for
    one batch of `samples`, at `steps` reverse steps (a block run: its own steps per block)."""
    options = speed_options(run, samples, steps, x0)
    wall, cpu = time.perf_counter(), time.process_time()
    generate(run, options)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    return {"speed_steps": options.steps, "samples_per_s": samples / wall, "samples_per_cpu_s": samples / cpu}


def matched_columns(results: list[dict]) -> dict:
    """The matched-entropy numbers of one row, over its seeds: ppl mean and min-max, the rest means."""
    ppl = [r["samples"]["teacher_perplexity"] for r in results]
    ratios = {key: statistics.fmean(r["ratios"][key] for r in results) for key in results[0]["ratios"]}
    met = [sum(r["targets"].values()) for r in results]
    return {"temperature": statistics.fmean(r["temperature"] for r in results),
            "entropy": statistics.fmean(r["samples"]["unigram_entropy"] for r in results),
            "matched": all(r["matched"] for r in results),
            "teacher_ppl": statistics.fmean(ppl), "ppl_min": min(ppl), "ppl_max": max(ppl),
            "ppl_x_heldout": ratios["teacher_perplexity"], "punct_x": ratios["punctuation_share"],
            "types_x": ratios["types_at"], "copy4_x": ratios["copy_rate_4gram"],
            "targets_met": f"{min(met)}-{max(met)}/4" if min(met) != max(met) else f"{met[0]}/4"}


class Row:
    """One row's samples: a temperature sampler per seed (the chain run once each), scored at held-out
    entropy, and its argmax's entropy (the lowest the final-token temperature reaches)."""

    def __init__(self, run, teacher, args):
        self.run, self.teacher, self.tolerance = run, teacher, args.tolerance
        self.draws = [temperature_sampler(run, SampleOptions.from_config(run.config, num_samples=args.samples,
                                                                         steps=args.steps, seed=seed,
                                                                         x0=x0_of(run, args.x0)))
                      for seed in range(args.seeds)]
        self.results = self.at(heldout_entropy(run, args.samples, teacher) if args.entropy is None else args.entropy)
        self.argmax_entropy = statistics.fmean(entropy_of(run, draw(0.0), teacher) for draw in self.draws)

    def at(self, entropy: float) -> list[dict]:
        return [score_at_entropy(self.run, self.teacher, draw, entropy, self.tolerance) for draw in self.draws]


def score_at_common_entropy(rows: list[dict], samplers: list[Row], target: float) -> str | None:
    """A row whose argmax is already above the target entropy (held-out text's, or --entropy) cannot
    be matched there by temperature: then every row is also scored at the lowest entropy all of
    them reach (the highest argmax entropy), so they still meet somewhere. Adds that column to
    `rows`; returns its name (or None)."""
    common = max(sampler.argmax_entropy for sampler in samplers)
    if common <= target * 1.05:
        return None
    column = f"ppl at {common:.2f} bits"
    for row, sampler in zip(rows, samplers):
        row[column] = statistics.fmean(r["samples"]["teacher_perplexity"] for r in sampler.at(common))
    return column


def target_text(entropy: float | None, heldout: dict) -> str:
    if entropy is None:
        return f"held-out text's ({heldout['unigram_entropy']:.2f} bits)"
    return f"{entropy:.2f} bits (--entropy; held-out text's: {heldout['unigram_entropy']:.2f})"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return handled("scaling.py", lambda: scaling_table(args))


def scaling_table(args: argparse.Namespace) -> None:
    if args.threads:
        torch.set_num_threads(args.threads)
    specs = [split_label(text) for text in args.runs]
    check_numbers(args)
    teacher = load_run(args.teacher)
    check_teacher(teacher)
    loaded = [(label, run_dir, load_run(run_dir, checkpoint)) for label, run_dir, checkpoint in specs]
    for label, _, run in loaded:  # every row, before the first one samples
        try:
            check_row(run, teacher, args)
        except UserError as error:
            raise UserError(f"row '{label}': {error}") from None
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows, samplers, ar_nll = [], [], float("nan")
    start = time.perf_counter()
    for label, run_dir, run in loaded:
        began = time.process_time()
        x0 = x0_of(run, args.x0)
        comparison = compare_with_ar(run, teacher, args.windows, args.draws, x0=x0)
        samplers.append(Row(run, teacher, args))
        ar_nll = comparison.ar_nll
        rows.append({"row": label, "step": run.step, "x0": x0 or "",
                     "tokens": run.step * run.config.batch_size * run.config.seq_len,
                     "train_s": training_seconds(Path(run_dir), run.step),
                     "nll_bound": comparison.bound.total, "nll_se": comparison.bound.se,
                     "bound_x_ar": comparison.ratio, "argmax_entropy": samplers[-1].argmax_entropy,
                     **matched_columns(samplers[-1].results),
                     **sampling_speed(run, args.samples, args.speed_steps, x0), "eval_cpu_s": time.process_time() - began})
        print(f"{label}: bound {comparison.bound.total:.2f} +- {comparison.bound.se:.2f}, "
              f"ppl {rows[-1]['teacher_ppl']:,.0f} at T {rows[-1]['temperature']:.3f}", flush=True)
        pd.DataFrame(rows).to_csv(out / "scaling.partial.csv", index=False)  # kept if a later row fails
    if not args.no_ar:
        samplers.append(Row(teacher, teacher, args))
        rows.append({"row": "AR (the teacher, self-scored)", "step": teacher.step,
                     "tokens": teacher.step * teacher.config.batch_size * teacher.config.seq_len,
                     "train_s": training_seconds(Path(args.teacher), teacher.step), "nll_bound": ar_nll,
                     "nll_se": 0.0, "bound_x_ar": 1.0, "argmax_entropy": samplers[-1].argmax_entropy,
                     **matched_columns(samplers[-1].results), **sampling_speed(teacher, args.samples, args.speed_steps)})
    reference = samplers[0].results[0]["heldout"]
    target = reference["unigram_entropy"] if args.entropy is None else args.entropy
    score_at_common_entropy(rows, samplers, target)
    rows.append({"row": "held-out text", "entropy": reference["unigram_entropy"], "argmax_entropy": math.nan,
                 "teacher_ppl": reference["teacher_perplexity"], "ppl_x_heldout": 1.0, "punct_x": 1.0,
                 "types_x": 1.0, "copy4_x": 1.0})
    table = pd.DataFrame(rows)
    wall = time.perf_counter() - start

    table.to_csv(out / "scaling.csv", index=False)
    header = (f"Bound: {args.windows} held-out windows x {args.draws} timesteps (nats/token, the AR's exact NLL "
              f"on the same windows). Samples: {args.samples} per seed x {args.seeds} seed(s), final-token "
              f"temperature set so their unigram entropy is {target_text(args.entropy, reference)}, scored by the "
              f"AR teacher {Path(args.teacher).name}. Targets (issue 13): ppl <= 10x held-out, "
              f"punctuation within 15%, types >= 0.8x, 4-gram copy <= 2x. Machine: {platform.machine()}, "
              f"{torch.get_num_threads()} threads; whole run {wall / 60:.1f} min.\n\n")
    shown = table.drop(columns=[c for c in ("eval_cpu_s", "ppl_min", "ppl_max") if c in table])
    spread = [f"{low:,.0f}-{high:,.0f}" if args.seeds > 1 and not math.isnan(low) else ""
              for low, high in zip(table["ppl_min"], table["ppl_max"])]
    shown.insert(shown.columns.get_loc("teacher_ppl") + 1, "ppl range", spread)
    markdown = header + shown.to_markdown(index=False, floatfmt=".4g") + "\n"
    (out / "scaling.md").write_text(markdown, encoding="utf-8")
    print(markdown)
    print(f"wrote {out / 'scaling.csv'} and {out / 'scaling.md'}")


if __name__ == "__main__":
    sys.exit(main())
