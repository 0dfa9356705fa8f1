"""The Gaussian diffusion family (Diffusion-LM): its family interface (see dlm.families). The model
is in gaussian_model, the loss in gaussian_objective, the reverse chain in gaussian_sampling, the
block layout it shares with the masked family in blocks."""

from __future__ import annotations

import collections
from collections.abc import Callable, Iterator, Sequence
from dataclasses import fields
from typing import TYPE_CHECKING

import torch
from torch import nn

from dlm.core.config import Config, ConfigError, section_keys
from dlm.core.runtime import autocast
from dlm.core.schedule import NoiseSchedule
from dlm.families import Terms
from dlm.families.gaussian_model import DiffusionLM, decode, rounding_logits
from dlm.families.gaussian_objective import GaussianDiffusion, LossSettings
from dlm.families.gaussian_sampling import Hook, SampleState, known_positions_hook, sample_chain

if TYPE_CHECKING:
    from dlm.runs.build import LoadedRun
    from dlm.runs.sample import SampleOptions

NAME = "diffusion"
TITLE = "Gaussian diffusion"
DESCRIPTION = ("Diffusion-LM: Gaussian noise on word embeddings, removed step by step by a transformer, "
               "the result rounded back to words")
SUPPORTS = frozenset({"likelihood_bound", "infill", "prefix", "length", "guidance", "latent", "temperature",
                      "geometry"})
SAMPLE_OPTIONS = frozenset({"steps", "spacing", "clamp", "clamp_fraction", "eta", "x0", "temperature", "unk",
                            "decoder", "seed", "batch_size", "num_samples", "record_every"})
# fixed words are diffused and rounded with the rest; after it they are set again
ROUNDS_FIXED_WORDS = True
TERMS = Terms(
    name="Gaussian diffusion in embedding space (Diffusion-LM)",
    blocks="Gaussian block diffusion (SSD-LM, BD3-LM)",
    losses="The diffusion loss (MSE of the predicted x0 against the clean embeddings), the rounding loss (the "
           "cross-entropy of the words under the rounding decoder) and their total, on training batches and on fixed "
           "validation windows. A low rounding loss alone says nothing about whether samples decode: look at the "
           "samples.",
    table="Mean row norm and mean nearest-neighbour distance of the embedding table, against the noise scale sigma0 "
          "of q(x0|w) (rows closer than a few sigma0 blur together under that noise: a table that shrinks or whose "
          "rows merge is on the road to collapse), the learning rate schedule and training throughput.",
    likelihood="Diffusion-LM's variational bound on -log p(w) (its diffusion, rounding and prior terms) in nats per "
               "token",
    trajectory="The rounding decoder's reading of the predicted x0 at each recorded step; t is the chain's timestep "
               "(from T, pure noise, down to 0).",
)
WHY_NOT = {"likelihood_exact": "its likelihood is a variational bound (dlm evaluate --nll)",
           "sampler": "its chain moves every position's vector at every step: there is no order of unmasking to "
                      "choose (steps, spacing and eta shape it)"}


# The family-specific Config keys it reads (dlm.families.check_config refuses the others'): every
# diffusion key but the masked family's mask rates, every sampling key, and its embedding table's shape.
CONFIG_KEYS = frozenset({*section_keys("diffusion"), *section_keys("sampling"), "embedding_norm", "embedding_scale",
                         "use_learned_embeddings", "rounding"}) - {"mask_rate_min", "mask_rate_max"}

ROUNDING_TARGETS = {"clean": "rounding on clean embeddings", "noisy": "rounding on q(x0|w)",
                    "predicted": "rounding on the predicted x0"}


def likelihood_kind(config: Config) -> str:
    """Diffusion-LM's variational bound, of the reverse chain that steps toward the sampler's x0."""
    return f"bound, {config.sample_x0} x0"


def recipe(config: Config) -> list[str]:
    """The run's Gaussian recipe in words, the choices that tell one such run from another."""
    words = []
    blocks = config.block_size is not None and config.block_size < config.seq_len
    if blocks:
        words.append(f"blocks of {config.block_size}" + ("" if config.trains_every_block else " (one per training window)"))
    words += [f"{config.predict} prediction", f"{config.schedule} schedule (T {config.diffusion_steps})",
              ROUNDING_TARGETS.get(config.rounding_target, f"rounding on {config.rounding_target}"),
              f"embeddings d {config.embed_dim}" + ("" if config.embedding_norm == "none" else f" {config.embedding_norm}")
              + ("" if config.use_learned_embeddings else " fixed")]
    if config.self_condition > 0:
        words.append(f"self-conditioning {config.self_condition:g}")
    if config.left_to_right > 0:
        words.append(f"left-to-right lag {config.left_to_right:g}")
    words.append(f"sampled toward the {config.sample_x0} x0" + (", clamped," if config.clamp else "")
                 + f" in {config.sample_steps} steps" + (" a block" if blocks else ""))
    return words


