"""Sampling from a trained run: the reverse chain, decoding with learned or cosine rounding, and
writing samples (JSONL plus a plain .txt) and, on request, the trajectory of decoded states."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch

from dlm.core.config import Config
from dlm.core.data import atomic_write_bytes
from dlm.core.schedule import SPACINGS
from dlm.runs.build import LoadedRun

X0_CHOICES = ("predicted", "expected")


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
    x0: str = recipe("sample_x0")  # predicted (the denoiser's) or expected (under its rounding softmax)
    temperature: float = recipe("decode_temperature")  # final tokens: 0 argmax, >0 drawn from softmax/T
    unk: bool = recipe("decode_unk")  # a final token may be <unk> (False: its score masked)
    decoder: str = "learned"  # learned (the rounding softmax) or cosine (similarity + argmax)
    seed: int = 0
    batch_size: int = 64
    record_every: int = 0  # keep the decoded tokens every N steps (0: not recorded)

    @classmethod
    def from_config(cls, config: Config, **overrides) -> SampleOptions:
        """The run's own sampling recipe, with explicit overrides (None means: keep the recipe's)."""
        recipe_values = {f.name: getattr(config, f.metadata["config"]) for f in fields(cls) if "config" in f.metadata}
        return cls(**{**recipe_values, **{k: v for k, v in overrides.items() if v is not None}})

    def banned_ids(self, tokenizer) -> tuple[int, ...]:
        """The token ids a final draw never gives: the tokenizer's <unk> unless `unk`."""
        return () if self.unk else (tokenizer.unk_id,)

    def validate(self, total_steps: int | None = None) -> None:
        """Every option a user can give, checked before sampling; `total_steps` is the run's
        diffusion_steps (None for a family without a chain: steps are not checked)."""
        for name in ("eta", "temperature", "clamp_fraction"):
            if not math.isfinite(getattr(self, name)):
                raise ValueError(f"{name} must be a finite number, got {getattr(self, name)}.")
        if self.x0 not in X0_CHOICES:
            raise ValueError(f"x0 must be one of {', '.join(X0_CHOICES)}, got '{self.x0}'.")
        if self.decoder not in ("learned", "cosine"):
            raise ValueError(f"decoder must be 'learned' or 'cosine', got '{self.decoder}'.")
        if self.num_samples < 1:
            raise ValueError(f"num_samples must be at least 1, got {self.num_samples}.")
        if self.batch_size < 1:
            raise ValueError(f"batch_size (samples drawn at once) must be at least 1, got {self.batch_size}.")
        if self.record_every < 0:
            raise ValueError(f"record_every must be 0 (no trajectory) or a number of steps, got {self.record_every}.")
        if not 0 <= self.eta <= 1:
            raise ValueError(f"eta must be between 0 (deterministic DDIM) and 1 (ancestral), got {self.eta}.")
        if total_steps is not None and not 1 <= self.steps <= total_steps:
            raise ValueError(f"steps must be between 1 and the run's diffusion_steps ({total_steps}), got {self.steps}.")
        if self.spacing not in SPACINGS:
            raise ValueError(f"spacing must be one of {', '.join(SPACINGS)}, got '{self.spacing}'.")
        if self.temperature < 0:
            raise ValueError("temperature must be 0 (argmax) or positive.")
        if not 0 <= self.clamp_fraction <= 1:
            raise ValueError("clamp_fraction must be between 0 and 1.")


@dataclass
class SampleBatch:
    ids: torch.Tensor  # (N, L)
    texts: list[str]
    trajectory: list[dict]  # [{"index", "t", "ids": (N, L) list}] when recorded


def generate(run: LoadedRun, options: SampleOptions, device: str | torch.device = "cpu") -> SampleBatch:
    """Samples of the run's family (the reverse chain, or left to right for the AR baseline)."""
    generator = torch.Generator().manual_seed(options.seed)
    ids, trajectory = run.family.generate(run, options, generator, device)
    return SampleBatch(ids, [run.tokenizer.decode(row) for row in ids], trajectory)


def write_samples(batch: SampleBatch, out: str | Path, run: LoadedRun, options: SampleOptions) -> tuple[Path, Path]:
    """FILE.jsonl (one object per sample) and FILE.txt beside it (one sample per line, its line
    breaks shown as ' / ', the way verse is quoted inline)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"checkpoint": str(run.checkpoint), "step": run.step, "epoch": run.epoch, "ema": run.used_ema,
            "model": run.config.model, "vocab": run.tokenizer.fingerprint(),
            **asdict(options)}
    lines = [json.dumps({"index": i, "text": text, "ids": row.tolist(), **meta}, ensure_ascii=False)
             for i, (text, row) in enumerate(zip(batch.texts, batch.ids))]
    atomic_write_bytes(out, ("\n".join(lines) + "\n").encode())
    txt = out.with_suffix(".txt")
    plain = [text.replace("\n", " / ") for text in batch.texts]
    atomic_write_bytes(txt, ("\n".join(plain) + "\n").encode())
    if batch.trajectory:
        frames = [{"index": f["index"], "t": f["t"], "ids": f["ids"]} for f in batch.trajectory]
        atomic_write_bytes(out.with_suffix(".trajectory.json"),
                           json.dumps({"itos": run.tokenizer.itos, "frames": frames}).encode())
    return out, txt
