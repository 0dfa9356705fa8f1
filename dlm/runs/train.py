"""Training in three stages: build the state (dlm.runs.state: model, objective, AdamW with explicit
parameter groups, warm-up + decay, EMA), resume it from last.pt, and the loop (clipping, metrics.csv,
validation, scheduled atomic checkpoints) with its hooks. Resume is exact. What the checkpoints
save and the resume itself are in dlm.runs.resume, metrics.csv in dlm.runs.metrics, the run folder's
lock in dlm.runs.rundir."""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm  # a widget bar in JupyterLab, a text bar in a terminal

from dlm import families
from dlm.core import data as dlm_data
from dlm.core.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from dlm.core.config import Config, save_config
from dlm.core.data import (
    CorpusData,
    Tokenizer,
    check_corpus,
    epoch_windows,
    fixed_windows,
    prepare_data,
    saved_tokenizer,
    tokenizer_file_name,
    windows_per_epoch,
)
from dlm.core.embeddings import nearest_neighbour_distances
from dlm.core.errors import DiskFullError
from dlm.core.noise import WindowKeys
from dlm.core.runtime import (
    Ranks,
    all_reduce_sum,
    autocast,
    barrier,
    check_global_batch,
    current_ranks,
    destroy_distributed,
    init_distributed,
    pick_device,
    resolved_precision,
)
from dlm.runs import curves as tensorboard_curves
from dlm.runs.build import LoadedRun, build_model
from dlm.runs.metrics import MetricsWriter
from dlm.runs.provenance import invocation, record_invocation
from dlm.runs.resume import (
    KEPT_KEYS,
    at_stable_lr,
    kept_payload,
    restore,
    resume_payload,
    resumed_config,
    write_missing_kept_checkpoint,
)
from dlm.runs.rundir import RunDir, RunExistsError, RunLock, listing
from dlm.runs.sample import SampleOptions, generate
from dlm.runs.state import TrainState, build_state

logger = logging.getLogger("dlm")

# What a checkpoint write that found the disk full asks of the user.
FREE_CHECKPOINT_SPACE = "Free space on that disk (df -h shows what is left; older checkpoints/epoch_*.pt can go)."


class DivergedError(RuntimeError):
    """A loss term or the weights became NaN or inf; the last good checkpoint is kept."""


class Diverged(Exception):
    """Raised inside the loop at the first non-finite loss term (or weights); train() turns it
    into a DivergedError that says what was kept and how to go on."""

    def __init__(self, step: int, term: str, value: float):
        super().__init__(f"step {step}: {term} {value}")
        self.step, self.term, self.value = step, term, value


@torch.no_grad()
def embedding_stats(table: torch.Tensor, max_rows: int = 2048) -> dict[str, float]:
    """Mean row norm, and the mean distance from a row to its nearest other row (on up to
    `max_rows` rows): shrinking or merging embeddings show up here before samples fail."""
    table = table.detach().float()
    return {"embedding_norm": table.norm(dim=-1).mean().item(),
            "nn_distance": nearest_neighbour_distances(table, rows=max_rows).mean().item()}


VALIDATION_SEED = 1234


@torch.no_grad()
def validation_losses(model, objective, windows: torch.Tensor, config: Config, device,
                      ranks: Ranks | None = None) -> dict[str, float]:
    """Loss terms on fixed validation windows with fixed noise (keyed by VALIDATION_SEED and the
    window), so epochs are comparable. In a distributed run each process scores its share of
    every batch and the batch means are summed over the processes: the same numbers as one process."""
    if len(windows) == 0:
        return {}
    ranks = ranks or current_ranks()
    was_training = model.training
    model.eval()
    sums = torch.zeros(len(objective.terms), dtype=torch.float64)
    batches = 0
    for first in range(0, min(len(windows), config.val_batches * config.batch_size), config.batch_size):
        size = min(config.batch_size, len(windows) - first)
        start, stop = ranks.shard(size)
        if stop > start:
            ids = windows[first + start: first + stop].to(device)
            keys = WindowKeys(VALIDATION_SEED, batches, torch.arange(start, stop))
            with autocast(config.precision, device):
                losses = objective.training_losses(model, ids, uniform_t=True, keys=keys)
            share = (stop - start) / size  # this process's share of the batch mean
            sums += torch.tensor([losses[term].item() for term in objective.terms], dtype=torch.float64) * share
        batches += 1
    all_reduce_sum(sums)
    model.train(was_training)
    return {f"val_{term}": value / batches for term, value in zip(objective.terms, sums.tolist())}


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


