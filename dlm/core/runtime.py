"""How a run executes on this machine: which device, which precision, the autocast context, and
the process group of a distributed run (`torchrun`: gloo on the CPU, nccl on CUDA).

`precision: auto` is decided by what the machine does, not by its CPU flags: on CUDA it is bf16;
on a CPU a short probe times a few forward+backward steps of a TinyTransformer-sized MLP in
float32 and under bf16 autocast, once per machine (CPU model, torch version, thread count), and
bf16 is used where it is at least BF16_MARGIN times faster. The measurement is cached in
$XDG_CACHE_HOME/dlm/precision.json (default ~/.cache), so later runs do not probe again, unless it
was timed on a busy machine (then a later run on a quieter one measures again).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from dlm.core.config import ConfigError
from dlm.core.data import atomic_write_bytes, cache_dir

logger = logging.getLogger("dlm")

# bf16 rounds every matmul input to 8 bits of mantissa; below this speed-up that is not worth it
# (AVX512-BF16 without AMX measured 1.07x on default.yaml; AMX 1.6x, with the same sample quality).
BF16_MARGIN = 1.3


def pick_device(name: str = "auto") -> torch.device:
    """auto (CUDA when a GPU is visible, else the CPU), cpu, cuda or cuda:N; anything else is refused."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    kind, colon, index = str(name).partition(":")
    if kind not in ("cpu", "cuda") or (colon and not (kind == "cuda" and index.isdigit())):
        raise ConfigError(f"device '{name}' is not one dlm runs on: use auto, cpu, cuda or cuda:N.")
    if kind == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device: cuda was asked for but no CUDA GPU is visible; use device: auto or cpu.")
    if colon and int(index) >= torch.cuda.device_count():
        raise ConfigError(f"device '{name}': this machine has {torch.cuda.device_count()} CUDA GPU(s), "
                          f"numbered from 0; use cuda:0 or auto.")
    return torch.device(name)


BUSY_LOAD = 0.75  # a probe timed while the 1-minute load per core was above this is measured again later


def load_per_core() -> float:
    """The 1-minute load average per core: how busy the machine was while a probe ran."""
    try:
        return os.getloadavg()[0] / (os.cpu_count() or 1)
    except OSError:  # pragma: no cover - not on Linux/macOS
        return 0.0


@dataclass
class PrecisionProbe:
    """One machine's measurement: seconds per probe step in float32 and under bf16 autocast, and
    the load per core it was taken at (a busy machine's timings may say little)."""
    machine: str
    fp32_s: float
    bf16_s: float
    load: float = 0.0

    @property
    def busy(self) -> bool:
        return self.load > BUSY_LOAD

    @property
    def speedup(self) -> float:
        return self.fp32_s / self.bf16_s

    @property
    def precision(self) -> str:
        return choose_precision(self.fp32_s, self.bf16_s)


def choose_precision(fp32_s: float, bf16_s: float, margin: float = BF16_MARGIN) -> str:
    """bf16 where it is at least `margin` times faster than float32, else fp32."""
    return "bf16" if fp32_s >= margin * bf16_s else "fp32"


def machine_key() -> str:
    """What the probe's answer depends on: the CPU model, torch's version, the thread count."""
    model = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return f"{model} | torch {torch.__version__} | {torch.get_num_threads()} threads"


def time_probe(width: int = 256, budget_s: float = 0.2, max_steps: int = 10) -> tuple[float, float]:
    """Seconds per forward+backward step of a TinyTransformer-sized MLP block (width -> 4 width ->
    width) in float32 and under bf16 autocast, the way training runs it: the fastest of up to
    `max_steps` timed steps (about `budget_s` each way) after an untimed one. The batch grows
    from 128 tokens until a float32 step takes 10 ms (4096 tokens, default.yaml's batch, at most),
    so a fast machine is timed on a real load. bf16 stops after one timed step that is no faster
    than float32. Well under 2 s in all, even on a slow, busy CPU."""
    generator = torch.Generator().manual_seed(0)

    def step(x: torch.Tensor, context) -> float:
        start = time.perf_counter()
        with context():
            y = block(x)
        y.float().square().mean().backward()
        return time.perf_counter() - start

    def fastest(x: torch.Tensor, context, give_up_above: float = float("inf")) -> float:
        spent = step(x, context)  # untimed: first-call costs (weight casts, allocator)
        times: list[float] = []
        while len(times) < max_steps and (len(times) < 2 or spent < budget_s):
            times.append(step(x, context))
            spent += times[-1]
            if times[-1] >= give_up_above:
                break
        return min(times)

    # Wherever the first `auto` is resolved (inside a sampler's inference mode, under autocast,
    # mid-training), the probe runs with gradients, in float32, and leaves the global RNG as it was.
    with (torch.random.fork_rng(devices=[]), torch.inference_mode(False), torch.enable_grad(),
          torch.autocast("cpu", enabled=False)):
        block = torch.nn.Sequential(torch.nn.Linear(width, 4 * width), torch.nn.GELU(),
                                    torch.nn.Linear(4 * width, width))
        tokens = 128
        x = torch.randn(tokens, width, generator=generator)
        while step(x, contextlib.nullcontext) < 0.01 and tokens < 4096:
            tokens *= 2
            x = torch.randn(tokens, width, generator=generator)
        fp32 = fastest(x, contextlib.nullcontext)
        bf16 = fastest(x, lambda: torch.autocast("cpu", dtype=torch.bfloat16), give_up_above=fp32)
    return fp32, bf16


def probe_cache() -> Path:
    return cache_dir() / "precision.json"


