"""What compute buys each family: one long warmup-stable-decay run per family, cooled down from its
kept checkpoints into the smaller budgets, each budget scored as the families table is.

    python benchmarks/compute.py [--threads 1] train FAMILY          # resumable: run it again to go on
    python benchmarks/compute.py status                               # what is trained and left; overfitting
    python benchmarks/compute.py score --teacher runs/ar [FAMILY ...] [--seeds 2]
    python benchmarks/compute.py plot                                 # reports/compute/index.html

FAMILY is one of FAMILIES below. Budgets are multiples of the presets' 910 optimizer steps at their
batch: 1/4, 1/2, 1, 2 and 4. `train` runs the 4x run (3,640 steps, wsd, its last 520 the cooldown,
a checkpoint every 3 epochs of 65 steps) into RUNS/FAMILY, then cools its stable-phase checkpoints
at epochs 3, 6, 12 and 24 down by 1/7 of each smaller budget into RUNS/FAMILY_xB (dlm cooldown; the
same run as a fresh wsd run of that budget, bit for bit). Every step is skipped when done and
continued with --resume when stopped, so the sweep spans sessions. `score` runs
benchmarks/scaling.py on every finished budget (the likelihood beside the AR's, teacher perplexity
at held-out entropy over --seeds, punctuation, types, 4-gram copying) and writes
benchmarks/results/compute.csv and compute.md with the training FLOPs of each point (6 x parameters
x tokens, twice that for block diffusion trained on every block at once, whose denoiser reads the
window twice). `plot` draws teacher perplexity and likelihood against training FLOPs, one line per
family with held-out text and the AR at 1x as references, and gives for each family the multiple of
the AR's 1x compute at which it reaches the AR's 1x quality (or "not within 4x").
"""

from __future__ import annotations

import argparse
import math
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RUNS = ROOT / "runs" / "compute"
RESULTS = ROOT / "benchmarks" / "results"

