"""Attribute classifiers for classifier-guided control (Diffusion-LM sec. 5.2).

An attribute is a yes/no property of a window of token ids that tiny_shakespeare labels itself
(`attribute`): it is computed from the ids, so the same rule labels training windows and samples.
Two classifiers per attribute, both a small TinyTransformer, mean-pooled, with a linear head:

- the guide ("latent"): reads NOISED latents x_t of one run (its family's noised_latents: for the
  Gaussian family q_sample(EMB(w) (+ sigma0 noise), t) in its frozen embedding table) with the time
  embedding, t uniform; the sampler takes gradients of it (dlm.runs.guidance);
- the judge ("judge"): reads clean token ids; it scores success in the control table, so the
  guide is never graded by itself.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from dlm.core.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from dlm.core.config import did_you_mean
from dlm.core.data import Tokenizer, fixed_windows
from dlm.core.errors import UserError
from dlm.core.nets import TinyTransformer
from dlm.families import families_named, not_available, supports, with_capability
from dlm.runs.build import LoadedRun, corpus_data
from dlm.runs.rundir import RunDir

logger = logging.getLogger("dlm")

KINDS = ("latent", "judge")
ATTRIBUTE_HELP = ("question (the window holds a '?'), word:W (it holds the word W) or speaker:NAME (it holds the "
                  "speaker tag 'NAME:'), W and NAME words of the run's vocabulary")


@dataclass(frozen=True)
class Attribute:
    """A window is positive (label 1) when any of `patterns` (token-id sequences) occurs in it."""

    name: str
    patterns: tuple[tuple[int, ...], ...]

    def label(self, ids: torch.Tensor) -> torch.Tensor:
        """(N, L) token ids -> (N,) labels 0/1."""
        found = torch.zeros(ids.shape[0], dtype=torch.bool, device=ids.device)
        for pattern in self.patterns:
            n = len(pattern)
            if ids.shape[1] < n:
                continue
            grams = ids.unfold(1, n, 1)  # (N, L - n + 1, n)
            found |= (grams == torch.tensor(pattern, device=ids.device)).all(-1).any(-1)
        return found.long()


def attribute(name: str, tokenizer: Tokenizer) -> Attribute:
    """The attribute called `name` in this vocabulary; anything else is one ValueError that says
    what is accepted."""
    kind, _, value = name.partition(":")
    if kind == "question" and not value:
        words = ["?"]
    elif kind == "word" and value:
        words = [value]
    elif kind == "speaker" and value:
        words = [value, ":"]
    else:
        raise UserError(f"Unknown attribute '{name}': use {ATTRIBUTE_HELP}.")
    missing = [w for w in words if w not in tokenizer.stoi]
    if missing:
        hint = did_you_mean(missing[0], [w for w in tokenizer.itos if w.isalpha()])
        raise UserError(f"Attribute '{name}': '{missing[0]}' is not a word of the run's vocabulary.{hint}")
    return Attribute(name, (tuple(tokenizer.stoi[w] for w in words),))


@dataclass
class ClassifierSettings:
    kind: str  # latent (one run's noised latents, with t: a family with "latent") or judge (clean token ids)
    attribute: str
    seq_len: int
    input_dim: int  # embed_dim of the run (latent) or the vocabulary size (judge)
    width: int = 128
    depth: int = 2
    heads: int = 4


class Classifier(nn.Module):
    """TinyTransformer -> mean over positions -> Linear(width, 2): logits of (not A, A)."""

    def __init__(self, settings: ClassifierSettings):
        super().__init__()
        if settings.kind not in KINDS:
            raise UserError(f"classifier kind must be one of {', '.join(KINDS)}, got '{settings.kind}'.")
        self.settings = settings
        latent = settings.kind == "latent"
        self.tokens = None if latent else nn.Embedding(settings.input_dim, settings.width)
        self.body = TinyTransformer(settings.input_dim if latent else settings.width, settings.width, settings.depth,
                                    settings.heads, settings.seq_len, dropout=0.0, time_conditioned=latent,
                                    out_dim=settings.width)
        self.head = nn.Linear(settings.width, 2)

    def forward(self, inputs: torch.Tensor, t: torch.Tensor | None = None) -> torch.Tensor:
        """latent: x_t (B, L, d) and t (B,) -> (B, 2); judge: ids (B, L) -> (B, 2)."""
        x = inputs if self.tokens is None else self.tokens(inputs)
        return self.head(self.body(x, t).mean(1))

    @torch.no_grad()
    def prob(self, inputs: torch.Tensor, t: torch.Tensor | None = None, batch_size: int = 256) -> torch.Tensor:
        """p(A | inputs) (B,), in batches."""
        return torch.cat([torch.softmax(self(inputs[i: i + batch_size], None if t is None else t[i: i + batch_size])
                                         .float(), -1)[:, 1] for i in range(0, len(inputs), batch_size)])


@dataclass
class ClassifierResult:
    classifier: Classifier
    attribute: Attribute
    metrics: dict  # positive share of the training windows, held-out balanced accuracy, seconds


def training_windows(run: LoadedRun, stride: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The run's corpus as windows of its length: train windows every `stride` tokens (overlapping,
    more of them than an epoch's), held-out windows end to end."""
    data = corpus_data(run)
    length = run.config.seq_len
    stride = stride or max(1, length // 4)
    starts = torch.arange(0, len(data.train_ids) - length + 1, stride)
    train = data.train_ids[starts[:, None] + torch.arange(length)]
    return train, fixed_windows(data.val_ids, length)


def balanced_batch(labels: torch.Tensor, size: int, generator: torch.Generator) -> torch.Tensor:
    """Indices of a batch half positive, half negative (drawn with replacement): a rare attribute
    (a word in 7% of windows) would otherwise teach the classifier to always say no."""
    positive, negative = labels.nonzero().view(-1), (labels == 0).nonzero().view(-1)
    half = size // 2
    pick = lambda pool, n: pool[torch.randint(0, len(pool), (n,), generator=generator)]  # noqa: E731
    return torch.cat([pick(positive, half), pick(negative, size - half)])


def check_classifier_options(steps: int, batch_size: int, width: int, depth: int, heads: int = 4) -> None:
    """train-classifier's options, checked before any run is loaded (as dlm train checks its config)."""
    if steps < 1:
        raise UserError(f"steps must be at least 1, got {steps}.")
    if batch_size < 2:  # balanced_batch: half the windows with the attribute, half without
        raise UserError(f"batch_size must be at least 2 (each batch holds windows with and without the attribute), "
                        f"got {batch_size}.")
    if width < heads or width % heads:
        raise UserError(f"width must be a positive multiple of {heads} (the classifier's attention heads), got {width}.")
    if depth < 1:
        raise UserError(f"depth must be at least 1 (transformer blocks), got {depth}.")


def train_classifier(run: LoadedRun, attribute_name: str, kind: str = "latent", *, steps: int = 300,
                     batch_size: int = 64, lr: float = 1e-3, width: int = 128, depth: int = 2, seed: int = 0,
                     windows: tuple[torch.Tensor, torch.Tensor] | None = None) -> ClassifierResult:
    """Train the guide (kind latent, on `run`'s frozen embeddings) or the judge (kind judge) for one
    attribute on the run's training windows; `windows` (train, held-out) skips reading the corpus."""
    if kind not in KINDS:
        raise UserError(f"--kind must be one of {', '.join(KINDS)}, got '{kind}'.")
    if kind == "latent" and not supports(run.config.model, "latent"):
        raise UserError(not_available(run.config.model, "A latent classifier (noised latents for guidance)", "latent")
                        + f" Train the judge (--kind judge) on it, or give a run of {families_named(with_capability('latent'))}.")
    check_classifier_options(steps, batch_size, width, depth)
    target = attribute(attribute_name, run.tokenizer)
    train, heldout = windows if windows is not None else training_windows(run)
    labels = target.label(train)
    share = float(labels.float().mean())
    if labels.sum() == 0 or labels.sum() == len(labels):
        raise UserError(f"Attribute '{attribute_name}' is {'never' if share == 0 else 'always'} true in the run's "
                         f"training windows: nothing to learn. Pick another attribute.")
    settings = ClassifierSettings(kind, attribute_name, run.config.seq_len,
                                  run.family.latent_dim(run) if kind == "latent" else len(run.tokenizer), width, depth)
    torch.manual_seed(seed)
    classifier = Classifier(settings)
    optimizer = torch.optim.AdamW(classifier.parameters(), lr=lr, weight_decay=0.0)
    generator = torch.Generator().manual_seed(seed)
    steps_total = run.family.latent_timesteps(run) if kind == "latent" else 0
    start = time.perf_counter()
    classifier.train()
    for step in range(steps):
        index = balanced_batch(labels, batch_size, generator)
        ids, y = train[index], labels[index]
        if kind == "latent":
            t = torch.randint(0, steps_total, (len(ids),), generator=generator)
            logits = classifier(run.family.noised_latents(run, ids, t, generator), t)
        else:
            logits = classifier(ids)
        loss = F.cross_entropy(logits, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if (step + 1) % max(1, steps // 5) == 0:
            logger.info("classifier %s %s: step %d/%d, loss %.4f", kind, attribute_name, step + 1, steps, loss.item())
    classifier.eval()
    metrics = {"train_positive_share": share, "heldout_positive_share": float(target.label(heldout).float().mean()),
               "steps": steps, "seconds": time.perf_counter() - start,
               **heldout_accuracy(run, classifier, target, heldout, seed)}
    return ClassifierResult(classifier, target, metrics)


def balanced_accuracy(prob: torch.Tensor, labels: torch.Tensor) -> float:
    """Mean of the accuracy on positives and on negatives (a rare attribute's plain accuracy is
    high for a classifier that always says no)."""
    said = prob > 0.5
    parts = [float((said[labels == c] == bool(c)).float().mean()) for c in (0, 1) if (labels == c).any()]
    return sum(parts) / len(parts)


def heldout_accuracy(run: LoadedRun, classifier: Classifier, target: Attribute, heldout: torch.Tensor,
                     seed: int = 0) -> dict:
    """Balanced accuracy on held-out windows: for the judge on clean ids; for the guide at t drawn
    uniformly and at the lowest tenth of t (where it must know the answer)."""
    labels = target.label(heldout)
    if classifier.settings.kind == "judge":
        return {"heldout_balanced_accuracy": balanced_accuracy(classifier.prob(heldout), labels)}
    generator = torch.Generator().manual_seed(seed + 1)
    steps = run.family.latent_timesteps(run)
    result = {}
    for key, top in (("heldout_balanced_accuracy", steps), ("heldout_balanced_accuracy_low_t", max(1, steps // 10))):
        t = torch.randint(0, top, (len(heldout),), generator=generator)
        result[key] = balanced_accuracy(classifier.prob(run.family.noised_latents(run, heldout, t, generator), t), labels)
    return result


def save_classifier(path: str | Path, result: ClassifierResult, run: LoadedRun) -> Path:
    """Atomic and checksummed (dlm.core.checkpoint); it names the vocabulary and, for a guide, the
    run checkpoint whose embeddings it read."""
    return save_checkpoint(path, {
        "classifier": asdict(result.classifier.settings), "model": result.classifier.state_dict(),
        "vocab": run.tokenizer.fingerprint(), "run_checkpoint": str(run.checkpoint), "run_step": run.step,
        "metrics": result.metrics,
    })


def load_classifier(path: str | Path, run: LoadedRun, kind: str, attribute_name: str | None = None) -> Classifier:
    """A classifier written by save_classifier, checked against the run it is used with: its kind,
    its vocabulary, its attribute (when given) and, for a guide, the run's step."""
    path = Path(path)
    if not path.is_file():
        hint = f" --attribute {attribute_name}" if attribute_name else ""
        raise CheckpointError(f"No {kind} classifier at '{path}'. Train one with: dlm train-classifier --run_dir RUN "
                              f"--kind {kind}{hint}")
    payload = load_checkpoint(path, require=("classifier", "model", "vocab"))
    settings = ClassifierSettings(**payload["classifier"])
    if settings.kind != kind:
        raise CheckpointError(f"'{path}' is a {settings.kind} classifier; a {kind} classifier is needed here.")
    if attribute_name is not None and settings.attribute != attribute_name:
        raise CheckpointError(f"'{path}' classifies '{settings.attribute}', not '{attribute_name}'.")
    if payload["vocab"] != run.tokenizer.fingerprint():
        raise CheckpointError(f"'{path}' was trained on another vocabulary than the run's: train it again on this run.")
    if kind == "latent" and payload.get("run_step") != run.step:
        # the guide read the table of one checkpoint; another checkpoint's table moved on
        logger.warning("'%s' was trained on the run's step %s, the run is at step %s: train it again for best "
                       "guidance.", path, payload.get("run_step"), run.step)
    classifier = Classifier(settings)
    try:
        classifier.load_state_dict(payload["model"])
    except RuntimeError as error:
        raise CheckpointError(f"'{path}' does not match its own settings: {error}") from None
    return classifier.eval()


def expected_log_prob(classifier: Classifier, x: torch.Tensor, t: torch.Tensor, target: int = 1) -> torch.Tensor:
    """log p(target | x_t, t) per row (B,), with gradients (the guidance objective's first term)."""
    return torch.log_softmax(classifier(x, t).float(), -1)[:, target]



def guide_and_judge(run: LoadedRun, run_dir: str | Path, attribute_name: str, steps: int = 300,
                    judge_steps: int = 100) -> tuple[Classifier, Classifier, dict]:
    """The guide (latent) and judge classifiers for one attribute: read from the run folder's
    classifiers/KIND/ATTR.pt (dlm train-classifier's files) when they are there, else trained and
    written there. Returns both and the metrics of those trained ({} when both were read)."""
    pair, metrics = [], {}
    for kind, kind_steps in (("latent", steps), ("judge", judge_steps)):
        path = RunDir(run_dir).classifier(kind, attribute_name)
        if path.is_file():
            pair.append(load_classifier(path, run, kind, attribute_name))
            continue
        result = train_classifier(run, attribute_name, kind, steps=kind_steps)
        save_classifier(path, result, run)
        pair.append(result.classifier)
        metrics[kind] = result.metrics
    return pair[0], pair[1], metrics