def check_config(config: Config) -> None:
    """Config's own checks cover the values; its chain runs at most diffusion_steps steps."""
    if config.sample_steps > config.diffusion_steps:
        raise ConfigError(f"'sample_steps' ({config.sample_steps}) must be at most diffusion_steps "
                          f"({config.diffusion_steps}): the chain has that many timesteps.")


def new_model(config: Config, vocab_size: int, pretrained: torch.Tensor | None = None) -> DiffusionLM:
    return DiffusionLM(config, vocab_size, pretrained)


def objective(config: Config) -> GaussianDiffusion:
    # LossSettings' fields are diffusion keys of the Config, read by name
    settings = LossSettings(**{f.name: getattr(config, f.name) for f in fields(LossSettings)})
    return GaussianDiffusion(NoiseSchedule(config.schedule, config.diffusion_steps), settings)


def trunk(model: DiffusionLM) -> nn.Module:
    return model.denoiser


def batch_chains(run: LoadedRun, options: SampleOptions, count: int, generator: torch.Generator,
                 device: torch.device | str = "cpu", hooks_for: Callable[[int, int], Sequence[Hook]] | None = None
                 ) -> Iterator[tuple[int, Iterator[SampleState]]]:
    """`count` samples of `run` as options describe them, in batches of options.batch_size:
    (index of the batch's first sample, its chain's states advanced under the run's autocast).
    hooks_for(first, size): the hooks of that batch's chain. Each chain is built (its noise drawn)
    only when the previous batch is done, so what the caller draws in between keeps its order."""
    for first in range(0, count, options.batch_size):
        size = min(options.batch_size, count - first)
        hooks = hooks_for(first, size) if hooks_for is not None else ()
        states = sample_chain(run.model, run.objective, options, (size, run.config.seq_len), generator, device,
                              hooks=hooks, banned=options.banned_ids(run.tokenizer))
        yield first, _under_autocast(states, run.config.precision, device)


def last_state(states: Iterator[SampleState]) -> SampleState:
    """Run a chain to its end, keeping only the final state."""
    return collections.deque(states, maxlen=1)[0]


def final_words(run: LoadedRun, state: SampleState, options: SampleOptions, generator: torch.Generator | None) -> torch.Tensor:
    """A chain's last state as token ids (B, L) on the CPU: a block chain's words as each block was
    decoded when it finished, else x decoded with the options' decoder, temperature and ban."""
    if state.words is not None:
        return state.words.cpu()
    return decode(run.model, state.x, options.decoder, options.temperature, generator,
                  options.banned_ids(run.tokenizer)).cpu()


def generate(run: LoadedRun, options: SampleOptions, generator: torch.Generator,
             device: torch.device | str = "cpu") -> tuple[torch.Tensor, list[dict]]:
    """`run` (model, objective, config) sampled: options.num_samples samples (N, L) in batches of
    options.batch_size, and the trajectory of decoded states every options.record_every steps
    (frames [{"index", "t", "ids"}])."""
    model = run.model
    options.validate(run.objective.steps)
    all_ids, trajectory = [], []
    banned = options.banned_ids(run.tokenizer)  # the slider's frames too
    for first, states in batch_chains(run, options, options.num_samples, generator, device):
        for state in states:
            if options.records(state.index):
                _record(trajectory, first, state.index, state.t,
                        decode(model, state.pred_x0, options.decoder, banned=banned).cpu())
        all_ids.append(final_words(run, state, options, generator))
    return torch.cat(all_ids), trajectory


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


def fill(run: LoadedRun, ids: torch.Tensor, known: torch.Tensor, options: SampleOptions, generator: torch.Generator,
         device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Control: windows ids (N, L) generated where `known` (L,) is False, through the reverse
    chain with `known_positions_hook` (Diffusion-LM's replacement method), in batches; the words
    and the final rounding scores (N, L, V) (for constraints applied after the chain)."""
    def hooks_for(first: int, size: int) -> list:
        return [known_positions_hook(run.model, ids[first: first + size].to(device), known.expand(size, -1).to(device))]

    words, scores = [], []
    for _, states in batch_chains(run, options, len(ids), generator, device, hooks_for):
        state = last_state(states)
        words.append(final_words(run, state, options, generator))
        scores.append(rounding_logits(run.model, state.x, options.decoder, options.banned_ids(run.tokenizer)).cpu())
    return torch.cat(words), torch.cat(scores)
