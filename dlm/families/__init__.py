"""Model families. Each family is one module that supplies, under the same names:

- NAME: the Config `model` value that selects it;
- new_model(config, vocab_size, pretrained=None): a freshly initialised nn.Module;
- objective(config): what the training loop minimises (`terms` and `training_losses(model, ids, ...)`);
- trunk(model): the network torch.compile wraps (parameter names stay the same);
- generate(model, objective, config, options, generator, device): sampled ids (N, L) and, when
  options.record_every asks for it, the trajectory of decoded states;
- SCORES_TOKENS: whether the model gives exact per-token likelihoods (it can be a teacher);
- ANALYSES: which of the workbench's analyses apply to its runs.

A third family (masked diffusion, say) is one new module plus one line in FAMILIES; nothing else
branches on the family.
"""

from __future__ import annotations

import importlib
from types import ModuleType

FAMILIES = {
    "diffusion": "dlm.families.gaussian",
    "ar": "dlm.families.autoregressive",
}


def family(name: str) -> ModuleType:
    """The family module for a Config's `model` value."""
    if name not in FAMILIES:
        raise ValueError(f"Unknown model family '{name}': use one of {', '.join(FAMILIES)}.")
    return importlib.import_module(FAMILIES[name])
