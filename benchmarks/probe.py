"""Where a run's samples go wrong: the denoiser's one-step accuracy by noise level, and how many
held-out words the reverse chain keeps when started from them (dlm/probe.py).

    python benchmarks/probe.py runs/default runs/default_10x      # prints and writes probe.md
    python benchmarks/probe.py runs/default --windows 128 --start_t 400,1000
    python benchmarks/probe.py --one_step --windows 256 runs/default runs/x10/checkpoints/epoch_0028.pt

A run is a run folder (its last checkpoint) or one of its checkpoint files. --one_step leaves out
the chains (minutes per run) and adds one table across the runs: the denoiser's one-step
cross-entropy and accuracy at each noise level, side by side (what more training teaches it where).

Each chain table row is one sampler (SAMPLERS below): first_step_accuracy is the denoiser's one-step
argmax, first_step_calibrated the share drawing each word once from its rounding softmax keeps,
kept what the whole chain keeps.

A masked-diffusion run gets its own table instead: the cross-entropy at masked positions of
held-out windows by mask rate, beside the training unigram's on the same positions: whether the
model reads its context at all (dlm.evaluation.probe.run_context_use).

Writes --out/probe.md (default benchmarks/results/) with one table of each kind per run
(--one_step: probe_one_step.md).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import pandas as pd

from dlm.evaluation.probe import chain_retention, denoising_accuracy, heldout_ids, run_context_use
from dlm.runs.build import load_run
from dlm.runs.rundir import run_and_checkpoint

ROOT = Path(__file__).resolve().parents[1]
# The chains compared from held-out x_t: the step noise (ancestral, DDIM), the x0 the step moves
# toward (the denoiser's, or its rounding softmax's expected embedding) and clamping at every step.
SAMPLERS = ({"eta": 1.0, "x0": "predicted"}, {"eta": 0.0, "x0": "predicted"}, {"eta": 1.0, "x0": "expected"},
            {"eta": 0.0, "x0": "expected"}, {"eta": 1.0, "x0": "predicted", "clamp": True})


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", help="run folders or checkpoint files (diffusion runs)")
    parser.add_argument("--one_step", action="store_true", help="only the one-step tables, and one across the runs")
    parser.add_argument("--windows", type=int, default=64, help="held-out windows probed")
    parser.add_argument("--start_t", default="400,1000,1400", help="timesteps the chain starts from")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"), help="where probe.md goes")
    return parser.parse_args(argv)


def markdown(table: pd.DataFrame) -> str:
    # tabulate reads the frame as one float array, so integer columns need their own format
    formats = [".0f" if pd.api.types.is_integer_dtype(dtype) else ".3f" for dtype in table.dtypes]
    return table.to_markdown(index=False, floatfmt=formats)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    sections, one_step = [], []
    for path in args.runs:
        run = load_run(*run_and_checkpoint(path))
        if run.config.model == "masked":
            section = f"## {path} (step {run.step})\n\n{markdown(run_context_use(run, args.windows))}\n"
            sections.append(section)
            print(section, flush=True)
            continue
        ids = heldout_ids(run, args.windows)
        accuracy = denoising_accuracy(run, ids)
        one_step.append(accuracy.assign(run=f"{path} (step {run.step})"))
        section = (f"## {path} (step {run.step})\n\nOne denoiser step from x_t, {args.windows} held-out "
                   f"windows:\n\n{markdown(accuracy)}\n")
        if run.config.left_to_right == 0 and not args.one_step:  # a chain from x_t needs one timestep everywhere
            rows = [{k: v for k, v in chain_retention(run, ids, int(t), **variant).items() if k != "final_ids"}
                    for t in args.start_t.split(",") for variant in SAMPLERS]
            section += (f"\nThe reverse chain ({run.config.sample_steps} steps, {run.config.sample_spacing}) "
                        f"from held-out x_t:\n\n{markdown(pd.DataFrame(rows))}\n")
        sections.append(section)
        print(section, flush=True)
    if args.one_step:
        table = pd.concat(one_step)
        for column, what in (("cross_entropy", "cross-entropy (nats)"), ("accuracy", "accuracy")):
            side_by_side = table.pivot(index="t", columns="run", values=column)[table["run"].unique()]
            section = f"## One-step {what} by timestep, across the runs\n\n{markdown(side_by_side.reset_index())}\n"
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
