"""The masked family's samplers side by side (issue 35): the grid (MDLM's fixed steps),
confidence-ordered unmasking (MaskGIT, LLaDA) and first-hitting (the chain's own law, one
denoiser call per position), in blocks of 4, 8 and 16 at 1, 2, 4 and 10 steps a block.

    nice python benchmarks/masked_samplers.py --threads 1 [--run RUN] [--teacher AR_RUN]

Per row: samples per wall second and CPU seconds per sample (time.process_time) for one batch of
64 samples, its denoiser calls (a call runs only the rows that unmask something, so the passes one
row took are given too), and the wall time of one 64-token sample at batch 1. first_hitting reads
no steps: one row per block size. Speed does not depend on
what the weights learned, so without --run the model is params/masked.yaml's size freshly
initialised over the word vocabulary of the AR preset's corpus (7,116 words); each block size is
that model with block_size set (the weights do not depend on it). With --run (a trained masked
run; its own block size is replaced by each of the grid's) and --teacher (an AR run on the same
corpus), each batch-64 row also gives the teacher's perplexity and the unigram entropy of its
samples, at the run's own temperature (not at matched entropy). The table gives medians of
--batch_repeats batches and of --repeats batch-1 samples, after one batch-1 sample that warms up.
Writes masked_samplers.csv and .md to --out.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import torch

from dlm.core.config import load_config
from dlm.core.runtime import resolved_precision
from dlm.families import masked
from dlm.runs.provenance import machine

ROOT = Path(__file__).resolve().parents[1]
PRESET_VOCAB = 7116  # tiny_shakespeare's word vocabulary at min_count 2 (benchmarks/ar_cache.py's)
BLOCKS = (4, 8, 16)
STEPS = (1, 2, 4, 10)
BATCH = 64


@dataclass
class Setting:
    block: int
    sampler: str
    steps: int  # a block's; first_hitting reads none (the block's size is shown)


def settings() -> list[Setting]:
    rows = []
    for block in BLOCKS:
        rows += [Setting(block, sampler, steps) for sampler in ("grid", "confidence") for steps in STEPS]
        rows.append(Setting(block, "first_hitting", block))
    return rows


def preset_run(run_dir: str | None, preset: str = "masked"):
    """A loaded run (--run) or, without one, the preset's model freshly initialised: what sampling
    needs of a run (config, model, objective, a tokenizer with no <unk>)."""
    if run_dir:
        from dlm.runs.build import load_run

        return load_run(run_dir)
    config = load_config(ROOT / "params" / f"{preset}.yaml")
    torch.manual_seed(0)
    model = masked.new_model(config, PRESET_VOCAB).eval()
    return SimpleNamespace(config=config, model=model, objective=masked.objective(config),
                           tokenizer=SimpleNamespace(unk_id=None, pad_id=0))


class CallCounter:
    """Denoiser calls (forward passes of the transformer; the finished blocks' cache is built by
    cache_prefix, not forward, and is not one) and the rows they ran (a call runs only the rows
    that unmask something)."""

    def __init__(self, model):
        self.calls, self.rows = 0, 0
        self.handle = model.transformer.register_forward_pre_hook(self.count)

    def count(self, module, args) -> None:
        self.calls += 1
        self.rows += args[0].shape[0]


def draw(run, setting: Setting, batch: int, seed: int = 0) -> tuple[torch.Tensor, float, float, CallCounter]:
    """One batch of samples in `setting`: (ids, wall s, CPU s, its denoiser calls)."""
    config = run.config.replace(block_size=setting.block, block_training="all")
    objective = masked.objective(config)
    unmasking = masked.Unmasking(setting.sampler, setting.steps, config.decode_temperature,
                                 () if run.tokenizer.unk_id is None else (run.tokenizer.unk_id,), config.precision)
    blank = torch.zeros(batch, config.seq_len, dtype=torch.long)
    counter = CallCounter(run.model)
    try:
        wall, cpu = time.perf_counter(), time.process_time()
        ids, _ = masked.sample_ids(run.model, objective, blank, torch.zeros_like(blank, dtype=torch.bool), unmasking,
                                   torch.Generator().manual_seed(seed))
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    finally:
        counter.handle.remove()
    return ids, wall, cpu, counter


def quality(run, teacher, ids: torch.Tensor) -> dict:
    from dlm.evaluation.evaluate import teacher_nll
    from dlm.evaluation.matched import entropy_of, scoring_rows

    rows, _ = scoring_rows(run, ids, teacher)
    return {"teacher_ppl": math.exp(teacher_nll(teacher, rows)), "entropy_bits": entropy_of(run, ids, teacher)}


def measure(run, setting: Setting, repeats: int, batch_repeats: int, teacher=None) -> dict:
    single = [draw(run, setting, 1, seed) for seed in range(repeats + 1)][1:]  # the first one warms up
    batched = [draw(run, setting, BATCH, seed) for seed in range(batch_repeats)]
    row = {"block": setting.block, "sampler": setting.sampler,
           "steps_per_block": "-" if setting.sampler == "first_hitting" else setting.steps,
           "samples_per_s": statistics.median(BATCH / wall for _, wall, _, _ in batched),
           "cpu_s_per_sample": statistics.median(cpu / BATCH for _, _, cpu, _ in batched),
           "calls_per_batch": statistics.median(counter.calls for *_, counter in batched),
           "calls_per_sample": statistics.median(counter.rows / BATCH for *_, counter in batched),
           "batch1_sample_s": statistics.median(wall for _, wall, _, _ in single),
           "batch1_cpu_s": statistics.median(cpu for _, _, cpu, _ in single),
           "calls_at_batch_1": statistics.median(counter.calls for *_, counter in single)}
    if teacher is not None:
        row.update(quality(run, teacher, torch.cat([ids for ids, *_ in batched])))
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", help="a masked run to time (default: masked.yaml's size, untrained)")
    parser.add_argument("--teacher", help="an AR run on the run's corpus: teacher perplexity of each row's samples "
                                          "(needs --run)")
    parser.add_argument("--repeats", type=int, default=3, help="batch-1 samples timed per row (median; default 3)")
    parser.add_argument("--batch_repeats", type=int, default=3,
                        help="batches of 64 timed per row (median; default 3, about 7 minutes on an idle core; 1 "
                             "keeps a busy machine's table under ~8)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = parser.parse_args(argv)
    if min(args.repeats, args.batch_repeats) < 1:
        parser.error("--repeats and --batch_repeats must be at least 1")
    if args.teacher and not args.run:
        parser.error("--teacher scores a trained run's samples: give --run too")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(args.threads)
    run = preset_run(args.run)
    teacher = None
    if args.teacher:
        from dlm.runs.build import load_run

        teacher = load_run(args.teacher)
    start = time.perf_counter()
    rows = []
    with torch.inference_mode():
        for setting in settings():
            rows.append(measure(run, setting, args.repeats, args.batch_repeats, teacher))
            print(rows[-1], flush=True)
    table = pd.DataFrame(rows)
    table.to_csv(out / "masked_samplers.csv", index=False)
    cpu = machine()
    command = "nice python benchmarks/masked_samplers.py" + "".join(
        f" --{key} {value}" for key, value in (("threads", args.threads), ("repeats", args.repeats),
                                              ("batch_repeats", args.batch_repeats), ("run", args.run),
                                              ("teacher", args.teacher)) if value)
    (out / "masked_samplers.md").write_text(
        f"# Masked samplers: steps per block, block sizes, and calls\n\n`{command}`\n\n"
        f"{cpu['cpu']} ({cpu['cores']} cores, {' '.join(cpu['flags']) or 'no AVX'}), {args.threads} thread(s), "
        f"torch {torch.__version__}, precision {run.config.precision} ({resolved_precision(run.config.precision, 'cpu')}"
        f" here); "
        f"{'the run ' + args.run if args.run else 'masked.yaml size, untrained'}; 64-token windows. "
        f"The whole table took {time.perf_counter() - start:.0f} s of wall time.\n\n"
        f"samples_per_s, cpu_s_per_sample: a batch of {BATCH} (median of {args.batch_repeats}); calls_per_batch: its "
        f"denoiser calls, each on the rows that unmask something; calls_per_sample: the passes one row of that batch "
        f"took on average (rows run / {BATCH}); batch1_sample_s, batch1_cpu_s, calls_at_batch_1: one sample alone "
        f"(median of {args.repeats}, after one that warms up).\n\n"
        + table.round(4).to_markdown(index=False) + "\n")
    print(table.round(4).to_string(index=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
