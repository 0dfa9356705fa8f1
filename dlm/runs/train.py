"""The training loop: AdamW with explicit parameter groups, warm-up + decay, clipping, EMA,
metrics.csv, scheduled atomic checkpoints and exact resume."""

from __future__ import annotations

import csv
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from tqdm.auto import tqdm  # a widget bar in JupyterLab, a text bar in a terminal

from dlm.core.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from dlm.core.config import Config, from_dict, save_config
from dlm.core.data import Tokenizer, atomic_write_bytes, epoch_windows, fixed_windows, prepare_data, windows_per_epoch
from dlm.core.embeddings import nearest_neighbour_distances
from dlm.core.runtime import autocast, pick_device, resolved_precision
from dlm.families import family
from dlm.runs.build import build_model, build_objective
from dlm.runs.rundir import RunDir

logger = logging.getLogger("dlm")

# Every loss term either model logs (the diffusion loss: total, mse, rounding, prior; the AR
# baseline: total, nll); each objective's `terms` says which of them it fills.
LOSS_TERMS = ("total", "mse", "rounding", "prior", "nll")
METRIC_COLUMNS = (
    "step", "epoch", *LOSS_TERMS, *(f"val_{term}" for term in LOSS_TERMS),
    "embedding_norm", "nn_distance", "lr", "tokens_per_s", "elapsed_s",
)


class RunExistsError(FileExistsError):
    """The run folder already holds a run and --resume was not given."""


def parameter_groups(model, config: Config) -> list[dict]:
    """AdamW groups. By default weight decay only touches weight matrices: decaying the embedding
    table pulls every row toward 0, one road to collapse; norms and biases should not shrink."""
    table = model.embedding.weight
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad or param is table:
            continue
        is_matrix = param.ndim == 2 and name.endswith(".weight")
        (decay if is_matrix or config.weight_decay_scope == "all" else no_decay).append(param)
    table_decay = config.weight_decay if config.weight_decay_scope != "matrices" else 0.0
    groups = [
        {"name": "matrices", "params": decay, "weight_decay": config.weight_decay},
        {"name": "norms+biases", "params": no_decay, "weight_decay": 0.0},
    ]
    if table.requires_grad:
        groups.append({"name": "embedding", "params": [table], "weight_decay": table_decay,
                       "lr": config.lr * config.embedding_lr_scale})
    for group in groups:
        group.setdefault("lr", config.lr)
    return [g for g in groups if g["params"]]


def lr_factor(step: int, config: Config, total_steps: int) -> float:
    """Linear warm-up, then linear / cosine decay to 10% (or constant)."""
    if step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    if config.lr_decay == "constant" or total_steps <= config.warmup_steps:
        return 1.0
    progress = min(1.0, (step - config.warmup_steps) / (total_steps - config.warmup_steps))
    if config.lr_decay == "cosine":
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))
    return 1.0 - 0.9 * progress


def build_optimizer(model, config: Config) -> torch.optim.AdamW:
    """AdamW over `parameter_groups`, betas (0.9, 0.98)."""
    return torch.optim.AdamW(parameter_groups(model, config), lr=config.lr, betas=(0.9, 0.98))


def train_step(model, diffusion, optimizer, ids: torch.Tensor, config: Config,
               scheduler=None, ema=None) -> dict[str, torch.Tensor]:
    """One optimizer step on a batch of token ids: the loss, backward, clipping, AdamW, the lr
    schedule and the EMA. Returns the loss terms (detached scalars). The training loop and
    benchmarks/speed.py both call this, so the benchmark times exactly what training runs."""
    with autocast(config.precision, ids.device):
        losses = diffusion.training_losses(model, ids)
    optimizer.zero_grad(set_to_none=True)
    losses["total"].backward()
    if config.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
    optimizer.step()
    if scheduler is not None:
        scheduler.step()
    if ema is not None:
        ema.update_parameters(model)
    return {term: value.detach() for term, value in losses.items()}


@torch.no_grad()
def embedding_stats(table: torch.Tensor, max_rows: int = 2048) -> dict[str, float]:
    """Mean row norm, and the mean distance from a row to its nearest other row (on up to
    `max_rows` rows): shrinking or merging embeddings show up here before samples fail."""
    table = table.detach().float()
    return {"embedding_norm": table.norm(dim=-1).mean().item(),
            "nn_distance": nearest_neighbour_distances(table, rows=max_rows).mean().item()}


@torch.no_grad()
def validation_losses(model, diffusion, windows: torch.Tensor, config: Config, device) -> dict[str, float]:
    """Loss terms on fixed validation windows with fixed noise, so epochs are comparable."""
    if len(windows) == 0:
        return {}
    generator = torch.Generator().manual_seed(1234)
    was_training = model.training
    model.eval()
    sums = dict.fromkeys(diffusion.terms, 0.0)
    batches = 0
    for start in range(0, min(len(windows), config.val_batches * config.batch_size), config.batch_size):
        ids = windows[start: start + config.batch_size].to(device)
        with autocast(config.precision, device):
            losses = diffusion.training_losses(model, ids, generator=generator, uniform_t=True)
        for term in diffusion.terms:
            sums[term] += losses[term].item()
        batches += 1
    model.train(was_training)
    return {f"val_{term}": value / batches for term, value in sums.items()}


