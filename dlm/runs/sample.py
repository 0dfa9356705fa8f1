"""Sampling from a trained run: the reverse chain, decoding with learned or cosine rounding, and
writing samples (JSONL plus a plain .txt) and, on request, the trajectory of decoded states."""

from __future__ import annotations

import contextlib
import json
import math
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

import torch

from dlm.core.config import Config, machine_memory_bytes
from dlm.core.data import atomic_write_bytes, check_destination, current_umask
from dlm.core.errors import DiskFullError, UserError, is_disk_full
from dlm.core.schedule import SPACINGS
from dlm.families import family, sample_settings
from dlm.runs.build import LoadedRun
from dlm.runs.rundir import RunDir

X0_CHOICES = ("predicted", "expected", "posterior")


def recipe(key: str):
    """A sampling option that a run's config sets: Config key `key` (section 'sampling') gives
    its default and, in SampleOptions.from_config, its value."""
    return field(default=Config.__dataclass_fields__[key].default, metadata={"config": key})


@dataclass
class SampleOptions:
    num_samples: int = 16
    steps: int = recipe("sample_steps")  # reverse steps
    spacing: str = recipe("sample_spacing")  # which timesteps: one of SPACINGS (sampling_timesteps)
    clamp: bool = recipe("clamp")  # Diffusion-LM's clamping trick
    clamp_fraction: float = recipe("clamp_fraction")  # clamp only during the last share of steps
    eta: float = recipe("sample_eta")  # 1 ancestral, 0 deterministic DDIM
    x0: str = recipe("sample_x0")  # predicted (the denoiser's), expected or posterior (under its rounding softmax)
    temperature: float = recipe("decode_temperature")  # final tokens: 0 argmax, >0 drawn from softmax/T
    unk: bool = recipe("decode_unk")  # a final token may be <unk> (False: its score masked)
    decoder: str = "learned"  # learned (the rounding softmax) or cosine (similarity + argmax)
    seed: int = 0
    batch_size: int = 64
    record_every: int = 0  # keep the decoded tokens every N steps of each (block's) chain (0: not recorded)
    sampler: str = "grid"  # a masked chain's: grid, first_hitting or confidence (dlm.families.masked.SAMPLERS)

    @classmethod
    def from_config(cls, config: Config, **overrides) -> SampleOptions:
        """The run's own sampling recipe, with explicit overrides (None means: keep the recipe's)."""
        recipe_values = {f.name: getattr(config, f.metadata["config"]) for f in fields(cls) if "config" in f.metadata}
        return cls(**{**recipe_values, **{k: v for k, v in overrides.items() if v is not None}})

    def records(self, index: int) -> bool:
        """Whether the chain's step `index` is kept in the trajectory: every record_every steps of
        each chain and each chain's last step (a block run's index counts on over its blocks, each
        running a chain of `steps`: every block is recorded alike, and its finished state shown)."""
        step = index % self.steps
        return bool(self.record_every) and (step % self.record_every == 0 or step == self.steps - 1)

    def banned_ids(self, tokenizer) -> tuple[int, ...]:
        """The token ids a final draw never gives: the tokenizer's <unk> unless `unk`."""
        return () if self.unk or tokenizer.unk_id is None else (tokenizer.unk_id,)

    def validate(self, total_steps: int | None = None) -> None:
        """Every option a user can give, checked before sampling; `total_steps` is the run's
        diffusion_steps (None for a family without a chain: steps are not checked)."""
        for name in ("eta", "temperature", "clamp_fraction"):
            if not math.isfinite(getattr(self, name)):
                raise UserError(f"{name} must be a finite number, got {getattr(self, name)}.")
        if self.x0 not in X0_CHOICES:
            raise UserError(f"x0 must be one of {', '.join(X0_CHOICES)}, got '{self.x0}'.")
        if self.decoder not in ("learned", "cosine"):
            raise UserError(f"decoder must be 'learned' or 'cosine', got '{self.decoder}'.")
        if self.num_samples < 1:
            raise UserError(f"num_samples must be at least 1, got {self.num_samples}.")
        if self.batch_size < 1:
            raise UserError(f"batch_size (samples drawn at once) must be at least 1, got {self.batch_size}.")
        if self.record_every < 0:
            raise UserError(f"record_every must be 0 (no trajectory) or a number of steps, got {self.record_every}.")
        if not 0 <= self.eta <= 1:
            raise UserError(f"eta must be between 0 (deterministic DDIM) and 1 (ancestral), got {self.eta}.")
        if total_steps is not None and not 1 <= self.steps <= total_steps:
            raise UserError(f"steps must be between 1 and the run's diffusion_steps ({total_steps}), got {self.steps}.")
        if self.spacing not in SPACINGS:
            raise UserError(f"spacing must be one of {', '.join(SPACINGS)}, got '{self.spacing}'.")
        if self.temperature < 0:
            raise UserError("temperature must be 0 (argmax) or positive.")
        if not 0 <= self.clamp_fraction <= 1:
            raise UserError("clamp_fraction must be between 0 and 1.")


