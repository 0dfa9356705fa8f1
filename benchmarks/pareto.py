"""Sample quality against sampling cost, per family and sampler (issue 35): the Pareto table and plot.

    python benchmarks/pareto.py --teacher runs/ar \\
        "masked whole window=runs/masked::grid:50,grid:200,first_hitting,confidence:50" \\
        "masked blocks of 4=runs/masked_blocks4::grid:1,grid:2,grid:4,grid:10,first_hitting,confidence:1" \\
        "Gaussian blocks of 1=runs/blocks1" --seeds 2 --samples 64 --threads 1 [--index reports]

Each LABEL=PATH[::SETTINGS] is a run folder (or a checkpoint in one) and the sampler settings to
try on it (SAMPLER:STEPS, SAMPLER or STEPS, comma-separated; none: the run's own recipe). A row
gives, for one run in one setting: the teacher's perplexity of its samples at held-out entropy
(the temperature found per seed; mean over --seeds with min-max, the entropy beside), the CPU
seconds per sample in one batch of --samples (process time: the VM's clock drifts) and the wall
seconds of one sample alone (median of --latency_repeats after one that warms up). The AR teacher's
own row (KV-cached; its samples scored by itself, which flatters them: a floor) is what the
diffusion rows race: a row meets the target when its perplexity is within the AR's seed spread or
below held-out text's, at no more than the AR's cost. `frontier_*`: no other row is both cheaper
and better.

Writes pareto.csv, pareto.md and pareto.png to --out (default benchmarks/results/); with --index
REPORTS also REPORTS/pareto.csv, which the report index shows (and the index is rewritten).
--keep TABLE adds rows to an earlier pareto.csv: its rows stay (the AR's too, which is then not
measured again) unless this run measures the same row and setting; each row's `measured` column
gives its date, so rows from separate invocations read as such (their costs were taken under
whatever else the machine ran then).
"""

from __future__ import annotations

import argparse
import dataclasses
import shutil
import statistics
import sys
import time
from pathlib import Path

import pandas as pd
import torch

from dlm.cli import handled
from dlm.core.data import check_destination
from dlm.core.errors import UserError
from dlm.evaluation.evaluate import check_teacher
from dlm.evaluation.likelihood import check_ar_run
from dlm.evaluation.matched import heldout_entropy, score_at_entropy, temperature_sampler
from dlm.evaluation.speed_quality import COSTS, Setting, frontier, parse_settings, race
from dlm.families import check_sample_options
from dlm.runs.build import load_run
from dlm.runs.provenance import machine
from dlm.runs.rundir import run_and_checkpoint
from dlm.runs.sample import SampleOptions, check_options, generate

ROOT = Path(__file__).resolve().parents[1]
AR_ROW = "AR, KV-cached (the teacher, self-scored)"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", metavar="LABEL=PATH[::SETTINGS]")
    parser.add_argument("--teacher", required=True, help="the AR run that scores samples and is raced")
    parser.add_argument("--samples", type=int, default=64, help="samples per seed, and the timed batch (default 64)")
    parser.add_argument("--seeds", type=int, default=2, help="sampling seeds per row: the ppl spread (default 2)")
    parser.add_argument("--latency_repeats", type=int, default=3, help="batch-1 samples timed per row (median)")
    parser.add_argument("--tolerance", type=float, default=0.01, help="relative tolerance on the entropy match")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    parser.add_argument("--index", metavar="REPORTS", help="also put pareto.csv beside the report index, rewrite it")
    parser.add_argument("--keep", metavar="TABLE", help="an earlier pareto.csv whose rows stay unless measured again")
    return parser.parse_args(argv)


def split_row(text: str) -> tuple[str, str, list[Setting]]:
    """'LABEL=PATH[::SETTINGS]' as (label, path, settings)."""
    label, sep, rest = text.partition("=")
    path, _, settings = rest.partition("::")
    if not sep or not label or not path:
        raise UserError(f"'{text}' is not LABEL=PATH[::SETTINGS] (e.g. masked=runs/masked::grid:50,first_hitting).")
    return label, path, parse_settings(settings)


