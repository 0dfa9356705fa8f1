"""Model families. Each family is one module, registered by one line in FAMILIES (its Config
`model` value -> the module). What a family module supplies, and all that the rest of the package
and the benchmarks may read of it, of its objective and of its model, is the contract written as
code in dlm.families.contract: FamilyModule (every family), one protocol per capability it declares
in SUPPORTS (contract.CAPABILITIES: "likelihood_exact", "likelihood_bound", "infill", "prefix",
"length", "guidance", "latent", "temperature", "geometry", "probe"), Objective and Model; the types
it receives and returns (LoadedRun, SampleOptions, Frames, Chain, Terms) live there too.

Here: the registry and what the layers above ask of it by name: family(name), supports(name,
capability), the key check of a Config against its family (check_config: each family-specific key
belongs to the families whose CONFIG_KEYS list it), the "not available" line, a run's family in its
own words (describe) and the sampling options a family's sampler reads (sample_settings,
check_sample_options with the family's check_given_options). A new family is one new module plus one line in FAMILIES;
tests/test_family_contract.py checks it.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable, Mapping
from types import ModuleType

from dlm.core.config import Config, ConfigError
from dlm.core.errors import UserError
from dlm.families.contract import Terms  # noqa: F401  (a family module's TERMS)

FAMILIES = {
    "gaussian": "dlm.families.gaussian",
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


def with_capability(capability: str) -> list[str]:
    """The families that declare `capability`, in FAMILIES order: whose runs a "use ..." line names."""
    return [name for name in FAMILIES if supports(name, capability)]


def families_named(names: list[str]) -> str:
    """'the gaussian family', 'the gaussian and masked families': families in a message."""
    return f"the {listed(names)} famil{'y' if len(names) == 1 else 'ies'}"


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
            raise ConfigError(f"'{key}' ({value}) is an option of {families_named(owners)}; the '{config.model}' "
                              f"family does not read it: leave it at its default ({default}) or use model: {owners[0]}.")
    module.check_config(config)


def without_other_families_keys(config: Config, given: set[str]) -> tuple[Config, list[str]]:
    """A preset of one family run as another (`dlm train-ar params/smoke.yaml`, `--model masked`):
    the preset's keys that the new family does not read are set back to their defaults and
    returned, so they can be named; the keys in `given` (the user's own) stay, for check_config."""
    defaults, module = Config(), family(config.model)
    dropped = [key for key in sorted(family_keys() - module.CONFIG_KEYS)
               if key not in given and getattr(config, key) != getattr(defaults, key)]
    return config.replace(**{key: getattr(defaults, key) for key in dropped}), dropped


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
    return f"{what} is not available for the '{name}' family{why} ({FAMILIES[name]})."


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
            owner = (f"the {readers[0]} family's sampler" if len(readers) == 1
                     else f"the {listed(readers)} families' samplers")
            raise UserError(f"{flag(option)} is an option of {owner}; the '{name}' family has none: "
                            f"drop {flag(option)}.")
    family(name).check_given_options(given, flag)