class MetricsWriter:
    """metrics.csv, one row per log interval (and one per epoch end, with validation losses)."""

    def __init__(self, path: Path, keep_until_step: int | None = None):
        self.path = path
        if keep_until_step is not None and path.exists():
            # On resume, drop rows logged after the checkpoint so the file reads as one run.
            with open(path, newline="") as handle:
                rows = [r for r in csv.DictReader(handle) if int(r["step"]) <= keep_until_step]
            self._rewrite(rows)
        elif not path.exists():
            self._rewrite([])

    def _rewrite(self, rows: list[dict]) -> None:
        lines = [",".join(METRIC_COLUMNS)] + [",".join(str(r.get(c, "")) for c in METRIC_COLUMNS) for r in rows]
        atomic_write_bytes(self.path, ("\n".join(lines) + "\n").encode())

    def write(self, row: dict) -> None:
        with open(self.path, "a", newline="") as handle:
            csv.DictWriter(handle, METRIC_COLUMNS, extrasaction="ignore").writerow(
                {k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()}
            )


def _terms_text(values: dict, names) -> str:
    text = ", ".join(f"{name.removeprefix('val_')} {values[name]:.4f}" for name in names)
    if "nll" in names or "val_nll" in names:  # the AR baseline: say it as a perplexity too
        text += f", ppl {math.exp(values['nll' if 'nll' in names else 'val_nll']):.1f}"
    return text


@dataclass
class TrainResult:
    run_dir: Path
    step: int
    epoch: int
    last_metrics: dict
    wall_s: float