def options_for(run, setting: Setting, samples: int, seed: int) -> SampleOptions:
    return SampleOptions.from_config(run.config, num_samples=samples, batch_size=samples, seed=seed,
                                     steps=setting.steps, sampler=setting.sampler)


def check_setting(label: str, run, setting: Setting, samples: int) -> None:
    """A setting the run's family cannot sample, in one line naming the row, before anything is drawn."""
    try:
        check_sample_options(run.config.model, {"sampler": setting.sampler, "steps": setting.steps}, "{}".format)
        check_options(run.config, options_for(run, setting, samples, 0))
    except UserError as error:
        raise UserError(f"row '{label}' ({setting.label()}): {error}") from None


def timed(run, options: SampleOptions) -> tuple[float, float]:
    """(wall s, CPU s) of one generate."""
    wall, cpu = time.perf_counter(), time.process_time()
    generate(run, options)
    return time.perf_counter() - wall, time.process_time() - cpu


def measure(run, teacher, setting: Setting, target: float, args: argparse.Namespace) -> dict:
    """One row: the samples at held-out entropy over the seeds, then their cost at seed 0's temperature."""
    results = [score_at_entropy(run, teacher, temperature_sampler(run, options_for(run, setting, args.samples, seed)),
                                target, args.tolerance) for seed in range(args.seeds)]
    ppl = [r["samples"]["teacher_perplexity"] for r in results]
    options = dataclasses.replace(options_for(run, setting, args.samples, 0), temperature=results[0]["temperature"])
    _, batch_cpu = timed(run, options)
    single = dataclasses.replace(options, num_samples=1, batch_size=1)
    alone = [timed(run, dataclasses.replace(single, seed=seed)) for seed in range(args.latency_repeats + 1)][1:]
    return {"family": run.family.TITLE, "setting": setting.label(),
            "temperature": statistics.fmean(r["temperature"] for r in results),
            "entropy": statistics.fmean(r["samples"]["unigram_entropy"] for r in results),
            "matched": all(r["matched"] for r in results),
            "teacher_ppl": statistics.fmean(ppl), "ppl_min": min(ppl), "ppl_max": max(ppl),
            "heldout_ppl": results[0]["heldout"]["teacher_perplexity"],
            "cpu_s_per_sample": batch_cpu / args.samples,
            "batch1_s": statistics.median(wall for wall, _ in alone),
            "batch1_cpu_s": statistics.median(cpu for _, cpu in alone), "measured": time.strftime("%Y-%m-%d")}


def kept_rows(path: str | None) -> pd.DataFrame:
    """The rows of an earlier table (--keep) without its derived columns, or an empty frame."""
    if path is None:
        return pd.DataFrame()
    try:
        table = pd.read_csv(path)
    except (OSError, ValueError) as error:
        raise UserError(f"--keep {path}: cannot read it as a pareto.csv ({error}); give benchmarks/results/pareto.csv "
                        "or leave --keep out.") from None
    missing = {"row", "setting", "teacher_ppl", *COSTS} - set(table.columns)
    if missing:
        raise UserError(f"--keep {path}: not a pareto.csv (no {', '.join(sorted(missing))}); "
                        "give benchmarks/results/pareto.csv or leave --keep out.")
    return table.drop(columns=[c for c in table.columns if c.startswith("frontier_") or c.endswith("_ok")])


