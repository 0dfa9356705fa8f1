"""Classifier-free control (Diffusion-LM sec. 7.2): infilling a template, prefix continuation and
length control, all through the run's family's `fill` (the fixed words given, the rest generated),
plus minimum-Bayes-risk selection over candidates (`mbr_select`).

Length control uses the corpus's own end marker. tiny_shakespeare separates speeches by a blank
line, and both tokenizers keep newlines as tokens, so every speech boundary in the training stream
already is the token pair NEWLINE NEWLINE (and a blank line occurs nowhere else). A speech of
exactly N tokens is then: the pair fixed at positions 0-1 and at N+2 to N+3, and no blank line in
between (the sampler's words may not put a newline next to a newline there, nor at the speech's
first or last position). No new token, no retraining: it works on every run trained so far, the AR baseline
included.
"""

from __future__ import annotations

import collections
import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from dlm.core.data import atomic_write_bytes
from dlm.core.errors import UserError
from dlm.families import families_named, sample_settings, supports, with_capability
from dlm.families.contract import batches
from dlm.runs.build import LoadedRun
from dlm.runs.sample import SampleOptions, check_options

BLANK = "__"  # one blank position in a template
MODES = ("template", "prefix", "length")


@dataclass
class Control:
    """What is fixed in a window of the run's seq_len: ids (L,) (blanks hold <pad>), known (L,).
    ids may also be (num_samples, L): one set of fixed words per sample, at the same positions."""

    mode: str  # template | prefix | length
    given: str  # what the user wrote: the template, the prefix, or N
    ids: torch.Tensor
    known: torch.Tensor
    length: int | None = None  # length mode: the speech's token count N

    @property
    def fixed_positions(self) -> list[int]:
        return self.known.nonzero().flatten().tolist()

    @property
    def speech(self) -> slice:
        """Length mode: the positions of the N generated tokens (between the two blank lines)."""
        return slice(2, 2 + self.length)


def _tokens(text: str, run: LoadedRun) -> list[str]:
    return run.tokenizer.tokenize(text.replace("\\n", "\n"))  # \n typed on a command line: a line break


def _check_known(tokens: list[str], run: LoadedRun, what: str) -> None:
    """Every word the run's vocabulary lacks, named in one error."""
    unknown = [t for t in tokens if t is not None and t not in run.tokenizer.stoi]
    if unknown:
        names = ", ".join(repr(t) for t in dict.fromkeys(unknown))
        raise UserError(f"{what} has words that are not in the run's vocabulary: {names}. Use words from the "
                         f"run's vocabulary (its vocab.json), or {BLANK} for a blank to fill.")


def _words(text: str, run: LoadedRun, what: str) -> list[int]:
    tokens = _tokens(text, run)
    _check_known(tokens, run, what)
    return [run.tokenizer.stoi[t] for t in tokens]


def _window(run: LoadedRun, mode: str, given: str, pieces: list[int | None], length: int | None = None) -> Control:
    """pieces: a token id (fixed) or None (blank) per position; the rest of the window is blank."""
    seq_len = run.config.seq_len
    if len(pieces) > seq_len:
        raise UserError(f"The {mode} is {len(pieces)} tokens long, more than the run's seq_len ({seq_len}): "
                         f"shorten it to at most {seq_len} tokens (blanks included).")
    pieces = pieces + [None] * (seq_len - len(pieces))
    ids = torch.tensor([run.tokenizer.pad_id if p is None else p for p in pieces], dtype=torch.long)
    known = torch.tensor([p is not None for p in pieces])
    return Control(mode, given, ids, known, length)


def template_control(run: LoadedRun, template: str) -> Control:
    """'To be , or not to be : __ __ __ __ question': the words fixed, each __ one blank token. A
    template shorter than seq_len is padded with blanks (the window's end is free)."""
    if not template.strip():
        raise UserError(f"The template is empty: write fixed words and {BLANK} blanks, e.g. "
                         f"\"To be , or not to be : {BLANK} {BLANK} {BLANK} question\".")
    tokens: list[str | None] = []
    for part in re.split(f"({BLANK})", template):
        tokens.extend([None] if part == BLANK else _tokens(part, run))
    _check_known(tokens, run, "The template")
    pieces = [None if t is None else run.tokenizer.stoi[t] for t in tokens]
    return _window(run, "template", template, pieces)


