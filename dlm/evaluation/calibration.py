"""A run's sampling temperature, chosen by a property of the text: the temperature (decode_temperature) at
which its samples' unigram entropy equals held-out text's. A sampler that runs hotter than text
(more rare words, fewer of the bigrams text uses) reads worse than it could; the temperature that
brings its entropy down to the text's is set by the text, never by a score of the samples.

`dlm calibrate --run_dir RUN` (or `calibrate_temperature: true` in a preset, at the end of training)
writes RUN/calibration.json; from then on the run samples at that temperature by default
(dlm.runs.build.load_run), and `--temperature T` still asks for any other. The record keeps the
entropy at the recipe's own temperature too, so the temperature-1 numbers stay reported.
"""

from __future__ import annotations

import json
import logging

import torch

from dlm.core.data import atomic_write_bytes
from dlm.evaluation.matched import entropy_of, find_temperature, heldout_entropy, temperature_sampler
from dlm.runs.build import LoadedRun, load_run, recipe_config
from dlm.runs.rundir import RunDir
from dlm.runs.sample import SampleOptions

logger = logging.getLogger("dlm")


def calibrate(run: LoadedRun, num_samples: int = 64, seed: int = 0, tolerance: float = 0.01,
              device: str | torch.device = "cpu") -> dict:
    """The temperature at which `num_samples` samples (seed `seed`) sit at the unigram entropy of
    as many held-out windows, to `tolerance` (relative); at temperature 0 (the argmax) when even
    that is above held-out entropy (`matched` False then). Draws in float64, as every sampler does."""
    recipe = recipe_config(run)  # the preset's own temperature, not an earlier calibration's
    options = SampleOptions.from_config(recipe, num_samples=num_samples, seed=seed, record_every=0,
                                        batch_size=num_samples)
    draw = temperature_sampler(run, options, device)
    target = heldout_entropy(run, num_samples)
    temperature, entropy = find_temperature(lambda t: entropy_of(run, draw(t)), target, tolerance)
    return {"temperature": round(float(temperature), 4), "entropy_bits": entropy, "heldout_entropy_bits": target,
            "matched": abs(entropy / target - 1) <= tolerance, "tolerance": tolerance,
            "recipe_temperature": recipe.decode_temperature,
            "recipe_entropy_bits": entropy_of(run, draw(recipe.decode_temperature)),
            "checkpoint": run.checkpoint.name, "step": run.step, "ema": run.used_ema,
            "num_samples": num_samples, "seed": seed}


def write_calibration(run_dir, record: dict, command: str) -> None:
    """RUN/calibration.json: the record and the command that made it."""
    record = {**record, "command": command}
    atomic_write_bytes(RunDir(run_dir).calibration, (json.dumps(record, indent=2) + "\n").encode())


def calibrate_trained_run(run_dir, device: str | torch.device = "cpu") -> dict | None:
    """The end of `dlm train` and train.ipynb: a run whose config asks calibrate_temperature gets its
    last.pt calibrated (RUN/calibration.json) and logged; None for a run that does not ask. (Not in
    dlm.runs.train itself: the runs layer does not reach up into the evaluations.)"""
    run = load_run(run_dir, device=device)
    if not run.config.calibrate_temperature:
        return None
    record = calibrate(run, device=device)
    write_calibration(run_dir, record, f"dlm calibrate --run_dir {run_dir} (at the end of training)")
    logger.info("calibrated: %s -> %s", describe(record), RunDir(run_dir).calibration)
    return record


def describe(record: dict) -> str:
    """One line: what the calibration found."""
    where = (f"temperature {record['temperature']:g} puts the samples at {record['entropy_bits']:.3f} bits"
             if record["matched"] else
             f"even the argmax (temperature 0) is at {record['entropy_bits']:.3f} bits, above")
    return (f"{where}; held-out text: {record['heldout_entropy_bits']:.3f} bits; the recipe's temperature "
            f"{record['recipe_temperature']:g}: {record['recipe_entropy_bits']:.3f} bits "
            f"({record['num_samples']} samples, seed {record['seed']}, {record['checkpoint']} at step {record['step']})")
