"""How fast dlm trains and samples on this machine, against what its matmuls can do.

    python benchmarks/speed.py                 # the full table: a few minutes on 2 cores
    python benchmarks/speed.py --quick         # tiny sizes, seconds: a smoke run for CI
    python benchmarks/speed.py --profile       # also print torch.profiler's top ops of a default.yaml step

Everything runs in one process tree on the same number of threads (--threads, default torch's
choice). What it measures, top to bottom:

- ceiling: the best fp32 matmul GFLOP/s over several square sizes (best of repeats). This is
  what "100% MFU" means here. The bf16 ceiling is measured the same way, for precision: bf16.
- train: tokens/s of the optimizer step of a state built by `dlm.runs.state.build_state` (the state
  and step the training loop runs: loss, backward, clipping, AdamW, lr schedule, EMA) on real
  corpus windows and the real vocabulary, for params/default.yaml and params/seed.yaml, after
  warm-up steps; each preset in its own subprocess so its peak resident memory is its own (data,
  model, optimizer and the step). MFU = model FLOPs per token x tokens/s / the ceiling of the
  precision the run resolves to. Step times are medians of individually timed steps, and every
  timing note carries the 1-minute load average, so a busy machine shows in the table.
- option: other Config options (--variants; default: the precision the default did not resolve
  to, fp32 where `precision: auto` means bf16, as where the precision probe finds bf16 faster) on
  default.yaml, against the default.yaml row.
- reference: a plain training step at the same sizes, built the way the earlier attempt built it
  (nn.TransformerEncoder layers, a Linear(1, width) time bias, an untied nn.Linear decoder, epsilon
  MSE + CE on the clean embeddings, AdamW, batch as configured), and dlm's tokens/s over it.
- sample: seconds per reverse step and samples/s for a batch of 64 sequences at 50, 200 and 2000
  steps with default.yaml's recipe. Chains longer than --max_sample_steps are timed on their
  first steps and extrapolated (every step costs the same network call); the note says so.
- blocks: samples/s of whole block-diffusion chains (blocks of 1, 4 and 16 tokens at
  params/blocks1.yaml's steps a block, trained on every block at once) with the key/value cache
  of the finished blocks and without it, against the whole window at default.yaml's steps
  (--blocks_only: just these rows, to benchmarks/results/speed_blocks.csv).
- scaling: step time of default.yaml at seq_len 64/128/256 and at the corpus vocabularies of
  min_count 10/2/1 (about 2k/7k/13k words).
- processes: default.yaml's training tokens/s on --processes N processes x 1 thread each
  (torchrun, gloo, DistributedDataParallel, the same global batch split over them) against 1
  process x N threads, both through the training loop's own sharded step (`TrainState.train_on`).

Model FLOPs per token are counted analytically (`flops_per_token`): 6 x the weights of every
matmul a token goes through (forward 2, backward 4: the denoiser's projections and MLPs, the time
MLP divided over the sequence, and the rounding head over the vocabulary, d x V), plus attention's
scores and weighted sum, 12 x depth x seq_len x width. Norms, activations, the optimizer and
the loss arithmetic are not counted (as in nanoGPT / PaLM's MFU).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from dlm.core.config import Config, load_config
from dlm.core.data import epoch_windows, prepare_data
from dlm.core.runtime import autocast, destroy_distributed, init_distributed, resolved_precision
from dlm.core.schedule import q_sample
from dlm.families.gaussian_model import DiffusionLM
from dlm.families.gaussian_sampling import sample_chain
from dlm.runs.build import build_objective
from dlm.runs.sample import SampleOptions
from dlm.runs.state import build_state

ROOT = Path(__file__).resolve().parents[1]
PARAMS = ROOT / "params"
COLUMNS = ("section", "setting", "metric", "value", "unit", "note")

# Tiny sizes for --quick (CI smoke): every preset is shrunk to these.
QUICK_OVERRIDES = {"seq_len": 16, "embed_dim": 16, "width": 32, "depth": 1, "heads": 2, "batch_size": 8,
                   "max_train_tokens": 4000, "diffusion_steps": 100, "sample_steps": 20}


def row(section: str, setting: str, metric: str, value: float, unit: str, note: str = "") -> dict:
    return {"section": section, "setting": setting, "metric": metric, "value": float(value), "unit": unit, "note": note}


# ----------------------------------------------------------------------------- the machine


def machine() -> dict:
    model = platform.processor() or "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    flags = ""
    with contextlib.suppress(OSError):
        flags = Path("/proc/cpuinfo").read_text()
    native_bf16 = [f for f in ("avx512_bf16", "amx_bf16") if f in flags]
    return {"cpu": model, "cores": os.cpu_count(), "threads": torch.get_num_threads(),
            "torch": torch.__version__, "native_bf16": ",".join(native_bf16) or "none",
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"}


def matmul_ceiling(sizes=(256, 512, 1024, 2048), repeats: int = 5, dtype=torch.float32) -> list[dict]:
    """GFLOP/s of an n x n x n matmul for each size, best of `repeats` timed calls."""
    rows = []
    for n in sizes:
        a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
        out = torch.empty(n, n, dtype=dtype)
        calls = max(1, int(2e9 / (2 * n**3)))  # about 2 GFLOP per timed repeat
        torch.mm(a, b, out=out)
        best = math.inf
        for _ in range(repeats):
            start = time.perf_counter()
            for _ in range(calls):
                torch.mm(a, b, out=out)
            best = min(best, (time.perf_counter() - start) / calls)
        name = {torch.float32: "fp32", torch.bfloat16: "bf16"}.get(dtype, str(dtype))
        rows.append(row("ceiling", f"{name} matmul {n}x{n}x{n}", "throughput",
                        2 * n**3 / best / 1e9, "GFLOP/s", f"best of {repeats}"))
    return rows


# ----------------------------------------------------------------------------- FLOPs


def flops_per_token(config: Config, vocab_size: int) -> dict[str, float]:
    """Model FLOPs of one training step per token, counted analytically (see the module doc)."""
    w, d, L = config.width, config.embed_dim, config.seq_len
    in_dim = 2 * d if config.self_condition > 0 else d
    per_block = 3 * w * w + w * w + 2 * 4 * w * w  # qkv, attention out, MLP up and down
    denoiser = in_dim * w + config.depth * per_block + w * d + 2 * 4 * w * w / L  # + time MLP per sequence
    attention = 12 * config.depth * L * w  # QK^T and AV: 2 x 2 x L x w forward, x 3 with backward
    rounding = 6 * d * vocab_size
    # A self-conditioned batch first runs the denoiser once more, forward only, without gradient.
    extra = config.self_condition * (2 * denoiser + attention / 3)
    return {"denoiser": 6 * denoiser + extra, "attention": attention, "rounding": rounding,
            "total": 6 * denoiser + extra + attention + rounding}


# ----------------------------------------------------------------------------- the reference step


class ReferenceDenoiser(nn.Module):
    """The earlier attempt's network at dlm's sizes: a time bias Linear(1, width) added to the input,
    nn.TransformerEncoder layers (post-LN, ReLU), and the earlier attempt's untied Linear decoder.
    In/out projections embed_dim <-> width make it the same size as dlm's denoiser."""

    def __init__(self, config: Config, vocab_size: int):
        super().__init__()
        w = config.width
        self.embedding = nn.Embedding(vocab_size, config.embed_dim)
        self.in_proj = nn.Linear(config.embed_dim, w)
        self.positions = nn.Parameter(torch.randn(config.seq_len, w) * 0.02)
        self.time_emb = nn.Linear(1, w)
        layer = nn.TransformerEncoderLayer(w, config.heads, 4 * w, config.dropout, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, config.depth, enable_nested_tensor=False)
        self.out_proj = nn.Linear(w, config.embed_dim)
        self.decoder = nn.Linear(config.embed_dim, vocab_size)

    def forward(self, x: torch.Tensor, t: torch.Tensor, steps: int) -> torch.Tensor:
        time_bias = self.time_emb((t.float() / steps)[:, None])[:, None, :]  # (B, 1, W)
        h = self.in_proj(x) + self.positions[: x.shape[1]] + time_bias
        return self.out_proj(self.encoder(h))