# family -> the dlm command and preset of its 1x recipe
FAMILIES = {
    "ar": ("train-ar", "params/ar.yaml"),
    "masked": ("train", "params/masked.yaml"),
    "masked_blocks4": ("train", "params/masked_blocks4.yaml"),
    "gaussian": ("train", "params/default.yaml"),
    "gaussian_blocks1": ("train", "params/blocks1.yaml"),
    "uniform": ("train", "params/uniform.yaml"),
}
STEPS_1X, STEPS_PER_EPOCH = 910, 65
LONG = {"steps": 4 * STEPS_1X, "cooldown": 4 * STEPS_1X // 7, "checkpoint_every": 3}
# budget -> (the long run's epoch it cools down from, cooldown steps): 1/7 of each budget, at an epoch end
BUDGETS = {0.25: (3, 33), 0.5: (6, 65), 1.0: (12, 130), 2.0: (24, 260)}


@dataclass
class Step:
    """One command of the sweep: what it makes, and the argv that makes (or continues) it."""
    folder: Path
    argv: list[str]
    note: str


def budget_folder(family: str, budget: float, root: Path = RUNS) -> Path:
    return root / family if budget == 4.0 else root / f"{family}_x{budget:g}"


def final_step(budget: float) -> int:
    return round(budget * STEPS_1X) if budget != 0.25 else BUDGETS[0.25][0] * STEPS_PER_EPOCH + BUDGETS[0.25][1]


def trained_to(folder: Path) -> int | None:
    """The step of the folder's last.pt (what a resume goes on from), None without one."""
    from dlm.core.checkpoint import load_checkpoint

    last = folder / "checkpoints" / "last.pt"
    return int(load_checkpoint(last, require=("step",))["step"]) if last.is_file() else None


def plan(family: str, root: Path = RUNS, threads: int | None = None) -> list[Step]:
    """The commands still to run for `family`, in order (the long run first; a cooldown only once
    its source checkpoint exists)."""
    command, preset = FAMILIES[family]
    runtime = ["--threads", str(threads)] if threads else []
    steps, long_run = [], budget_folder(family, 4.0, root)
    done = trained_to(long_run)
    if done is None or done < LONG["steps"]:
        resume = ["--resume"] if (long_run / "checkpoints" / "last.pt").is_file() else []
        steps.append(Step(long_run, ["dlm", command, preset, "--run_dir", str(long_run), "--lr_decay", "wsd",
                                     "--max_steps", str(LONG["steps"]), "--lr_cooldown_steps", str(LONG["cooldown"]),
                                     "--checkpoint_every", str(LONG["checkpoint_every"]),
                                     "--no-calibrate_temperature", *runtime, *resume],
                          f"{family} 4x: {done or 0} of {LONG['steps']} steps"))
    long_planned = bool(steps)  # then it makes every source below
    for budget, (epoch, cooldown) in BUDGETS.items():
        folder, source = budget_folder(family, budget, root), long_run / "checkpoints" / f"epoch_{epoch:04d}.pt"
        reached = trained_to(folder)
        if reached is not None and reached >= final_step(budget):
            continue
        if (folder / "checkpoints" / "last.pt").is_file():
            steps.append(Step(folder, ["dlm", "train", str(folder / "config.yaml"), "--run_dir", str(folder),
                                       "--resume", *runtime], f"{family} {budget:g}x: continuing the cooldown"))
        elif source.is_file() or long_planned:
            steps.append(Step(folder, ["dlm", "cooldown", "--from", str(source), "--cooldown_steps", str(cooldown),
                                       "--run_dir", str(folder), *runtime],
                              f"{family} {budget:g}x: cooldown of {cooldown} steps from epoch {epoch}"))
    return steps


def train(family: str, root: Path, threads: int | None) -> int:
    for step in plan(family, root, threads):
        if step.argv[1] == "cooldown" and step.folder.exists() and not (step.folder / "checkpoints").is_dir():
            # a cooldown stopped before its first checkpoint: nothing in it to keep (this script made it)
            print(f"removing {step.folder}: its cooldown stopped before its first checkpoint", flush=True)
            shutil.rmtree(step.folder)
        print(f"== {step.note}\n   {' '.join(step.argv)}", flush=True)
        done = subprocess.run(step.argv, cwd=ROOT)
        if done.returncode:
            return done.returncode
    print(f"{family}: every budget trained", flush=True)
    return 0


def validation_trend(folder: Path) -> str:
    """The long run's validation loss in words: its lowest (step) and its latest, and whether it has
    risen since: the measurement that says a family overfits before 4x and needs dropout or weight
    decay (item 2 of issue 36), read while the run goes on."""
    import pandas as pd

    metrics = folder / "metrics.csv"
    if not metrics.is_file():
        return ""
    try:
        validation = pd.read_csv(metrics)[["step", "val_total"]].dropna()
    except (KeyError, ValueError):
        return ""
    if validation.empty:
        return ""
    best, last = validation.loc[validation["val_total"].idxmin()], validation.iloc[-1]
    risen = last["val_total"] > best["val_total"] * 1.01
    return (f"val loss lowest {best['val_total']:.4f} at step {int(best['step'])}, latest {last['val_total']:.4f} at "
            f"step {int(last['step'])}" + (": risen over 1% since, it overfits" if risen else ""))


def status(root: Path) -> int:
    for family in FAMILIES:
        reached = {budget: trained_to(budget_folder(family, budget, root)) for budget in (0.25, 0.5, 1.0, 2.0, 4.0)}
        cells = ", ".join(f"{budget:g}x {'done' if (s or 0) >= final_step(budget) else f'{s or 0}/{final_step(budget)}'}"
                          for budget, s in reached.items())
        trend = validation_trend(budget_folder(family, 4.0, root))
        print(f"{family:18s} {cells}" + (f"\n{'':18s} {trend}" if trend else ""))
    return 0


def training_flops(parameters: int, tokens: int, every_block: bool) -> float:
    """6 N D (forward and backward), doubled when the denoiser reads the window twice (every-block training)."""
    return 6.0 * parameters * tokens * (2 if every_block else 1)


def compute_multiple(points: list[tuple[float, float]], target: float, reference_flops: float) -> float | None:
    """The multiple of `reference_flops` at which quality (lower is better) first reaches `target`,
    interpolated in log-log between the budgets around the crossing; None when no budget reaches it."""
    points = sorted(points)
    for index, (flops, value) in enumerate(points):
        if value <= target:
            if index == 0:
                return flops / reference_flops
            (f0, v0), (f1, v1) = points[index - 1], (flops, value)
            share = (math.log(v0) - math.log(target)) / (math.log(v0) - math.log(v1))
            return math.exp(math.log(f0) + share * (math.log(f1) - math.log(f0))) / reference_flops
    return None


def score(families: list[str], teacher: str, seeds: int, root: Path, threads: int | None) -> int:
    import pandas as pd

    from dlm.runs.build import load_run

    rows = []
    for family in families:
        for budget in (0.25, 0.5, 1.0, 2.0, 4.0):
            folder = budget_folder(family, budget, root)
            if (trained_to(folder) or 0) < final_step(budget):
                print(f"{family} {budget:g}x: not trained yet (python benchmarks/compute.py train {family})")
                continue
            out = root / "scores" / folder.name
            argv = [sys.executable, str(ROOT / "benchmarks" / "scaling.py"), "--teacher", teacher,
                    f"{family} {budget:g}x={folder}", "--seeds", str(seeds), "--samples", "64", "--windows", "64",
                    "--no_ar", "--out", str(out), *(["--threads", str(threads)] if threads else [])]
            if not (out / "scaling.csv").is_file():
                done = subprocess.run(argv, cwd=ROOT)
                if done.returncode:
                    return done.returncode
            row = pd.read_csv(out / "scaling.csv").iloc[0].to_dict()
            run = load_run(folder)
            parameters = sum(p.numel() for p in run.model.parameters())
            every_block = run.config.block_size is not None and run.config.block_training == "all"
            rows.append({"family": family, "budget": budget, **row,
                         "parameters": parameters,
                         "train_flops": training_flops(parameters, int(row["tokens"]), every_block)})
            del run
    if not rows:
        print("nothing trained to score yet")
        return 0
    table = pd.DataFrame(rows)
    RESULTS.mkdir(parents=True, exist_ok=True)
    table.to_csv(RESULTS / "compute.csv", index=False)
    shown = table[["family", "budget", "step", "train_flops", "nll_bound", "bound_x_ar", "teacher_ppl", "ppl_min",
                   "ppl_max", "entropy", "ppl_x_heldout", "punct_x", "types_x", "copy4_x", "targets_met"]]
    (RESULTS / "compute.md").write_text(
        "# Quality against training compute\n\nMade by `python benchmarks/compute.py score --teacher "
        f"{teacher} --seeds {seeds}` (see its docstring for the sweep).\n\n" + shown.to_markdown(index=False) + "\n")
    print(shown.to_string(index=False))
    return 0


def multiples(table) -> dict[str, str]:
    """Per family, the multiple of the AR's 1x training FLOPs at which its teacher perplexity first
    reaches the AR's own at 1x (in words)."""
    ar = table[(table["family"] == "ar") & (table["budget"] == 1.0)]
    if ar.empty:
        return {}
    target, reference = float(ar["teacher_ppl"].iloc[0]), float(ar["train_flops"].iloc[0])
    words = {}
    for family, rows in table.groupby("family"):
        multiple = compute_multiple(list(zip(rows["train_flops"], rows["teacher_ppl"])), target, reference)
        words[family] = "not within 4x" if multiple is None else f"{multiple:.2g}x"
    return words


def plot(root: Path) -> int:
    import base64
    import html
    import io

    import pandas as pd
    from matplotlib.figure import Figure

    path = RESULTS / "compute.csv"
    if not path.is_file():
        print(f"compute.py: error: no {path.relative_to(ROOT)} yet: run `compute.py score` first.", file=sys.stderr)
        return 2
    table = pd.read_csv(path)
    figure = Figure(figsize=(11, 4.2), layout="constrained")
    quality, likelihood = figure.subplots(1, 2)
    for family, rows in table.groupby("family"):
        rows = rows.sort_values("train_flops")
        quality.plot(rows["train_flops"], rows["teacher_ppl"], marker="o", label=family)
        likelihood.plot(rows["train_flops"], rows["nll_bound"], marker="o", label=family)
    heldout = table["teacher_ppl"] / table["ppl_x_heldout"]
    quality.axhline(float(heldout.median()), color="black", linestyle="--", label="held-out text")
    ar = table[(table["family"] == "ar") & (table["budget"] == 1.0)]
    if not ar.empty:
        quality.axhline(float(ar["teacher_ppl"].iloc[0]), color="grey", linestyle=":", label="AR at 1x")
        likelihood.axhline(float(ar["nll_bound"].iloc[0]), color="grey", linestyle=":", label="AR at 1x")
    for axes, name in ((quality, "teacher perplexity at held-out entropy"), (likelihood, "NLL / NELBO / bound, nats/token")):
        axes.set_xscale("log")
        axes.set_yscale("log")
        axes.set_xlabel("training FLOPs (6 N D)")
        axes.set_ylabel(name)
        axes.legend(fontsize=8)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    image = base64.b64encode(buffer.getvalue()).decode()
    words = multiples(table)
    rows_html = "".join(f"<tr><td>{html.escape(family)}</td><td>{html.escape(text)}</td></tr>"
                        for family, text in words.items())
    page = ("<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>dlm: quality against compute</title>"
            "<style>body{font-family:sans-serif;max-width:1100px;margin:1em auto}div.wide{overflow-x:auto}"
            "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:2px 6px}</style></head><body>"
            "<h1>Quality against training compute</h1>"
            f"<img alt='teacher perplexity and likelihood against training FLOPs' style='max-width:100%' "
            f"src='data:image/png;base64,{image}'>"
            "<h2>The AR's 1x quality: at what multiple of its compute each family reaches it</h2>"
            f"<table><tr><th>family</th><th>multiple</th></tr>{rows_html}</table>"
            "<h2>Every point</h2><div class='wide'>" + table.to_html(index=False, float_format=lambda v: f"{v:.4g}")
            + "</div><p>Made by <code>python benchmarks/compute.py plot</code> from benchmarks/results/compute.csv."
            "</p></body></html>\n")
    out = ROOT / "reports" / "compute"
    out.mkdir(parents=True, exist_ok=True)
    (out / "index.html").write_text(page)
    print(f"-> {out / 'index.html'}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", default=str(RUNS), help="where the sweep's run folders go (default runs/compute)")
    parser.add_argument("--threads", type=int, help="torch threads of every command")
    commands = parser.add_subparsers(dest="command", required=True)
    train_parser = commands.add_parser("train", help="train (or go on training) one family's budgets")
    train_parser.add_argument("family", choices=list(FAMILIES))
    commands.add_parser("status", help="what is trained and what is left")
    score_parser = commands.add_parser("score", help="score every trained budget")
    score_parser.add_argument("families", nargs="*", metavar="FAMILY", help=f"of {', '.join(FAMILIES)} (default: all)")
    score_parser.add_argument("--teacher", required=True, help="the AR run that scores samples")
    score_parser.add_argument("--seeds", type=int, default=2)
    commands.add_parser("plot", help="reports/compute/index.html from benchmarks/results/compute.csv")
    args = parser.parse_args(argv)
    root = Path(args.root)
    if args.command == "train":
        return train(args.family, root, args.threads)
    if args.command == "status":
        return status(root)
    if args.command == "plot":
        return plot(root)
    unknown = [family for family in args.families if family not in FAMILIES]
    if unknown or args.seeds < 1:
        parser.error(f"unknown family {', '.join(unknown)}: use {', '.join(FAMILIES)}" if unknown
                     else "--seeds must be at least 1")
    return score(args.families or list(FAMILIES), args.teacher, args.seeds, root, args.threads)


if __name__ == "__main__":
    sys.exit(main())
