"""The Gaussian diffusion family (Diffusion-LM): its family interface (see dlm.families). The model
is in gaussian_model, the loss in gaussian_objective, the reverse chain in gaussian_sampling, the
block layout it shares with the masked family in blocks."""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import fields

import torch
from torch import nn

from dlm.core.config import Config, ConfigError, section_keys
from dlm.core.runtime import autocast
from dlm.core.schedule import NoiseSchedule, q_sample
from dlm.families import Terms
from dlm.families.contract import Chain, Frames, Guide, LoadedRun, SampleOptions, batches
from dlm.families.gaussian_bound import BOUND_OPTIONS, BOUND_TERMS, window_bound  # noqa: F401  (its likelihood)
from dlm.families.gaussian_guidance import (
    chain_scheduler,
    check_guidance,  # noqa: F401  (its guidance check)
    guidance_hook,
)
from dlm.families.gaussian_model import DiffusionLM, decode, rounding_logits
from dlm.families.gaussian_objective import GaussianDiffusion, LossSettings
from dlm.families.gaussian_probe import probe  # noqa: F401  (its probe)
from dlm.families.gaussian_sampling import Hook, SampleState, chain_blocks, known_positions_hook, sample_chain

NAME = "gaussian"
TITLE = "Gaussian diffusion"
DESCRIPTION = ("Diffusion-LM: Gaussian noise on word embeddings, removed step by step by a transformer, "
               "the result rounded back to words")
SUPPORTS = frozenset({"likelihood_bound", "infill", "prefix", "length", "guidance", "latent", "temperature",
                      "geometry", "probe"})
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
    titles={"mse": "diffusion loss (MSE)", "rounding": "rounding loss (CE)", "prior": "prior loss (KL)"},
    trajectory="The rounding decoder's reading of the predicted x0 at each recorded step; t is the noise level the "
               "denoiser read, the chain's timestep as a fraction of its T (1: pure noise, down to 0).",
)
WHY_NOT = {"likelihood_exact": "its likelihood is a variational bound (dlm evaluate --nll)",
           "sampler": "its chain moves every position's vector at every step: there is no order of unmasking to "
                      "choose (steps, spacing and eta shape it)"}


# The family-specific Config keys it reads (dlm.families.check_config refuses the others'): its own
# section's, the block keys and every sampling key.
CONFIG_KEYS = frozenset({*section_keys("gaussian"), *section_keys("blocks"), *section_keys("sampling")})

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
    # LossSettings' fields are Config keys of the gaussian and blocks sections, read by name
    settings = LossSettings(**{f.name: getattr(config, f.name) for f in fields(LossSettings)})
    return GaussianDiffusion(NoiseSchedule(config.schedule, config.diffusion_steps), settings)


def trunk(model: DiffusionLM) -> nn.Module:
    return model.denoiser


def chain(config: Config) -> Chain:
    """T timesteps; a block run runs a chain per block, one block after the other."""
    return Chain(blocks=chain_blocks(objective(config), config.seq_len), timesteps=config.diffusion_steps)


def check_given_options(given: Mapping[str, object], flag: Callable[[str], str]) -> None:
    """Its sampler takes any of its SAMPLE_OPTIONS together."""


def check_steps(options: SampleOptions, config: Config) -> None:
    """The chain's steps are some of its diffusion_steps timesteps (and the options' own ranges)."""
    options.validate(config.diffusion_steps)


def chain_states(run: LoadedRun, options: SampleOptions, size: int, generator: torch.Generator,
                 device: torch.device | str = "cpu", hooks: Sequence[Hook] = ()) -> Iterator[SampleState]:
    """The reverse chain of `size` samples of `run` as options describe it, its states advanced
    under the run's autocast (its noise is drawn when the first state is asked for)."""
    states = sample_chain(run.model, run.objective, options, (size, run.config.seq_len), generator=generator,
                          device=device, hooks=hooks, banned=options.banned_ids(run.tokenizer))
    return _under_autocast(states, run.config.precision, device)


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


def noise_level(run: LoadedRun, t: int) -> float:
    """A frame's t: the timestep the denoiser read as a fraction of the chain (1: x_T, 0: the last step)."""
    return t / max(run.objective.steps - 1, 1)


