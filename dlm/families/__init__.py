"""Model families. Each family is one module that supplies, under the same names:

- NAME: the Config `model` value that selects it (the key of its line in FAMILIES);
- TITLE and DESCRIPTION: its name for a reader ("masked diffusion") and one line on what it does
  (the report index's family column);
- likelihood_kind(config): what its likelihood number is, "exact NLL" (with "likelihood_exact"),
  "NELBO" or "bound" (with "likelihood_bound"), followed by ", ..." where the run's config decides
  which bound (the Gaussian bound is of the chain toward the sampler's x0);
- recipe(config): the run's family-specific choices in words (["blocks of 4", "clipped mask rate
  0.3-0.8", ...]), what tells one run of the family from another in the report index;
- SUPPORTS: what the workbench may ask of it, a set of: "likelihood_exact" (per-token NLL: it can
  be the teacher), "likelihood_bound" (a variational bound: `dlm evaluate --nll`), "infill",
  "prefix", "length" (classifier-free control), "guidance" (classifier guidance of its chain),
  "latent" (noised latents for a latent classifier), "temperature" (samples drawn at a
  temperature: matched entropy), "geometry" (the collapse and embedding-geometry analyses);
- SAMPLE_OPTIONS: the SampleOptions fields its sampler reads (a user giving another is told so, and
  a samples or control record lists these alone: sample_settings); optionally
  check_given_options(given, flag): raise UserError for options given together that it cannot take;
- ROUNDS_FIXED_WORDS (with "infill", "prefix" or "length"): whether fill's fixed words go through the
  chain and its rounding too (the Gaussian chain), so a control record can say how often the
  rounding kept them (kept_by_rounding); False where fill gives them back as given;
- CONFIG_KEYS: the family-specific Config keys it reads (every other key is shared: data, training,
  bookkeeping, runtime and the denoiser's size); dlm.families.check_config refuses another family's
  key set away from its default, naming the families that read it;
- check_config(config): raise ConfigError for values the family cannot train (after the key check);
- new_model(config, vocab_size, pretrained=None): a freshly initialised nn.Module with an
  `embedding` (its `.weight` the table AdamW groups apart) and `table()` (the training log's geometry);
- objective(config): what the training loop minimises: `terms` (the metric columns, "total"
  first) and `training_losses(model, ids, generator=None, uniform_t=False, keys=None)`;
- trunk(model): the network torch.compile wraps (parameter names stay the same);
- generate(run, options, generator, device): sampled ids (N, L) and the trajectory frames
  ([{"index", "t", "ids"}], empty when options.record_every is 0 or the family records none);
- fill(run, ids, known, options, generator, device) (with "infill", "prefix" or "length"): windows
  (N, L) generated where `known` is False, and the scores (N, L, V) each position was drawn from
  (None where there are none);
- window_bound(run, ids, draws, generator, ...) and BOUND_TERMS (with "likelihood_bound", unless
  the Gaussian bound of dlm.evaluation.likelihood applies): each window's bound terms, (B,) each;
- TERMS: a Terms, the words the workbench's pages use for it (what it is, what its losses, its
  embedding table, its likelihood and its sampling trajectory are), so that no page speaks of one
  family in another's terms;
- WHY_NOT: for each capability it lacks and each SampleOptions field its sampler does not read, why
  (one clause): the "not available" line a page or a command shows says it.

A new family is one new module plus one line in FAMILIES; tests/test_family_contract.py checks it.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable, Mapping
from types import ModuleType

from dlm.core.config import Config, ConfigError
from dlm.core.errors import UserError

FAMILIES = {
    "diffusion": "dlm.families.gaussian",
    "masked": "dlm.families.masked",
    "ar": "dlm.families.autoregressive",
    "uniform": "dlm.families.uniform",
}


def family(name: str) -> ModuleType:
    """The family module for a Config's `model` value."""
    if name not in FAMILIES:
        raise UserError(f"Unknown model family '{name}': use one of {', '.join(FAMILIES)}.")
    return importlib.import_module(FAMILIES[name])


def family_keys() -> frozenset[str]:
    """The Config keys that some family reads and another does not."""
    return frozenset().union(*(family(name).CONFIG_KEYS for name in FAMILIES))


def readers(key: str) -> list[str]:
    return [name for name in FAMILIES if key in family(name).CONFIG_KEYS]


def listed(names: list[str]) -> str:
    """'a', 'a and b', 'a, b and c': family names in a message."""
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} and {names[-1]}"


