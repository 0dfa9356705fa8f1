"""Classifier guidance (Diffusion-LM sec. 5.2, plug-and-play control): a family's chain steered at
every step by the gradient of an attribute classifier (dlm.runs.classifier) that reads its noised
latents. The steering is the family's own (its guided_sample, with "guidance" in its SUPPORTS; the
Gaussian family's is dlm.families.gaussian_guidance); this module checks the run and batches."""

from __future__ import annotations

from dataclasses import replace

import torch

from dlm.core.errors import UserError
from dlm.families import families_named, not_available, supports, with_capability
from dlm.families.contract import FLUENCY, Guide, batches
from dlm.runs.build import LoadedRun
from dlm.runs.classifier import Classifier
from dlm.runs.sample import SampleOptions, check_options

__all__ = ["FLUENCY", "check_guidance", "guided_ids"]


def check_guidance(run: LoadedRun) -> None:
    """A run whose chain classifier guidance can steer: its family's ("guidance"), and then its
    family's own check of this run (a block or left-to-right chain cannot be)."""
    if not supports(run.config.model, "guidance"):
        raise UserError(not_available(run.config.model, f"Classifier guidance of '{run.checkpoint}'", "guidance")
                        + f" Guide a run of {families_named(with_capability('guidance'))}; dlm infill controls this one "
                          "without a classifier.")
    run.family.check_guidance(run)


def guided_ids(run: LoadedRun, options: SampleOptions, classifier: Classifier | None = None, strength: float = 0.0,
               fluency: float = FLUENCY, inner_steps: int = 3, target: int = 1,
               device: torch.device | str = "cpu") -> torch.Tensor:
    """options.num_samples samples (N, L) with guidance toward class `target` of the classifier.
    With strength 0 (or no classifier) they are the samples `dlm sample` draws for the same
    options: the same draws in the same order from the same seed."""
    check_options(run.config, options)
    check_guidance(run)
    if strength < 0 or fluency < 0 or inner_steps < 0:
        raise UserError("guidance strength, fluency and inner_steps must be 0 or more.")
    guide = None
    if classifier is not None:
        classifier.to(device).requires_grad_(False)  # gradients flow to the latents only
        guide = Guide(classifier, strength, fluency, inner_steps, target)
    generator = torch.Generator().manual_seed(options.seed)
    return torch.cat([run.family.guided_sample(run, replace(options, num_samples=size), guide,
                                               generator, device)
                      for _, size in batches(options.num_samples, options.batch_size)])
