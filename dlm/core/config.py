"""The one Config dataclass that holds every knob, and its YAML / command-line loading.

Precedence: dataclass defaults < YAML preset < explicit overrides. Unknown keys and values of the
wrong type are errors that name the key and what it accepts, so a typo never trains silently.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Optional

import yaml


class ConfigError(ValueError):
    """A preset or override that cannot become a Config."""


@dataclass
class Config:
    # diffusion: Diffusion-LM; ar: the autoregressive baseline (same blocks, causal mask, tied head)
    model: Literal["diffusion", "ar"] = "diffusion"

    # --- data ---
    corpus: str = "tiny_shakespeare"  # the named corpus, or a path to any UTF-8 text file
    tokenizer: Literal["word", "char"] = "word"
    min_count: int = 2  # word tokenizer: rarer words become <unk>
    lowercase: bool = False
    seq_len: int = 64  # tokens per training window
    max_train_tokens: Optional[int] = None  # train on the first N tokens of the train split only

    # --- embeddings and rounding ---
    embed_dim: int = 64
    use_learned_embeddings: bool = True  # off: a fixed random or pretrained table (the seed's option)
    init_from_pretrained: Optional[str] = None  # word2vec/GloVe text file or a dlm checkpoint
    embedding_norm: Literal["none", "l2", "layernorm"] = "none"  # l2: rows scaled to norm sqrt(d)
    embedding_init_std: float = 1.0
    # with embedding_norm l2/layernorm: rows get norm embedding_scale * sqrt(d). Below 1 the same
    # noise schedule destroys the signal sooner (Difformer's noise rescaling, seen from the table)
    embedding_scale: float = 1.0
    embedding_lr_scale: float = 1.0  # the table's lr is lr * this
    rounding: Literal["tied", "untied"] = "tied"  # tied: logits = x @ E^T + b (Diffusion-LM)

    # --- denoiser (TinyTransformer) ---
    width: int = 256
    depth: int = 4
    heads: int = 4
    dropout: float = 0.1

    # --- diffusion ---
    schedule: Literal["sqrt", "linear", "cosine"] = "sqrt"
    diffusion_steps: int = 2000
    # x0 or epsilon: regress the vector (Diffusion-LM); logits: classify each position through the
    # rounding head, train by cross-entropy, use the softmax-weighted embedding as x0 (CDCD)
    predict: Literal["x0", "epsilon", "logits"] = "x0"
    rounding_weight: float = 1.0
    # clean: CE on EMB(w) and diffusion on clean x0 (the seed); noisy: x0 ~ q(x0|w) (Diffusion-LM);
    # predicted: CE on the denoiser's predicted x0 (Difformer's anchor loss), x0 ~ q(x0|w)
    rounding_target: Literal["clean", "noisy", "predicted"] = "noisy"
    prior_loss: bool = True  # the tT term that keeps embedding norms from growing
    self_condition: float = 0.0  # share of batches trained with self-conditioning (0 = off)
    # AR-Diffusion (Wu et al. 2023): position i runs the chain late by left_to_right * i / (L - 1)
    # of it, in training and sampling, so words are settled left to right. 0: Diffusion-LM
    left_to_right: float = 0.0
    # CDCD-style time warping: draw training timesteps with density following the rise of the
    # measured word cross-entropy over t (where words are being chosen), not uniformly
    time_warp: bool = False

    # --- sampling: how this recipe is meant to be sampled (dlm sample flags override) ---
    sample_steps: int = 200  # reverse steps (<= diffusion_steps)
    # which timesteps those are: logsnr (evenly spaced in log signal-to-noise; 50 steps sample
    # like 2000), quadratic (the DDIM paper's) or uniform (Diffusion-LM's even stride)
    sample_spacing: Literal["logsnr", "quadratic", "uniform"] = "logsnr"
    clamp: bool = True  # Diffusion-LM's clamping trick: snap the predicted x0 to its nearest row
    clamp_fraction: float = 1.0  # clamp only during the last share of the steps
    sample_eta: float = 1.0  # 1 ancestral (DDPM), 0 deterministic DDIM
    decode_temperature: float = 0.0  # final tokens: 0 argmax of the rounding logits, >0 drawn at T

    # --- optimisation ---
    batch_size: int = 64
    epochs: int = 10
    max_steps: Optional[int] = None  # stop after this many optimizer steps (overrides epochs)
    # stop once the training loop has run this many wall-clock seconds (in this invocation), and
    # decay the lr over that time rather than over the steps: equal-time comparisons
    max_train_seconds: Optional[float] = None
    lr: float = 3e-4
    weight_decay: float = 0.0
    # which parameters weight decay touches: matrices only (nanoGPT), matrices and the embedding
    # table, or everything (the earlier attempt)
    weight_decay_scope: Literal["matrices", "matrices+embeddings", "all"] = "matrices"
    warmup_steps: int = 100
    lr_decay: Literal["linear", "cosine", "constant"] = "linear"
    grad_clip: float = 1.0  # 0 disables clipping
    ema_decay: float = 0.999  # 0 disables the EMA copy
    seed: int = 0

    # --- bookkeeping ---
    log_every: int = 20  # optimizer steps between log lines / metrics.csv rows
    checkpoint_every: int = 1  # keep a checkpoint every N epochs (plus last.pt)
    val_batches: int = 4  # validation batches at each epoch end
    device: Literal["auto", "cpu", "cuda"] = "auto"
    threads: Optional[int] = None  # torch intra-op threads; None keeps torch's choice
    # --- speed: how a run executes (measured in benchmarks/speed.py; see README, "Speed") ---
    # bf16: autocast the network's matmuls to bfloat16 (the rounding loss stays float32);
    # auto: bf16 on CUDA and on CPUs with AMX (measured 1.6x faster there, same sample quality),
    # fp32 on other CPUs (AVX512-BF16 alone measured 1.07x)
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    compile: bool = False  # torch.compile the denoiser: slower first steps, then faster ones
    progress: bool = True  # tqdm bar (text) on stderr

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, **overrides: Any) -> Config:
        return from_dict({**self.to_dict(), **overrides})


def field_types() -> dict[str, Any]:
    return typing.get_type_hints(Config)


def describe_type(tp: Any) -> str:
    """Human words for a field type: 'one of: word, char', 'int or null', ..."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of: " + ", ".join(map(str, typing.get_args(tp)))
    if origin in (typing.Union, types.UnionType):
        parts = [describe_type(a) for a in typing.get_args(tp) if a is not type(None)]
        return " or ".join(parts) + " or null"
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(
        tp, str(tp)
    )