def check_options(config: Config, options: SampleOptions) -> None:
    """Every sampling option against a run's config, before any draw (before the run is loaded,
    too): the options' own ranges and the steps its chain can take (the Gaussian family's
    diffusion_steps, or the family's own `check_steps`)."""
    chain = family(config.model)
    options.validate(getattr(chain.objective(config), "steps", None))
    check_steps = getattr(chain, "check_steps", None)
    if check_steps is not None:
        check_steps(options, config)


def chain_steps(run: LoadedRun, options: SampleOptions) -> int:
    """The steps of each (block's) chain the run's sampler takes: options.steps, or the family's own
    count (`chain_steps` of the family: a masked first_hitting chain takes one per position)."""
    own = getattr(run.family, "chain_steps", None)
    if own is None:
        return options.steps
    return own(options, run.objective.block_size_for(run.config.seq_len) or run.config.seq_len)


@dataclass
class SampleBatch:
    ids: torch.Tensor  # (N, L)
    texts: list[str]
    trajectory: list[dict]  # [{"index", "t", "ids": (N, L) list}] when recorded


def generate_batches(run: LoadedRun, options: SampleOptions,
                     device: str | torch.device = "cpu") -> Iterator[SampleBatch]:
    """The samples one batch of options.batch_size at a time: one generator runs through the batches
    in order, so they are the draws one call for all of them makes."""
    options.validate()  # what does not depend on the family (it checks the steps), before any draw
    generator = torch.Generator().manual_seed(options.seed)
    for first in range(0, options.num_samples, options.batch_size):
        part = replace(options, num_samples=min(options.batch_size, options.num_samples - first))
        ids, trajectory = run.family.generate(run, part, generator, device)
        yield SampleBatch(ids, [run.tokenizer.decode(row) for row in ids], trajectory)


def generate(run: LoadedRun, options: SampleOptions, device: str | torch.device = "cpu") -> SampleBatch:
    """Samples of the run's family (the reverse chain, or left to right for the AR baseline)."""
    batches = list(generate_batches(run, options, device))
    trajectory = [dict(frame, ids=[row for batch in batches for row in batch.trajectory[i]["ids"]])
                  for i, frame in enumerate(batches[0].trajectory)]
    return SampleBatch(torch.cat([b.ids for b in batches]), [t for b in batches for t in b.texts], trajectory)


def check_memory(options: SampleOptions, seq_len: int, total_steps: int | None) -> None:
    """Refuse up front what cannot fit: a recorded trajectory keeps every sample's tokens at every
    recorded step (the samples themselves are written batch by batch and not kept)."""
    if not options.record_every:
        return
    frames = (total_steps or options.steps) // options.record_every + 2
    need = frames * options.num_samples * seq_len * 40  # a Python int in a list: about 40 bytes
    have = machine_memory_bytes()
    if have is not None and need > have / 2:
        most = max(1, int(have / 2 / (frames * seq_len * 40)))
        raise UserError(f"--record_every {options.record_every} with {options.num_samples} samples keeps about "
                        f"{need / 2**30:.1f} GiB of trajectory; this machine has {have / 2**30:.1f} GiB: record "
                        f"at most {most} samples, or every few more steps.")


def sample_files(out: str | Path) -> dict[str, Path]:
    """FILE.jsonl and what is written beside it."""
    out = Path(out)
    return {"jsonl": out, "txt": out.with_suffix(".txt"), "trajectory": out.with_suffix(".trajectory.json")}


def check_sample_destination(out: str | Path, overwrite: bool = False, switch: str = "--overwrite") -> Path:
    """--out of dlm sample, before sampling: FILE.jsonl (the listing beside it is derived from that
    name), not inside a run's checkpoints folder, nothing beside it in the way, and no sample file of
    that name already there unless `overwrite` (the set is then replaced together, see SampleWriter)."""
    what = "--out"
    files = sample_files(check_destination(out, what, suffix=".jsonl"))
    for folder in files["jsonl"].absolute().parents:
        if folder.name == "checkpoints" and (RunDir(folder.parent).config.is_file() or any(folder.glob("*.pt"))):
            raise UserError(f"{what} '{out}' lies inside the run's checkpoints folder '{folder}': write samples "
                            f"elsewhere, e.g. {RunDir(folder.parent).samples_file}.")
    for kind in ("txt", "trajectory"):
        check_destination(files[kind], f"the {kind} file beside {what}")
    existing = [path.name for path in files.values() if path.exists()]
    if existing and not overwrite:
        elsewhere = ", or write to another --out" if switch == "--overwrite" else ""
        raise UserError(f"'{files['jsonl'].parent}' already holds {', '.join(existing)}: pass {switch} to replace "
                        f"that set of samples{elsewhere}.")
    return files["jsonl"]