def pareto_table(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    specs = [split_row(text) for text in args.runs]
    for flag, value in (("--samples", args.samples), ("--seeds", args.seeds), ("--latency_repeats", args.latency_repeats)):
        if value < 1:
            raise UserError(f"{flag} must be at least 1, got {value}.")
    out = Path(args.out)
    for name in ("pareto.csv", "pareto.md", "pareto.png"):
        check_destination(out / name, "--out")
    if args.index:
        check_destination(Path(args.index) / "pareto.csv", "--index")
    kept = kept_rows(args.keep)
    teacher = load_run(args.teacher)
    check_teacher(teacher)
    loaded = []
    for label, path, settings in specs:  # every row checked before the first one samples
        run = load_run(*run_and_checkpoint(path))
        check_ar_run(run, teacher, "--teacher")
        for setting in settings:
            check_setting(label, run, setting, args.samples)
        loaded.append((label, run, settings))
    out.mkdir(parents=True, exist_ok=True)
    target = heldout_entropy(teacher, args.samples, teacher)
    start, rows = time.perf_counter(), []
    ar_kept = not kept.empty and (kept["row"] == AR_ROW).any()
    with torch.inference_mode():
        for label, run, settings in [*([] if ar_kept else [(AR_ROW, teacher, [Setting()])]), *loaded]:
            for setting in settings:
                rows.append({"row": label, **measure(run, teacher, setting, target, args)})
                print({k: round(v, 4) if isinstance(v, float) else v for k, v in rows[-1].items()}, flush=True)
                pd.DataFrame(rows).to_csv(out / "pareto.partial.csv", index=False)  # kept if a later row fails
    measured = pd.DataFrame(rows)
    if not kept.empty:  # a row measured now replaces its earlier self, in the earlier table's order
        again = kept.set_index(["row", "setting"]).index.isin(measured.set_index(["row", "setting"]).index)
        measured = pd.concat([kept[~again], measured], ignore_index=True)
        ar = measured["row"] == AR_ROW
        measured = pd.concat([measured[ar], measured[~ar]], ignore_index=True)
    table = race(measured, AR_ROW, float(measured["heldout_ppl"].iloc[0]))
    for cost in COSTS:
        table[f"frontier_{cost}"] = frontier(table, cost)
    write_outputs(table, args, target, time.perf_counter() - start)
    (out / "pareto.partial.csv").unlink(missing_ok=True)


def write_outputs(table: pd.DataFrame, args: argparse.Namespace, target: float, wall: float) -> None:
    from dlm.workbench import plots

    out = Path(args.out)
    table.to_csv(out / "pareto.csv", index=False)
    plots.quality_against_speed(table, table["heldout_ppl"].iloc[0]).savefig(out / "pareto.png")
    cpu = machine()
    command = "python benchmarks/pareto.py --teacher " + args.teacher + "".join(f' "{r}"' for r in args.runs) + \
        f" --seeds {args.seeds} --samples {args.samples} --threads {args.threads}" + \
        (f" --keep {args.keep}" if args.keep else "")
    shown = table.drop(columns=["heldout_ppl", "ppl_min", "ppl_max", "matched"])
    shown.insert(shown.columns.get_loc("teacher_ppl") + 1, "ppl range",
                 [f"{lo:,.1f}-{hi:,.1f}" for lo, hi in zip(table["ppl_min"], table["ppl_max"])])
    text = (f"# Sample quality against sampling cost\n\n`{command}`\n\n"
            f"{cpu['cpu']} ({cpu['cores']} cores, {' '.join(cpu['flags']) or 'no AVX'}), {args.threads} thread(s), "
            f"torch {torch.__version__}; {wall / 60:.1f} min in all. Samples: {args.samples} per seed x "
            f"{args.seeds} seeds at held-out entropy ({target:.2f} bits; temperature found per seed), scored by the "
            f"AR teacher; held-out text's perplexity {table['heldout_ppl'].iloc[0]:.1f}. Costs: "
            f"{'; '.join(f'{k}: {v}' for k, v in COSTS.items())}. quality_ok: perplexity at most the AR's highest "
            "seed or held-out text's; batch64_ok / batch1_ok: that, at no more than the AR's cost.\n\n"
            + shown.to_markdown(index=False, floatfmt=".4g") + "\n\n![quality against cost](pareto.png)\n")
    (out / "pareto.md").write_text(text, encoding="utf-8")
    print(text)
    if args.index:
        from dlm.workbench.workbook import write_index

        shutil.copyfile(out / "pareto.csv", Path(args.index) / "pareto.csv")
        print(f"index: {write_index(args.index)}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return handled("pareto.py", lambda: pareto_table(args))


if __name__ == "__main__":
    sys.exit(main())