def reference_setup(config: Config, vocab_size: int):
    """The reference model, its schedule and an AdamW over every parameter; returns a step(ids)."""
    torch.manual_seed(config.seed)
    model = ReferenceDenoiser(config, vocab_size)
    schedule = build_objective(config).schedule
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr)
    model.train()

    def step(ids: torch.Tensor) -> None:
        x0 = model.embedding(ids)  # (B, L, d)
        t = torch.randint(0, schedule.steps, (ids.shape[0],))
        noise = torch.randn_like(x0)
        eps = model(q_sample(schedule, x0, t, noise), t, schedule.steps)
        logits = model.decoder(x0)  # rounding CE on the clean embeddings
        loss = F.mse_loss(eps, noise) + F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids.reshape(-1))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def dlm_setup(config: Config, vocab_size: int):
    """dlm's model, optimizer, lr schedule and EMA built by train()'s own build_state; returns a step(ids)."""
    torch.manual_seed(config.seed)
    state = build_state(config, DiffusionLM(config, vocab_size), total_steps=10**6)
    state.model.train()
    return state.train_on


def time_steps(step, batches, warmup: int, steps: int) -> float:
    """Median seconds per step over `steps` individually timed steps after `warmup` untimed ones.
    The median, not the mean: on a shared machine a burst of someone else's work lands in a few
    steps and should not decide the number."""
    batches = iter(batches)
    for _ in range(warmup):
        step(next(batches))
    times = []
    for _ in range(steps):
        ids = next(batches)
        start = time.perf_counter()
        step(ids)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def corpus_batches(train_ids: torch.Tensor, config: Config):
    """Training batches the way train() draws them, epoch after epoch."""
    epoch = 0
    while True:
        epoch += 1
        windows = epoch_windows(train_ids, config.seq_len, torch.Generator().manual_seed(epoch))
        for first in range(0, len(windows) - config.batch_size + 1, config.batch_size):
            yield windows[first: first + config.batch_size]