def check_config(config: Config) -> None:
    """The one check of a Config against its family, before anything is written: a family-specific
    key set (away from its default) for a family that does not read it is one line naming the
    families that do (ignoring it would train something other than what was asked); then the
    family's own checks."""
    module, defaults = family(config.model), Config()
    for key in sorted(family_keys() - module.CONFIG_KEYS):
        value, default = getattr(config, key), getattr(defaults, key)
        if value != default:
            owners = readers(key)
            owner = "Gaussian-diffusion" if owners == ["diffusion"] else listed(owners)
            raise ConfigError(f"'{key}' ({value}) is a {owner} option; the '{config.model}' family does not read "
                              f"it: leave it at its default ({default}) or use model: {owners[0]}.")
    module.check_config(config)


def without_other_families_keys(config: Config, given: set[str]) -> tuple[Config, list[str]]:
    """A preset of one family run as another (`dlm train-ar params/smoke.yaml`, `--model masked`):
    the preset's keys that the new family does not read are set back to their defaults and
    returned, so they can be named; the keys in `given` (the user's own) stay, for check_config."""
    defaults, module = Config(), family(config.model)
    dropped = [key for key in sorted(family_keys() - module.CONFIG_KEYS)
               if key not in given and getattr(config, key) != getattr(defaults, key)]
    return config.replace(**{key: getattr(defaults, key) for key in dropped}), dropped


@dataclasses.dataclass(frozen=True)
class Terms:
    """How the workbench's pages speak of a family (its module's TERMS). Each text is a sentence or
    two in Markdown; None where the family has no such thing (a caption it never needs)."""

    name: str  # what it is, e.g. "Gaussian diffusion (Diffusion-LM)"
    losses: str  # the loss curves: what each metrics.csv term is
    table: str  # the embedding table's geometry over training: what it means for this family
    blocks: str | None = None  # what it is when it generates in blocks (block_size below the window)
    likelihood: str | None = None  # its likelihood over training (with "likelihood_bound")
    trajectory: str | None = None  # a frame of its sampling trajectory, and what the frame's t is


def describe(config: Config) -> str:
    """The run's family in its own words: its TERMS name, or its block name with the block size."""
    terms, size = family(config.model).TERMS, config.block_size
    if size is not None and size < config.seq_len and terms.blocks:
        return f"{terms.blocks}, blocks of {size} token{'s' if size > 1 else ''} generated left to right"
    return terms.name


def supports(name: str, capability: str) -> bool:
    """Whether the family `name` declares `capability` (see SUPPORTS above)."""
    return capability in family(name).SUPPORTS


def not_available(name: str, what: str, lacks: str | None = None) -> str:
    """The one line the workbench shows for something a family does not support; `lacks` (a
    capability or a SampleOptions field the family does not have) adds why, from its WHY_NOT."""
    why = f": {family(name).WHY_NOT[lacks]}" if lacks is not None else ""
    return f"{what} is not available for the '{name}' family{why} (dlm.families.{FAMILIES[name].rsplit('.', 1)[1]})."


def sample_settings(name: str, options) -> dict:
    """The SampleOptions values (a dataclass) the family `name`'s sampler reads (its SAMPLE_OPTIONS),
    in field order: what a samples or control record lists. The rest are settings of other families'
    samplers; listed on a record, they would claim a spacing or decoder that no sampler used."""
    read = family(name).SAMPLE_OPTIONS
    return {key: value for key, value in dataclasses.asdict(options).items() if key in read}


def check_sample_options(name: str, given: Mapping[str, object], flag: Callable[[str], str] = "--{}".format) -> None:
    """Sampling options (SampleOptions fields) a user gave, None where not given: the first one the
    family `name`'s sampler does not read is one line naming it and the family, before any sampling
    (ignoring it silently would sample something other than what was asked). `flag` writes an
    option as the user gave it (a command-line flag by default, or a notebook parameter)."""
    for option, value in given.items():
        if value is not None and option not in family(name).SAMPLE_OPTIONS:
            readers = [other for other in FAMILIES if option in family(other).SAMPLE_OPTIONS]
            owner = ("the Gaussian diffusion chain" if readers == ["diffusion"]
                     else f"the {listed(readers)} families' samplers")
            raise UserError(f"{flag(option)} is an option of {owner}; the '{name}' family has none: "
                            f"drop {flag(option)}.")
    check_together = getattr(family(name), "check_given_options", None)  # options its sampler cannot take together
    if check_together is not None:
        check_together(given, flag)
