"""dlm cooldown: one long wsd run (lr_decay: wsd) gives every shorter budget. A kept checkpoint of
its stable phase, at step k, goes on in a NEW run folder for K more steps while the lr decays
linearly from the stable lr to 0: the run a fresh wsd run of k + K steps with a cooldown of K would
have been, step for step (Hagele et al. 2024, arXiv 2405.18392)."""

from __future__ import annotations

from pathlib import Path

from dlm.core.checkpoint import load_checkpoint
from dlm.core.config import ConfigError, from_dict, section_keys
from dlm.core.data import check_run_folder
from dlm.core.errors import UserError
from dlm.core.runtime import ranks_from_env
from dlm.runs.train import Start, TrainResult, train

# What a cooldown may set besides its length: what the run records and how it executes.
COOLDOWN_OVERRIDES = (*section_keys("bookkeeping"), *section_keys("runtime"))
RESUME_KEYS = ("optimizer", "scheduler", "rng")  # what a checkpoint needs to be gone on from exactly


def check_destination_folder(run_dir: str | Path) -> Path:
    """A new run folder: missing or empty (a cooldown never writes into another run)."""
    path = check_run_folder(run_dir, "--run_dir")
    if path.is_dir() and any(path.iterdir()):
        raise UserError(f"--run_dir '{path}' is not empty: a cooldown starts a new run folder; choose a new one.")
    return path


def stable_start(checkpoint: str | Path) -> dict:
    """The checkpoint's payload, checked: a wsd run's, with what a resume needs, at its stable lr."""
    path = Path(checkpoint)
    if not path.is_file():
        raise UserError(f"--from '{path}' is not a checkpoint file: give one of a wsd run's kept checkpoints, "
                        f"RUN/checkpoints/epoch_NNNN.pt.")
    payload = load_checkpoint(path, require=("config", "vocab", "model", "step", "epoch"))
    decay = payload["config"].get("lr_decay")
    if decay != "wsd":
        raise UserError(f"'{path}' is from a run with lr_decay {decay}, whose lr already decays over the whole run: "
                        f"cool down from a run trained with --lr_decay wsd.")
    scheduler = payload.get("scheduler") or {}
    stable = all(key in payload for key in RESUME_KEYS) and scheduler.get("_last_lr") == scheduler.get("base_lrs")
    if not stable:
        raise UserError(f"'{path}' (step {payload['step']}) is from its run's warm-up or cooldown, not at the stable "
                        f"lr: cool down from a kept checkpoint between them (those hold the optimizer state).")
    return payload


def cooldown_config(payload: dict, cooldown_steps: int, overrides: dict | None = None):
    """The checkpoint's config with a wsd schedule that ends K steps on: max_steps k + K, a cooldown
    of K; and the keys that changed, {key: [before, after]}."""
    overrides = dict(overrides or {})
    refused = sorted(set(overrides) - set(COOLDOWN_OVERRIDES))
    if refused:
        raise ConfigError(f"A cooldown keeps its run's recipe; it cannot set {', '.join(refused)} (only what a run "
                          f"records and how it executes: {', '.join(COOLDOWN_OVERRIDES)}).")
    before = from_dict(payload["config"])
    config = before.replace(**overrides, max_steps=payload["step"] + cooldown_steps, lr_cooldown_steps=cooldown_steps,
                            max_train_seconds=None)
    changed = {key: [value, getattr(config, key)] for key, value in before.to_dict().items()
               if getattr(config, key) != value}
    return config, changed


def cooldown(checkpoint: str | Path, run_dir: str | Path, cooldown_steps: int,
             overrides: dict | None = None) -> TrainResult:
    """Train `cooldown_steps` more steps from a kept checkpoint of a wsd run's stable phase into the
    new folder `run_dir`, the lr decaying linearly to 0. Everything is checked before anything is
    written."""
    if ranks_from_env().distributed:
        raise UserError("dlm cooldown runs in one process: start it without torchrun; once it kept a checkpoint, "
                        "go on with dlm train RUN/config.yaml --run_dir RUN --resume --nproc N.")
    if isinstance(cooldown_steps, bool) or not isinstance(cooldown_steps, int) or cooldown_steps < 1:
        raise UserError(f"--cooldown_steps must be a number of steps, at least 1; got {cooldown_steps}.")
    check_destination_folder(run_dir)
    payload = stable_start(checkpoint)
    config, changed = cooldown_config(payload, cooldown_steps, overrides)
    return train(config, run_dir, start=Start(payload, Path(checkpoint), changed))