def blanked_control(run: LoadedRun, window: Sequence[int], start: int, stop: int) -> Control:
    """A template from a window of text (ids, e.g. held-out): positions start..stop-1 blank, the rest
    fixed; `given` is that template as a user would type it (the notebook's default task)."""
    window = [int(i) for i in window][: run.config.seq_len]
    if not 0 <= start < stop <= len(window):
        raise UserError(f"The blank span {start}..{stop} must lie inside the window's {len(window)} tokens.")
    pieces = [None if start <= i < stop else token for i, token in enumerate(window)]
    words = [BLANK if p is None else run.tokenizer.itos[p].replace("\n", "\\n") for p in pieces]
    # BPE and character pieces carry their own spaces: joined with more, a word would read "Wh at"
    return _window(run, "template", ("" if run.tokenizer.joined_as_is else " ").join(words), pieces)


def prefix_control(run: LoadedRun, prefix: str) -> Control:
    """The first k tokens fixed, the rest of the window generated."""
    pieces = _words(prefix, run, "The prefix")
    if not pieces:
        raise UserError("The prefix is empty: give the words to continue, e.g. \"ROMEO :\\n\".")
    return _window(run, "prefix", prefix, pieces)


def newline_id(run: LoadedRun) -> int:
    """The newline token, whose pair (a blank line) ends a speech; an error when the run has none."""
    newline = run.tokenizer.stoi.get("\n")
    if newline is None:
        raise UserError("--length needs the blank line that ends a speech, but this run's vocabulary has no "
                         "newline token (its corpus has no line breaks): use --template or --prefix.")
    return newline


def length_control(run: LoadedRun, length: int) -> Control:
    """A whole speech of exactly `length` tokens: a blank line, N free positions, a blank line; the
    window's remaining positions are free (the next speech begins there)."""
    most = run.config.seq_len - 4
    if not 1 <= length <= most:
        raise UserError(f"--length must be between 1 and {most} (the run's seq_len {run.config.seq_len} less "
                         f"the two blank lines around the speech), got {length}.")
    newline = newline_id(run)
    pieces = [newline, newline, *[None] * length, newline, newline]
    return _window(run, "length", str(length), pieces, length)


def make_control(run: LoadedRun, template: str | None = None, prefix: str | None = None,
                 length: int | None = None) -> Control:
    """Exactly one of template, prefix, length."""
    given = [name for name, value in (("template", template), ("prefix", prefix), ("length", length))
             if value is not None]
    if len(given) != 1:
        raise UserError("Give exactly one of --template, --prefix or --length.")
    capability = {"template": "infill", "prefix": "prefix", "length": "length"}[given[0]]
    if not supports(run.config.model, capability):
        can = [f"--{flag}" for flag, need in (("template", "infill"), ("prefix", "prefix"), ("length", "length"))
               if supports(run.config.model, need)]
        left_to_right = supports(run.config.model, "likelihood_exact")  # exact per-token NLL: an AR factorisation
        raise UserError(f"--{given[0]} is not available for the '{run.config.model}' family"
                        f"{' (an autoregressive run writes left to right)' if left_to_right else ''}: "
                        f"use {' or '.join(can) or 'another run'}, or a run of {families_named(with_capability(capability))} "
                        f"for --{given[0]}.")
    if template is not None:
        return template_control(run, template)
    if prefix is not None:
        return prefix_control(run, prefix)
    return length_control(run, length)


# --- minimum Bayes risk ---------------------------------------------------------------------------

def hamming_distance(a: Sequence[int], b: Sequence[int]) -> float:
    """Share of positions that differ (sequences of one length)."""
    return sum(x != y for x, y in zip(a, b)) / max(1, max(len(a), len(b)))