def unknown_key_error(key: str, where: str = "") -> ConfigError:
    allowed = sorted(field_types())
    close = difflib.get_close_matches(key, allowed, n=1)
    hint = f" Did you mean '{close[0]}'?" if close else ""
    return ConfigError(
        f"Unknown config key '{key}'{where}.{hint} Allowed keys: {', '.join(allowed)}."
    )


def coerce(key: str, value: Any, from_text: bool = False) -> Any:
    """Check (and for command-line text, parse) one value against the field's type."""
    types_by_key = field_types()
    if key not in types_by_key:
        raise unknown_key_error(key)
    tp = types_by_key[key]
    try:
        return _coerce(tp, value, from_text)
    except (TypeError, ValueError):
        raise ConfigError(
            f"Config key '{key}' got {value!r}; it must be {describe_type(tp)}."
        ) from None


def _coerce(tp: Any, value: Any, from_text: bool) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None or (from_text and str(value).lower() in ("none", "null", "")):
            return None
        (inner,) = [a for a in typing.get_args(tp) if a is not type(None)]
        return _coerce(inner, value, from_text)
    if origin is Literal:
        if value in typing.get_args(tp):
            return value
        raise ValueError
    if from_text and isinstance(value, str):
        if tp is bool:
            lowered = value.lower()
            if lowered in ("true", "yes", "1", "on"):
                return True
            if lowered in ("false", "no", "0", "off"):
                return False
            raise ValueError
        if tp is int:
            return int(value)
        if tp is float:
            return float(value)
        return value
    # From YAML: exact types, except that an int is a fine float.
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is int and isinstance(value, bool):
        raise TypeError
    if not isinstance(value, tp):
        raise TypeError
    return value