# ---------------------------------------------------------------------------------------------
# Stage 1, the state: dlm.runs.state (build_state). Stage 2, resume: dlm.runs.resume (resumed_config,
# restore). Stage 3: the loop, and what it calls besides the optimizer step.


class RunHooks:
    """What the loop does besides stepping, for one run folder: log lines and metrics.csv rows,
    validation at each epoch end, the kept checkpoints, last.pt and best.pt (the state of the
    lowest validation loss), and TensorBoard's curves when the run asks for them."""

    def __init__(self, run: RunDir, tokenizer: Tokenizer, val_windows: torch.Tensor, metrics: MetricsWriter, *,
                 saved: dict | None = None, curves: tensorboard_curves.Curves | None = None,
                 on_metrics: Callable[[dict], None] | None = None, corpus_sha256: str | None = None):
        self.run, self.tokenizer, self.val_windows, self.metrics = run, tokenizer, val_windows, metrics
        self.corpus_sha256 = corpus_sha256  # recorded in every checkpoint
        self.curves = curves
        self.on_metrics = on_metrics  # told of each metrics.csv row once it is written (a live plot)
        # last.pt's log interval (a resumed run's first row then averages the same steps as an
        # uninterrupted run's) and the step of the last checkpoint written (the one a divergence keeps)
        self.saved_interval = saved.get("interval") if saved else None
        self.saved_step = saved["step"] if saved else None
        self.interval: Interval | None = None
        # the lowest validation loss so far, {"step", "val_total"} (recorded in last.pt), and this epoch end's
        self.best = saved.get("best") if saved else None
        self.val_total: float | None = None

    def open_interval(self, terms: tuple[str, ...], device: torch.device) -> Interval:
        self.interval = Interval(terms, device)
        if self.saved_interval is not None:
            self.interval.load_state_dict(self.saved_interval)
        return self.interval

    def write(self, row: dict) -> None:
        self.metrics.write(row)
        if self.on_metrics is not None:
            self.on_metrics(row)

    def log(self, state: TrainState, row: dict) -> None:
        self.write(row)
        if self.curves is not None:
            self.curves.log_row(row, state.objective.terms)
        logger.info("step %6d/%d | epoch %4d | loss %.4f (%s) | |E| %.3f, nn %.3f | lr %.2e | %.0f tok/s | eta %d:%02d",
                    row["step"], state.pace.total_steps, row["epoch"], row["total"],
                    _terms_text(row, state.objective.terms[1:]), row["embedding_norm"], row["nn_distance"], row["lr"],
                    row["tokens_per_s"], *divmod(max(0, round(state.pace.seconds_left(row["step"]))), 60))

    def validate(self, state: TrainState) -> dict:
        val = validation_losses(state.eval_model, state.objective, self.val_windows, state.config,
                                next(state.model.parameters()).device, state.ranks)
        if val:
            row = {"step": state.step, "epoch": state.epoch, **val, "elapsed_s": state.pace.elapsed()}
            self.val_total = val["val_total"]
            self.write(row)
            if self.curves is not None:
                self.curves.log_validation(state.step, val)
            logger.info("epoch %4d | val loss %.4f (%s)", state.epoch, val["val_total"],
                        _terms_text(val, [f"val_{term}" for term in state.objective.terms[1:]]))
        return val

    def checkpoint(self, state: TrainState, keep: bool) -> None:
        self.check_finite(state)  # never replace the last good last.pt with NaN weights
        # last.pt first: a kill between the two writes then leaves a resumable run (the other way
        # round it left a kept checkpoint without last.pt: not resumable, and not a fresh folder either)
        interval = {"interval": self.interval.state_dict()} if self.interval is not None else {}
        improved = self.val_total is not None and (self.best is None or self.val_total < self.best["val_total"])
        if improved:
            self.best = {"step": state.step, "val_total": self.val_total}
        self.val_total = None
        try:
            save_checkpoint(self.run.last_checkpoint, {**resume_payload(state, self.tokenizer, self.corpus_sha256),
                                                       **interval, "metrics": self.metrics.record(), "best": self.best})
        except DiskFullError as full:
            raise DiskFullError(full.path, full.size,
                                f"{FREE_CHECKPOINT_SPACE} {where_it_stands(self.run, self)}") from None
        self.saved_step = state.step
        if improved:  # after last.pt, which records it: a kill between the two is mended on resume (keep_best_whole)
            save_checkpoint(self.run.best_checkpoint, {**kept_payload(state, self.tokenizer, self.corpus_sha256), **self.best})
        if keep:
            # a wsd run's stable phase keeps what a resume needs: dlm cooldown starts new runs from it
            kept = ({**resume_payload(state, self.tokenizer, self.corpus_sha256), **interval} if at_stable_lr(state)
                    else kept_payload(state, self.tokenizer, self.corpus_sha256))
            epoch_checkpoint = self.run.epoch_checkpoint(state.epoch)
            try:
                save_checkpoint(epoch_checkpoint, kept)
            except DiskFullError as full:
                raise DiskFullError(full.path, full.size, f"{FREE_CHECKPOINT_SPACE} {where_it_stands(self.run, self)} "
                                    f"The resume first writes the missing {epoch_checkpoint.name} from last.pt.") from None
            if self.curves is not None:  # after the checkpoints: drawing samples never delays them
                self.curves.log_table(state.step, state.model.table())
                self.curves.log_samples(state.step, training_samples(state, self.tokenizer))
                self.curves.flush()

    def keep_best_whole(self, saved: dict) -> None:
        """A run killed between writing last.pt and best.pt at the epoch end that improved the
        validation loss: last.pt records that step as the best and holds its state; best.pt gets it."""
        best = saved.get("best")
        if best is None or best["step"] != saved["step"]:
            return
        path = self.run.best_checkpoint
        try:
            if load_checkpoint(path).get("step") == best["step"]:
                return
        except CheckpointError:  # missing or damaged: last.pt holds the state it should hold
            pass
        save_checkpoint(path, {**{key: saved[key] for key in KEPT_KEYS}, **best})
        logger.info("best.pt rewritten from last.pt (step %d): the run stopped between the two writes", best["step"])

    def check_finite(self, state: TrainState) -> None:
        """Raise Diverged when a loss term since the last log line or any weight is NaN or inf."""
        if self.interval is not None:
            bad = self.interval.first_nonfinite(state.step)
            if bad is not None:
                raise Diverged(*bad)
        models = [state.model] + ([state.ema.module] if state.ema is not None else [])
        for model in models:
            for name, param in model.state_dict().items():
                if param.is_floating_point() and not torch.isfinite(param).all():
                    raise Diverged(state.step, f"weights ({name})", float("nan"))