def random_batches(config: Config, vocab_size: int):
    generator = torch.Generator().manual_seed(0)
    while True:
        yield torch.randint(0, vocab_size, (config.batch_size, config.seq_len), generator=generator)


def measure_training(config: Config, impl: str, warmup: int, steps: int) -> dict:
    """Tokens/s of one implementation ('dlm' or 'reference') on the real corpus, and this
    process's peak resident memory. Run it in a fresh process (`training_in_subprocess`)."""
    data = prepare_data(config.corpus, config.tokenizer, config.min_count, config.lowercase, None,
                        config.max_train_tokens)
    vocab = len(data.tokenizer)
    step = (dlm_setup if impl == "dlm" else reference_setup)(config, vocab)
    seconds = time_steps(step, corpus_batches(data.train_ids, config), warmup, steps)
    tokens = config.batch_size * config.seq_len
    return {"impl": impl, "vocab": vocab, "step_s": seconds, "tokens_per_s": tokens / seconds,
            "flops_per_token": flops_per_token(config, vocab)["total"],
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "load": os.getloadavg()[0]}  # 1-minute load average as the timing ended


def training_in_subprocess(preset: str, overrides: dict, impl: str, warmup: int, steps: int, threads: int) -> dict:
    """`measure_training` in a child process of this script (same threads), so that the peak
    memory is that run's own."""
    spec = json.dumps({"preset": preset, "overrides": overrides, "impl": impl, "warmup": warmup,
                       "steps": steps, "threads": threads})
    return child_result([sys.executable, str(Path(__file__).resolve()), "--child", spec],
                        f"benchmark child for {preset} ({impl})")


