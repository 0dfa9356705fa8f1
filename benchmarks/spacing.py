"""Sampling steps against quality, for two timestep spacings: teacher perplexity at held-out entropy
(`dlm evaluate --matched`) and the bound of the chain the sampler runs (`dlm evaluate --nll --steps`).

    python benchmarks/spacing.py runs/default runs/ar                       # 25, 50, 200 steps
    python benchmarks/spacing.py runs/default runs/ar --steps 10 25 50 100 200 --seeds 0 1
    python benchmarks/spacing.py --quick                                     # tiny runs, seconds

For every step count and spacing (default: logsnr, the log-SNR floor, against logsnr_full, the
whole range), each seed's --samples samples are drawn at the final-token temperature that gives
held-out text's unigram entropy (`match_entropy`) and scored by the teacher; the bound of the chain
(every one of its steps, on --windows held-out windows) is computed once per chain, its seed the
first. Writes spacing.csv and spacing.md to --out (default benchmarks/results/).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import pandas as pd

from dlm.cli import handled
from dlm.core.data import check_destination
from dlm.core.errors import UserError
from dlm.core.schedule import SPACINGS
from dlm.evaluation.likelihood import bound_chain, check_ar_run, check_counts, nll_bound
from dlm.evaluation.matched import check_entropy, check_teacher, match_entropy
from dlm.evaluation.rundata import validation_windows
from dlm.runs.build import LoadedRun, load_run
from dlm.runs.sample import X0_CHOICES, SampleOptions, check_options

ROOT = Path(__file__).resolve().parents[1]


def measure(run: LoadedRun, teacher: LoadedRun, steps: list[int], spacings: list[str], seeds: list[int],
            samples: int, windows: int, written=lambda table: None, tolerance: float = 0.01, x0: str | None = None,
            entropy: float | None = None) -> pd.DataFrame:
    """The table; `written(table so far)` after every row, so a long run stopped early keeps its rows.
    x0: the x0 the steps move toward (None: the run's sample_x0); entropy: the bits the samples are
    scored at (None: held-out text's)."""
    chains = check_runs(run, teacher, steps, spacings, samples, x0)
    ids = validation_windows(run, windows, seeds[0])
    rows = []
    for count in steps:
        for spacing in spacings:
            chain = chains[count, spacing]
            start = time.perf_counter()
            bound = nll_bound(run, ids, seed=seeds[0], chain=chain, x0=x0)
            bound_s = time.perf_counter() - start
            for seed in seeds:
                options = SampleOptions.from_config(run.config, num_samples=samples, steps=count, spacing=spacing,
                                                    seed=seed, x0=x0)
                start = time.perf_counter()
                result = match_entropy(run, teacher, options, tolerance, entropy=entropy)
                rows.append({"steps": count, "spacing": spacing, "x0": options.x0, "seed": seed,
                             "teacher_perplexity": result["samples"]["teacher_perplexity"],
                             "unigram_entropy": result["samples"]["unigram_entropy"],
                             "target_entropy": result["target_entropy"], "temperature": result["temperature"],
                             "matched": result["matched"], "punctuation_share": result["samples"]["punctuation_share"],
                             "chain_bound": bound.total, "chain_bound_se": bound.se,
                             "sample_s": time.perf_counter() - start, "bound_s": bound_s})
                print(rows[-1], flush=True)
                written(pd.DataFrame(rows))
    return pd.DataFrame(rows)


def check_runs(run, teacher, steps: list[int], spacings: list[str], samples: int,
               x0: str | None) -> dict[tuple[int, str], list[int]]:
    """The run and teacher against what is asked, before any bound or sample: a Gaussian run (the
    spacings are its chain's), an AR teacher on its vocabulary, every step count within the run's
    diffusion_steps. Returns each (steps, spacing)'s chain."""
    if "spacing" not in run.family.SAMPLE_OPTIONS:
        raise UserError(f"RUN_DIR '{run.checkpoint.parent.parent}' is of model '{run.config.model}': spacing.py "
                        f"compares the timestep spacings of the Gaussian diffusion chain, and its sampler has no such "
                        f"chain; give a run of model: gaussian.")
    check_teacher(teacher)
    check_ar_run(run, teacher, "TEACHER")
    for count in steps:
        check_options(run.config, SampleOptions.from_config(run.config, num_samples=samples, steps=count, x0=x0))
    return {(count, spacing): bound_chain(run, count, spacing) for count in steps for spacing in spacings}


def markdown(table: pd.DataFrame, command: str) -> str:
    lines = [f"`{command}`", "",
             "| steps | spacing | x0 | seed | teacher ppl at the target entropy | entropy (bits) | target | temperature | "
             "chain bound (nats/token) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for row in table.itertuples():
        lines.append(f"| {row.steps} | {row.spacing} | {getattr(row, 'x0', 'predicted')} | {row.seed} | "
                     f"{row.teacher_perplexity:,.0f} | "
                     f"{row.unigram_entropy:.2f}{'' if row.matched else ' (not matched)'} | {row.target_entropy:.2f} | "
                     f"{row.temperature:.3f} | {row.chain_bound:.2f} +- {row.chain_bound_se:.2f} |")
    return "\n".join(lines) + "\n"


def quick_runs(folder: Path) -> tuple[str, str]:
    """A 2-step Gaussian run and a 2-step AR teacher on a made-up corpus (the smoke preset)."""
    from dlm.cli import main as cli

    corpus = folder / "corpus.txt"
    corpus.write_text("\n\n".join(" ".join(f"w{(i * 7 + j) % 23}" for j in range(40)) for i in range(60)))
    common = ["--corpus", str(corpus), "--min_count", "1", "--max_train_tokens", "none", "--max_steps", "2"]
    smoke = str(ROOT / "params" / "smoke.yaml")
    cli(["train", smoke, "--run_dir", str(folder / "d"), *common])
    cli(["train-ar", smoke, "--run_dir", str(folder / "ar"), *common])
    return str(folder / "d"), str(folder / "ar")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", nargs="?")
    parser.add_argument("teacher", nargs="?")
    parser.add_argument("--steps", type=int, nargs="+", default=[25, 50, 200])
    parser.add_argument("--spacings", nargs="+", choices=SPACINGS, default=["logsnr_full", "logsnr"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--windows", type=int, default=64, help="held-out windows of each chain's bound")
    parser.add_argument("--tolerance", type=float, default=0.01,
                        help="how close (relative) the samples' entropy must come to held-out's (default 0.01): "
                        "teacher perplexity rises steeply with entropy, so rows within one band can differ by it")
    parser.add_argument("--x0", choices=X0_CHOICES, help="the x0 the steps move toward (default: the run's sample_x0)")
    parser.add_argument("--entropy", type=float,
                        help="score the samples at this unigram entropy (bits) instead of held-out text's")
    parser.add_argument("--quick", action="store_true", help="tiny runs made on the spot: a smoke run")
    parser.add_argument("--out", help="folder of spacing.csv and spacing.md (default: benchmarks/results/; "
                        "with --quick: the temporary folder of its runs)")
    args = parser.parse_args(argv)
    if args.quick:
        import tempfile

        folder = Path(tempfile.mkdtemp())
        args.run_dir, args.teacher = quick_runs(folder)
        args.steps, args.samples, args.windows = [3, 5], 4, 4
        args.out = args.out or str(folder)
    elif args.run_dir is None or args.teacher is None:
        parser.error("give RUN_DIR TEACHER (a Gaussian run and an AR run on its vocabulary), or --quick")
    if not 0 < args.tolerance < 1:
        parser.error(f"--tolerance is a fraction of held-out entropy between 0 and 1, got {args.tolerance}")
    return handled("spacing.py", lambda: spacing_table(args, argv))


def spacing_table(args: argparse.Namespace, argv: list[str] | None) -> None:
    check_entropy(args.entropy)
    if args.samples < 1:
        raise UserError(f"--samples must be at least 1, got {args.samples}.")
    check_counts(args.windows, 1)
    out = Path(args.out or ROOT / "benchmarks" / "results")
    check_destination(out / "spacing.csv", "--out")
    run, teacher = load_run(args.run_dir), load_run(args.teacher)
    check_runs(run, teacher, args.steps, args.spacings, args.samples, args.x0)  # before the folder is made
    out.mkdir(parents=True, exist_ok=True)
    command = "python benchmarks/spacing.py " + " ".join(sys.argv[1:] if argv is None else argv)

    def write(table: pd.DataFrame) -> None:
        table.to_csv(out / "spacing.csv", index=False)
        (out / "spacing.md").write_text(markdown(table, command))

    table = measure(run, teacher, args.steps, args.spacings, args.seeds, args.samples, args.windows, write,
                    args.tolerance, args.x0, args.entropy)
    print(markdown(table, command))


if __name__ == "__main__":
    sys.exit(main())