def from_dict(values: dict[str, Any], from_text: bool = False) -> Config:
    checked = {key: coerce(key, value, from_text) for key, value in values.items()}
    config = Config(**checked)
    validate(config)
    return config


def validate(config: Config) -> None:
    positive = ["seq_len", "embed_dim", "width", "depth", "heads", "batch_size", "diffusion_steps",
                "log_every", "checkpoint_every", "min_count"]
    for key in positive:
        if getattr(config, key) < 1:
            raise ConfigError(f"Config key '{key}' must be at least 1, got {getattr(config, key)}.")
    if config.max_train_seconds is not None and config.max_train_seconds <= 0:
        raise ConfigError(f"'max_train_seconds' must be positive (or left out), got {config.max_train_seconds}.")
    if config.epochs < 0:
        raise ConfigError(f"Config key 'epochs' must be 0 or more, got {config.epochs}.")
    if config.width % config.heads:
        raise ConfigError(
            f"'width' ({config.width}) must be divisible by 'heads' ({config.heads})."
        )
    if config.embedding_scale <= 0:
        raise ConfigError(f"'embedding_scale' must be positive, got {config.embedding_scale}.")
    if config.embedding_scale != 1.0 and config.embedding_norm == "none":
        raise ConfigError("'embedding_scale' only applies to a normalised table: set embedding_norm to l2 or layernorm.")
    if not 0.0 <= config.self_condition <= 1.0:
        raise ConfigError("'self_condition' is a share of batches: a number from 0 to 1.")
    if config.left_to_right < 0:
        raise ConfigError("'left_to_right' is a delay (a share of the chain per sequence length): 0 or more.")
    if config.left_to_right > 0 and config.time_warp:
        raise ConfigError("'time_warp' draws one timestep per sequence and 'left_to_right' one per position: "
                          "use one of them.")
    if config.left_to_right > 0 and config.sample_steps < 2:
        raise ConfigError("'left_to_right' chains need sample_steps of at least 2.")
    if not 1 <= config.sample_steps <= config.diffusion_steps:
        raise ConfigError(f"'sample_steps' must be between 1 and diffusion_steps ({config.diffusion_steps}).")
    if not 0.0 <= config.clamp_fraction <= 1.0:
        raise ConfigError("'clamp_fraction' is a share of the sampling steps: a number from 0 to 1.")
    if config.decode_temperature < 0:
        raise ConfigError("'decode_temperature' must be 0 (argmax) or positive.")
    if not 0.0 <= config.ema_decay < 1.0:
        raise ConfigError("'ema_decay' must be in [0, 1): 0 disables the EMA copy.")


def load_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"No preset file at '{path}'. Presets live in params/ (e.g. params/default.yaml).")
    try:
        values = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:
        raise ConfigError(f"'{path}' is not valid YAML: {error}") from None
    if not isinstance(values, dict):
        raise ConfigError(f"'{path}' must hold a mapping of config keys to values.")
    for key in values:
        if key not in field_types():
            raise unknown_key_error(str(key), where=f" in {path}")
    return values


def load_config(path: str | Path | None = None, **overrides: Any) -> Config:
    """Defaults, then the YAML preset at `path`, then `overrides` (already typed values)."""
    values = load_yaml(path) if path is not None else {}
    values.update(overrides)
    return from_dict(values)


def save_config(config: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