class Interval:
    """Loss sums over one log interval. They stay on the device (float64, the same sums as Python
    floats) so that a CUDA step never waits for the GPU; they are read once per log line."""

    def __init__(self, terms: tuple[str, ...], device: torch.device):
        self.terms = terms
        self.sums = torch.zeros(len(terms), dtype=torch.float64, device=device)
        self.reset()

    def reset(self) -> None:
        self.sums.zero_()
        self.history: list[torch.Tensor] = []  # this invocation's per-step terms: which step blew up
        self.steps, self.tokens, self.start = 0, 0, time.perf_counter()

    def state_dict(self) -> dict:
        """The sums and step count (saved in last.pt so that a resumed interval averages the same steps).
        In a distributed run the sums of all processes: every process calls this at the same checkpoint,
        and the resumed run (with any number of processes) restores them in its rank 0 alone."""
        return {"sums": all_reduce_sum(self.sums.detach().clone()).cpu(), "steps": self.steps}

    def load_state_dict(self, saved: dict) -> None:
        self.sums.copy_(saved["sums"])
        self.steps = int(saved["steps"])

    def add(self, losses: dict[str, torch.Tensor], ids: torch.Tensor, share: float = 1.0) -> None:
        """A step's losses; in a distributed run this process's, weighed by its `share` of the batch."""
        terms = torch.stack([losses[term] for term in self.terms]).double() * share
        self.sums += terms
        self.history.append(terms)
        self.steps += 1
        self.tokens += ids.numel()

    def first_nonfinite(self, step: int) -> tuple[int, str, float] | None:
        """(step, term, value) of the first NaN or inf loss term in this interval, else None."""
        if not self.history or torch.isfinite(self.sums).all():
            return None
        values = torch.stack(self.history)
        bad = ~torch.isfinite(values)
        at = int(bad.any(dim=1).nonzero()[0])
        columns = [int(c) for c in bad[at].nonzero()]
        column = next((c for c in columns if self.terms[c] != "total"), columns[0])  # the term, not the sum
        return step - len(self.history) + at + 1, self.terms[column], values[at, column].item()

    def row(self, state: TrainState) -> dict:
        # In a distributed run: the batch means summed over the processes' shares, the tokens of all of them.
        totals = all_reduce_sum(torch.cat([self.sums, self.sums.new_tensor([self.tokens])])).tolist()
        if not all(math.isfinite(value) for value in totals[:-1]):
            found = self.first_nonfinite(state.step)  # None when it blew up in another process
            raise Diverged(*(found or (state.step, "a loss term (in another process)", float("nan"))))
        means = {term: value / self.steps for term, value in zip(self.terms, totals)}
        return {"step": state.step, "epoch": state.epoch, **means, **embedding_stats(state.model.table()),
                "lr": state.scheduler.get_last_lr()[0],
                "tokens_per_s": totals[-1] / (time.perf_counter() - self.start), "elapsed_s": state.pace.elapsed()}


