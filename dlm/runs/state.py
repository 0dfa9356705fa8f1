"""The training state and one optimizer step: the model, its family's objective, AdamW with
explicit parameter groups, warm-up + decay, the EMA, the run's pace (steps or a time budget).
dlm.runs.train loops over it, dlm.runs.resume saves and restores it, benchmarks/speed.py times its
step: none of them imports another through it."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from dlm.core.config import Config
from dlm.core.noise import WindowKeys
from dlm.core.runtime import Ranks, autocast, broadcast_float
from dlm.families import family
from dlm.runs.build import build_objective


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


def cooldown_steps(config: Config, total_steps: int) -> int:
    """The steps a wsd run's lr decays over: lr_cooldown_steps, else its fraction of the run (at least one)."""
    if config.lr_cooldown_steps is not None:
        return config.lr_cooldown_steps
    return max(1, round(config.lr_cooldown_fraction * total_steps))


def lr_factor(step: int, config: Config, total_steps: int) -> float:
    """Linear warm-up, then linear / cosine decay to 10% (or constant); wsd: constant, then linear
    to 0 over the cooldown's last steps (the warm-up wins where the two overlap)."""
    if config.lr_decay == "wsd":
        warm = (step + 1) / config.warmup_steps if step < config.warmup_steps else 1.0
        return min(warm, max(0.0, (total_steps - step) / cooldown_steps(config, total_steps)))
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


class ObjectiveModule(nn.Module):
    """The model and its objective as one module whose forward is the loss: what a distributed
    run wraps in DistributedDataParallel (the objective calls the model's parts, not its forward)."""

    def __init__(self, model: nn.Module, objective):
        super().__init__()
        self.model, self.objective = model, objective

    def forward(self, ids: torch.Tensor, keys: WindowKeys | None = None) -> dict[str, torch.Tensor]:
        return self.objective.training_losses(self.model, ids, keys=keys)


def train_step(model, objective, optimizer, ids: torch.Tensor, config: Config, *,
               scheduler=None, ema=None, keys: WindowKeys | None = None, loss_module: nn.Module | None = None,
               loss_scale: float = 1.0) -> dict[str, torch.Tensor]:
    """One optimizer step on a batch of token ids: the family objective's loss, backward, clipping,
    AdamW, the lr schedule and the EMA. Returns the loss terms (detached scalars). The training loop and
    benchmarks/speed.py both call this, so the benchmark times exactly what training runs.

    `keys` seed the batch's draws (see dlm.core.noise); `loss_module` is the distributed run's
    DistributedDataParallel(ObjectiveModule), which averages the gradients over the processes;
    `loss_scale` weighs a process's shard when the shards of a batch differ in size."""
    with autocast(config.precision, ids.device):
        losses = (loss_module(ids, keys) if loss_module is not None
                  else objective.training_losses(model, ids, keys=keys))
    optimizer.zero_grad(set_to_none=True)
    (losses["total"] if loss_scale == 1.0 else losses["total"] * loss_scale).backward()
    if config.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
    optimizer.step()
    if scheduler is not None:
        scheduler.step()
    if ema is not None:
        ema.update_parameters(model)
    return {term: value.detach() for term, value in losses.items()}