def child_result(command: list[str], what: str) -> dict:
    """Run a benchmark child process; what it measured is the JSON on the last line it prints."""
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{what} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def child_config(spec: str) -> tuple[dict, Config]:
    """A child's settings (the JSON spec its parent passed) and its config, on its thread count."""
    values = json.loads(spec)
    torch.set_num_threads(values["threads"])
    return values, load_config(PARAMS / values["preset"], **values["overrides"])


def child(spec: str) -> None:
    values, config = child_config(spec)
    print(json.dumps(measure_training(config, values["impl"], values["warmup"], values["steps"])))


# ----------------------------------------------------------------------------- processes


def measure_processes(preset: str, overrides: dict, nproc: int, threads: int, warmup: int, steps: int) -> dict:
    """Tokens/s of the training step on `nproc` processes of `threads` threads (torchrun, gloo;
    each process its shard of every global batch); rank 0's median step time."""
    spec = json.dumps({"preset": preset, "overrides": overrides, "warmup": warmup, "steps": steps, "threads": threads})
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
               str(Path(__file__).resolve()), "--ddp_child", spec]
    return child_result(command, f"benchmark on {nproc} processes")


def ddp_child(spec: str) -> None:
    values, config = child_config(spec)
    ranks, device = init_distributed(torch.device("cpu"))
    data = prepare_data(config.corpus, config.tokenizer, config.min_count, config.lowercase, None,
                        config.max_train_tokens)
    torch.manual_seed(config.seed)
    state = build_state(config, DiffusionLM(config, len(data.tokenizer)), total_steps=10**6)
    state.ranks = ranks
    state.distribute(device)
    state.model.train()

    def step(batch: torch.Tensor) -> None:
        start, stop = ranks.shard(len(batch))
        state.train_on(batch[start:stop], start, len(batch))

    seconds = time_steps(step, corpus_batches(data.train_ids, config), values["warmup"], values["steps"])
    destroy_distributed()
    if ranks.is_main:
        print(json.dumps({"step_s": seconds, "tokens_per_s": config.batch_size * config.seq_len / seconds,
                          "load": os.getloadavg()[0]}))


def processes_rows(preset: str, overrides: dict, nproc: int, warmup: int, steps: int) -> list[dict]:
    """N processes x 1 thread against 1 process x N threads, on the same global batches."""
    config = load_config(PARAMS / preset, **overrides)
    name = f"{preset}: batch {config.batch_size} x seq {config.seq_len}, {resolved_precision(config.precision, 'cpu')}"
    spread = measure_processes(preset, overrides, nproc, 1, warmup, steps)
    threaded = measure_processes(preset, overrides, 1, nproc, warmup, steps)
    note = f"median of {steps} steps after {warmup}; load {{:.1f}}"
    return [
        row("processes", f"{name}, {nproc} processes x 1 thread", "throughput", spread["tokens_per_s"], "tokens/s",
            "torchrun, gloo, DDP; " + note.format(spread["load"])),
        row("processes", f"{name}, 1 process x {nproc} threads", "throughput", threaded["tokens_per_s"], "tokens/s",
            note.format(threaded["load"])),
        row("processes", f"{name}, {nproc} processes x 1 thread", "speed-up",
            spread["tokens_per_s"] / threaded["tokens_per_s"], "x", f"over 1 process x {nproc} threads"),
    ]


# ----------------------------------------------------------------------------- sampling


