"""One short check of the CUDA path on a GPU machine (benchmarks/gpu_check.sh runs it after the
CUDA tests): training tokens/s and MFU in bf16 and fp32, sampling samples/s, peak memory, the
paper-scale preset's step time (and the hours its 200k steps would take), then a 2-minute training
run sampled and scored against a 45-second AR teacher. Writes a markdown table (benchmarks/results/gpu.md
by default) as it goes, so a run cut short keeps what it measured.

    python benchmarks/gpu_check.py [--out benchmarks/results/gpu.md] [--train_s 120] [--teacher_s 45]
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from speed import flops_per_token  # noqa: E402  (the same analytic FLOP count as the CPU table)

from dlm.core.config import load_config  # noqa: E402
from dlm.core.data import epoch_windows, prepare_data  # noqa: E402
from dlm.runs.build import build_objective, load_run, new_model  # noqa: E402
from dlm.runs.sample import SampleOptions, generate  # noqa: E402
from dlm.runs.state import build_optimizer, train_step  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


class Table:
    """Rows of (what, value, note), rewritten to the markdown file after every row."""

    def __init__(self, path: Path, header: list[str]):
        self.path, self.header, self.rows = path, header, []
        path.parent.mkdir(parents=True, exist_ok=True)

    def add(self, what: str, value: str, note: str = "") -> None:
        self.rows.append((what, value, note))
        print(f"{what}: {value} {note}", flush=True)
        lines = [*self.header, "", "| what | measured | note |", "|---|---|---|"]
        lines += [f"| {w} | {v} | {n} |" for w, v, n in self.rows]
        self.path.write_text("\n".join(lines) + "\n")


def sync() -> None:
    torch.cuda.synchronize()


def matmul_ceiling(dtype: torch.dtype, n: int = 8192, repeats: int = 10) -> float:
    a, b = torch.randn(n, n, device="cuda", dtype=dtype), torch.randn(n, n, device="cuda", dtype=dtype)
    for _ in range(3):
        a @ b
    sync()
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    sync()
    return 2 * n**3 * repeats / (time.perf_counter() - start)


def training_speed(preset: str, precision: str, steps: int = 30, warmup: int = 5, **overrides) -> dict:
    """Median-free: total time of `steps` steps after warm-up, synchronised (GPU steps queue up)."""
    config = load_config(ROOT / "params" / preset, precision=precision, device="cuda", progress=False, **overrides)
    data = prepare_data(config.corpus, config.tokenizer, config.min_count, config.lowercase, None, config.max_train_tokens)
    torch.manual_seed(0)
    model = new_model(config, len(data.tokenizer)).cuda().train()
    objective = build_objective(config)
    optimizer = build_optimizer(model, config)
    windows = epoch_windows(data.train_ids, config.seq_len, torch.Generator().manual_seed(0))
    batches = [windows[i * config.batch_size: (i + 1) * config.batch_size].cuda() for i in range(steps + warmup)]
    torch.cuda.reset_peak_memory_stats()
    for ids in batches[:warmup]:
        train_step(model, objective, optimizer, ids, config)
    sync()
    start = time.perf_counter()
    for ids in batches[warmup:]:
        train_step(model, objective, optimizer, ids, config)
    sync()
    seconds = (time.perf_counter() - start) / steps
    tokens = config.batch_size * config.seq_len
    flops = flops_per_token(config, len(data.tokenizer))["total"] * tokens / seconds
    return {"config": config, "s_per_step": seconds, "tokens_per_s": tokens / seconds, "flops": flops,
            "peak_gb": torch.cuda.max_memory_allocated() / 1e9}


def run(command: list[str], log: Path) -> float:
    start = time.perf_counter()
    with open(log, "a") as handle:
        handle.write("$ " + " ".join(command) + "\n")
        handle.flush()
        subprocess.run(command, check=True, stdout=handle, stderr=subprocess.STDOUT, cwd=ROOT)
    return time.perf_counter() - start


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "gpu.md"))
    parser.add_argument("--work", default="runs/gpu_check", help="run folders of the timed training")
    parser.add_argument("--train_s", type=float, default=120)
    parser.add_argument("--teacher_s", type=float, default=45)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu_check: no CUDA GPU visible; this check needs one.", file=sys.stderr)
        return 2
    name = torch.cuda.get_device_name(0)
    table = Table(Path(args.out), [f"# GPU check: {name}", "",
                                   f"torch {torch.__version__}, CUDA {torch.version.cuda}, "
                                   f"written by benchmarks/gpu_check.sh on {time.strftime('%Y-%m-%d')}."])
    ceilings = {}
    for label, dtype in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
        ceilings[label] = matmul_ceiling(dtype)
        table.add(f"ceiling: {label} matmul 8192^3", f"{ceilings[label] / 1e12:,.0f} TFLOP/s",
                  "TF32 off (PyTorch's default)" if label == "fp32" else "")

    for precision in ("bf16", "fp32"):
        result = training_speed("default.yaml", precision)
        table.add(f"default.yaml training, {precision} (batch 64 x 64)", f"{result['tokens_per_s']:,.0f} tokens/s",
                  f"{result['s_per_step'] * 1e3:.1f} ms/step, MFU {100 * result['flops'] / ceilings[precision]:.1f}%, "
                  f"peak {result['peak_gb']:.2f} GB")
    for batch in (256, 1024):
        result = training_speed("default.yaml", "bf16", batch_size=batch)
        table.add(f"default.yaml training, bf16, batch {batch}", f"{result['tokens_per_s']:,.0f} tokens/s",
                  f"{result['s_per_step'] * 1e3:.1f} ms/step, MFU {100 * result['flops'] / ceilings['bf16']:.1f}%, "
                  f"peak {result['peak_gb']:.2f} GB")
    result = training_speed("paper_scale.yaml", "bf16", steps=20)
    hours = result["s_per_step"] * result["config"].max_steps / 3600
    table.add("paper_scale.yaml training, bf16 (12 x 768, d 128, batch 64)", f"{result['tokens_per_s']:,.0f} tokens/s",
              f"{result['s_per_step'] * 1e3:.1f} ms/step, MFU {100 * result['flops'] / ceilings['bf16']:.1f}%, "
              f"peak {result['peak_gb']:.2f} GB: 200k steps ~ {hours:.1f} h")

    work = ROOT / args.work
    work.mkdir(parents=True, exist_ok=True)
    log = Path(args.out).with_suffix(".log")
    log.write_text("")
    py = [sys.executable, "-m", "dlm"]
    default_dir, teacher_dir = work / "default_2min", work / "ar"
    for folder in (default_dir, teacher_dir):
        subprocess.run(["rm", "-rf", str(folder)], check=True)
    wall = run([*py, "train", "params/default.yaml", "--run_dir", str(default_dir), "--max_train_seconds",
                str(args.train_s), "--epochs", "1000", "--no-progress", "--no-calibrate_temperature"], log)
    trained = load_run(default_dir)
    table.add(f"default.yaml trained {args.train_s:g} s on the clock", f"{trained.step:,} steps",
              f"{trained.step / args.train_s:.1f} steps/s ({wall:.0f} s with start-up)")
    run([*py, "train-ar", "params/ar.yaml", "--run_dir", str(teacher_dir), "--max_train_seconds", str(args.teacher_s),
         "--epochs", "1000", "--no-progress"], log)
    teacher = load_run(teacher_dir)
    table.add(f"AR teacher trained {args.teacher_s:g} s", f"{teacher.step:,} steps", "")

    run_gpu = load_run(default_dir, device="cuda")
    for steps in (50, 200):
        options = SampleOptions.from_config(run_gpu.config, num_samples=64, steps=steps, batch_size=64)
        generate(run_gpu, SampleOptions.from_config(run_gpu.config, num_samples=8, steps=5), device="cuda")  # warm-up
        sync()
        start = time.perf_counter()
        generate(run_gpu, options, device="cuda")
        sync()
        seconds = time.perf_counter() - start
        table.add(f"sampling, batch 64, {steps} steps", f"{64 / seconds:,.1f} samples/s",
                  f"{seconds / steps * 1e3:.1f} ms/step")
    samples = work / "samples.jsonl"
    run([*py, "sample", "--run_dir", str(default_dir), "--num_samples", "64", "--out", str(samples),
         "--device", "cuda"], log)
    scores = work / "scores.json"
    run([*py, "evaluate", "--samples", str(samples), "--teacher", str(teacher_dir), "--json", str(scores)], log)
    result = json.loads(scores.read_text())
    mine, held = result["samples"], result["heldout"]
    table.add("2-minute run, 64 samples: teacher perplexity / entropy",
              f"{mine['teacher_perplexity']:,.0f} @ {mine['unigram_entropy']:.2f} bits",
              f"held-out {held['teacher_perplexity']:,.0f} @ {held['unigram_entropy']:.2f} bits; "
              f"punctuation {mine['punctuation_share']:.3f} (held-out {held['punctuation_share']:.3f}); "
              f"collapsed: {result.get('collapsed')}")
    first = [json.loads(line)["text"] for line in samples.read_text().splitlines()[:2]]
    table.add("first samples", " / ".join(t.replace("\n", " ").replace("|", "\\|")[:160] for t in first), "")
    if not math.isfinite(mine["teacher_perplexity"]):
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
