"""The family contract, written once as code: the protocols of a family module, its objective and
its model (what the rest of the package and the benchmarks may read of them, and nothing else),
and the types a family receives and returns (a loaded run, sampling options, trajectory frames, its
words for the pages). The types live here, beside the families, so that a family names them
without reaching up into dlm.runs; dlm.runs.build and dlm.runs.sample re-export them."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Protocol

import torch
from torch import nn

from dlm.core.config import Config
from dlm.core.data import Tokenizer
from dlm.core.errors import UserError
from dlm.core.schedule import SPACINGS

if TYPE_CHECKING:
    import pandas as pd

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
    titles: Mapping[str, str] = field(default_factory=dict)  # a loss plot's title for each term but "total"


@dataclass(kw_only=True)
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


@dataclass(kw_only=True)
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


def batches(count: int, size: int) -> Iterator[tuple[int, int]]:
    """(first, length) of each batch of at most `size` of `count` items, in order: the one place
    where sampling is cut into batches (a family's generate, fill and guided_sample get one)."""
    for first in range(0, count, size):
        yield first, min(size, count - first)


class Frames:
    """One batch's sampling trajectory, as a family records it: a frame {"index", "t", "ids"} at each
    step that options.records keeps. `t` is one unit for every family: the chain's noise level as a
    fraction, 1 pure noise down to 0 the clean words (what each family's TERMS.trajectory shows)."""

    def __init__(self, options: SampleOptions):
        self.options = options
        self.frames: list[dict] = []

    def wants(self, index: int) -> bool:
        """Whether step `index` is recorded (SampleOptions.records): ask before decoding a frame."""
        return self.options.records(index)

    def add(self, index: int, t: float, ids: torch.Tensor) -> None:
        """The window (N, L) after step `index`, at noise level t in [0, 1]."""
        self.frames.append({"index": index, "t": round(float(t), 4), "ids": ids.cpu().tolist()})


def merge_frames(frames: list[dict], more: list[dict]) -> list[dict]:
    """The trajectory of two batches: `more`'s rows appended to the frames of the same steps."""
    if not frames:
        return [dict(frame, ids=list(frame["ids"])) for frame in more]
    for mine, theirs in zip(frames, more):
        mine["ids"].extend(theirs["ids"])
    return frames


@dataclass(frozen=True)
class Chain:
    """A family's reverse chain as a run's config sets it up (what `dlm sample` says it costs)."""

    blocks: int  # chains run one after another per window (1: the whole window at once)
    timesteps: int | None  # a discrete-time chain's timesteps (its steps are some of them); None: continuous time
    most_calls: int | None = None  # the most denoiser calls a block's chain makes, whatever its steps (None: one a step)
    # a chain's steps where options.steps is not it (a masked first_hitting chain: one per position)
    steps_for: Callable[[SampleOptions], int] | None = None

    def calls(self, steps: int) -> int:
        """Denoiser calls of one block's chain of `steps` steps (at most)."""
        return steps if self.most_calls is None else min(steps, self.most_calls)

    def steps(self, options: SampleOptions) -> int:
        """The steps of one block's chain that `options` ask for."""
        return options.steps if self.steps_for is None else self.steps_for(options)


@dataclass(frozen=True)
class BoundChain:
    """`dlm evaluate --nll --steps N`: the bound of the shortened chain the sampler runs at N steps,
    placed by `spacing` (for a family whose BOUND_OPTIONS has "steps")."""

    steps: int
    spacing: str


# Classifier guidance's weight on the chain's own step density (Diffusion-LM's lambda; its reference
# code's langevin_fn3 uses 0.01): with 1, the exact density, the late steps' small noise pulls every
# move straight back.
FLUENCY = 0.01


@dataclass(frozen=True)
class Guide:
    """Classifier guidance of a chain toward class `target` (dlm.runs.guidance): `classifier(x, t)`
    gives logits (B, classes) for the family's latents x (B, L, latent_dim) at timesteps t (B,)."""

    classifier: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    strength: float
    fluency: float = FLUENCY
    inner_steps: int = 3
    target: int = 1


# --- the contract ---------------------------------------------------------------------------------
# What the rest of the package and the benchmarks may read of a family module (FamilyModule, and
# for each capability it declares in SUPPORTS the protocol CAPABILITIES names), of its objective
# (Objective) and of its model (Model, beside nn.Module's own API). Nothing else: tests/
# test_family_contract.py runs every command on a family that has these and nothing more.


class Model(Protocol):
    """new_model's module (an nn.Module: parameters, state_dict, train/eval, to)."""

    embedding: nn.Module  # its `.weight` is the table AdamW groups apart

    def table(self) -> torch.Tensor:
        """The embedding table (V, d) whose geometry the training log follows."""


class Objective(Protocol):
    """What the training loop minimises (the module's objective(config))."""

    terms: tuple[str, ...]  # the metric columns, "total" first
    # what it learns while training besides the model (state_dict / load_state_dict, kept in last.pt for
    # an exact resume): the Gaussian objective's measured timestep density; None where there is none
    timestep_sampler: object | None

    def training_losses(self, model: nn.Module, ids: torch.Tensor, generator: torch.Generator | None = None,
                        uniform_t: bool = False, keys=None) -> dict[str, torch.Tensor]:
        """Each of `terms` as a scalar; uniform_t: validation's draws (see dlm.runs.train)."""


class FamilyModule(Protocol):
    """What every family module has."""

    NAME: str  # the Config `model` value that selects it (its key in FAMILIES)
    TITLE: str  # its name for a reader ("masked diffusion")
    DESCRIPTION: str  # one line on what it does (the report index's family column)
    SUPPORTS: frozenset[str]  # its capabilities: keys of CAPABILITIES
    SAMPLE_OPTIONS: frozenset[str]  # the SampleOptions fields its sampler reads
    CONFIG_KEYS: frozenset[str]  # the family-specific Config keys it reads (dlm.families.check_config)
    TERMS: Terms  # the words the pages use for it
    WHY_NOT: Mapping[str, str]  # why it lacks each capability and SampleOptions field it lacks (one clause)

    def likelihood_kind(self, config: Config) -> str:
        """"exact NLL" (with "likelihood_exact"), "NELBO" or "bound" (with "likelihood_bound"),
        followed by ", ..." where the run's config decides which bound."""

    def recipe(self, config: Config) -> list[str]:
        """The run's family-specific choices in words (what tells one run of it from another)."""

    def check_config(self, config: Config) -> None:
        """Raise ConfigError for values it cannot train (after dlm.families.check_config's key check)."""

    def new_model(self, config: Config, vocab_size: int, pretrained: torch.Tensor | None = None) -> Model:
        """A freshly initialised model."""

    def objective(self, config: Config) -> Objective:
        """What training minimises."""

    def trunk(self, model: nn.Module) -> nn.Module:
        """The network torch.compile wraps (parameter names stay the same)."""

    def chain(self, config: Config) -> Chain | None:
        """Its reverse chain as the config sets it up; None for a family without one."""

    def check_given_options(self, given: Mapping[str, object], flag: Callable[[str], str]) -> None:
        """Sampling options a user gave (None: not given) that its sampler cannot take together: one
        UserError naming them, before any sampling (`flag` writes an option as the user gave it)."""

    def check_steps(self, options: SampleOptions, config: Config) -> None:
        """The options' own ranges (options.validate) and the steps its sampler can take, one
        UserError line otherwise (before any sampling)."""

    def generate(self, run: LoadedRun, options: SampleOptions, generator: torch.Generator,
                 device: torch.device | str = "cpu") -> tuple[torch.Tensor, list[dict]]:
        """One batch: options.num_samples windows (N, L) and their trajectory (Frames' frames;
        empty when options.record_every is 0 or it records none)."""


class Fills(Protocol):
    """With "infill", "prefix" or "length": fixed words kept, the rest generated."""

    # whether fill's fixed words go through the chain and its rounding too (the control record then
    # says how often the rounding kept them); False where fill gives them back as given
    ROUNDS_FIXED_WORDS: bool

    def fill(self, run: LoadedRun, ids: torch.Tensor, known: torch.Tensor, options: SampleOptions,
             generator: torch.Generator, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor | None]:
        """One batch: windows (N, L) generated where `known` (L,) is False, and the scores (N, L, V)
        each position was drawn from (None where it has none)."""


class ExactLikelihood(Protocol):
    """With "likelihood_exact": it can be the teacher."""

    def token_nll(self, run: LoadedRun, ids: torch.Tensor) -> torch.Tensor:
        """-log p (nats) of each token of ids (B, L) after the first, given what precedes, (B, L-1)."""


class BoundedLikelihood(Protocol):
    """With "likelihood_bound": a variational bound on -log p (dlm evaluate --nll)."""

    BOUND_TERMS: tuple[str, ...]  # the terms window_bound returns
    BOUND_OPTIONS: frozenset[str]  # which of "x0", "steps" (a BoundChain) and "spacing" its bound reads

    def window_bound(self, run: LoadedRun, ids: torch.Tensor, draws: int, generator: torch.Generator | None = None,
                     x0: str | None = None, chain: BoundChain | None = None) -> dict[str, torch.Tensor]:
        """Each window's bound terms summed over its positions, (B,) each, from `draws` draws."""


class Temperature(Protocol):
    """With "temperature": samples at a temperature (dlm evaluate --matched)."""

    def decode_again(self, run: LoadedRun, options: SampleOptions,
                     device: torch.device | str = "cpu") -> Callable[[float], torch.Tensor] | None:
        """draw(temperature) -> ids (N, L) from one run of its chains, where the temperature enters
        only the final draw; None where it enters every step (each temperature is sampled afresh)."""


class Guidance(Protocol):
    """With "guidance": a classifier's gradient steers its chain."""

    def check_guidance(self, run: LoadedRun) -> None:
        """One UserError line where this run's chain cannot be guided."""

    def guided_sample(self, run: LoadedRun, options: SampleOptions, guide: Guide | None, generator: torch.Generator,
                      device: torch.device | str = "cpu") -> torch.Tensor:
        """One batch (N, L) guided by `guide` (None: the samples generate draws for the same generator)."""


class Latents(Protocol):
    """With "latent": noised latents a classifier reads (the guide of "guidance")."""

    def latent_dim(self, run: LoadedRun) -> int:
        """A latent's size per position."""

    def latent_timesteps(self, run: LoadedRun) -> int:
        """T: latents are noised to timesteps 0..T-1."""

    def clean_latents(self, run: LoadedRun, ids: torch.Tensor) -> torch.Tensor:
        """The latents (B, L, d) of windows ids (B, L) at timestep 0, unnoised."""

    def noised_latents(self, run: LoadedRun, ids: torch.Tensor, t: torch.Tensor,
                       generator: torch.Generator) -> torch.Tensor:
        """x_t (B, L, d) of windows ids at timesteps t (B,), as its training draws them."""


class Geometry(Protocol):
    """With "geometry": the collapse and embedding-geometry analyses."""

    def noise_scale(self, config: Config) -> float:
        """sigma0: the noise scale its embedding rows are held against (rows closer blur together)."""

    def rounding_bias(self, run: LoadedRun) -> torch.Tensor:
        """Its rounding decoder's bias (V,): where a vector that carries nothing decodes to."""


class Probe(Protocol):
    """With "probe": tables of how its denoiser does on held-out windows (benchmarks/probe.py)."""

    def probe(self, run: LoadedRun, ids: torch.Tensor, unigram: torch.Tensor,
              start_ts: Sequence[float] = ()) -> list[tuple[str, pd.DataFrame]]:
        """(title, table) pairs for held-out windows ids (B, L) and the training unigram's log-probs
        (V,); start_ts: noise levels in (0, 1] to run the chain from (where it has such a probe)."""


CAPABILITIES: dict[str, type | None] = {  # each capability a family may declare, and what it then has
    "likelihood_exact": ExactLikelihood, "likelihood_bound": BoundedLikelihood, "infill": Fills, "prefix": Fills,
    "length": Fills, "guidance": Guidance, "latent": Latents, "temperature": Temperature, "geometry": Geometry,
    "probe": Probe,
}


def members(protocol: type) -> list[str]:
    """The names a protocol lists: its annotated attributes and its functions."""
    own = {name for name in vars(protocol) if not name.startswith("_")}
    return sorted(own | set(getattr(protocol, "__annotations__", {})))


def module_members(supports: Iterable[str]) -> list[str]:
    """Every name a family module declaring `supports` must have."""
    names = set(members(FamilyModule))
    for capability in supports:
        names |= set(members(CAPABILITIES[capability]))
    return sorted(names)


def missing(module: ModuleType) -> list[str]:
    """The contract's names `module` lacks (or has as something not callable where a function is
    listed): [] for a module that keeps the contract."""
    gaps = []
    for name in module_members(getattr(module, "SUPPORTS", ())):
        if not hasattr(module, name):
            gaps.append(name)
        elif not name.isupper() and not callable(getattr(module, name)):
            gaps.append(f"{name} (not callable)")
    return gaps
