"""The run folder (config, vocabulary, metrics, checkpoints) and building a model from a config."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from dlm.ar import AutoregressiveLM, NextTokenObjective
from dlm.checkpoint import CheckpointError, load_checkpoint
from dlm.config import Config, ConfigError, from_dict
from dlm.data import Tokenizer
from dlm.diffusion import GaussianDiffusion, LossSettings, NoiseSchedule
from dlm.embeddings import pretrained_table, read_word_vectors
from dlm.model import DiffusionLM

logger = logging.getLogger("dlm")


class RunDir:
    """Where one run keeps everything: run_dir/{config.yaml, vocab.json, metrics.csv, checkpoints/}."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    config = property(lambda self: self.path / "config.yaml")
    vocab = property(lambda self: self.path / "vocab.json")
    metrics = property(lambda self: self.path / "metrics.csv")
    checkpoints = property(lambda self: self.path / "checkpoints")
    last_checkpoint = property(lambda self: self.path / "checkpoints" / "last.pt")
    samples = property(lambda self: self.path / "samples")

    def epoch_checkpoint(self, epoch: int) -> Path:
        return self.checkpoints / f"epoch_{epoch:04d}.pt"

    def kept_checkpoints(self) -> list[Path]:
        """The checkpoints kept on the schedule, oldest first."""
        return sorted(self.checkpoints.glob("epoch_*.pt"))

    def has_run(self) -> bool:
        return self.last_checkpoint.exists() or self.metrics.exists()


def pick_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device: cuda was asked for but no CUDA GPU is visible; use device: auto or cpu.")
    return torch.device(name)


def build_diffusion(config: Config) -> GaussianDiffusion:
    settings = LossSettings(config.predict, config.rounding_weight, config.rounding_target,
                            config.prior_loss, config.self_condition, config.left_to_right,
                            config.time_warp)
    return GaussianDiffusion(NoiseSchedule(config.schedule, config.diffusion_steps), settings)


def build_objective(config: Config) -> GaussianDiffusion | NextTokenObjective:
    """What the training loop minimises: the diffusion loss, or next-token CE for the AR baseline."""
    return NextTokenObjective() if config.model == "ar" else build_diffusion(config)


def pretrained_vectors(path: str) -> dict[str, torch.Tensor]:
    """Word vectors from a word2vec/GloVe text file or from a dlm checkpoint's embedding table."""
    if not Path(path).is_file():
        raise ConfigError(f"init_from_pretrained: no file at '{path}'. Give a word-vector text file or a dlm checkpoint.")
    if path.endswith(".pt"):
        payload = load_checkpoint(path)
        table = payload["model"]["embedding.weight"]
        return dict(zip(payload["vocab"]["itos"], table))
    try:
        return read_word_vectors(path)
    except UnicodeDecodeError:
        raise ConfigError(
            f"init_from_pretrained: '{path}' is neither word-vector text nor a dlm checkpoint (.pt)."
        ) from None


def new_model(config: Config, vocab_size: int, pretrained: torch.Tensor | None = None) -> DiffusionLM | AutoregressiveLM:
    """A freshly initialised model of the config's kind."""
    if config.model == "ar":
        return AutoregressiveLM(config, vocab_size)
    return DiffusionLM(config, vocab_size, pretrained)


def build_model(config: Config, tokenizer: Tokenizer) -> DiffusionLM | AutoregressiveLM:
    """A model for training, its table initialised from init_from_pretrained when given."""
    if config.model == "ar":
        return new_model(config, len(tokenizer))
    pretrained = None
    if config.init_from_pretrained:
        vectors = pretrained_vectors(config.init_from_pretrained)
        pretrained, covered = pretrained_table(vectors, tokenizer.itos, config.embed_dim, config.embedding_init_std)
        logger.info("pretrained embeddings: %d of %d vocabulary words covered (%.1f%%) by %s",
                    covered, len(tokenizer), 100 * covered / len(tokenizer), config.init_from_pretrained)
    return new_model(config, len(tokenizer), pretrained)


@dataclass
class LoadedRun:
    config: Config
    tokenizer: Tokenizer
    model: DiffusionLM | AutoregressiveLM  # EMA weights when present and asked for
    diffusion: GaussianDiffusion | NextTokenObjective  # the run's objective
    checkpoint: Path
    step: int
    epoch: int
    used_ema: bool


def load_run(run_dir: str | Path, checkpoint: str | Path | None = None, use_ema: bool = True,
             device: str | torch.device = "cpu") -> LoadedRun:
    run = RunDir(run_dir)
    path = Path(checkpoint) if checkpoint else run.last_checkpoint
    if checkpoint is None and not run.path.is_dir():
        raise CheckpointError(f"Run folder '{run.path}' does not exist. Train into it first with dlm train.")
    payload = load_checkpoint(path)
    config = from_dict(payload["config"])
    tokenizer = Tokenizer.from_dict(payload["vocab"])
    model = new_model(config, len(tokenizer))
    used_ema = use_ema and payload.get("ema") is not None
    state = payload["ema"] if used_ema else payload["model"]
    try:
        model.load_state_dict(state)
    except RuntimeError as error:
        raise CheckpointError(f"'{path}' does not match its own config: {error}") from None
    model.to(device).eval()
    return LoadedRun(config, tokenizer, model, build_objective(config), path,
                     payload["step"], payload["epoch"], used_ema)