def training_samples(state: TrainState, tokenizer: Tokenizer) -> list[str]:
    """A few samples of the weights being trained (the EMA copy when kept) with the run's sampling
    recipe at up to curves.SAMPLE_STEPS steps, drawn without touching the training's random state
    (a resumed run then trains exactly as an uninterrupted one)."""
    config, model = state.config, state.eval_model
    device = next(model.parameters()).device
    run = LoadedRun(config=config, tokenizer=tokenizer, model=model, objective=state.objective, checkpoint=Path(),
                    step=state.step, epoch=state.epoch, used_ema=state.ema is not None)
    options = SampleOptions.from_config(config, num_samples=tensorboard_curves.SAMPLES_SHOWN, seed=0,
                                        steps=min(tensorboard_curves.SAMPLE_STEPS, config.sample_steps))
    was_training = model.training
    model.eval()
    try:
        with torch.random.fork_rng(devices=[device.index or 0] if device.type == "cuda" else []):
            return generate(run, options, device).texts
    finally:
        model.train(was_training)


class WorkerHooks(RunHooks):
    """A distributed run's other processes (rank > 0): they take part in validation's reduction
    and write nothing; rank 0's RunHooks writes the run folder."""

    def __init__(self, val_windows: torch.Tensor):
        self.val_windows = val_windows
        # rank 0 restores the log interval (all processes' sums) and knows the last checkpoint; a worker starts at 0
        self.saved_interval, self.saved_step, self.interval = None, None, None
        self.curves = None

    def log(self, state: TrainState, row: dict) -> None:
        pass

    def validate(self, state: TrainState) -> dict:
        return validation_losses(state.eval_model, state.objective, self.val_windows, state.config,
                                 next(state.model.parameters()).device, state.ranks)

    def checkpoint(self, state: TrainState, keep: bool) -> None:
        """Writes nothing; checks the (identical) weights as rank 0 does, and takes part in the
        reduction of the log interval's sums that rank 0 saves in last.pt."""
        self.check_finite(state)
        if self.interval is not None:
            self.interval.state_dict()


def steps_per_epoch(epoch_size: int, batch_size: int, world_size: int = 1) -> int:
    """Batches in an epoch: the last may be short, unless it would leave a process without a window."""
    full, rest = divmod(epoch_size, batch_size)
    return full + (rest >= world_size)


def epoch_batches(train_ids: torch.Tensor, config: Config, epoch: int, device: torch.device,
                  ranks: Ranks | None = None):
    """The epoch's shuffled windows (seeded by the epoch, so a resumed run draws the same), in
    batches of batch_size on the device. Yields (ids, first, size): in a distributed run every
    process gets its shard of each batch (the batch's windows first .. first + len(ids), of `size`)."""
    ranks = ranks or Ranks()
    windows = epoch_windows(train_ids, config.seq_len, torch.Generator().manual_seed(config.seed * 1_000_003 + epoch))
    if device.type == "cuda":
        windows = windows.pin_memory()  # so that .to(device, non_blocking=True) is asynchronous
    for number in range(steps_per_epoch(len(windows), config.batch_size, ranks.world_size)):
        batch = windows[number * config.batch_size: (number + 1) * config.batch_size]
        start, stop = ranks.shard(len(batch))
        yield batch[start:stop].to(device, non_blocking=True), start, len(batch)


