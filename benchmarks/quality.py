"""Ablation table at equal CPU budget, scored on samples (not on losses) with `dlm evaluate`.

    python benchmarks/quality.py --teacher runs/ar              # every arm, 180 s of training each
    python benchmarks/quality.py --teacher runs/ar --arms base,"decode cosine" --budget_s 60
    python benchmarks/quality.py --quick                         # tiny sizes, a minute: CI's smoke run
    python benchmarks/quality.py --teacher runs/ar --matched --arms "base,depth 8,width 512,batch 192"

Each arm is params/default.yaml with a few keys changed (dlm/evaluation/ablation.py lists them). Every
training recipe trains for the same wall-clock seconds (--budget_s, `max_train_seconds`), its lr
decaying over that time; decoding-only arms reuse their recipe's run. Each arm draws
--samples sequences with the run's own sampling recipe plus its overrides, and they are scored
by an autoregressive teacher (generative perplexity) and against held-out windows of the same
shape. The AR baseline trained on the same budget is in the table too (its own samples at
temperature 1.0 and 0.8). With --matched each arm is also scored at held-out entropy (its final
draw's temperature found by regula falsi): arms at different entropies compare only there. Without
--teacher, the teacher is trained first from params/ar.yaml (about 12 minutes on 2 cores).

Writes quality.csv and quality.md to --out (default benchmarks/results/) and prints the table.
"""

from __future__ import annotations

import argparse
import logging
import platform
import sys
import time
from pathlib import Path

import torch

from dlm.core.config import load_config
from dlm.evaluation.ablation import AR_ARMS, ARMS, markdown_table, run_ablation
from dlm.families import family, family_keys
from dlm.runs.rundir import RunDir
from dlm.runs.train import train

ROOT = Path(__file__).resolve().parents[1]
PARAMS = ROOT / "params"

# --quick: every preset shrunk to these, so the whole machinery runs in about a minute.
QUICK_OVERRIDES = {"seq_len": 16, "embed_dim": 16, "width": 32, "depth": 1, "heads": 2, "batch_size": 8,
                   "max_train_tokens": 4000, "diffusion_steps": 100, "sample_steps": 20, "warmup_steps": 5,
                   "val_batches": 1, "log_every": 10, "progress": False}
QUICK_ARMS = ["base", "decode cosine", "clamp last 10%", "rounding on clean", "AR T=1.0"]
# --quick: the AR teacher (trained when --teacher is not given) gets one epoch, not params/ar.yaml's 10:
# a smoke run checks that samples are scored, not how well.
QUICK_TEACHER_EPOCHS = 1


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", default=str(PARAMS / "default.yaml"), help="the preset every arm changes")
    parser.add_argument("--teacher", help="an AR run (dlm train-ar) that scores samples; trained first when absent")
    parser.add_argument("--arms", help="comma-separated arm names (default: all); see dlm/evaluation/ablation.py")
    parser.add_argument("--budget_s", type=float, help="training seconds per recipe (default 180; --quick: 2)")
    parser.add_argument("--samples", type=int, help="samples per arm (default 64; --quick: 8)")
    parser.add_argument("--no_ar", action="store_true", help="leave out the AR baseline arms")
    parser.add_argument("--work", default=str(ROOT / "runs" / "quality"), help="where arm runs and samples go")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"), help="where quality.csv/.md go")
    parser.add_argument("--corpus", help="override the corpus (a path); the tests use a tiny one")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    parser.add_argument("--matched", action="store_true",
                        help="also each arm's teacher perplexity at held-out entropy (dlm evaluate --matched): "
                             "the column that compares arms at different entropies")
    parser.add_argument("--quick", action="store_true", help="tiny sizes and a few arms: a smoke run")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.budget_s is None:
        args.budget_s = 2.0 if args.quick else 180.0
    if args.samples is None:
        args.samples = 8 if args.quick else 64
    logging.basicConfig(level=logging.WARNING)
    if args.threads:
        torch.set_num_threads(args.threads)
    overrides = dict(QUICK_OVERRIDES) if args.quick else {}
    if args.corpus:
        overrides.update(corpus=args.corpus, min_count=1)
    if args.threads:
        overrides["threads"] = args.threads
    base = load_config(args.base, **overrides)
    unread_by_ar = family_keys() - family("ar").CONFIG_KEYS  # keys the AR family refuses (dlm.families.check_config)
    ar_preset = load_config(PARAMS / "ar.yaml", **{k: v for k, v in overrides.items() if k not in unread_by_ar})

    arms = ARMS + ([] if args.no_ar else AR_ARMS)
    wanted = args.arms.split(",") if args.arms else (QUICK_ARMS if args.quick else None)
    if wanted:
        by_name = {arm.name: arm for arm in arms}
        unknown = [name for name in wanted if name not in by_name]
        if unknown:
            print(f"Unknown arm(s): {', '.join(unknown)}. Arms: {', '.join(by_name)}", file=sys.stderr)
            return 2
        arms = [by_name[name] for name in wanted]

    work = Path(args.work)
    teacher = args.teacher
    if teacher is None:
        teacher = str(work / "teacher")
        if not RunDir(teacher).last_checkpoint.exists():
            print(f"training the AR teacher from params/ar.yaml into {teacher} ...", flush=True)
            teacher_config = ar_preset.replace(progress=False, calibrate_temperature=False)  # it scores, never samples
            if args.quick:
                teacher_config = teacher_config.replace(epochs=QUICK_TEACHER_EPOCHS, checkpoint_every=1)
            train(teacher_config, teacher)

    start = time.perf_counter()
    table = run_ablation(base, arms, teacher, work, args.budget_s, num_samples=args.samples, ar_preset=ar_preset,
                         log=lambda line: print(line, flush=True), matched=args.matched)
    wall = time.perf_counter() - start

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = "quality_quick" if args.quick else "quality"
    table.to_csv(out / f"{stem}.csv", index=False)
    header = (f"Ablations of {Path(args.base).name}, {args.budget_s:.0f} s of training per recipe, {args.samples} samples "
              f"per arm, scored by the AR teacher {Path(teacher).name}; types at {int(table['types_count'].iloc[0]):,} "
              f"tokens. Machine: {platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}; "
              f"whole run {wall / 60:.1f} min.\n\n")
    markdown = header + markdown_table(table)
    (out / f"{stem}.md").write_text(markdown, encoding="utf-8")
    print(markdown)
    print(f"wrote {out / f'{stem}.csv'} and {out / f'{stem}.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
