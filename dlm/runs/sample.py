"""Sampling from a trained run: its family's sampler (`generate`, one batch at a time), and writing
samples (JSONL plus a plain .txt) and, on request, the trajectory of decoded states."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from dlm.core.config import Config, machine_memory_bytes
from dlm.core.data import atomic_write_bytes, check_destination, current_umask
from dlm.core.errors import DiskFullError, UserError, is_disk_full
from dlm.families import family, sample_settings
from dlm.families.contract import X0_CHOICES, Chain, SampleOptions, batches, merge_frames  # noqa: F401  (re-exported: the contract's types)
from dlm.runs.build import LoadedRun
from dlm.runs.rundir import RunDir


def check_options(config: Config, options: SampleOptions) -> None:
    """Every sampling option against a run's config, before any draw (before the run is loaded,
    too): the options' own ranges and the steps its family's sampler can take (its check_steps
    checks both)."""
    family(config.model).check_steps(options, config)


def chain_steps(run: LoadedRun, options: SampleOptions) -> int:
    """The steps of each (block's) chain the run's sampler takes: options.steps, or its chain's own
    count (Chain.steps: a masked first_hitting chain takes one per position)."""
    chain = run.family.chain(run.config)
    return options.steps if chain is None else chain.steps(options)


@dataclass
class SampleBatch:
    ids: torch.Tensor  # (N, L)
    texts: list[str]
    trajectory: list[dict]  # [{"index", "t", "ids": (N, L) list}] when recorded


def generate_batches(run: LoadedRun, options: SampleOptions,
                     device: str | torch.device = "cpu") -> Iterator[SampleBatch]:
    """The samples one batch of options.batch_size at a time: one generator runs through the batches
    in order, so they are the draws one call for all of them makes."""
    check_options(run.config, options)  # before any draw
    generator = torch.Generator().manual_seed(options.seed)
    for _, size in batches(options.num_samples, options.batch_size):
        ids, trajectory = run.family.generate(run, replace(options, num_samples=size), generator, device)
        yield SampleBatch(ids, [run.tokenizer.decode(row) for row in ids], trajectory)


def generate(run: LoadedRun, options: SampleOptions, device: str | torch.device = "cpu") -> SampleBatch:
    """Samples of the run's family (the reverse chain, or left to right for the AR baseline)."""
    parts, trajectory = [], []
    for batch in generate_batches(run, options, device):
        parts.append(batch)
        trajectory = merge_frames(trajectory, batch.trajectory)
    return SampleBatch(torch.cat([b.ids for b in parts]), [t for b in parts for t in b.texts], trajectory)


def check_memory(options: SampleOptions, seq_len: int, chain: Chain | None) -> None:
    """Refuse up front what cannot fit: a recorded trajectory keeps every sample's tokens at every
    recorded step of every block's chain (the samples themselves are written batch by batch and not
    kept). `chain`: the run's (its family's chain(config)); None, no chain: nothing is recorded."""
    if not options.record_every or chain is None:
        return
    frames = chain.blocks * (options.steps // options.record_every + 2)
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
        self.frames = merge_frames(self.frames, batch.trajectory)  # each batch's rows on the frames of the same steps
        self.count += len(batch.texts)

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