def measure_sampling(config: Config, vocab_size: int, batch: int = 64, chains=(50, 200, 2000),
                     max_timed: int = 200, warmup: int = 3) -> list[dict]:
    """Seconds per reverse step and samples/s for a batch of `batch` sequences, with the config's
    own sampling recipe (clamp, eta, spacing), built as `dlm sample` builds it. Chains longer than
    `max_timed` steps are timed on their first `max_timed` steps and extrapolated."""
    torch.manual_seed(config.seed)
    model = DiffusionLM(config, vocab_size).eval()
    objective = build_objective(config)
    rows = []

    def run(steps: int, limit: int) -> float:
        """Median seconds of the first `limit` reverse steps of a `steps`-step chain."""
        chain = sample_chain(model, objective, SampleOptions.from_config(config, steps=steps), (batch, config.seq_len),
                             generator=torch.Generator().manual_seed(0))
        times = []
        with autocast(config.precision, "cpu"):
            start = time.perf_counter()
            for state in chain:
                now = time.perf_counter()
                times.append(now - start)
                start = now
                if state.index + 1 >= limit:
                    break
        return statistics.median(times)

    run(config.diffusion_steps, warmup)
    for steps in chains:
        steps = min(steps, config.diffusion_steps)
        timed = min(steps, max_timed)
        per_step = run(steps, timed)
        note = "median step" if timed == steps else f"median of the first {timed} of {steps} steps, extrapolated"
        note += f"; load {os.getloadavg()[0]:.1f}"
        setting = f"{steps} steps, batch {batch}"
        rows.append(row("sample", setting, "per step", per_step, "s", note))
        rows.append(row("sample", setting, "throughput", batch / (per_step * steps), "samples/s", note))
    return rows


def measure_block_sampling(config: Config, vocab_size: int, batch: int = 16, block_sizes=(1, 4, 16),
                           block_steps: int = 10, whole_steps: int = 200, repeats: int = 2) -> list[dict]:
    """Samples/s of whole block-diffusion chains (a model trained on every block at once,
    `block_training: all`) at `block_steps` steps a block, with the prefix cache and without it
    (`prefix_cache`), against the whole window at `whole_steps` steps: best of `repeats` chains."""
    rows = []

    def run(case: Config, steps: int, cached: bool) -> float:
        torch.manual_seed(case.seed)
        model = DiffusionLM(case, vocab_size).eval()
        objective = build_objective(case)
        best = math.inf
        for _ in range(repeats):
            chain = sample_chain(model, objective, SampleOptions.from_config(case, steps=steps),
                                 (batch, case.seq_len), generator=torch.Generator().manual_seed(0), prefix_cache=cached)
            with autocast(case.precision, "cpu"):
                start = time.perf_counter()
                for _ in chain:
                    pass
                best = min(best, time.perf_counter() - start)
        return best

    whole = run(config.replace(block_size=None), whole_steps, False)
    note = f"batch {batch}, best of {repeats} chains; load {{:.1f}}"
    rows.append(row("blocks", f"whole window, {whole_steps} steps", "throughput", batch / whole, "samples/s",
                    note.format(os.getloadavg()[0])))
    for size in block_sizes:
        case = config.replace(block_size=size, block_training="all")
        for cached in (False, True):
            seconds = run(case, block_steps, cached)
            setting = f"blocks of {size}, {block_steps} steps a block, {'cached' if cached else 'uncached'}"
            rows.append(row("blocks", setting, "throughput", batch / seconds, "samples/s",
                            note.format(os.getloadavg()[0])))
            rows.append(row("blocks", setting, "time / whole window's", seconds / whole, "x",
                            f"the whole window at {whole_steps} steps = 1"))
    return rows


# ----------------------------------------------------------------------------- scaling


def measure_scaling(config: Config, seq_lens, vocab_sizes: dict[str, int], warmup: int, steps: int) -> list[dict]:
    """Step time of dlm's train step (random ids) as seq_len and the vocabulary grow."""
    rows = []
    base_vocab = list(vocab_sizes.values())[len(vocab_sizes) // 2]
    cases = [(f"seq_len {n}, vocab {base_vocab}", config.replace(seq_len=n), base_vocab) for n in seq_lens]
    cases += [(f"seq_len {config.seq_len}, vocab {v} ({name})", config, v) for name, v in vocab_sizes.items()]
    for setting, case, vocab in cases:
        seconds = time_steps(dlm_setup(case, vocab), random_batches(case, vocab), warmup, steps)
        tokens = case.batch_size * case.seq_len
        rows.append(row("scaling", setting, "step time", seconds, "s",
                        f"batch {case.batch_size}, median of {steps} steps; load {os.getloadavg()[0]:.1f}"))
        rows.append(row("scaling", setting, "throughput", tokens / seconds, "tokens/s"))
    return rows


# ----------------------------------------------------------------------------- profile


def profile_step(config: Config, vocab_size: int, steps: int = 3, top: int = 25) -> str:
    """torch.profiler's table of the most expensive ops over a few dlm train steps."""
    from torch.profiler import ProfilerActivity, profile

    step = dlm_setup(config, vocab_size)
    batches = random_batches(config, vocab_size)
    step(next(batches))
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        for _ in range(steps):
            step(next(batches))
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=top)