def run_loop(state: TrainState, train_ids: torch.Tensor, hooks: RunHooks) -> dict:
    """Epochs of optimizer steps until the steps or the clock run out; a log row every log_every
    steps, validation and checkpoints at each epoch end. Returns the last metrics row."""
    config, pace = state.config, state.pace
    device = next(state.model.parameters()).device
    bar = tqdm(total=None if pace.budget_s else pace.total_steps, initial=state.step, disable=not config.progress,
               desc="train", unit="step", ascii=True)
    pace.restart(state.step)
    interval = hooks.open_interval(state.objective.terms, device)
    done, row = False, {}
    state.model.train()
    share_clock = state.ranks.distributed and pace.budget_s is not None
    while not done and state.step < pace.total_steps:
        state.epoch += 1
        for ids, first, size in epoch_batches(train_ids, config, state.epoch, device, state.ranks):
            if share_clock:
                pace.share_clock()
            interval.add(state.train_on(ids, first, size), ids, len(ids) / size)
            bar.update(1)
            done = state.step >= pace.total_steps or pace.out_of_time()
            if state.step % config.log_every == 0 or done:
                row = interval.row(state)
                hooks.log(state, row)
                interval.reset()
            if done:
                break
        # Every epoch has the same number of steps, so this is an epoch end unless max_steps or the clock cut it.
        val = hooks.validate(state)
        if val:
            row = {**row, "step": state.step, "epoch": state.epoch, **val, "elapsed_s": pace.elapsed()}
        hooks.checkpoint(state, keep=state.epoch % config.checkpoint_every == 0 or done)
    bar.close()
    return row


@dataclass
class Start:
    """Another run's checkpoint that a new run folder starts from (dlm cooldown): its payload, where
    it was read, and the config keys the new run changed, {key: [before, after]}."""
    payload: dict
    checkpoint: Path
    changed: dict

    @property
    def run_path(self) -> Path:
        return self.checkpoint.parent.parent  # RUN/checkpoints/FILE.pt


def remove_leftovers(run: RunDir) -> None:
    """Temp files of checkpoint (or metrics) writes a killed process never finished: no reader ever
    looks at them, and under the run's lock no other writer owns them."""
    leftovers = run.leftover_temp_files()
    for path in leftovers:
        path.unlink(missing_ok=True)
    if leftovers:
        logger.info("removed %d temp file(s) left by an interrupted write: %s", len(leftovers),
                    ", ".join(str(p.relative_to(run.path)) for p in leftovers))


def train(config: Config, run_dir: str | Path, resume: bool = False, rebuild_metrics: bool = False,
          on_metrics: Callable[[dict], None] | None = None, accept_corpus_change: bool = False,
          start: Start | None = None) -> TrainResult:
    """Build the state, resume it from last.pt when asked, run the loop; the writing process holds
    the run folder's lock throughout (RunLockedError when another process trains there). A resume
    refuses a metrics.csv that lost rows last.pt recorded (MetricsError) unless `rebuild_metrics`,
    and a corpus that is not the text last.pt was trained on (CorpusChangedError) unless
    `accept_corpus_change`.
    `on_metrics` is called with each metrics.csv row after it is written (train.ipynb's live plot).
    `start`: a new run folder that goes on from another run's checkpoint (dlm.runs.cooldown)."""
    dlm_data.check_run_folder(run_dir)  # before any work: a usable folder, not "" (the working directory)
    if config.tensorboard:
        tensorboard_curves.check_available()
        tensorboard_curves.check_folder(run_dir)
    families.check_config(config)  # a key that means nothing to the family: before anything is written
    run = RunDir(run_dir)
    if resume and not run.has_run():
        raise CheckpointError(f"No run to resume in '{run.path}' (no checkpoints, no metrics.csv). "
                              f"Drop --resume to start one there.")
    if not run.has_checkpoint() and not run.started_without_checkpoint() and run.entries():
        raise RunExistsError(not_a_run_message(run))  # before any device or process starts; again under the lock
    device = pick_device(config.device)
    ranks, device = init_distributed(device)  # torchrun's processes: join the group (waits for all)
    try:
        if not ranks.is_main:  # rank 0 writes the run folder and holds its lock for all of them
            return _train(config, run, resume, device, ranks, rebuild_metrics=rebuild_metrics,
                          accept_corpus_change=accept_corpus_change, start=start)
        made = make_folders(run.path)  # what this process makes, not another one starting on the same folder
        with RunLock(run):
            try:
                remove_leftovers(run)
                result = _train(config, run, resume, device, ranks, rebuild_metrics=rebuild_metrics,
                                on_metrics=on_metrics, accept_corpus_change=accept_corpus_change, start=start)
            except BaseException:
                remove_if_unused(run, made)  # under the lock: no other trainer is using the folder
                raise
            return result
    finally:
        destroy_distributed()