def ngram_distance(a: Sequence[int], b: Sequence[int], max_n: int = 4) -> float:
    """1 - a symmetric BLEU-like overlap: the mean over n = 1..max_n of the clipped n-gram matches
    over the mean n-gram count (0: same n-grams, 1: none shared)."""
    scores = []
    for n in range(1, max_n + 1):
        grams_a = collections.Counter(tuple(a[i: i + n]) for i in range(len(a) - n + 1))
        grams_b = collections.Counter(tuple(b[i: i + n]) for i in range(len(b) - n + 1))
        total = (sum(grams_a.values()) + sum(grams_b.values())) / 2
        if total:
            scores.append(sum((grams_a & grams_b).values()) / total)
    return 1 - sum(scores) / len(scores) if scores else 0.0


DISTANCES: dict[str, Callable[[Sequence[int], Sequence[int]], float]] = {
    "ngram": ngram_distance, "hamming": hamming_distance}


def mbr_select(candidates: Sequence[Sequence[int]], distance: str | Callable = "ngram") -> int:
    """Minimum Bayes risk: the index of the candidate with the least summed distance to the others
    (the medoid), as Diffusion-LM decodes infilling. Ties go to the earliest candidate."""
    if not candidates:
        raise ValueError("mbr_select needs at least one candidate.")
    measure = DISTANCES[distance] if isinstance(distance, str) else distance
    rows = [list(map(int, c)) for c in candidates]
    risks = [sum(measure(a, b) for j, b in enumerate(rows) if j != i) for i, a in enumerate(rows)]
    return min(range(len(rows)), key=risks.__getitem__)


def mbr_indices(ids: torch.Tensor | Sequence[Sequence[int]], candidates: int, distance: str | Callable = "ngram"
                ) -> list[int]:
    """Rows (N * k, L) read as N groups of k = `candidates` consecutive candidates: the row index of
    each group's MBR pick (`mbr_select`)."""
    rows = ids.tolist() if isinstance(ids, torch.Tensor) else [list(r) for r in ids]
    return [group + mbr_select(rows[group: group + candidates], distance)
            for group in range(0, len(rows), candidates)]


# --- sampling -------------------------------------------------------------------------------------

@dataclass
class ControlResult:
    control: Control
    ids: torch.Tensor  # (N, L): the fixed words guaranteed at their positions
    texts: list[str]  # the whole window (length mode: the speech alone)
    # per sample: share of fixed positions the rounding already got right; None for a family whose fill
    # gives the fixed words back as given (nothing rounds them: ROUNDS_FIXED_WORDS in dlm.families)
    kept_by_rounding: list[float] | None
    options: SampleOptions
    mbr: int = 1
    masked: list[int] = field(default_factory=list)  # length mode, per sample: newlines the constraint re-rounded


def _length_constraint(run: LoadedRun, ids: torch.Tensor, scores: torch.Tensor | None,
                       control: Control) -> tuple[torch.Tensor, torch.Tensor]:
    """Length mode: no blank line inside the speech. A newline next to a newline, or at the
    speech's first or last position, is replaced by the best other word of the position's scores
    (N, L, V); returns the ids and per row how many positions that changed."""
    ids = ids.clone()
    masked = torch.zeros(len(ids), dtype=torch.long)
    if control.mode != "length":
        return ids, masked
    newline = newline_id(run)
    logits = scores.clone()
    logits[..., newline] = -torch.inf
    first, last = control.speech.start, control.speech.stop - 1
    for i in range(first, last + 1):  # left to right: position i sees the word chosen at i - 1
        bad = (ids[:, i] == newline) & ((ids[:, i - 1] == newline) | (i in (first, last)))
        ids[bad, i] = logits[bad, i].argmax(-1)
        masked += bad
    return ids, masked