# ----------------------------------------------------------------------------- the run


def presets(quick: bool, extra: dict) -> dict[str, tuple[str, dict]]:
    shrink = QUICK_OVERRIDES if quick else {}
    return {"default.yaml": ("default.yaml", {**shrink, **extra}), "seed.yaml": ("seed.yaml", {**shrink, **extra})}


def run_benchmark(args) -> tuple[list[dict], dict]:
    threads = args.threads or torch.get_num_threads()
    torch.set_num_threads(threads)
    info = machine()
    extra = dict(args.override)
    if args.corpus:
        extra["corpus"] = args.corpus
    quick = args.quick
    warmup, steps = (1, 2) if quick else (args.warmup, args.steps)
    sizes, repeats = ((64, 128), 2) if quick else ((256, 512, 1024, 2048), 5)
    rows = matmul_ceiling(sizes, repeats)
    ceiling = max(r["value"] for r in rows)
    rows.append(row("ceiling", "fp32 matmul", "best", ceiling, "GFLOP/s", "100% MFU"))
    bf16 = matmul_ceiling(sizes, repeats, dtype=torch.bfloat16)
    bf16_ceiling = max(r["value"] for r in bf16)
    rows += [*bf16, row("ceiling", "bf16 matmul", "best", bf16_ceiling, "GFLOP/s", "for precision: bf16")]

    def measure(preset: str, overrides: dict, impl: str) -> dict:
        if args.in_process:
            return measure_training(load_config(PARAMS / preset, **overrides), impl, warmup, steps)
        return training_in_subprocess(preset, overrides, impl, warmup, steps, threads)

    def mfu(result: dict, config: Config) -> tuple[float, str, str]:
        """MFU against the ceiling of the precision `config` runs at here: value, unit, note."""
        precision = resolved_precision(config.precision, "cpu")
        peak = bf16_ceiling if precision == "bf16" else ceiling
        value = 100 * result["flops_per_token"] * result["tokens_per_s"] / (peak * 1e9)
        return value, "%", f"against the {precision} matmul ceiling"

    memory_note = "peak RSS of this whole process (--in_process)" if args.in_process else "peak RSS of its own process"
    default_config = default_result = None
    for name, (preset, overrides) in presets(quick, extra).items():
        config = load_config(PARAMS / preset, **overrides)
        setting = (f"{name}: batch {config.batch_size} x seq {config.seq_len}, width {config.width}, d {config.embed_dim}, "
                   f"{resolved_precision(config.precision, 'cpu')}")
        ours, ref = measure(preset, overrides, "dlm"), measure(preset, overrides, "reference")
        note = (f"vocab {ours['vocab']}, {ours['flops_per_token'] / 1e6:.1f} MFLOP/token, median of {steps} steps "
                f"after {warmup}; load {ours['load']:.1f}")
        rows += [
            row("train", setting, "dlm throughput", ours["tokens_per_s"], "tokens/s", note),
            row("train", setting, "dlm step time", ours["step_s"], "s"),
            row("train", setting, "dlm MFU", *mfu(ours, config)),
            row("train", setting, "dlm peak memory", ours["peak_rss_mb"], "MB", memory_note),
            row("train", setting, "reference throughput", ref["tokens_per_s"], "tokens/s",
                "nn.TransformerEncoder, untied decoder, epsilon MSE + CE on clean embeddings"),
            row("train", setting, "reference MFU", mfu(ref, config.replace(precision="fp32"))[0], "%",
                f"fp32; load {ref['load']:.1f}"),
            row("train", setting, "dlm / reference", ours["tokens_per_s"] / ref["tokens_per_s"], "x"),
        ]
        if default_config is None:
            default_config, default_result, default_preset = config, ours, (preset, overrides)
    default_vocab = default_result["vocab"]

    variants = args.variants
    if variants is None:  # the precision the default did not pick, measured against it
        other = "fp32" if resolved_precision(default_config.precision, "cpu") == "bf16" else "bf16"
        variants = [f"precision={other}"]
    for variant in variants:
        preset, overrides = default_preset
        key, _, value = variant.partition("=")
        changed = {**overrides, key: yaml_value(value)}
        result = measure(preset, changed, "dlm")
        setting = f"default.yaml, {variant}"
        rows += [
            row("option", setting, "dlm throughput", result["tokens_per_s"], "tokens/s",
                f"median of {steps} steps after {warmup}; load {result['load']:.1f}"),
            row("option", setting, "speed-up", result["tokens_per_s"] / default_result["tokens_per_s"], "x",
                "over the default.yaml row above"),
            row("option", setting, "dlm MFU", *mfu(result, load_config(PARAMS / preset, **changed))),
            row("option", setting, "dlm peak memory", result["peak_rss_mb"], "MB", memory_note),
        ]

    chains = (5, 10, 20) if quick else (50, 200, 2000)
    batch = 4 if quick else 64
    max_timed = 10 if quick else args.max_sample_steps
    rows += measure_sampling(default_config, default_vocab, batch=batch, chains=chains, max_timed=max_timed)
    for variant in variants:
        key, _, value = variant.partition("=")
        if key == "precision":
            case = default_config.replace(precision=yaml_value(value))
            per_step = [r for r in measure_sampling(case, default_vocab, batch=batch, chains=chains[1:2], max_timed=max_timed)
                        if r["metric"] == "per step"]
            rows += [{**r, "section": "option", "setting": f"sample {r['setting']}, {variant}"} for r in per_step]

    rows += blocks_rows(default_config, default_vocab, quick)

    if quick:
        vocab_sizes = {"small": 50, "medium": default_vocab, "large": 2 * default_vocab}
        seq_lens = (8, 16)
    else:
        vocab_sizes = {f"min_count {m}": len(prepare_data(default_config.corpus, default_config.tokenizer, m,
                                                           default_config.lowercase).tokenizer) for m in (10, 2, 1)}
        seq_lens = (64, 128, 256)
    rows += measure_scaling(default_config, seq_lens, vocab_sizes, warmup=1 if quick else 2, steps=2 if quick else 5)

    processes = args.processes if args.processes is not None else (0 if quick else 2)
    if processes > 1:
        rows += processes_rows(*default_preset, processes, warmup, steps)

    if args.profile:
        print(profile_step(default_config, default_vocab))
    return rows, info