def generate(run: LoadedRun, options: SampleOptions, generator: torch.Generator,
             device: torch.device | str = "cpu") -> tuple[torch.Tensor, list[dict]]:
    """One batch of options.num_samples samples (N, L) of `run` (model, objective, config), and
    the trajectory of decoded states every options.record_every steps."""
    check_steps(options, run.config)
    frames = Frames(options)
    banned = options.banned_ids(run.tokenizer)  # the slider's frames too
    for state in chain_states(run, options, options.num_samples, generator, device):
        if frames.wants(state.index):
            frames.add(state.index, noise_level(run, state.t),
                       decode(run.model, state.pred_x0, options.decoder, banned=banned))
    return final_words(run, state, options, generator), frames.frames


def _under_autocast(states, precision: str, device):
    """Advance the reverse chain under the run's autocast (bf16 with precision bf16, or auto on
    CUDA); what the caller does with each state (decoding) runs outside it, in float32."""
    while True:
        with autocast(precision, device):
            state = next(states, None)
        if state is None:
            return
        yield state


def fill(run: LoadedRun, ids: torch.Tensor, known: torch.Tensor, options: SampleOptions, generator: torch.Generator,
         device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Control, one batch: windows ids (N, L) generated where `known` (L,) is False, through the
    reverse chain with `known_positions_hook` (Diffusion-LM's replacement method); the words and
    the final rounding scores (N, L, V) (for constraints applied after the chain)."""
    hooks = [known_positions_hook(run.model, ids.to(device), known.expand(len(ids), -1).to(device))]
    state = last_state(chain_states(run, options, len(ids), generator, device, hooks))
    scores = rounding_logits(run.model, state.x, options.decoder, options.banned_ids(run.tokenizer)).cpu()
    return final_words(run, state, options, generator), scores


def decode_again(run: LoadedRun, options: SampleOptions,
                 device: torch.device | str = "cpu") -> Callable[[float], torch.Tensor] | None:
    """The temperature enters only the final rounding: a whole-window chain runs once and its last
    state is decoded again at each temperature (from the generator's state after the chains: with
    one batch, exactly dlm sample's draw). A block run decodes each block as it finishes: None."""
    if chain_blocks(run.objective, run.config.seq_len) > 1:
        return None
    check_steps(options, run.config)
    generator = torch.Generator().manual_seed(options.seed)
    finals = [last_state(chain_states(run, dataclasses.replace(options, num_samples=size), size, generator, device)).x
              for _, size in batches(options.num_samples, options.batch_size)]
    final_x, after_chains = torch.cat(finals), generator.get_state()

    def draw(temperature: float) -> torch.Tensor:
        decode_generator = torch.Generator()
        decode_generator.set_state(after_chains)
        return decode(run.model, final_x, options.decoder, temperature, decode_generator,
                      options.banned_ids(run.tokenizer)).cpu()
    return draw


def guided_sample(run: LoadedRun, options: SampleOptions, guide: Guide | None, generator: torch.Generator,
                  device: torch.device | str = "cpu") -> torch.Tensor:
    """One batch guided by `guide` (dlm.families.gaussian_guidance.guidance_hook at each step)."""
    hooks = [] if guide is None else [guidance_hook(guide.classifier, chain_scheduler(run, options), guide.strength,
                                                    guide.fluency, guide.inner_steps, guide.target)]
    return final_words(run, last_state(chain_states(run, options, options.num_samples, generator, device, hooks)),
                       options, generator)


# --- its latents (a latent classifier's inputs) and its geometry --------------------------------


def latent_dim(run: LoadedRun) -> int:
    return run.model.embed_dim


def latent_timesteps(run: LoadedRun) -> int:
    return run.objective.steps


def clean_latents(run: LoadedRun, ids: torch.Tensor) -> torch.Tensor:
    """EMB(w): the words' embeddings (B, L, d), the latents at t = 0."""
    with torch.no_grad():
        return run.model.embed(ids).float()


def noised_latents(run: LoadedRun, ids: torch.Tensor, t: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """x_t of windows `ids` at timesteps t, as the run's training draws them (x0 = EMB(w) + sigma0
    noise unless the run diffuses the clean embeddings)."""
    schedule = run.objective.schedule
    with torch.no_grad():
        x0 = clean_latents(run, ids)
        if run.config.rounding_target != "clean":
            x0 = x0 + schedule.sigma0 * torch.randn(x0.shape, generator=generator)
        return q_sample(schedule, x0, t, torch.randn(x0.shape, generator=generator))


def noise_scale(config: Config) -> float:
    """sigma0, the spread of q(x0 | w): rows closer than a few sigma0 blur together under it."""
    return NoiseSchedule(config.schedule, config.diffusion_steps).sigma0


def rounding_bias(run: LoadedRun) -> torch.Tensor:
    return run.model.rounding_bias()