@dataclass
class Pace:
    """How long training runs: `total_steps`, or with a time budget as long as the clock allows.
    The lr schedule decays towards `planned_steps`, which under a budget is re-estimated every step."""
    total_steps: int
    budget_s: float | None = None
    first_step: int = 0  # where this invocation started (a resumed run starts later)
    start: float = field(default_factory=time.perf_counter)
    shared_elapsed: float | None = None  # a distributed run's clock: rank 0's, read at each step

    def restart(self, step: int) -> None:
        self.first_step, self.start = step, time.perf_counter()

    def elapsed(self) -> float:
        return self.shared_elapsed if self.shared_elapsed is not None else time.perf_counter() - self.start

    def share_clock(self) -> None:
        """Every process takes rank 0's elapsed time, so that under a time budget all of them plan
        the same lr schedule and stop at the same step."""
        self.shared_elapsed = broadcast_float(time.perf_counter() - self.start)

    def out_of_time(self) -> bool:
        return self.budget_s is not None and self.elapsed() >= self.budget_s

    def seconds_left(self, current: int) -> float:
        """What the budget leaves, or the remaining steps at this invocation's pace so far (the ETA)."""
        if self.budget_s is not None:
            return self.budget_s - self.elapsed()
        return (self.total_steps - current) * self.elapsed() / max(1, current - self.first_step)

    def planned_steps(self, current: int) -> int:
        """The last step, or under a time budget the step the budget will reach at this
        invocation's pace so far."""
        if self.budget_s is None or current <= self.first_step:
            return self.total_steps
        elapsed = max(self.elapsed(), 1e-9)
        return max(current + 1, self.first_step + round((current - self.first_step) * self.budget_s / elapsed))


@dataclass(kw_only=True)
class TrainState:
    """What one optimizer step needs and changes; what last.pt saves of it: dlm.runs.resume."""
    config: Config
    model: nn.Module
    objective: Any  # the family's objective (dlm.families.contract.Objective): its training losses
    optimizer: torch.optim.AdamW
    scheduler: torch.optim.lr_scheduler.LambdaLR
    ema: AveragedModel | None
    pace: Pace
    step: int = 0
    epoch: int = 0
    ranks: Ranks = field(default_factory=Ranks)
    loss_module: nn.Module | None = None  # a distributed run's DistributedDataParallel(ObjectiveModule)

    @property
    def timestep_sampler(self):
        """The objective's measured timestep density (time_warp, timestep_sampling), checkpointed
        with the run."""
        return self.objective.timestep_sampler

    @property
    def eval_model(self) -> nn.Module:
        """The EMA weights when there are any: what validation and sampling use."""
        return self.ema.module if self.ema is not None else self.model

    def train_on(self, ids: torch.Tensor, first: int = 0, batch_size: int | None = None) -> dict[str, torch.Tensor]:
        """One optimizer step (train_step), counted, on a batch or, in a distributed run, on this
        process's shard of it: the windows first .. first + len(ids) of a global batch of `batch_size`."""
        batch_size = batch_size or len(ids)
        keys = WindowKeys.batch(self.config.seed, self.step, len(ids), first)
        losses = train_step(self.model, self.objective, self.optimizer, ids, self.config,
                            scheduler=self.scheduler, ema=self.ema, keys=keys, loss_module=self.loss_module,
                            loss_scale=len(ids) * self.ranks.world_size / batch_size)
        self.step += 1
        return losses

    def distribute(self, device: torch.device) -> None:
        """Wrap the model and objective in DistributedDataParallel (after a resume has loaded the
        weights; it starts every process from rank 0's). The state's model stays the plain one:
        checkpoints hold its state_dict, without DDP's `module.` prefixes."""
        if self.ranks.distributed:
            self.loss_module = DistributedDataParallel(
                ObjectiveModule(self.model, self.objective),
                device_ids=[device.index] if device.type == "cuda" else None)


def build_state(config: Config, model: nn.Module, total_steps: int) -> TrainState:
    """Around a model (already on its device): the family's objective, AdamW over the parameter
    groups, the lr schedule, the EMA copy, torch.compile when asked. train() and
    benchmarks/speed.py both build their state here."""
    objective = build_objective(config)
    optimizer = build_optimizer(model, config)
    ema = (AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(config.ema_decay))
           if config.ema_decay > 0 else None)
    if config.compile:
        family(config.model).trunk(model).compile()  # in place: parameter names and checkpoints stay the same
    pace = Pace(total_steps, config.max_train_seconds)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, config, pace.planned_steps(s)))
    return TrainState(config=config, model=model, objective=objective, optimizer=optimizer, scheduler=scheduler,
                      ema=ema, pace=pace)