def fill_in_batches(run: LoadedRun, targets: torch.Tensor, known: torch.Tensor, options: SampleOptions,
                    generator: torch.Generator, device: str | torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The family's fill of `targets` (N, L) in batches of options.batch_size, one generator through
    them in order: the windows and the scores each position was drawn from (None: the family has none)."""
    parts = [run.family.fill(run, targets[first: first + size], known, options, generator, device)
             for first, size in batches(len(targets), options.batch_size)]
    scores = [part[1] for part in parts]
    return torch.cat([part[0] for part in parts]), None if scores[0] is None else torch.cat(scores)


def infill(run: LoadedRun, control: Control | str, options: SampleOptions | None = None, mbr: int = 1,
           mbr_distance: str = "ngram", device: str | torch.device = "cpu") -> ControlResult:
    """options.num_samples windows with the control's fixed words (a Control, or a template string),
    each the MBR pick of `mbr` candidates when mbr > 1. After the family's fill, the fixed positions
    are set to their words (a guarantee); for a family whose chain rounds them too
    (ROUNDS_FIXED_WORDS), how often the rounding alone had them is reported."""
    if isinstance(control, str):
        control = make_control(run, template=control)
    options = options or SampleOptions.from_config(run.config)
    check_options(run.config, options)
    if mbr < 1:
        raise UserError(f"--mbr must be at least 1 (the number of candidates per sample), got {mbr}.")
    if mbr_distance not in DISTANCES:
        raise UserError(f"mbr distance must be one of {', '.join(DISTANCES)}, got '{mbr_distance}'.")
    if control.ids.ndim == 2 and len(control.ids) != options.num_samples:
        raise UserError(f"The control has {len(control.ids)} rows of fixed words for {options.num_samples} samples.")
    generator = torch.Generator().manual_seed(options.seed)
    # every sample's fixed words, once per MBR candidate
    targets = control.ids.expand(options.num_samples, -1).repeat_interleave(mbr, 0)
    raw, scores = fill_in_batches(run, targets, control.known, options, generator, device)
    raw, masked = _length_constraint(run, raw, scores, control)  # masked: positions the constraint re-rounded
    known = control.known
    kept = None
    if run.family.ROUNDS_FIXED_WORDS:
        kept = ((raw[:, known] == targets[:, known]).float().mean(1) if known.any()
                else torch.ones(len(raw))).tolist()
    ids = torch.where(known, targets, raw)
    if mbr > 1:
        picks = mbr_indices(ids, mbr, mbr_distance)
        ids, masked = ids[picks], masked[picks]
        kept = None if kept is None else [kept[i] for i in picks]
    span = control.speech if control.mode == "length" else slice(None)
    texts = [run.tokenizer.decode(row[span]) for row in ids]
    return ControlResult(control, ids, texts, kept, options, mbr, masked.tolist())


def control_records(result: ControlResult, run: LoadedRun) -> list[dict]:
    """One JSON object per sample: what was fixed, where, and the text (dlm evaluate reads 'text')."""
    control = result.control
    meta = {"mode": control.mode, control.mode: control.given, "fixed_positions": control.fixed_positions,
            "fixed_ids": control.ids[control.known].tolist(), "mbr": result.mbr,
            "checkpoint": str(run.checkpoint), "step": run.step, "model": run.config.model,
            "vocab": run.tokenizer.fingerprint(), **sample_settings(run.config.model, result.options)}
    records = []
    for i, (text, row) in enumerate(zip(result.texts, result.ids)):
        kept = {} if result.kept_by_rounding is None else {"kept_by_rounding": result.kept_by_rounding[i]}
        record = {"index": i, "text": text, "ids": row.tolist(), **kept, **meta}
        if control.mode == "length":  # the speech alone is the text; ids keep the whole window
            record["newlines_masked"] = result.masked[i]
            record["ids"] = row[control.speech].tolist()
            record["window_ids"] = row.tolist()
        records.append(record)
    return records


def write_control(result: ControlResult, run: LoadedRun, out: str | Path) -> Path:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps(r, ensure_ascii=False) for r in control_records(result, run)]
    atomic_write_bytes(out, ("\n".join(lines) + "\n").encode())
    return out
