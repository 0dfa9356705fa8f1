"""Sampling from a trained run: the reverse chain, decoding with learned or cosine rounding, and
writing samples (JSONL plus a plain .txt) and, on request, the trajectory of decoded states."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from dlm.data import atomic_write_bytes
from dlm.diffusion import SPACINGS, sample_progressive
from dlm.embeddings import CosineRounding
from dlm.model import autocast
from dlm.runs import LoadedRun


@dataclass
class SampleOptions:
    num_samples: int = 16
    steps: int = 200
    spacing: str = "logsnr"  # which timesteps: logsnr, quadratic or uniform (see sampling_timesteps)
    decoder: str = "learned"  # learned (the rounding softmax) or cosine (similarity + argmax)
    clamp: bool = True  # Diffusion-LM's clamping trick
    clamp_fraction: float = 1.0  # clamp only during the last share of steps
    eta: float = 1.0  # 1 ancestral, 0 deterministic DDIM
    temperature: float = 0.0  # final tokens: 0 argmax of the rounding logits, >0 drawn from softmax/T
    seed: int = 0
    batch_size: int = 64
    record_every: int = 0  # keep the decoded tokens every N steps (0: not recorded)

    @classmethod
    def from_config(cls, config, **overrides) -> SampleOptions:
        """The run's own sampling recipe, with explicit overrides (None means: keep the recipe's)."""
        options = cls(steps=config.sample_steps, spacing=config.sample_spacing, clamp=config.clamp,
                      clamp_fraction=config.clamp_fraction, eta=config.sample_eta, temperature=config.decode_temperature)
        for key, value in overrides.items():
            if value is not None:
                setattr(options, key, value)
        return options

    def validate(self, total_steps: int) -> None:
        if self.decoder not in ("learned", "cosine"):
            raise ValueError(f"decoder must be 'learned' or 'cosine', got '{self.decoder}'.")
        if self.num_samples < 1:
            raise ValueError("num_samples must be at least 1.")
        if not 1 <= self.steps <= total_steps:
            raise ValueError(f"steps must be between 1 and the run's diffusion_steps ({total_steps}), got {self.steps}.")
        if self.spacing not in SPACINGS:
            raise ValueError(f"spacing must be one of {', '.join(SPACINGS)}, got '{self.spacing}'.")
        if self.temperature < 0:
            raise ValueError("temperature must be 0 (argmax) or positive.")
        if not 0 <= self.clamp_fraction <= 1:
            raise ValueError("clamp_fraction must be between 0 and 1.")


@torch.inference_mode()
def decode_ids(run: LoadedRun, x0: torch.Tensor, decoder: str = "learned", temperature: float = 0.0,
               generator: torch.Generator | None = None) -> torch.Tensor:
    """Vectors (B, L, d) to token ids (B, L)."""
    rounding = run.model.rounding if decoder == "learned" else CosineRounding(run.model.embedding)
    logits = rounding(x0).float()
    if decoder == "cosine" or temperature == 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits / temperature, dim=-1).cpu()
    flat = torch.multinomial(probs.view(-1, probs.shape[-1]), 1, generator=generator)
    return flat.view(logits.shape[:-1])


@dataclass
class SampleBatch:
    ids: torch.Tensor  # (N, L)
    texts: list[str]
    trajectory: list[dict]  # [{"index", "t", "ids": (N, L) list}] when recorded


def generate(run: LoadedRun, options: SampleOptions, device: str | torch.device = "cpu") -> SampleBatch:
    if run.config.model == "ar":
        return generate_autoregressive(run, options)
    options.validate(run.diffusion.steps)
    generator = torch.Generator().manual_seed(options.seed)
    all_ids, trajectory = [], []
    for first in range(0, options.num_samples, options.batch_size):
        count = min(options.batch_size, options.num_samples - first)
        states = sample_progressive(
            run.model, run.diffusion, (count, run.config.seq_len), options.steps, eta=options.eta,
            clamp=options.clamp, clamp_fraction=options.clamp_fraction, spacing=options.spacing, generator=generator,
            device=device,
        )
        for state in _under_autocast(states, run.config.precision, device):
            last = state.index == options.steps - 1
            if options.record_every and (state.index % options.record_every == 0 or last):
                ids = decode_ids(run, state.pred_x0, options.decoder).cpu()
                _record(trajectory, first, state.index, state.t, ids)
        x0 = state.x
        all_ids.append(decode_ids(run, x0, options.decoder, options.temperature, generator).cpu())
    ids = torch.cat(all_ids)
    texts = [run.tokenizer.decode(row) for row in ids]
    return SampleBatch(ids, texts, trajectory)


def generate_autoregressive(run: LoadedRun, options: SampleOptions) -> SampleBatch:
    """The AR baseline's own samples, left to right at `options.temperature` (0: greedy), each
    starting after a newline, the way the corpus's lines start."""
    generator = torch.Generator().manual_seed(options.seed)
    start_id = run.tokenizer.stoi.get("\n", run.tokenizer.unk_id)
    batches = [run.model.generate(min(options.batch_size, options.num_samples - first), run.config.seq_len,
                                  start_id, options.temperature, generator).cpu()
               for first in range(0, options.num_samples, options.batch_size)]
    ids = torch.cat(batches)
    return SampleBatch(ids, [run.tokenizer.decode(row) for row in ids], [])


def _under_autocast(states, precision: str, device):
    """Advance the reverse chain under the run's autocast (bf16 with precision bf16, or auto on
    CUDA); what the caller does with each state (decoding) runs outside it, in float32."""
    while True:
        with autocast(precision, device):
            state = next(states, None)
        if state is None:
            return
        yield state


def _record(trajectory: list[dict], first: int, index: int, t: int, ids: torch.Tensor) -> None:
    """Frames are per step; later batches append their rows to the frame of the same step."""
    if first == 0:
        trajectory.append({"index": index, "t": t, "ids": ids.tolist()})
    else:
        frame = next(f for f in trajectory if f["index"] == index)
        frame["ids"].extend(ids.tolist())


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