def make_folders(path: Path) -> list[Path]:
    """Make `path` and its missing parents; the folders this process made, deepest first. mkdir is
    atomic: a folder another process makes at the same moment is not counted as this one's."""
    made = []
    for folder in reversed([path, *path.parents]):
        if not folder.exists():
            try:
                folder.mkdir()
                made.append(folder)
            except FileExistsError:
                pass
    return made[::-1]


def remove_if_unused(run: RunDir, made: list[Path]) -> None:
    """A start that failed before writing anything (a bad init_from_pretrained, ...) leaves nothing:
    the run folder is removed when this process made it and it holds only the lock, and with it the
    parents this process made (each only when empty)."""
    if not made or made[0] != run.path or [p.name for p in run.path.iterdir()] != [run.lock.name]:
        return
    run.lock.unlink()
    for folder in made:
        with contextlib.suppress(OSError):  # not empty: something else was put there meanwhile
            folder.rmdir()


@dataclass
class Origin:
    """What a run folder trains from (starting_point): its mode, the config it trains under, and
    the checkpoint payload it starts from (none when fresh or restarted)."""
    mode: str  # fresh, restarted, resume or cooldown
    config: Config
    payload: dict | None = None
    start: Start | None = None  # cooldown: the other run's checkpoint

    @property
    def resumed(self) -> bool:
        return self.mode == "resume"

    def checkpoint(self, run: RunDir) -> Path:
        """Where the payload was read."""
        return self.start.checkpoint if self.start is not None else run.last_checkpoint

    def tokenizer_folder(self, run: RunDir) -> Path:
        """The run folder whose tokenizer the payload's vocabulary names."""
        return self.start.run_path if self.start is not None else run.path


def starting_point(config: Config, run: RunDir, resume: bool, start: Start | None) -> Origin:
    """What a run folder trains from. The mode is fresh (a new or empty folder), restarted (a run
    dlm started that stopped before its first checkpoint), resume (its last.pt, under the saved
    recipe) or cooldown (another run's checkpoint, `start`, into a new or empty folder). Anything
    else in the folder is never overwritten: RunExistsError."""
    if start is not None:
        if run.entries():
            raise RunExistsError(f"'{run.path}' is not empty: choose a new run folder to start from "
                                 f"'{start.checkpoint}'.")
        return Origin("cooldown", config, start.payload, start)
    if run.started_without_checkpoint():
        # killed (or --epochs 0) before its first checkpoint: nothing to resume, nothing to keep
        logger.info("'%s' holds no checkpoint (its run stopped before the first epoch end): starting it afresh, "
                    "metrics.csv rewritten", run.path)
        return Origin("restarted", config)
    if resume and run.has_checkpoint():
        payload = load_checkpoint(run.last_checkpoint, instead=(
            "dlm train resumes from last.pt alone (the kept epoch_*.pt hold no optimizer state): restore it from a "
            "copy, or train the run again in a new folder; dlm sample --checkpoint FILE still samples a kept one."))
        return Origin("resume", resumed_config(config, payload["config"], run), payload)
    if run.has_checkpoint():
        raise RunExistsError(
            f"'{run.path}' already holds a run. Continue it (--resume on the command line, resume=True in "
            f"train.ipynb), or choose a new run folder."
        )
    if run.entries():
        raise RunExistsError(not_a_run_message(run))
    return Origin("fresh", config)