def blocks_rows(config: Config, vocab_size: int, quick: bool) -> list[dict]:
    """Block chains with and without the prefix cache (blocks of 1, 4 and 16, 10 steps a block, as
    params/blocks1.yaml samples) against the whole window at default.yaml's 200 steps."""
    if quick:
        return measure_block_sampling(config, vocab_size, batch=2, block_sizes=(1, 4), block_steps=2, whole_steps=5,
                                      repeats=1)
    return measure_block_sampling(config, vocab_size, block_steps=load_config(PARAMS / "blocks1.yaml").sample_steps,
                                  whole_steps=config.sample_steps)


def markdown(rows: list[dict], info: dict) -> str:
    lines = [f"Machine: {info['cpu']}, {info['cores']} cores, {info['threads']} torch threads, torch {info['torch']}, "
             f"native bf16: {info['native_bf16']}, CUDA: {info['cuda']}", "",
             "| section | setting | metric | value | unit | note |", "|---|---|---|---:|---|---|"]
    for r in rows:
        value = r["value"]
        shown = f"{value:.3g}" if abs(value) < 100 else f"{value:,.0f}"
        lines.append(f"| {r['section']} | {r['setting']} | {r['metric']} | {shown} | {r['unit']} | {r['note']} |")
    return "\n".join(lines)


