"""The classifier-guided control table (Diffusion-LM's Table 2, at this budget): for each attribute,
success and fluency of unguided samples, guided samples at a few strengths (their method: the run's
family, e.g. "gaussian" and "gaussian + guidance"), the AR baseline's plain samples and its
rejection-sampled ones, and held-out text for reference.

success (judge): share of samples that the JUDGE (a classifier on clean token ids, trained apart
from the guide) calls positive; success (rule): share for which the attribute's own rule holds
(exact, from the ids); guide p: the guiding classifier's mean p(A) on the samples' clean
embeddings at t = 0; teacher ppl: perplexity under the AR teacher (lm-score).

The AR baseline does the task by rejection sampling with the SAME guide the guided run uses:
k candidates per sample, the first that the guide (reading the candidate's latents in the guided
run's family at t = 0) calls positive, else the one it scores highest. So both methods
use one classifier, and the judge grades both. The AR run is also the teacher that scores every
row's fluency (`ArBaseline`).
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass

import pandas as pd
import torch

from dlm.core.data import Tokenizer
from dlm.core.errors import UserError
from dlm.core.textstats import heldout_windows
from dlm.evaluation.evaluate import records_from_ids, sample_ids, teacher_nll
from dlm.evaluation.rundata import run_data
from dlm.families import supports
from dlm.runs.build import LoadedRun
from dlm.runs.classifier import Attribute, Classifier, attribute
from dlm.runs.guidance import FLUENCY, guided_ids
from dlm.runs.sample import SampleOptions, generate

COLUMNS = ("attribute", "method", "strength", "samples", "success_judge", "success_rule", "guide_p",
           "teacher_ppl", "seconds")


@dataclass(frozen=True)
class GuidanceSettings:
    """How the guided rows are drawn (dlm.runs.guidance): at each of `strengths` (strength 0,
    unguided, is always a row), with the hook's fluency weight and inner steps."""
    strengths: Sequence[float]
    fluency: float = FLUENCY
    inner_steps: int = 3


@dataclass(frozen=True)
class ArBaseline:
    """The autoregressive run the table compares with: the teacher that scores every row's fluency,
    and the sampler of the AR rows, `candidates` per sample for its rejection-sampled row."""
    run: LoadedRun
    candidates: int = 4


def in_vocabulary(ids: torch.Tensor, source: Tokenizer, target: Tokenizer, length: int) -> torch.Tensor:
    """Rows of ids of one vocabulary as rows of `length` ids of another (the same rows when the
    vocabularies agree; else the texts encoded again, cut or padded)."""
    if source.fingerprint() == target.fingerprint():
        return ids[:, :length]
    rows = sample_ids(records_from_ids(ids, source), target)
    out = torch.full((len(rows), length), target.pad_id, dtype=torch.long)
    for i, row in enumerate(rows):
        out[i, : min(length, len(row))] = torch.tensor(row[:length], dtype=torch.long)
    return out


def guide_prob(run: LoadedRun, guide: Classifier, ids: torch.Tensor) -> torch.Tensor:
    """The guide's p(A) for clean windows (N, L): their latents (the family's clean_latents), at t = 0."""
    with torch.no_grad():
        return guide.prob(run.family.clean_latents(run, ids), torch.zeros(len(ids), dtype=torch.long))


def score(run: LoadedRun, teacher: LoadedRun | None, target: Attribute, guide: Classifier, judge: Classifier,
          ids: torch.Tensor) -> dict:
    """One row's numbers for samples `ids` (N, L) in the run's vocabulary (no teacher: no perplexity)."""
    fluency = float("nan")
    if teacher is not None:
        fluency = math.exp(teacher_nll(teacher, sample_ids(records_from_ids(ids, run.tokenizer), teacher.tokenizer)))
    return {"samples": len(ids), "success_judge": float((judge.prob(ids) > 0.5).float().mean()),
            "success_rule": float(target.label(ids).float().mean()),
            "guide_p": float(guide_prob(run, guide, ids).mean()),
            "teacher_ppl": fluency}


def rejection_pick(probs: torch.Tensor, candidates: int) -> torch.Tensor:
    """Index of the kept candidate in each block of `candidates` (probs (N * k,)): the first with
    p > 0.5, else the most probable."""
    blocks = probs.view(-1, candidates)
    accepted = blocks > 0.5
    first = torch.where(accepted.any(1), accepted.float().argmax(1), blocks.argmax(1))
    return torch.arange(len(blocks)) * candidates + first


