"""Where a run's samples go wrong: its family's probe of the denoiser on held-out windows (the
family's `probe`, dlm.evaluation.probe). For a Gaussian run, the denoiser's one-step accuracy by
noise level and how many held-out words the reverse chain keeps when started from them.

    python benchmarks/probe.py runs/default runs/default_10x      # prints and writes probe.md
    python benchmarks/probe.py runs/default --windows 128 --start_t 0.2,0.5
    python benchmarks/probe.py --one_step --windows 256 runs/default runs/x10/checkpoints/epoch_0028.pt

A run is a run folder (its last checkpoint) or one of its checkpoint files. --one_step leaves out
the chains (minutes per run) and adds one table across the runs: the denoiser's one-step
cross-entropy and accuracy at each noise level, side by side (what more training teaches it where).

Each chain table row is one sampler (dlm.families.gaussian_probe.SAMPLERS): first_step_accuracy is the
denoiser's one-step argmax, first_step_calibrated the share drawing each word once from its rounding
softmax keeps, kept what the whole chain keeps.

A masked-diffusion run's probe is its own table: the cross-entropy at masked positions of held-out
windows by mask rate, beside the training unigram's on the same positions: whether the model reads
its context at all. A family without a probe is one line saying so.

Writes --out/probe.md (default benchmarks/results/) with one table of each kind per run
(--one_step: probe_one_step.md).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import pandas as pd

from dlm.cli import handled
from dlm.core.errors import UserError
from dlm.evaluation.probe import probe_tables
from dlm.runs.build import load_run
from dlm.runs.rundir import run_and_checkpoint

ROOT = Path(__file__).resolve().parents[1]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", help="run folders or checkpoint files (of a family with a probe)")
    parser.add_argument("--one_step", action="store_true", help="only the one-step tables, and one across the runs")
    parser.add_argument("--windows", type=int, default=64, help="held-out windows probed")
    parser.add_argument("--start_t", default="0.2,0.5,0.7",
                        help="noise levels the chain starts from, fractions of the chain in (0, 1]")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"), help="where probe.md goes")
    return parser.parse_args(argv)


def markdown(table: pd.DataFrame) -> str:
    # tabulate reads the frame as one float array, so integer columns need their own format
    formats = [".0f" if pd.api.types.is_integer_dtype(dtype) else ".3f" for dtype in table.dtypes]
    return table.to_markdown(index=False, floatfmt=formats)


def noise_levels(text: str) -> list[float]:
    """--start_t: comma-separated noise levels in (0, 1] (1: pure noise)."""
    try:
        levels = [float(part) for part in text.split(",")]
    except ValueError:
        levels = []
    if not levels or not all(0 < level <= 1 for level in levels):
        raise UserError(f"--start_t takes noise levels in (0, 1] (fractions of the chain, 1 pure noise), e.g. "
                        f"0.2,0.5; got '{text}'.")
    return levels


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    return handled("probe.py", lambda: probe_runs(args))


def probe_runs(args: argparse.Namespace) -> int:
    levels = [] if args.one_step else noise_levels(args.start_t)
    sections, one_step = [], []
    for path in args.runs:
        run = load_run(*run_and_checkpoint(path))
        tables = probe_tables(run, args.windows, levels)
        name = f"{path} (step {run.step})"
        one_step.append(tables[0][1].assign(run=name))
        section = f"## {name}\n\n" + "\n".join(f"{title}:\n\n{markdown(table)}\n" for title, table in tables)
        sections.append(section)
        print(section, flush=True)
    if args.one_step:
        table = pd.concat(one_step)
        level = table.columns[0]  # the probe's noise level: a timestep, or a mask rate
        for column, what in (("cross_entropy", "cross-entropy (nats)"), ("accuracy", "accuracy")):
            if column not in table or table[column].isna().any():
                continue
            side_by_side = table.pivot(index=level, columns="run", values=column)[table["run"].unique()]
            section = f"## One-step {what} by {level}, across the runs\n\n{markdown(side_by_side.reset_index())}\n"
            sections.insert(0, section)
            print(section, flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = "probe_one_step.md" if args.one_step else "probe.md"
    (out / name).write_text("\n".join(sections), encoding="utf-8")
    print(f"wrote {out / name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
