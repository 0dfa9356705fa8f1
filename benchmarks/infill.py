"""Classifier-free control measured on a trained run (a family with infill, prefix and length) against the AR
baseline (dlm/runs/control.py):

- prefix continuation: the first 8 tokens of held-out windows fixed; teacher perplexity of the
  continuations of the run, the AR run, and the held-out text's own;
- infilling a template: how often the rounding alone keeps the fixed words (before the guarantee),
  teacher perplexity of the filled windows, one sample against the MBR pick of 4;
- length control: speeches of exactly N tokens; how many newlines the constraint had to re-round,
  teacher perplexity of the speeches.

    python benchmarks/infill.py runs/default runs/ar [--out benchmarks/results/infill.md] [--steps 200]

The teacher is the AR run: it scores its own continuations, which flatters them (the ppl of a
sample at temperature 1 under its own model is its entropy); read that row as a floor.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import pandas as pd

from dlm.evaluation.continuation import prefix_comparison
from dlm.evaluation.evaluate import teacher_nll
from dlm.runs.build import load_run
from dlm.runs.control import infill, length_control, template_control
from dlm.runs.sample import SampleOptions

ROOT = Path(__file__).resolve().parents[1]
TEMPLATE = "To be , or not to be : __ __ __ __ __ __ question"


def kept_share(result) -> float:
    """The share of fixed words the rounding kept by itself; nan for a family that does not round them."""
    kept = result.kept_by_rounding
    return float("nan") if kept is None else sum(kept) / len(kept)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", help="a run whose family has infill, prefix and length control")
    parser.add_argument("teacher", help="an AR run: the prefix-continuation baseline and the teacher")
    parser.add_argument("--steps", type=int, help="sampling steps (default: the run's sample_steps)")
    parser.add_argument("--samples", type=int, default=8, help="samples per measurement")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "infill.md"))
    args = parser.parse_args(argv)
    run, teacher = load_run(args.run), load_run(args.teacher)
    ppl = lambda rows: math.exp(teacher_nll(teacher, [list(map(int, r)) for r in rows]))  # noqa: E731

    prefix = prefix_comparison({run.config.model: run, "ar": teacher}, teacher, num_prefixes=args.samples, prefix_len=8,
                               samples_per_prefix=2, steps=args.steps)

    rows = []
    control = template_control(run, TEMPLATE)
    for mbr in (1, 4):
        began = time.perf_counter()
        options = SampleOptions.from_config(run.config, num_samples=args.samples, steps=args.steps)
        result = infill(run, control, options, mbr=mbr)
        rows.append({"task": f"template, mbr {mbr}", "kept_by_rounding": kept_share(result),
                     "teacher_perplexity": ppl(result.ids), "seconds": time.perf_counter() - began,
                     "example": result.texts[0][:80].replace("\n", " / ")})
    for length in (8, 24):
        began = time.perf_counter()
        options = SampleOptions.from_config(run.config, num_samples=args.samples, steps=args.steps)
        result = infill(run, length_control(run, length), options)
        speeches = [window[result.control.speech] for window in result.ids]
        rows.append({"task": f"length {length}", "kept_by_rounding": kept_share(result),
                     "newlines_masked_per_sample": sum(result.masked) / len(result.masked),
                     "teacher_perplexity": ppl(speeches), "seconds": time.perf_counter() - began,
                     "example": result.texts[0][:80].replace("\n", " / ")})
    control_table = pd.DataFrame(rows)

    text = (f"# Classifier-free control: {args.run} (step {run.step}), teacher {args.teacher} (step {teacher.step})\n\n"
            f"{args.samples} samples per row, steps {args.steps or run.config.sample_steps}.\n\n"
            f"## Prefix continuation (8 tokens fixed, 2 samples per prefix)\n\n"
            f"{prefix.to_markdown(index=False, floatfmt='.1f')}\n\n"
            f"## Infilling and length control\n\n"
            f"Template: `{TEMPLATE}`\n\n{control_table.to_markdown(index=False, floatfmt='.2f')}\n")
    print(text)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
