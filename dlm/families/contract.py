"""The family contract's types: what a family module receives and returns (a loaded run, sampling
options, its words for the pages). They live here, beside the families, so that a family names
them without reaching up into dlm.runs; dlm.runs.build and dlm.runs.sample re-export them."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from types import ModuleType

from torch import nn

from dlm.core.config import Config
from dlm.core.data import Tokenizer
from dlm.core.errors import UserError
from dlm.core.schedule import SPACINGS

X0_CHOICES = ("predicted", "expected", "posterior")


@dataclasses.dataclass(frozen=True)
class Terms:
    """How the workbench's pages speak of a family (its module's TERMS). Each text is a sentence or
    two in Markdown; None where the family has no such thing (a caption it never needs)."""

    name: str  # what it is, e.g. "Gaussian diffusion (Diffusion-LM)"
    losses: str  # the loss curves: what each metrics.csv term is
    table: str  # the embedding table's geometry over training: what it means for this family
    blocks: str | None = None  # what it is when it generates in blocks (block_size below the window)
    likelihood: str | None = None  # its likelihood over training (with "likelihood_bound")
    trajectory: str | None = None  # a frame of its sampling trajectory (its t: see dlm.families.contract.Frames)


@dataclass
class LoadedRun:
    """A trained run ready to sample (dlm.runs.build.load_run): what a family's functions receive."""

    config: Config
    tokenizer: Tokenizer
    model: nn.Module  # EMA weights when present and asked for
    objective: object  # the run's training objective, from its family (an Objective: terms, training_losses)
    checkpoint: Path
    step: int
    epoch: int
    used_ema: bool
    corpus_sha256: str | None = None  # what the checkpoint's training read (None: trained before it was recorded)
    accept_corpus_change: bool = False  # read the corpus even when its SHA-256 is another (--accept_corpus_change)
    # RUN/calibration.json when it was made for this checkpoint: config.decode_temperature is then
    # its temperature (dlm.evaluation.calibration), the preset's own is recipe_config(run)'s
    calibration: dict | None = None

    @property
    def family(self) -> ModuleType:
        """The module of the run's model family (dlm.families)."""
        from dlm.families import family

        return family(self.config.model)


def recipe(key: str):
    """A sampling option that a run's config sets: Config key `key` (section 'sampling') gives
    its default and, in SampleOptions.from_config, its value."""
    return field(default=Config.__dataclass_fields__[key].default, metadata={"config": key})


@dataclass
class SampleOptions:
    """Every sampling option of every family's sampler; a family reads those in its SAMPLE_OPTIONS."""

    num_samples: int = 16
    steps: int = recipe("sample_steps")  # reverse steps
    spacing: str = recipe("sample_spacing")  # which timesteps: one of SPACINGS (sampling_timesteps)
    clamp: bool = recipe("clamp")  # Diffusion-LM's clamping trick
    clamp_fraction: float = recipe("clamp_fraction")  # clamp only during the last share of steps
    eta: float = recipe("sample_eta")  # 1 ancestral, 0 deterministic DDIM
    x0: str = recipe("sample_x0")  # predicted (the denoiser's), expected or posterior (under its rounding softmax)
    # the sampler's temperature: 0 argmax, >0 drawn from softmax/T (where the family draws words:
    # the Gaussian chain's final rounding, every step of a discrete chain, every token of the AR model)
    temperature: float = recipe("decode_temperature")
    unk: bool = recipe("decode_unk")  # a drawn word may be <unk> (False: its score masked)
    decoder: str = "learned"  # learned (the rounding softmax) or cosine (similarity + argmax)
    seed: int = 0
    batch_size: int = 64
    record_every: int = 0  # keep the window every N steps of each (block's) chain (0: not recorded)

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
        """Every option a user can give, checked before sampling; `total_steps` is the most steps
        of a discrete-time chain (its timesteps; None: steps are the family's check_steps' to check)."""
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
