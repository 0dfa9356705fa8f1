"""Where a masked sampling batch spends its time (issue 35): one batch of 64 64-token samples of
params/masked.yaml's model (untrained: the time does not depend on the weights), whole window,
split into the denoiser trunk (the transformer's forward passes), the output head (the word
projection at the positions drawn), the word softmax, the draws, and the bookkeeping (everything
else: the float64 casts, the unmasking coins, masks, indexing, the Python loop); beside it the
Gaussian default's batch (params/default.yaml, 50 steps: trunk, the rounding softmax its posterior
x0 takes at every step, the rest), each timed with time.process_time around the parts.

    nice python benchmarks/masked_profile.py --threads 1 [--repeats 3] [--before COMMIT]

--before COMMIT also times the masked rows with the dlm package of that commit (git archive into a
temporary folder, run in a subprocess): the same table before a change. Writes
masked_profile.md and masked_profile.csv to --out.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import torch

from dlm.core.config import load_config
from dlm.families import family
from dlm.runs.provenance import machine
from dlm.runs.sample import SampleOptions

ROOT = Path(__file__).resolve().parents[1]
PRESET_VOCAB = 7116  # tiny_shakespeare's word vocabulary at min_count 2 (benchmarks/ar_cache.py's)
BATCH = 64
# (preset, sampler, steps): the masked default (200 grid steps), the 50-step comparison,
# the other samplers, and the Gaussian default at 50 steps
CASES = [("masked", "grid", 200), ("masked", "grid", 50), ("masked", "first_hitting", None),
         ("masked", "confidence", 50), ("default", None, 50)]
PARTS = ("trunk", "head", "softmax", "draws")
COLUMNS = ("trunk: the TinyTransformer's forward passes; head: masked, the word logits at the positions drawn (a "
           "confidence step: at every masked position), Gaussian, the rounding softmax's expected embedding its "
           "posterior x0 takes at every position and step; softmax: the words' float64 softmax; draws: the word draws "
           "(the inverse CDF, or the Gumbel-max draw of a tree before it); bookkeeping: the rest (float64 casts, "
           "unmasking coins, masks, indexing, the loop). x_gaussian_50: samples per CPU second over the Gaussian "
           "default's at 50 steps.")


class Clock:
    """CPU seconds spent inside the wrapped callables, per part (outermost calls only)."""

    def __init__(self):
        self.seconds = dict.fromkeys(PARTS, 0.0)
        self.depth, self.calls, self.rows = 0, 0, 0  # the trunk's calls and the rows they ran

    def wrap(self, part: str, function):
        def timed(*args, **kwargs):
            if self.depth:
                return function(*args, **kwargs)
            if part == "trunk":
                self.calls += 1
                self.rows += args[0].shape[0]
            self.depth += 1
            start = time.process_time()
            try:
                return function(*args, **kwargs)
            finally:
                self.seconds[part] += time.process_time() - start
                self.depth -= 1

        return timed


@contextlib.contextmanager
def patched(target, name: str, replacement):
    original = getattr(target, name)
    setattr(target, name, replacement)
    try:
        yield
    finally:
        setattr(target, name, original)


def preset_run(preset: str):
    config = load_config(ROOT / "params" / f"{preset}.yaml")
    chain = family(config.model)
    torch.manual_seed(0)
    return SimpleNamespace(config=config, model=chain.new_model(config, PRESET_VOCAB).eval(),
                           objective=chain.objective(config), family=chain,
                           tokenizer=SimpleNamespace(unk_id=None, pad_id=0))


def instrument(run, clock: Clock) -> contextlib.ExitStack:
    """The parts' wrappers: the trunk's forward (and, for block runs, its cache building), the
    head (masked: the word logits; Gaussian: the rounding softmax's expected embedding), the word
    softmax (torch.softmax: the transformer's attention does not call it) and the draws."""
    stack = contextlib.ExitStack()
    model = run.model
    trunk = getattr(model, "transformer", None) or model.denoiser
    stack.enter_context(patched(trunk, "forward", clock.wrap("trunk", trunk.forward)))
    head = "logits" if hasattr(model, "logits") else "expected_embedding"
    stack.enter_context(patched(model, head, clock.wrap("head", getattr(model, head))))
    stack.enter_context(patched(torch, "softmax", clock.wrap("softmax", torch.softmax)))
    if run.config.model == "masked":
        masked = run.family
        for draw in ("categorical", "inverse_cdf"):  # the draw of the tree being timed, before or after
            if hasattr(masked, draw):
                stack.enter_context(patched(masked, draw, clock.wrap("draws", getattr(masked, draw))))
    return stack


def profile(preset: str, sampler: str | None, steps: int | None) -> dict:
    run = preset_run(preset)
    overrides = {"sampler": sampler} if sampler not in (None, "grid") else {}  # a tree without samplers has grid
    options = SampleOptions.from_config(run.config, num_samples=BATCH, batch_size=BATCH, steps=steps, seed=0,
                                        **overrides)
    clock = Clock()
    with instrument(run, clock):
        start = time.process_time()
        run.family.generate(run, options, torch.Generator().manual_seed(0))
        total = time.process_time() - start
    parts = {part: clock.seconds[part] for part in PARTS}
    return {"preset": preset, "sampler": sampler or "-", "steps": steps or "-", "cpu_s": total, **parts,
            "bookkeeping": total - sum(parts.values()), "samples_per_cpu_s": BATCH / total,
            "trunk_calls": clock.calls, "trunk_passes_per_sample": clock.rows / BATCH}


def medians(rounds: list[list[dict]]) -> list[dict]:
    """Each case's run of median CPU time over the rounds (its parts as that run measured them),
    with the lowest and highest CPU time beside it."""
    rows = []
    for runs in zip(*rounds):
        ordered = sorted(runs, key=lambda run: run["cpu_s"])
        rows.append({**ordered[(len(ordered) - 1) // 2], "cpu_s_min": ordered[0]["cpu_s"],
                     "cpu_s_max": ordered[-1]["cpu_s"], "runs": len(ordered)})
    return rows


def rows_of_tree(commit: str, threads: int, cases) -> list[dict]:
    """The masked cases timed with the dlm package of `commit` (a subprocess on its own copy)."""
    with tempfile.TemporaryDirectory() as folder:
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", commit, "dlm"], check=True,
                                 capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", folder], input=archive, check=True)
        env = {**os.environ, "PYTHONPATH": folder, "OMP_NUM_THREADS": str(threads)}
        done = subprocess.run([sys.executable, __file__, "--child", json.dumps(cases), "--threads", str(threads)],
                              env=env, check=True, capture_output=True, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def this_tree() -> str:
    """The commit the timed package is at, '+' when dlm/ differs from it."""
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    changed = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "dlm"], capture_output=True, text=True)
    return (head.stdout.strip() or "this tree") + ("+" if changed.stdout.strip() else "")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3,
                        help="rounds over this tree's cases, interleaved (median; the --before cases run once)")
    parser.add_argument("--before", help="a commit whose dlm package is timed too, on the masked grid cases")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    parser.add_argument("--child", help=argparse.SUPPRESS)  # the cases to time, JSON, printed back as JSON
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.child:
        print(json.dumps([profile(*case) for case in json.loads(args.child)]))
        return 0
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    start = time.perf_counter()
    rows = []
    if args.before:
        before = [case for case in CASES if case[0] == "masked" and case[1] == "grid"]
        rows += [{"code": args.before, **row, "runs": 1} for row in rows_of_tree(args.before, args.threads, before)]
    rounds = []
    for _ in range(args.repeats):
        rounds.append([profile(*case) for case in CASES])
        print(rounds[-1], flush=True)
    rows += [{"code": this_tree(), **row} for row in medians(rounds)]
    table = pd.DataFrame(rows)
    gaussian = table[table["preset"] == "default"]["samples_per_cpu_s"].iloc[0]
    table["x_gaussian_50"] = table["samples_per_cpu_s"] / gaussian
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    table.to_csv(out / "masked_profile.csv", index=False)
    cpu = machine()
    command = f"nice python benchmarks/masked_profile.py --threads {args.threads} --repeats {args.repeats}" + (
        f" --before {args.before}" if args.before else "")
    (out / "masked_profile.md").write_text(
        f"# Where a masked sampling batch spends its time\n\n`{command}`\n\n"
        f"{cpu['cpu']} ({cpu['cores']} cores, {' '.join(cpu['flags']) or 'no AVX'}), {args.threads} thread(s), "
        f"torch {torch.__version__}; one batch of {BATCH} 64-token samples a run, process CPU seconds; the "
        f"current tree's rows: the run of median CPU time of {args.repeats}, the cases interleaved (cpu_s_min, cpu_s_max: the "
        f"others); trunk_passes_per_sample: the rows the trunk ran / {BATCH}. The table took "
        f"{time.perf_counter() - start:.0f} s of wall time.\n\n{COLUMNS}\n\n"
        + table.round(3).to_markdown(index=False) + "\n")
    print(table.round(3).to_string(index=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