def shown(path: Path) -> str:
    """A path as a log line shows it: under the home folder as ~/..., so no page or log that is
    shared names the machine's user folders."""
    try:
        return "~/" + str(path.relative_to(Path.home()))
    except ValueError:
        return str(path)


_measured: dict[str, PrecisionProbe] = {}  # this process's answers, by machine_key()


def cpu_precision_probe() -> PrecisionProbe:
    """This machine's probe: from this process's memory, else the cache file, else measured now
    (and written to the cache file)."""
    key = machine_key()
    if key in _measured:
        return _measured[key]
    path = probe_cache()
    try:
        cached = json.loads(path.read_text())
    except (OSError, ValueError):
        cached = {}
    entry = cached.get(key) if isinstance(cached, dict) else None
    probe = None
    if isinstance(entry, dict) and {"fp32_s", "bf16_s"} <= set(entry):
        probe = PrecisionProbe(key, float(entry["fp32_s"]), float(entry["bf16_s"]), float(entry.get("load", 0.0)))
        where = f"cached in {shown(path)}"
    load = load_per_core()
    # A probe timed on a busy machine is provisional: measured again whenever the machine is quieter.
    if probe is None or (probe.busy and load < probe.load):
        again = probe is not None
        probe = PrecisionProbe(key, *time_probe(), load)
        where = (f"{'measured again (the cached probe ran on a busy machine)' if again else 'measured now'}, "
                 f"cached in {shown(path)}")
        cached = cached if isinstance(cached, dict) else {}
        cached[key] = {k: v for k, v in asdict(probe).items() if k != "machine"}
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(path, (json.dumps(cached, indent=1) + "\n").encode())
    if probe.busy:
        where += f"; timed at load {probe.load:.1f} per core, so it is measured again once the machine is quieter"
    logger.info("precision auto: %s on this CPU (bf16 step %.2fx as fast as fp32, needs %.1fx; %s)",
                probe.precision, probe.speedup, BF16_MARGIN, where)
    _measured[key] = probe
    return probe


def resolved_precision(precision: str, device: torch.device | str) -> str:
    """Config.precision made concrete: fp32 and bf16 as given; auto is bf16 on CUDA, and on a CPU
    what the probe found (bf16 where it is BF16_MARGIN times faster)."""
    if precision != "auto":
        return precision
    device = torch.device(device)
    if device.type == "cuda":
        return "bf16"
    return cpu_precision_probe().precision if device.type == "cpu" else "fp32"


def autocast(precision: str, device: torch.device | str) -> contextlib.AbstractContextManager:
    """The autocast context for Config.precision: bfloat16 matmuls when it resolves to bf16,
    nothing for fp32. Enter it around forward passes only, not backward."""
    device = torch.device(device)
    if resolved_precision(precision, device) == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


# ---------------------------------------------------------------------------------------------
# Distributed runs: one process per rank, started by torchrun (or `dlm train --nproc N`).


@dataclass(frozen=True)
class Ranks:
    """Where this process stands in its run: rank, world size, local rank (its GPU on a node)."""
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that writes the run folder."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def shard(self, count: int) -> tuple[int, int]:
        """This rank's contiguous share [start, stop) of `count` items: count // world_size each,
        the first count % world_size ranks one more."""
        base, extra = divmod(count, self.world_size)
        start = self.rank * base + min(self.rank, extra)
        return start, start + base + (self.rank < extra)


def check_global_batch(batch_size: int, processes: int) -> None:
    """batch_size is the global batch: each of the processes takes an equal share of it."""
    if processes > 1 and batch_size % processes:
        raise ConfigError(f"batch_size is the global batch ({batch_size} windows a step); it must divide by the "
                          f"{processes} processes. Use a multiple of {processes}.")


def ranks_from_env() -> Ranks:
    """The ranks torchrun gives this process in RANK, WORLD_SIZE and LOCAL_RANK (one rank without them)."""
    return Ranks(int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
                 int(os.environ.get("LOCAL_RANK", 0)))


def current_ranks() -> Ranks:
    """This process's ranks in the process group it has joined (one rank when none)."""
    if not (dist.is_available() and dist.is_initialized()):
        return Ranks()
    return Ranks(dist.get_rank(), dist.get_world_size(), ranks_from_env().local_rank)


_started_group = False  # whether init_distributed started the group (and so destroy_distributed ends it)


def init_distributed(device: torch.device) -> tuple[Ranks, torch.device]:
    """Join torchrun's process group when there is more than one rank: nccl on CUDA (each rank on
    the GPU of its LOCAL_RANK), gloo on the CPU. Returns the ranks and the device to train on.
    A single process (no torchrun, or --nproc_per_node 1) starts no group."""
    ranks = ranks_from_env()
    if not ranks.distributed:
        return ranks, device
    if device.type == "cuda":
        device = torch.device("cuda", ranks.local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        global _started_group
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        _started_group = True
    return current_ranks(), device


def destroy_distributed() -> None:
    """Leave the process group init_distributed started (one started by the caller stays)."""
    global _started_group
    if _started_group and dist.is_initialized():
        dist.destroy_process_group()
    _started_group = False


def barrier() -> None:
    """Wait for every rank (nothing in a single process)."""
    if distributed_active():
        dist.barrier()


def distributed_active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum `tensor` over the ranks, in place (nothing in a single process). Returns it."""
    if not distributed_active():
        return tensor
    if dist.get_backend() == "nccl" and tensor.device.type != "cuda":  # nccl reduces GPU tensors only
        on_gpu = tensor.cuda()
        dist.all_reduce(on_gpu, op=dist.ReduceOp.SUM)
        return tensor.copy_(on_gpu)
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def broadcast_float(value: float) -> float:
    """Rank 0's `value` on every rank (the value itself in a single process)."""
    if not distributed_active():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]