def train(config: Config, run_dir: str | Path, resume: bool = False) -> TrainResult:
    run = RunDir(run_dir)
    device = pick_device(config.device)
    if config.threads:
        torch.set_num_threads(config.threads)
    payload = None
    if resume:
        payload = load_checkpoint(run.last_checkpoint)
        saved = from_dict(payload["config"])
        # A resumed run keeps its recipe; only how long it trains and how it logs may change.
        changeable = {"epochs", "max_steps", "max_train_seconds", "log_every", "checkpoint_every", "device", "threads",
                      "progress", "val_batches", "precision", "compile"}
        changed = [k for k, v in config.to_dict().items() if k not in changeable and getattr(saved, k) != v]
        if changed:
            logger.info("resume keeps the saved recipe; ignoring changed keys: %s", ", ".join(changed))
        config = saved.replace(**{k: getattr(config, k) for k in changeable})
    elif run.has_run():
        raise RunExistsError(
            f"'{run.path}' already holds a run. Continue it (--resume on the command line, resume=True in "
            f"train.ipynb), or choose a new run folder."
        )
    run.path.mkdir(parents=True, exist_ok=True)

    torch.manual_seed(config.seed)
    tokenizer = Tokenizer.from_dict(payload["vocab"]) if payload else None
    data = prepare_data(config.corpus, config.tokenizer, config.min_count, config.lowercase,
                        tokenizer, config.max_train_tokens)
    tokenizer = data.tokenizer
    model = build_model(config, tokenizer).to(device)
    diffusion = build_objective(config)  # the diffusion loss, or next-token CE for model: ar
    terms = diffusion.terms
    warp = getattr(diffusion, "time_warp", None)  # measured during training, so it is checkpointed
    optimizer = build_optimizer(model, config)
    ema = (AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(config.ema_decay))
           if config.ema_decay > 0 else None)
    if config.compile:
        # in place: parameter names and checkpoints stay the same
        family(config.model).trunk(model).compile()

    epoch_size = windows_per_epoch(len(data.train_ids), config.seq_len)
    steps_per_epoch = math.ceil(epoch_size / config.batch_size)
    total_steps = config.max_steps if config.max_steps is not None else config.epochs * steps_per_epoch
    budget_s = config.max_train_seconds
    first_step, start = 0, time.perf_counter()  # for planned_steps; set again where the loop starts

    def planned_steps(current: int) -> int:
        """The step the lr schedule decays towards: the last one, or under a time budget the
        step the budget will reach at this invocation's pace so far (re-estimated every step)."""
        if budget_s is None or current <= first_step:
            return total_steps
        elapsed = max(time.perf_counter() - start, 1e-9)
        return max(current + 1, first_step + round((current - first_step) * budget_s / elapsed))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, config, planned_steps(s)))

    step, epoch = 0, 0
    if payload:
        try:
            model.load_state_dict(payload["model"])
            optimizer.load_state_dict(payload["optimizer"])
            scheduler.load_state_dict(payload["scheduler"])
            if ema is not None:
                ema.module.load_state_dict(payload["ema"])
                ema.n_averaged.fill_(payload["ema_n_averaged"])
            if warp is not None:
                warp.load_state_dict(payload["time_warp"])
        except (RuntimeError, ValueError, KeyError) as error:
            raise CheckpointError(f"'{run.last_checkpoint}' does not match this run: {error}") from None
        torch.set_rng_state(payload["rng"])
        step, epoch = payload["step"], payload["epoch"]
    else:
        save_config(config, run.config)
        tokenizer.save(run.vocab)
    metrics = MetricsWriter(run.metrics, keep_until_step=step if payload else None)
    val_windows = fixed_windows(data.val_ids, config.seq_len)

    n_params = sum(p.numel() for p in model.parameters())
    logger.info("device %s (%s) | vocab %d | %d train windows/epoch | %d steps/epoch | %s | %.2fM params",
                device, resolved_precision(config.precision, device), len(tokenizer), epoch_size, steps_per_epoch,
                f"{total_steps} steps total" if budget_s is None else f"{budget_s:g} s of training",
                n_params / 1e6)
    for group in optimizer.param_groups:
        logger.info("  param group %-12s %8d params, weight_decay %g, peak lr %g", group["name"],
                    sum(p.numel() for p in group["params"]), group["weight_decay"], group["initial_lr"])

    def checkpoint(path: Path) -> None:
        save_checkpoint(path, {
            "model": model.state_dict(), "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "ema": ema.module.state_dict() if ema is not None else None,
            "ema_n_averaged": int(ema.n_averaged) if ema is not None else 0,
            "config": config.to_dict(), "vocab": tokenizer.to_dict(),
            "step": step, "epoch": epoch, "rng": torch.get_rng_state(),
            "time_warp": warp.state_dict() if warp is not None else None,
        })

    bar = tqdm(total=None if budget_s else total_steps, initial=step, disable=not config.progress, desc="train",
               unit="step", ascii=True)
    first_step, start = step, time.perf_counter()
    out_of_time = False
    interval_start, interval_tokens = start, 0
    # Loss sums stay on the device (float64, the same sums as Python floats) so that a CUDA step
    # never waits for the GPU; they are read once per log interval.
    sums = torch.zeros(len(terms), dtype=torch.float64, device=device)
    interval_steps = 0
    row: dict = {}
    model.train()
    while step < total_steps and not out_of_time:
        epoch += 1
        generator = torch.Generator().manual_seed(config.seed * 1_000_003 + epoch)
        windows = epoch_windows(data.train_ids, config.seq_len, generator)
        if device.type == "cuda":
            windows = windows.pin_memory()  # so that .to(device, non_blocking=True) is asynchronous
        for first in range(0, len(windows), config.batch_size):
            ids = windows[first: first + config.batch_size].to(device, non_blocking=True)
            losses = train_step(model, diffusion, optimizer, ids, config, scheduler, ema)
            step += 1
            interval_steps += 1
            interval_tokens += ids.numel()
            sums += torch.stack([losses[term] for term in terms]).double()
            bar.update(1)
            out_of_time = budget_s is not None and time.perf_counter() - start >= budget_s
            if step % config.log_every == 0 or step == total_steps or out_of_time:
                now = time.perf_counter()
                means = {term: value / interval_steps for term, value in zip(terms, sums.tolist())}
                row = {"step": step, "epoch": epoch, **means,
                       **embedding_stats(model.embedding.table()), "lr": scheduler.get_last_lr()[0],
                       "tokens_per_s": interval_tokens / (now - interval_start), "elapsed_s": now - start}
                metrics.write(row)
                left_s = (budget_s - (now - start) if budget_s is not None
                          else (total_steps - step) * (now - start) / max(1, step - first_step))
                logger.info("step %6d/%d | epoch %4d | loss %.4f (%s) | |E| %.3f, nn %.3f | lr %.2e | %.0f tok/s | eta %d:%02d",
                            step, total_steps, epoch, row["total"], _terms_text(row, terms[1:]), row["embedding_norm"],
                            row["nn_distance"], row["lr"], row["tokens_per_s"], *divmod(max(0, round(left_s)), 60))
                sums.zero_()
                interval_steps, interval_tokens, interval_start = 0, 0, time.perf_counter()
            if step >= total_steps or out_of_time:
                break
        # Every epoch has the same number of steps, so this is an epoch end unless max_steps or the clock cut it.
        val = validation_losses(ema.module if ema is not None else model, diffusion, val_windows, config, device)
        if val:
            row = {**row, "step": step, "epoch": epoch, **val, "elapsed_s": time.perf_counter() - start}
            metrics.write({k: row.get(k, "") for k in ("step", "epoch", *val, "elapsed_s")})
            logger.info("epoch %4d | val loss %.4f (%s)", epoch, val["val_total"],
                        _terms_text(val, [f"val_{term}" for term in terms[1:]]))
        if epoch % config.checkpoint_every == 0 or step >= total_steps or out_of_time:
            checkpoint(run.epoch_checkpoint(epoch))
        checkpoint(run.last_checkpoint)
    bar.close()
    return TrainResult(run.path, step, epoch, row, time.perf_counter() - start)
