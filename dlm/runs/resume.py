"""Resuming a run exactly: what the checkpoints save of the training state (kept_payload for
epoch_NNNN.pt, resume_payload for last.pt), which config keys a resume may change, and restoring
last.pt into a freshly built state (dlm.runs.state.build_state)."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from dlm.core.checkpoint import CheckpointError, save_checkpoint
from dlm.core.config import Config, from_dict, section_keys
from dlm.core.data import Tokenizer
from dlm.runs.rundir import RunDir, RunExistsError
from dlm.runs.state import TrainState

logger = logging.getLogger("dlm")


KEPT_KEYS = ("model", "ema", "config", "vocab", "step", "epoch", "corpus_sha256")  # what kept_payload holds


def kept_payload(state: TrainState, tokenizer: Tokenizer, corpus_sha256: str | None = None) -> dict:
    """An epoch_XXXX.pt checkpoint: the weights (and EMA weights) with what reads them, and the
    SHA-256 of the corpus they were trained on (checked whenever the run reads its corpus again). No
    optimizer state: that is twice the model again, and only last.pt is resumed from (except in a
    wsd run's stable phase: see at_stable_lr)."""
    return {"model": state.model.state_dict(),
            "ema": state.ema.module.state_dict() if state.ema is not None else None,
            "config": state.config.to_dict(), "vocab": tokenizer.to_dict(), "step": state.step, "epoch": state.epoch,
            "corpus_sha256": corpus_sha256}


def write_missing_kept_checkpoint(run: RunDir, payload: dict, due: bool) -> Path | None:
    """The epoch checkpoint of last.pt's epoch, when it was `due` and is missing (its write found the
    disk full, or a kill came between the two writes), written from last.pt, which holds the same
    weights: the path written, named in the log, else None."""
    path = run.epoch_checkpoint(payload["epoch"])
    if not due or path.exists():
        return None
    save_checkpoint(path, {key: payload[key] for key in KEPT_KEYS})
    logger.info("%s was missing (its write failed or was cut short): written from checkpoints/last.pt, which holds "
                "the same step %d", path.relative_to(run.path), payload["step"])
    return path


def resume_payload(state: TrainState, tokenizer: Tokenizer, corpus_sha256: str | None = None) -> dict:
    """last.pt: a kept checkpoint plus all that an exact resume needs."""
    sampler = state.timestep_sampler
    return {**kept_payload(state, tokenizer, corpus_sha256),
            "optimizer": state.optimizer.state_dict(), "scheduler": state.scheduler.state_dict(),
            "ema_n_averaged": int(state.ema.n_averaged) if state.ema is not None else 0,
            "rng": torch.get_rng_state(), "timestep_sampler": sampler.state_dict() if sampler is not None else None}


def at_stable_lr(state: TrainState) -> bool:
    """A wsd run whose next step trains at the full lr (past warm-up, before its cooldown): a state
    dlm cooldown can start from, so its kept checkpoint carries all that a resume needs."""
    scheduler = state.scheduler
    return state.config.lr_decay == "wsd" and scheduler.get_last_lr() == scheduler.base_lrs



# A resumed run keeps its recipe; only how long it trains, what it records and how it executes may change,
# and its peak lr (the way on after a divergence: --resume --lr LOWER).
CHANGEABLE_ON_RESUME = ("epochs", "max_steps", "max_train_seconds", "lr", *section_keys("bookkeeping"),
                        *section_keys("runtime"))


def resumed_config(config: Config, saved: dict, run: RunDir | None = None) -> Config:
    saved_config = from_dict(saved)
    if config.model != saved_config.model:  # the folder's model would train under the other preset's recipe
        command = "dlm train-ar" if saved_config.model == "ar" else "dlm train"
        where = f"'{run.path}'" if run is not None else "The run"
        raise RunExistsError(f"{where} holds a run of model '{saved_config.model}', not '{config.model}': resume it "
                             f"with {command} and its own preset, or choose another --run_dir for the {config.model} run.")
    changed = [k for k, v in config.to_dict().items()
               if k not in CHANGEABLE_ON_RESUME and getattr(saved_config, k) != v]
    if changed:
        logger.info("resume keeps the saved recipe; ignoring changed keys: %s", ", ".join(changed))
    return saved_config.replace(**{k: getattr(config, k) for k in CHANGEABLE_ON_RESUME})


def restore(state: TrainState, payload: dict, path: Path) -> None:
    """last.pt's weights, optimizer, schedule, EMA, timestep sampler, RNG and counters into `state`."""
    sampler_state = payload.get("timestep_sampler") or payload.get("time_warp")  # "time_warp": before two kinds
    if state.timestep_sampler is not None and sampler_state is None:
        raise CheckpointError(
            f"'{path}' holds no state of the timestep sampler its run trains with (time_warp: "
            f"{state.config.time_warp}, timestep_sampling: {state.config.timestep_sampling}): it was written "
            f"without one (by an older dlm, or edited), so it cannot be resumed exactly. Sample or evaluate "
            f"it as it is, or train the run again in a new folder.")
    try:
        state.model.load_state_dict(payload["model"])
        state.optimizer.load_state_dict(payload["optimizer"])
        state.scheduler.load_state_dict(payload["scheduler"])
        if state.ema is not None:
            state.ema.module.load_state_dict(payload["ema"])
            state.ema.n_averaged.fill_(payload["ema_n_averaged"])
        if state.timestep_sampler is not None:
            state.timestep_sampler.load_state_dict(sampler_state)
    except (RuntimeError, ValueError, KeyError) as error:
        raise CheckpointError(f"'{path}' does not match this run: {error}") from None
    torch.set_rng_state(payload["rng"])
    state.step, state.epoch = payload["step"], payload["epoch"]
    saved_lr = payload["config"].get("lr")
    if saved_lr is not None and saved_lr != state.config.lr:
        set_peak_lr(state)
        logger.info("resume: peak lr %g -> %g (the schedule goes on from step %d at the new peak)",
                    saved_lr, state.config.lr, state.step)


def set_peak_lr(state: TrainState) -> None:
    """Give a restored optimizer and schedule the config's peak lr (the saved state holds the old one)."""
    scheduler = state.scheduler
    for index, group in enumerate(state.optimizer.param_groups):
        peak = state.config.lr * (state.config.embedding_lr_scale if group.get("name") == "embedding" else 1.0)
        group["initial_lr"] = scheduler.base_lrs[index] = peak
        group["lr"] = peak * scheduler.lr_lambdas[index](scheduler.last_epoch)
    scheduler._last_lr = [group["lr"] for group in state.optimizer.param_groups]