class SampleWriter:
    """FILE.jsonl and FILE.txt written batch by batch into hidden temp files beside them, each batch
    flushed to disk; close() (also after an interrupt or a full disk) cuts them back to the last whole
    batch and renames the set into place together: an older set of that name is replaced only by
    samples that exist, a trajectory is written only when recorded (an older one is removed, so it
    never sits beside samples it does not belong to), and no file ever ends in half a line."""

    def __init__(self, out: str | Path, run: LoadedRun, options: SampleOptions):
        self.files = sample_files(out)
        self.meta = {"checkpoint": str(run.checkpoint), "step": run.step, "epoch": run.epoch, "ema": run.used_ema,
                     "model": run.config.model, "vocab": run.tokenizer.fingerprint(),
                     **sample_settings(run.config.model, options)}
        self.itos = run.tokenizer.itos
        self.count, self.handles, self.frames = 0, None, []
        self.temps: dict[str, Path] = {}
        self.whole: dict[str, int] = {"jsonl": 0, "txt": 0}  # bytes up to the end of the last whole batch
        self.full = False  # the disk filled: the trajectory, which would not fit either, is not written

    def add(self, batch: SampleBatch) -> None:
        if self.handles is None:
            self.handles = {}
            for kind in ("jsonl", "txt"):
                path = self.files[kind]
                path.parent.mkdir(parents=True, exist_ok=True)
                fd, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
                os.close(fd)
                self.temps[kind], self.handles[kind] = Path(temp), open(temp, "wb", buffering=0)  # noqa: SIM115
        lines = [json.dumps({"index": self.count + i, "text": text, "ids": row.tolist(), **self.meta},
                            ensure_ascii=False) for i, (text, row) in enumerate(zip(batch.texts, batch.ids))]
        plain = [text.replace("\n", " / ") for text in batch.texts]
        try:
            for kind, rows in (("jsonl", lines), ("txt", plain)):
                handle = self.handles[kind]
                handle.write("".join(row + "\n" for row in rows).encode("utf-8"))
                handle.flush()
                os.fsync(handle.fileno())
        except OSError as error:
            if not is_disk_full(error):
                raise
            self.full = True  # close() cuts both files back to the last whole batch
            kept = (f"{self.count} samples are kept in it, each a whole line" if self.count
                    else "No sample was kept (an earlier file of that name is left as it was)")
            raise DiskFullError(self.files["jsonl"], what=f"{kept}. Free space on that disk (df -h shows what is "
                                                          f"left) and sample again.") from None
        for kind in self.whole:
            self.whole[kind] = self.handles[kind].tell()
        self._record(batch.trajectory)
        self.count += len(batch.texts)

    def _record(self, frames: list[dict]) -> None:
        """Frames are per step; each batch adds its rows to the frames of the same steps."""
        if not self.frames:
            self.frames = [{"index": f["index"], "t": f["t"], "ids": list(f["ids"])} for f in frames]
        else:
            for mine, theirs in zip(self.frames, frames):
                mine["ids"].extend(theirs["ids"])

    def close(self) -> None:
        try:
            for kind, handle in (self.handles or {}).items():
                if not handle.closed:
                    with contextlib.suppress(OSError):  # a full disk: what did not fit is cut off below
                        handle.close()
                os.truncate(self.temps[kind], self.whole[kind])  # a batch cut short (full disk, interrupt) is dropped
            if self.count:
                if self.frames and not self.full:
                    atomic_write_bytes(self.files["trajectory"],
                                       json.dumps({"itos": self.itos, "frames": self.frames}).encode())
                else:
                    self.files["trajectory"].unlink(missing_ok=True)
                for kind, temp in self.temps.items():
                    os.chmod(temp, 0o666 & ~current_umask())  # mkstemp makes 0600 files; give the usual mode
                    os.replace(temp, self.files[kind])
        finally:
            for temp in self.temps.values():
                temp.unlink(missing_ok=True)  # renamed already, or nothing whole to keep
            self.temps = {}


def write_samples(batch: SampleBatch, out: str | Path, run: LoadedRun, options: SampleOptions) -> tuple[Path, Path]:
    """FILE.jsonl (one object per sample) and FILE.txt beside it (one sample per line, its line
    breaks shown as ' / ', the way verse is quoted inline)."""
    writer = SampleWriter(out, run, options)
    writer.add(batch)
    writer.close()
    return writer.files["jsonl"], writer.files["txt"]
