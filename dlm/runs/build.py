"""Building a run's model and objective from its config (through its family), and loading a run."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from torch import nn

from dlm.core.checkpoint import CheckpointError, load_checkpoint
from dlm.core.config import Config, ConfigError, from_dict
from dlm.core.data import CorpusData, Tokenizer, check_corpus, prepare_data, saved_tokenizer
from dlm.core.embeddings import pretrained_table, read_word_vectors
from dlm.families import family
from dlm.families.contract import LoadedRun  # noqa: F401  (re-exported: the contract's type)
from dlm.runs.rundir import RunDir

logger = logging.getLogger("dlm")


def build_objective(config: Config):
    """What the training loop minimises, as the config's model family defines it."""
    return family(config.model).objective(config)


def pretrained_vectors(path: str) -> dict[str, torch.Tensor]:
    """Word vectors from a word2vec/GloVe text file or from a dlm checkpoint's embedding table."""
    if not Path(path).is_file():
        raise ConfigError(f"init_from_pretrained: no file at '{path}'. Give a word-vector text file or a dlm checkpoint.")
    if path.endswith(".pt"):
        payload = load_checkpoint(path)
        table = payload["model"]["embedding.weight"]
        if not torch.isfinite(table).all():
            raise ConfigError(f"init_from_pretrained: the embedding table in '{path}' holds nan or inf values "
                              f"(a run that diverged): use another checkpoint.")
        return dict(zip(saved_tokenizer(payload["vocab"], Path(path).parent.parent).itos, table))
    try:
        return read_word_vectors(path)
    except UnicodeDecodeError:
        raise ConfigError(
            f"init_from_pretrained: '{path}' is neither word-vector text nor a dlm checkpoint (.pt)."
        ) from None


def new_model(config: Config, vocab_size: int, pretrained: torch.Tensor | None = None) -> nn.Module:
    """A freshly initialised model of the config's family."""
    return family(config.model).new_model(config, vocab_size, pretrained)


def build_model(config: Config, tokenizer: Tokenizer) -> nn.Module:
    """A model for training, its table initialised from init_from_pretrained when given."""
    pretrained = None
    if config.init_from_pretrained:
        vectors = pretrained_vectors(config.init_from_pretrained)
        pretrained, covered = pretrained_table(vectors, tokenizer.itos, config.embed_dim, config.embedding_init_std)
        logger.info("pretrained embeddings: %d of %d vocabulary words covered (%.1f%%) by %s",
                    covered, len(tokenizer), 100 * covered / len(tokenizer), config.init_from_pretrained)
    return new_model(config, len(tokenizer), pretrained)


def corpus_data(run: LoadedRun) -> CorpusData:
    """The run's corpus encoded with its vocabulary, its train split cut as it was trained: refused
    when the file is not the text the run was trained on (check_corpus), unless the run was loaded
    with accept_corpus_change."""
    data = prepare_data(run.config.corpus, tokenizer=run.tokenizer, max_train_tokens=run.config.max_train_tokens)
    check_corpus(data, run.config.corpus, run.corpus_sha256, run.checkpoint, run.accept_corpus_change)
    return data


def load_run(run_dir: str | Path, checkpoint: str | Path | None = None, use_ema: bool = True,
             device: str | torch.device = "cpu", accept_corpus_change: bool = False) -> LoadedRun:
    """A run's checkpoint (`checkpoint`: a file, or 'last' or 'best' of the run; default its last.pt)
    as a model ready to sample (its EMA weights when kept and `use_ema`)."""
    run = RunDir(run_dir)
    path = run.checkpoint_file(checkpoint)
    if str(checkpoint or "last") in ("last", "best") and not run.path.is_dir():
        raise CheckpointError(f"Run folder '{run.path}' does not exist. Train into it first with dlm train.")
    if str(checkpoint) == "best" and not path.is_file():
        raise CheckpointError(f"'{run.path}' keeps no checkpoints/best.pt (a run trained before runs kept the state of "
                              f"their lowest validation loss, or one without validation windows): choose --checkpoint "
                              f"last or a kept epoch_NNNN.pt.")
    payload = load_checkpoint(path, require=("config", "vocab", "model", "step", "epoch"))
    try:
        config = from_dict(payload["config"])
    except ConfigError as error:  # e.g. a run trained with lr: nan before such settings were refused
        raise ConfigError(f"'{path}' was trained with a setting that dlm refuses now; train the run again "
                          f"without it. {error}") from None
    tokenizer = saved_tokenizer(payload["vocab"], run.path)
    model = new_model(config, len(tokenizer))
    used_ema = use_ema and payload.get("ema") is not None
    state = payload["ema"] if used_ema else payload["model"]
    try:
        model.load_state_dict(state)
    except RuntimeError as error:
        raise CheckpointError(f"'{path}' does not match its own config: {error}") from None
    model.to(device).eval()
    calibration = calibration_for(run, path, payload["step"], used_ema)
    if calibration is not None:
        config = config.replace(decode_temperature=calibration["temperature"])
    return LoadedRun(config=config, tokenizer=tokenizer, model=model, objective=build_objective(config), checkpoint=path,
                     step=payload["step"], epoch=payload["epoch"], used_ema=used_ema, corpus_sha256=payload.get("corpus_sha256"),
                     accept_corpus_change=accept_corpus_change, calibration=calibration)


def calibration_for(run: RunDir, checkpoint: Path, step: int, used_ema: bool) -> dict | None:
    """RUN/calibration.json when it was made for this checkpoint (same file, step and weights)."""
    try:
        record = json.loads(run.calibration.read_text(encoding="utf-8"))
        made_here = (record["checkpoint"], record["step"], record["ema"]) == (checkpoint.name, step, used_ema)
        temperature = float(record["temperature"])
        float(record["recipe_temperature"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if not made_here or not temperature >= 0:
        return None
    logger.info("sampling at the calibrated temperature %g (held-out entropy; %s); --temperature gives another",
                temperature, run.calibration)
    return record


def recipe_config(run: LoadedRun) -> Config:
    """The run's config with the preset's own decode_temperature (before any calibration)."""
    if run.calibration is None:
        return run.config
    return run.config.replace(decode_temperature=float(run.calibration["recipe_temperature"]))