def write_csv(rows: list[dict], info: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, [*COLUMNS, "machine"])
        writer.writeheader()
        machine_text = f"{info['cpu']}; {info['cores']} cores; {info['threads']} threads; torch {info['torch']}"
        for r in rows:
            writer.writerow({**r, "value": f"{r['value']:.6g}", "machine": machine_text})


def parse_override(text: str) -> tuple[str, object]:
    key, _, value = text.partition("=")
    return key, yaml_value(value)


def yaml_value(text: str):
    import yaml

    return yaml.safe_load(text)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes, a few steps: a smoke run (seconds)")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)")
    parser.add_argument("--warmup", type=int, default=5, help="untimed training steps before timing")
    parser.add_argument("--steps", type=int, default=30, help="timed training steps per preset")
    parser.add_argument("--max_sample_steps", type=int, default=200,
                        help="time at most this many reverse steps per chain; longer chains are extrapolated")
    parser.add_argument("--corpus", default=None, help="corpus name or text file (default: the presets')")
    parser.add_argument("--override", action="append", default=[], type=parse_override, metavar="KEY=VALUE",
                        help="config override for every measured preset (repeatable), e.g. precision=bf16")
    parser.add_argument("--in_process", action="store_true",
                        help="measure training in this process, not one subprocess per preset (peak memory is then shared)")
    parser.add_argument("--variants", nargs="*", default=None, metavar="KEY=VALUE",
                        help="options measured on default.yaml against its own row (default: the precision it did not "
                             "resolve to; e.g. compile=true, which adds about a minute of compiling)")
    parser.add_argument("--profile", action="store_true", help="print torch.profiler's top ops of a default.yaml step")
    parser.add_argument("--out", default=None,
                        help="CSV to write (default: benchmarks/results/speed.csv; speed_processes.csv with --processes_only)")
    parser.add_argument("--processes", type=int, default=None, metavar="N",
                        help="also time default.yaml on N processes x 1 thread against 1 process x N threads "
                             "(default: 2; none with --quick)")
    parser.add_argument("--processes_only", action="store_true", help="time only those process rows")
    parser.add_argument("--blocks_only", action="store_true",
                        help="time only the block-chain rows, prefix cache on and off (speed_blocks.csv)")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--ddp_child", default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.child:
        child(args.child)
        return 0
    if args.ddp_child:
        ddp_child(args.ddp_child)
        return 0
    start = time.perf_counter()
    if args.blocks_only:
        torch.set_num_threads(args.threads or torch.get_num_threads())
        extra = {**dict(args.override), **({"corpus": args.corpus} if args.corpus else {})}
        preset, overrides = presets(args.quick, extra)["default.yaml"]
        config = load_config(PARAMS / preset, **overrides)
        vocab = len(prepare_data(config.corpus, config.tokenizer, config.min_count, config.lowercase).tokenizer)
        rows, info = blocks_rows(config, vocab, args.quick), machine()
    elif args.processes_only:
        extra = {**dict(args.override), **({"corpus": args.corpus} if args.corpus else {})}
        preset, overrides = presets(args.quick, extra)["default.yaml"]
        warmup, steps = (1, 2) if args.quick else (args.warmup, args.steps)
        rows, info = processes_rows(preset, overrides, args.processes or 2, warmup, steps), machine()
    else:
        rows, info = run_benchmark(args)
    print(markdown(rows, info))
    default_name = "speed_blocks.csv" if args.blocks_only else "speed_processes.csv" if args.processes_only else "speed.csv"
    args.out = args.out or str(ROOT / "benchmarks" / "results" / default_name)
    write_csv(rows, info, Path(args.out))
    print(f"\nwrote {args.out} ({time.perf_counter() - start:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
