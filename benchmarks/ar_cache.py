"""The AR baseline's sampling speed with and without its KV cache (issue 35): samples per wall
second and per process CPU second, at batch 64 and at batch 1, at 1 and 2 threads.

    python benchmarks/ar_cache.py [--run runs/ar] [--repeats 3] [--out benchmarks/results/ar_cache.csv]

Speed does not depend on what the weights learned, so without --run the model is params/ar.yaml's
shape freshly initialised over tiny_shakespeare's word vocabulary size (the AR preset's). Each
setting is timed --repeats times (this VM's clock drifts): the table gives the median and the
spread. The cached and uncached loops draw the same samples (tests/test_ar.py).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import pandas as pd
import torch

from dlm.core.config import load_config
from dlm.families.autoregressive import AutoregressiveLM
from dlm.runs.provenance import machine

ROOT = Path(__file__).resolve().parents[1]
PRESET_VOCAB = 7116  # tiny_shakespeare's word vocabulary at min_count 2 (the AR preset's run logs it)


def model_of(run: str | None) -> AutoregressiveLM:
    if run:
        from dlm.runs.build import load_run

        return load_run(run).model
    torch.manual_seed(0)
    return AutoregressiveLM(load_config(ROOT / "params" / "ar.yaml"), PRESET_VOCAB).eval()


def timed(model: AutoregressiveLM, batch: int, cached: bool) -> tuple[float, float]:
    """(wall, CPU) seconds of one batch of `batch` 64-token samples."""
    generator = torch.Generator().manual_seed(0)
    wall, cpu = time.perf_counter(), time.process_time()
    model.generate(batch, model.transformer.seq_len, 0, temperature=1.0, generator=generator, cached=cached)
    return time.perf_counter() - wall, time.process_time() - cpu


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", help="an AR run to time (default: the preset's shape, untrained)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "ar_cache.csv"))
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    model = model_of(args.run)
    rows = []
    for threads in (1, 2):
        torch.set_num_threads(threads)
        for batch in (64, 1):
            for cached in (True, False):
                timed(model, batch, cached)  # warm-up
                runs = [timed(model, batch, cached) for _ in range(args.repeats)]
                per_s = [batch / wall for wall, _ in runs]
                per_cpu_s = [batch / cpu for _, cpu in runs]
                rows.append({"threads": threads, "batch": batch, "kv_cache": cached,
                             "samples_per_s": statistics.median(per_s), "min": min(per_s), "max": max(per_s),
                             "samples_per_cpu_s": statistics.median(per_cpu_s),
                             "ms_per_sample": 1000 * statistics.median(wall for wall, _ in runs) / batch})
                print(rows[-1], flush=True)
    table = pd.DataFrame(rows)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    table.to_csv(out, index=False)
    cpu = machine()
    out.with_suffix(".md").write_text(
        f"# AR sampling with and without the KV cache\n\n`python benchmarks/ar_cache.py --repeats {args.repeats}`"
        f"{' --run ' + args.run if args.run else ''} on {cpu['cpu']} ({cpu['cores']} cores, "
        f"{' '.join(cpu['flags']) or 'no AVX'}); median of {args.repeats} (min-max), 64-token samples.\n\n"
        + table.round(3).to_markdown(index=False) + "\n")
    print(table.round(3).to_string(index=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