def _train(config: Config, run: RunDir, resume: bool, device: torch.device, ranks: Ranks, *,
           rebuild_metrics: bool = False, on_metrics: Callable[[dict], None] | None = None,
           accept_corpus_change: bool = False, start: Start | None = None) -> TrainResult:
    origin = starting_point(config, run, resume, start)
    config = origin.config
    check_global_batch(config.batch_size, ranks.world_size)
    if not ranks.is_main:
        logger.setLevel(logging.WARNING)  # rank 0 speaks for the run
    barrier()  # every process has checked the run folder before rank 0 writes to it
    if ranks.is_main:
        run.path.mkdir(parents=True, exist_ok=True)
    if config.threads:
        torch.set_num_threads(config.threads)

    torch.manual_seed(config.seed)
    data = training_data(origin, run, accept_corpus_change)
    epoch_size = windows_per_epoch(len(data.train_ids), config.seq_len)
    epoch_steps = steps_per_epoch(epoch_size, config.batch_size, ranks.world_size)
    total_steps = config.max_steps if config.max_steps is not None else config.epochs * epoch_steps
    state = starting_state(origin, run, data, device, ranks, total_steps)
    val_windows = fixed_windows(data.val_ids, config.seq_len)
    if ranks.is_main:
        hooks = run_hooks(state, origin, run, data, val_windows, device, rebuild_metrics=rebuild_metrics,
                          on_metrics=on_metrics)
    else:
        hooks = WorkerHooks(val_windows)
    log_start(state, data, device, epoch_size, epoch_steps)
    try:
        row = run_loop(state, data.train_ids, hooks)
    except Diverged as blew_up:
        raise DivergedError(diverged_message(blew_up, run, config, hooks.saved_step)) from None
    except KeyboardInterrupt:
        logger.warning("interrupted at step %d (epoch %d). %s", state.step, state.epoch,
                       where_it_stands(run, hooks, started=start is not None))
        raise
    finally:
        if hooks.curves is not None:
            hooks.curves.close()
    return TrainResult(run.path, state.step, state.epoch, row, state.pace.elapsed())


def training_data(origin: Origin, run: RunDir, accept_corpus_change: bool) -> CorpusData:
    """The corpus, split and tokenized. A run that goes on from a checkpoint reads its tokenizer back
    (a BPE run's tokenizer.json is never trained again), and is refused a corpus that is not the text
    it was trained on, before anything is written (unless `accept_corpus_change`)."""
    config, payload = origin.config, origin.payload
    data = prepare_data(config.corpus, config.tokenizer, config.min_count, config.lowercase,
                        saved_tokenizer(payload["vocab"], origin.tokenizer_folder(run)) if payload else None,
                        config.max_train_tokens,
                        config.bpe_vocab_size)
    if payload:
        check_corpus(data, config.corpus, payload.get("corpus_sha256"), run.path, accept_corpus_change)
    return data


def starting_state(origin: Origin, run: RunDir, data: CorpusData, device: torch.device, ranks: Ranks,
                   total_steps: int) -> TrainState:
    """The state built on the device and restored from the origin's checkpoint; rank 0 writes what
    the run folder lacks (a resumed run's due kept checkpoint, a new run's config and tokenizer)."""
    config, payload = origin.config, origin.payload
    state = build_state(config, build_model(config, data.tokenizer).to(device), total_steps)
    state.ranks = ranks
    if payload:
        restore(state, payload, origin.checkpoint(run))
    if origin.resumed and ranks.is_main:  # a kept checkpoint is due at every checkpoint_every-th epoch and at the end
        write_missing_kept_checkpoint(run, payload, state.epoch % config.checkpoint_every == 0
                                      or state.step >= total_steps)
    if not origin.resumed and ranks.is_main:
        save_config(config, run.config)
        data.tokenizer.save(run.path / tokenizer_file_name(data.tokenizer))
    state.distribute(device)
    return state