def ar_candidates_drawn(run: LoadedRun, ar_run: LoadedRun, options: SampleOptions, candidates: int,
                        device: torch.device | str = "cpu") -> tuple[torch.Tensor, float]:
    """num_samples * candidates AR samples at the AR run's own temperature, in the guided run's
    vocabulary and length, and the seconds they took."""
    start = time.perf_counter()
    ar_options = SampleOptions.from_config(ar_run.config, num_samples=options.num_samples * candidates,
                                           seed=options.seed, batch_size=options.batch_size)
    drawn = in_vocabulary(generate(ar_run, ar_options, device).ids, ar_run.tokenizer, run.tokenizer, run.config.seq_len)
    return drawn, time.perf_counter() - start


def control_rows(run: LoadedRun, attribute_name: str, guide: Classifier, judge: Classifier, options: SampleOptions,
                 guidance: GuidanceSettings, ar: ArBaseline | None = None, *, unguided: torch.Tensor | None = None,
                 ar_drawn: tuple[torch.Tensor, float] | None = None, device: torch.device | str = "cpu",
                 samples_out: dict | None = None) -> list[dict]:
    """Every row of one attribute's table (see the module docstring); without `ar`, no AR rows and
    no perplexity. `unguided` and `ar_drawn`: the unguided samples and the AR's candidates when
    already drawn (the same for every attribute). `samples_out`: filled with {strength: ids} (the
    control notebook's slider)."""
    target = attribute(attribute_name, run.tokenizer)
    teacher = ar.run if ar is not None else None
    family = run.config.model  # the method of the run's own rows: its family's name
    guide.to(device)
    rows = []

    def add(method, strength, ids, seconds):
        rows.append({"attribute": attribute_name, "method": method, "strength": strength,
                     **score(run, teacher, target, guide, judge, ids), "seconds": seconds})

    for strength in (0.0, *guidance.strengths):
        start = time.perf_counter()
        if strength == 0 and unguided is not None:
            ids = unguided
        else:
            ids = guided_ids(run, options, guide, strength, guidance.fluency, guidance.inner_steps, device=device)
        add(family if strength == 0 else f"{family} + guidance", strength, ids, time.perf_counter() - start)
        if samples_out is not None:
            samples_out[strength] = ids
    if ar is not None:
        if ar_drawn is None:
            ar_drawn = ar_candidates_drawn(run, ar.run, options, ar.candidates, device)
        drawn, seconds = ar_drawn
        add("AR", float("nan"), drawn[: options.num_samples], seconds / ar.candidates)
        kept = drawn[rejection_pick(guide_prob(run, guide, drawn), ar.candidates)]
        add(f"AR + rejection (best of {ar.candidates})", float("nan"), kept, seconds)
    heldout = heldout_windows(run_data(run).val_ids, run.config.seq_len, options.num_samples, options.seed)
    add("held-out text", float("nan"), torch.as_tensor(heldout), 0.0)
    return rows


def control_table(run: LoadedRun, classifiers: dict[str, tuple[Classifier, Classifier]], options: SampleOptions,
                  guidance: GuidanceSettings, ar: ArBaseline | None = None, *,
                  device: torch.device | str = "cpu", samples_out: dict | None = None) -> pd.DataFrame:
    """control_rows for every attribute ({name: (guide, judge)}); the unguided samples (and the AR's
    candidates) drawn once. `samples_out`: filled with {attribute: {strength: ids}}."""
    if ar is not None and not supports(ar.run.config.model, "likelihood_exact"):
        raise UserError("The teacher must be an autoregressive run: train one with dlm train-ar params/ar.yaml.")
    options = dataclasses.replace(options, record_every=0)
    start = time.perf_counter()
    unguided = guided_ids(run, options, device=device)
    seconds = time.perf_counter() - start
    ar_drawn = None if ar is None else ar_candidates_drawn(run, ar.run, options, ar.candidates, device)
    rows = []
    for name, (guide, judge) in classifiers.items():
        part = control_rows(run, name, guide, judge, options, guidance, ar, unguided=unguided, ar_drawn=ar_drawn,
                            device=device, samples_out=None if samples_out is None else samples_out.setdefault(name, {}))
        part[0]["seconds"] = seconds
        rows.extend(part)
    return pd.DataFrame(rows, columns=list(COLUMNS))


def markdown(table: pd.DataFrame) -> str:
    """The table as markdown, one line per row."""
    header = ["attribute", "method", "strength", "samples", "success (judge)", "success (rule)", "guide p",
              "teacher ppl", "seconds"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]

    def fmt(value, digits=3):
        if isinstance(value, float):
            return "" if math.isnan(value) else f"{value:,.1f}" if abs(value) >= 100 else f"{value:.{digits}g}"
        return str(value)

    for record in table.to_dict("records"):
        cells = [record["attribute"], record["method"], fmt(record["strength"]), str(record["samples"]),
                 fmt(record["success_judge"], 2), fmt(record["success_rule"], 2), fmt(record["guide_p"], 2),
                 fmt(record["teacher_ppl"]), fmt(record["seconds"], 2)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