def run_hooks(state: TrainState, origin: Origin, run: RunDir, data: CorpusData, val_windows: torch.Tensor,
              device: torch.device, *, rebuild_metrics: bool = False,
              on_metrics: Callable[[dict], None] | None = None) -> RunHooks:
    """Rank 0's hooks: metrics.csv (a resume keeps the rows last.pt recorded), TensorBoard's curves
    when asked, and this invocation recorded in provenance.json."""
    config, payload, start = origin.config, origin.payload, origin.start
    terms = tuple(state.objective.terms)
    metrics = (MetricsWriter(run.metrics, keep_until_step=state.step, recorded=payload.get("metrics"),
                             rebuild=rebuild_metrics, terms=terms) if origin.resumed
               else MetricsWriter(run.metrics, fresh=origin.mode == "restarted", terms=terms))
    # purge_step: TensorBoard drops an earlier invocation's points from here on (trained again now)
    curves = tensorboard_curves.Curves(run.path, purge_step=state.step) if config.tensorboard else None
    hooks = RunHooks(run, data.tokenizer, val_windows, metrics, saved=payload if origin.resumed else None,
                     curves=curves, on_metrics=on_metrics, corpus_sha256=data.sha256)
    if origin.resumed:
        hooks.keep_best_whole(payload)
    if start is not None:  # the log interval goes on from the start (the checkpoints and best are this folder's)
        hooks.saved_interval = payload.get("interval")
    record_invocation(run.provenance, invocation(
        config.to_dict(), mode=origin.mode, step=state.step, device=str(device),
        precision=resolved_precision(config.precision, device), processes=state.ranks.world_size,
        corpus={"path": str(data.path), "sha256": data.sha256},
        start=None if start is None else {"checkpoint": str(start.checkpoint), "step": start.payload["step"],
                                          "changed": start.changed}),
        keep_earlier=origin.resumed)
    return hooks


def log_start(state: TrainState, data: CorpusData, device: torch.device, epoch_size: int, epoch_steps: int) -> None:
    """The run's opening log lines: processes, device, sizes, budget, parameter groups."""
    config, ranks = state.config, state.ranks
    n_params = sum(p.numel() for p in state.model.parameters())
    if ranks.distributed:
        logger.info("distributed: %d processes (%s), %d windows of each batch of %d on each", ranks.world_size,
                    torch.distributed.get_backend(), config.batch_size // ranks.world_size, config.batch_size)
    logger.info("device %s (%s) | vocab %d | %d train windows/epoch | %d steps/epoch | %s | %.2fM params",
                device, resolved_precision(config.precision, device), len(data.tokenizer), epoch_size, epoch_steps,
                f"{state.pace.total_steps} steps total" if config.max_train_seconds is None
                else f"{config.max_train_seconds:g} s of training", n_params / 1e6)
    for group in state.optimizer.param_groups:
        logger.info("  param group %-12s %8d params, weight_decay %g, peak lr %g", group["name"],
                    sum(p.numel() for p in group["params"]), group["weight_decay"], group["initial_lr"])


def not_a_run_message(run: RunDir) -> str:
    return (f"'{run.path}' holds {listing(run.entries())} but no run of dlm's to continue: a new run starts only in an empty or "
            f"new folder, so nothing there is overwritten. Choose another --run_dir, or move those files away.")


def where_it_stands(run: RunDir, hooks: RunHooks, started: bool = False) -> str:
    """What a stopped run keeps and how to go on (last.pt is only written at epoch ends: an
    interruption mid-step could leave the weights half updated, so none is written then).
    `started`: a run started from another run's checkpoint (dlm cooldown), resumed with its own config."""
    if hooks.saved_step is None:
        if started:
            return f"No checkpoint was written yet; remove '{run.path}' and run the same dlm cooldown again."
        return (f"No checkpoint was written yet; 'dlm train PARAMS --run_dir {run.path}' starts it again "
                f"(a run folder without a checkpoint starts afresh).")
    params = run.config if started else "PARAMS"
    return (f"checkpoints/last.pt holds step {hooks.saved_step}; continue with 'dlm train {params} --run_dir {run.path} "
            f"--resume' (the steps after it are trained again, with the same losses).")


def diverged_message(blew_up: Diverged, run: RunDir, config: Config, saved_step: int | None) -> str:
    what = (f"the {blew_up.term} became non-finite" if blew_up.term.startswith("weights")
            else f"loss term '{blew_up.term}' became {blew_up.value}")
    lower = f"{config.lr / 10:.3g}"
    if saved_step is None:
        return (f"Training diverged at step {blew_up.step}: {what}. No checkpoint was written yet; start again with a "
                f"lower lr: dlm train PARAMS --run_dir {run.path} --lr {lower}")
    return (f"Training diverged at step {blew_up.step}: {what}. checkpoints/last.pt is kept from step {saved_step}, "
            f"the last good one; resume it with a lower lr (resume accepts a new lr): "
            f"dlm train PARAMS --run_dir {run.path} --resume --lr {lower}")
