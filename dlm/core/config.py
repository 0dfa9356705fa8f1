"""The one Config dataclass that holds every knob, and its YAML / command-line loading.

Precedence: dataclass defaults < YAML preset < explicit overrides. Unknown keys and values of the
wrong type are errors that name the key and what it accepts, so a typo never trains silently.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import inspect
import io
import math
import os
import re
import sys
import textwrap
import tokenize
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Optional

import yaml

from dlm.core.errors import UserError


class ConfigError(UserError):
    """A preset or override that cannot become a Config."""


# Every Config key belongs to one section, named for what its keys are for: the keys every family reads
# (data, model, training, bookkeeping, runtime: a resumed run may change the last two), one family's own
# keys (gaussian, masked: a section named after a family in dlm.families.FAMILIES), and those of the
# families that generate in blocks (blocks) or sample by a chain (sampling, SampleOptions's keys).
# dlm.families.check_config refuses a family-specific key given to a family that does not read it.
CONTROL_TASKS = ("infill", "prefix", "length", "guidance")  # what notebooks/control.ipynb can show
SECTIONS = ("data", "model", "gaussian", "blocks", "masked", "sampling", "training", "bookkeeping", "runtime")


def _in(section: str) -> Any:
    """A field maker for one section: `seq_len: int = _data(64)` is a field of section 'data'."""
    def make(default: Any) -> Any:
        return dataclasses.field(default=default, metadata={"section": section})
    return make


_data, _model, _gaussian, _blocks, _masked, _sampling, _training, _bookkeeping, _runtime = map(_in, SECTIONS)


@dataclass(kw_only=True)
class Config:
    """Every knob, flat: presets, `dlm train --KEY value` and `papermill -p KEY value` name keys,
    not sections. Each key declares its section; `config.section("sampling")` reads one."""

    # --- data ---
    corpus: str = _data("tiny_shakespeare")  # the named corpus, or a path to any UTF-8 text file
    tokenizer: Literal["word", "bpe", "char"] = _data("word")  # word (rare words <unk>), bpe or char (no <unk>)
    min_count: int = _data(2)  # word tokenizer: rarer words become <unk>
    bpe_vocab_size: int = _data(4000)  # bpe tokenizer: pieces in its vocabulary (2000 to 8000)
    lowercase: bool = _data(False)  # lowercase the corpus before tokenizing
    seq_len: int = _data(64)  # tokens per training window
    max_train_tokens: Optional[int] = _data(None)  # train on the first N tokens of the train split only

    # --- model: the family and its denoiser (TinyTransformer), every family's ---
    # the model family, a name in dlm.families.FAMILIES: gaussian (Diffusion-LM's Gaussian diffusion),
    # masked (MDLM's absorbing-state diffusion), uniform (UDLM's uniform-state diffusion), ar (the
    # autoregressive baseline: same blocks, causal mask)
    model: str = _model("gaussian")
    embed_dim: int = _model(64)  # embedding dimension d
    init_from_pretrained: Optional[str] = _model(None)  # word2vec/GloVe text file or a dlm checkpoint
    embedding_init_std: float = _model(1.0)  # std of the table's random init
    embedding_lr_scale: float = _model(1.0)  # the table's lr is lr * this
    # where the denoiser learns word order: learned (a position table added to the input) or rotary
    # (RoPE in attention, MDLM's and BD3-LM's; see dlm.core.nets.TinyTransformer)
    positions: Literal["learned", "rotary"] = _model("learned")
    width: int = _model(256)  # the transformer's width
    depth: int = _model(4)  # the transformer's blocks
    heads: int = _model(4)  # attention heads
    dropout: float = _model(0.1)  # the transformer's dropout

    # --- gaussian: the Gaussian family's own keys (model: gaussian): its embedding table, noise and loss ---
    use_learned_embeddings: bool = _gaussian(True)  # off: a fixed random or pretrained table (the seed's option)
    embedding_norm: Literal["none", "l2", "layernorm"] = _gaussian("none")  # l2: rows scaled to norm sqrt(d)
    # with embedding_norm l2/layernorm: rows get norm embedding_scale * sqrt(d). Below 1 the same
    # noise schedule destroys the signal sooner (Difformer's noise rescaling, seen from the table)
    embedding_scale: float = _gaussian(1.0)
    rounding: Literal["tied", "untied"] = _gaussian("tied")  # tied: logits = x @ E^T + b (Diffusion-LM)
    schedule: Literal["sqrt", "linear", "cosine"] = _gaussian("sqrt")  # the noise schedule (sqrt: Diffusion-LM's)
    diffusion_steps: int = _gaussian(2000)  # T, the diffusion timesteps
    # x0 or epsilon: regress the vector (Diffusion-LM); logits: classify each position through the
    # rounding head, train by cross-entropy, use the softmax-weighted embedding as x0 (CDCD);
    # preconditioned: x0 = c_skip x_t + c_out F, EDM's, the identity at low noise for free
    # (GaussianDiffusion.preconditioning)
    predict: Literal["x0", "epsilon", "logits", "preconditioned"] = _gaussian("x0")
    rounding_weight: float = _gaussian(1.0)  # weight of the rounding cross-entropy in the loss
    # clean: CE on EMB(w) and diffusion on clean x0 (the seed); noisy: x0 ~ q(x0|w) (Diffusion-LM);
    # predicted: CE on the denoiser's predicted x0 (Difformer's anchor loss), x0 ~ q(x0|w)
    rounding_target: Literal["clean", "noisy", "predicted"] = _gaussian("noisy")
    prior_loss: bool = _gaussian(True)  # the tT term that keeps embedding norms from growing
    self_condition: float = _gaussian(0.0)  # share of batches trained with self-conditioning (0 = off)
    # AR-Diffusion (Wu et al. 2023): position i runs the chain late by left_to_right * i / (L - 1)
    # of it, in training and sampling, so words are settled left to right. 0: Diffusion-LM
    left_to_right: float = _gaussian(0.0)
    # CDCD-style time warping: draw training timesteps with density following the rise of the
    # measured word cross-entropy over t (where words are being chosen), not uniformly
    time_warp: bool = _gaussian(False)
    # uniform, or loss_second_moment: importance sampling of the training timesteps with density
    # proportional to sqrt(E[loss^2]) at t, each sequence's loss weighted by 1 / (T p(t)) so the
    # objective is unchanged (improved-diffusion's LossSecondMomentResampler; uniform until measured)
    timestep_sampling: Literal["uniform", "loss_second_moment"] = _gaussian("uniform")

    # --- blocks: block diffusion, generation in blocks left to right (the gaussian and masked families) ---
    # semi-autoregressive block diffusion (SSD-LM, BD3-LM): the window is generated in blocks of
    # this many tokens, left to right, each by the diffusion chain with the earlier blocks given
    # clean; trained the same way. Must divide seq_len; null (or seq_len): the whole window at once
    block_size: Optional[int] = _blocks(None)
    # how a block run trains: one (SSD-LM: each window draws one block, noised, after its earlier
    # blocks clean; the loss on that block only) or all (BD3-LM: every block noised at its own
    # timestep at once, beside the clean window, under a block-causal attention mask: every
    # position is a training target, at about twice the step's cost)
    block_training: Literal["one", "all"] = _blocks("one")

    # --- masked: the masked family's own keys (model: masked) ---
    # masked family: training draws the mask rate t from [mask_rate_min, mask_rate_max] (BD3-LM's
    # clipped range lowers the gradient's variance; validation and the bound use the whole range)
    mask_rate_min: float = _masked(0.001)
    mask_rate_max: float = _masked(1.0)  # masked family: the largest training mask rate (see mask_rate_min)

    # --- sampling: how the recipe is meant to be sampled (dlm sample flags override); "Gaussian chain": gaussian's only ---
    sample_steps: int = _sampling(200)  # the chain's steps (a Gaussian chain's: at most diffusion_steps)
    # Gaussian chain: which timesteps those are: logsnr (evenly spaced in log signal-to-noise down to a
    # floor), logsnr_full (over the whole range, crowded at pure noise), quadratic (the DDIM paper's) or
    # uniform (Diffusion-LM's even stride); see dlm.core.schedule.sampling_timesteps
    sample_spacing: Literal["logsnr", "logsnr_full", "quadratic", "uniform"] = _sampling("logsnr")
    # Gaussian chain: Diffusion-LM's clamping trick, the predicted x0 snapped to its nearest row
    clamp: bool = _sampling(True)
    clamp_fraction: float = _sampling(1.0)  # Gaussian chain: clamp only during the last share of the steps
    sample_eta: float = _sampling(1.0)  # Gaussian chain: 1 ancestral (DDPM), 0 deterministic DDIM
    # Gaussian chain: the x0 each step moves toward: the denoiser's prediction, the expected embedding
    # under the rounding softmax of that prediction (keeps the words the denoiser knows; see
    # docs/journal.md), or the posterior mean E[x_0 | x_t] under that softmax (gaussian_sampling.posterior_x0_hook)
    sample_x0: Literal["predicted", "expected", "posterior"] = _sampling("predicted")
    # the sampler's temperature where its family draws words: the Gaussian chain's final rounding, every
    # step of the masked and uniform chains (their per-step temperature), every token of the AR model;
    # 0 argmax, >0 drawn from softmax(logits / T)
    decode_temperature: float = _sampling(0.0)
    # whether a final token may be <unk>; False masks its score, so that a capped vocabulary's
    # samples (about 12% <unk> at 10+ occurrences) hold words only
    decode_unk: bool = _sampling(True)

    # --- training: optimisation, and how long ---
    batch_size: int = _training(64)  # windows per optimizer step (a distributed run's global batch)
    epochs: int = _training(10)  # passes over the training windows
    max_steps: Optional[int] = _training(None)  # stop after this many optimizer steps (overrides epochs)
    # stop once the training loop has run this many wall-clock seconds (in this invocation), and
    # decay the lr over that time rather than over the steps: equal-time comparisons
    max_train_seconds: Optional[float] = _training(None)
    lr: float = _training(3e-4)  # peak learning rate
    weight_decay: float = _training(0.0)  # AdamW weight decay
    # which parameters weight decay touches: matrices only (nanoGPT), matrices and the embedding
    # table, or everything (the earlier attempt)
    weight_decay_scope: Literal["matrices", "matrices+embeddings", "all"] = _training("matrices")
    warmup_steps: int = _training(100)  # linear warm-up steps
    # after warm-up: linear or cosine to 10% of lr, constant, or wsd (warmup-stable-decay, Hagele
    # et al. 2024): constant at lr, then linear to 0 over the run's last lr_cooldown_fraction of
    # steps (its last lr_cooldown_steps when set). A kept checkpoint of a wsd run's stable phase can
    # be cooled down into a run of any shorter budget (dlm cooldown)
    lr_decay: Literal["linear", "cosine", "constant", "wsd"] = _training("linear")
    lr_cooldown_fraction: float = _training(0.2)  # wsd: the share of the steps the lr decays over
    lr_cooldown_steps: Optional[int] = _training(None)  # wsd: the steps the lr decays over (overrides the fraction)
    grad_clip: float = _training(1.0)  # 0 disables clipping
    ema_decay: float = _training(0.999)  # 0 disables the EMA copy
    seed: int = _training(0)  # training seed: the initial weights, the windows' order, the noise

    # --- bookkeeping: what a run records ---
    log_every: int = _bookkeeping(20)  # optimizer steps between log lines / metrics.csv rows
    checkpoint_every: int = _bookkeeping(1)  # keep a checkpoint every N epochs (plus last.pt)
    val_batches: int = _bookkeeping(4)  # validation batches at each epoch end
    # the controls `dlm report` shows on a control page (notebooks/control.ipynb): a comma list of
    # infill, prefix, length, guidance; empty: no control page
    control_tasks: str = _bookkeeping("")
    # TensorBoard event files in run_dir/tensorboard/ (losses, lr, tokens/s, embedding geometry,
    # samples at kept checkpoints); needs the tensorboard package
    tensorboard: bool = _bookkeeping(False)
    # at the end of training, find the sampling temperature that puts 64 samples at held-out
    # text's unigram entropy and sample at it by default from then on (RUN/calibration.json;
    # dlm.evaluation.calibration; the same as `dlm calibrate`)
    calibrate_temperature: bool = _bookkeeping(False)

    # --- runtime: how a run executes on this machine (measured in benchmarks/speed.py; README, "Speed") ---
    device: Literal["auto", "cpu", "cuda"] = _runtime("auto")  # auto: CUDA when there is one
    threads: Optional[int] = _runtime(None)  # torch intra-op threads; None (or 0) keeps torch's choice
    # bf16: autocast the network's matmuls to bfloat16 (the rounding loss stays float32); auto: bf16
    # on CUDA, and on a CPU where a short timed probe finds bf16 at least 1.3x faster (dlm.core.runtime)
    precision: Literal["auto", "fp32", "bf16"] = _runtime("auto")
    compile: bool = _runtime(False)  # torch.compile the denoiser: slower first steps, then faster ones
    progress: bool = _runtime(True)  # a live progress bar with ETA: text on stderr, a widget in JupyterLab

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, **overrides: Any) -> Config:
        return from_dict({**self.to_dict(), **overrides})

    def section(self, name: str) -> dict[str, Any]:
        """The keys of one section (see SECTIONS) and their values, in declaration order."""
        return {key: getattr(self, key) for key in section_keys(name)}

    @property
    def trains_every_block(self) -> bool:
        """Block diffusion trained on every block at once (BD3-LM): the denoiser reads the clean
        window beside the noised one."""
        return self.block_size is not None and self.block_size < self.seq_len and self.block_training == "all"


def section_keys(name: str) -> tuple[str, ...]:
    if name not in SECTIONS:
        raise ConfigError(f"No config section '{name}'; the sections are: {', '.join(SECTIONS)}.")
    return tuple(f.name for f in dataclasses.fields(Config) if f.metadata["section"] == name)


def section_of(key: str) -> str:
    return Config.__dataclass_fields__[key].metadata["section"]


def field_types() -> dict[str, Any]:
    return dict(_field_types())  # a copy: callers may change theirs


@functools.cache
def _field_types() -> dict[str, Any]:  # get_type_hints evaluates every annotation: ~1 ms a call
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


@dataclass(frozen=True)
class Key:
    """One Config key as a user sees it: for --help texts and notebook parameters cells."""
    name: str
    section: str
    type: str  # describe_type's words: 'an integer or null', 'one of: word, char'
    default: Any
    comment: str  # the comment lines above the key in Config and the one beside it, joined


def keys() -> list[Key]:
    """Every Config key, in declaration order, with its section, type in words, default and comment."""
    comments = _comments()
    types_by_key = field_types()
    return [Key(f.name, f.metadata["section"], describe_type(types_by_key[f.name]), f.default,
                comments.get(f.name, "")) for f in dataclasses.fields(Config)]


def notebook_parameter(key: Key) -> str:
    """The key's line for a notebook's parameters cell: typed, None (keep the preset's value), and
    commented, so that `papermill --help-notebook` explains it."""
    tp = field_types()[key.name]
    inner = "str" if typing.get_origin(tp) is Literal else next(
        a for a in (*typing.get_args(tp), tp) if a is not type(None) and isinstance(a, type)).__name__
    choices = f" ({key.type})" if key.type.startswith("one of") else ""
    return f"{key.name}: Optional[{inner}] = None  # {key.comment or key.name.replace('_', ' ')}{choices}"


# The first line of train.ipynb's Config parameters: the lines from it to the end of the parameters
# cell are notebook_parameters(), written by `python -m dlm.workbench.shipped --update`.
NOTEBOOK_OVERRIDES = "# Config overrides: None keeps the value of the preset named by `params`."


def notebook_parameters() -> str:
    """Every key as a notebook parameter (`notebook_parameter`), section by section in declaration
    order under a `# --- section ---` line, after NOTEBOOK_OVERRIDES: train.ipynb's Config
    parameters, whose comments are then Config's own."""
    lines = [NOTEBOOK_OVERRIDES]
    for section in SECTIONS:
        lines.append(f"# --- {section} ---")
        lines.extend(notebook_parameter(key) for key in keys() if key.section == section)
    return "\n".join(lines)


@functools.cache
def _comments() -> dict[str, str]:
    """Config's comments, read from this file: the comment lines right above a key (not the
    `# --- section ---` rulers) and the comment beside it."""
    source = textwrap.dedent(inspect.getsource(Config))
    beside = {tok.start[0]: tok.string.lstrip("# ").strip()
              for tok in tokenize.generate_tokens(io.StringIO(source).readline) if tok.type == tokenize.COMMENT}
    comments, above = {}, []
    for number, line in enumerate(source.splitlines(), start=1):
        text = line.strip()
        if text.startswith("#"):
            above = [] if text.startswith("# ---") else [*above, beside[number]]
            continue
        match = re.match(r"(\w+):", text)
        if match and match[1] in Config.__dataclass_fields__:
            comments[match[1]] = " ".join([*above, *([beside[number]] if number in beside else [])])
        above = []
    return comments


def did_you_mean(name: str, allowed) -> str:
    """' Did you mean 'X'?' for the closest allowed name, or nothing when none is close."""
    close = difflib.get_close_matches(name, sorted(allowed), n=1)
    return f" Did you mean '{close[0]}'?" if close else ""


def unknown_key_error(key: str, where: str = "") -> ConfigError:
    allowed = sorted(field_types())
    hint = did_you_mean(key, allowed)
    return ConfigError(
        f"Unknown config key '{key}'{where}.{hint} Allowed keys: {', '.join(allowed)}."
    )


def coerce(key: str, value: Any, from_text: bool = False) -> Any:
    """Check (and for command-line text, parse) one value against the field's type."""
    types_by_key = _field_types()
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
    # From YAML: exact types, except that an int is a fine float, and so is a numeric string: PyYAML
    # (YAML 1.1) reads `lr: 1e-3` as the string '1e-3' (it wants 1.0e-3).
    if tp is float and isinstance(value, str):
        return float(value)
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is int and isinstance(value, bool):
        raise TypeError
    if not isinstance(value, tp):
        raise TypeError
    return value


# A family's former `model` value -> its name now: presets and checkpoints that say the old one still
# load, as the new one, with one line on stderr (once per process).
RENAMED_MODELS = {"diffusion": "gaussian"}
_told_renamed: set[str] = set()


def current_model(name: Any) -> Any:
    """A `model` value by the family's current name (RENAMED_MODELS), saying so the first time."""
    new = RENAMED_MODELS.get(name) if isinstance(name, str) else None
    if new is None:
        return name
    if name not in _told_renamed:
        _told_renamed.add(name)
        print(f"model: {name} is now called {new}; loading it as {new}", file=sys.stderr, flush=True)
    return new


def from_dict(values: dict[str, Any], from_text: bool = False) -> Config:
    if "model" in values:
        values = {**values, "model": current_model(values["model"])}
    checked = {key: coerce(key, value, from_text) for key, value in values.items()}
    config = Config(**checked)
    validate(config)
    return config


# Closed and open ranges of every number key (None: no bound on that side; "[" closed, "(" open).
RANGES: dict[str, tuple[str, Any, Any, str]] = {
    "lr": ("(", 0.0, None, "the peak learning rate, e.g. 0.001"),
    "weight_decay": ("[", 0.0, None, "0 turns it off"),
    "dropout": ("[", 0.0, 1.0, "a drop probability: 0 turns it off; 1 would drop everything"),
    "grad_clip": ("[", 0.0, None, "0 disables clipping"),
    "rounding_weight": ("[", 0.0, 1000.0, "the rounding loss's weight; the recipes use 1"),
    "embedding_init_std": ("(", 0.0, None, "the table's initial standard deviation"),
    "embedding_lr_scale": ("(", 0.0, None, "the table's lr is lr * this"),
    "embedding_scale": ("(", 0.0, None, "rows get norm embedding_scale * sqrt(d)"),
    "self_condition": ("[", 0.0, 1.0, "a share of batches: a number from 0 to 1"),
    "left_to_right": ("[", 0.0, None, "a delay (a share of the chain per sequence length): 0 or more"),
    "clamp_fraction": ("[", 0.0, 1.0, "a share of the sampling steps: a number from 0 to 1"),
    "sample_eta": ("[", 0.0, 1.0, "1 ancestral (DDPM), 0 deterministic DDIM"),
    "decode_temperature": ("[", 0.0, None, "0 (argmax) or positive"),
    "ema_decay": ("[", 0.0, 1.0, "0 disables the EMA copy"),
    "max_train_seconds": ("(", 0.0, None, "positive, or left out"),
    "lr_cooldown_fraction": ("(", 0.0, 1.0, "the share of a wsd run's steps its lr decays over, e.g. 0.2"),
    "bpe_vocab_size": ("[", 2000, 8000, "the BPE tokenizer's vocabulary size"),
    "mask_rate_min": ("(", 0.0, 1.0, "the least mask rate a masked run trains at, in (0, 1)"),
    "mask_rate_max": ("(", 0.0, 1.0, "the largest mask rate a masked run trains at, at most 1"),
}
RANGE_RIGHT_OPEN = {"dropout", "ema_decay"}  # [0, 1): 1 is not allowed


def _check_range(key: str, value: Any) -> None:
    if value is None or key not in RANGES:
        return
    left, low, high, meaning = RANGES[key]
    below = value < low if left == "[" else value <= low
    above = high is not None and (value >= high if key in RANGE_RIGHT_OPEN else value > high)
    if below or above:
        lo = f"{left}{low:g}"
        hi = (f"{high:g})" if key in RANGE_RIGHT_OPEN else f"{high:g}]") if high is not None else "inf)"
        raise ConfigError(f"Config key '{key}' must be in {lo}, {hi} ({meaning}), got {value:g}.")


def validate(config: Config) -> None:
    for key in _field_types():  # every number key: finite (nan and inf train silently to nan)
        value = getattr(config, key)
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"Config key '{key}' must be a finite number, got {value}.")
        _check_range(key, value)
    positive = ["seq_len", "embed_dim", "width", "depth", "heads", "batch_size", "diffusion_steps",
                "log_every", "checkpoint_every", "min_count", "val_batches"]
    for key in positive:
        if getattr(config, key) < 1:
            raise ConfigError(f"Config key '{key}' must be at least 1, got {getattr(config, key)}.")
    for key in ("max_steps", "max_train_tokens", "lr_cooldown_steps"):
        if getattr(config, key) is not None and getattr(config, key) < 1:
            raise ConfigError(f"Config key '{key}' must be at least 1 (or left out, null), got {getattr(config, key)}.")
    if config.threads is not None and config.threads < 0:
        raise ConfigError(f"Config key 'threads' must be a number of threads, or 0 or null for torch's choice; "
                          f"got {config.threads}.")
    for key in ("epochs", "warmup_steps"):
        if getattr(config, key) < 0:
            raise ConfigError(f"Config key '{key}' must be 0 or more, got {getattr(config, key)}.")
    if config.width % config.heads:
        raise ConfigError(
            f"'width' ({config.width}) must be divisible by 'heads' ({config.heads})."
        )
    if config.embedding_scale != 1.0 and config.embedding_norm == "none":
        raise ConfigError("'embedding_scale' only applies to a normalised table: set embedding_norm to l2 or layernorm.")
    if config.left_to_right > 0 and config.time_warp:
        raise ConfigError("'time_warp' draws one timestep per sequence and 'left_to_right' one per position: "
                          "use one of them.")
    if config.timestep_sampling != "uniform" and (config.left_to_right > 0 or config.time_warp):
        other = "'left_to_right' one per position" if config.left_to_right > 0 else "'time_warp' its own"
        raise ConfigError(f"'timestep_sampling: {config.timestep_sampling}' draws one timestep per sequence and "
                          f"{other}: use one of them (timestep_sampling uniform).")
    if config.left_to_right > 0 and config.sample_steps < 2:
        raise ConfigError("'left_to_right' chains need sample_steps of at least 2.")
    if config.block_size is not None:
        check_block_size(config)
    if config.mask_rate_min >= config.mask_rate_max:
        raise ConfigError(f"'mask_rate_min' ({config.mask_rate_min:g}) must be below 'mask_rate_max' "
                          f"({config.mask_rate_max:g}).")
    unknown_tasks = sorted({t.strip() for t in config.control_tasks.split(",") if t.strip()} - set(CONTROL_TASKS))
    if unknown_tasks:
        raise ConfigError(f"'control_tasks' names {', '.join(unknown_tasks)}: use a comma list of "
                          f"{', '.join(CONTROL_TASKS)} (or leave it empty for no control page).")
    if config.sample_steps < 1:
        raise ConfigError(f"'sample_steps' must be at least 1, got {config.sample_steps}.")
    if config.block_training != "one" and (config.block_size is None or config.block_size == config.seq_len):
        raise ConfigError(f"'block_training' ({config.block_training}) applies to block runs only: set block_size "
                          f"to a divisor of seq_len below {config.seq_len}, or drop block_training.")
    check_memory(config)


def check_block_size(config: Config) -> None:
    size, length = config.block_size, config.seq_len
    if not 1 <= size <= length or length % size:
        divisors = ", ".join(str(d) for d in range(1, length + 1) if length % d == 0)
        raise ConfigError(f"'block_size' ({size}) must divide seq_len ({length}): use one of {divisors} "
                          f"(or null for the whole window).")
    if size < length and config.left_to_right > 0:
        raise ConfigError("'block_size' and 'left_to_right' both order the generation: use one of them "
                          "(left_to_right 0, or block_size null).")
    if config.trains_every_block and config.self_condition > 0:
        raise ConfigError("'block_training: all' feeds the window twice (noised and clean); it cannot be combined "
                          "with self_condition yet: use self_condition 0 or block_training one.")
    if size < length and config.time_warp:
        raise ConfigError("'time_warp' measures the loss over the whole window; it cannot be combined with "
                          "block_size below seq_len.")


def training_memory_bytes(config: Config) -> int:
    """A rough estimate of what training needs, before the vocabulary is known (the rounding logits
    are computed in chunks, so the vocabulary only counts through the table, taken at a small
    vocabulary here: the estimate errs low): weights, gradients, AdamW's two moments and the EMA
    copy (~20 bytes a parameter), the saved activations (about 24 floats per token, width and
    layer, each layer's attention maps, and the noised embeddings), and the schedule tables. A
    run trained on every block at once reads the clean window beside the noised one: twice the
    tokens, four times the attention maps."""
    d, w, depth, length = config.embed_dim, config.width, config.depth, config.seq_len
    vocab = {"char": 64, "bpe": config.bpe_vocab_size}.get(config.tokenizer, 1000)
    params = depth * 12 * w * w + 2 * d * w + 2 * length * w + 4 * w * w + vocab * d
    inputs = 2 * length if config.trains_every_block else length
    activations = config.batch_size * inputs * (depth * (24 * w + 3 * config.heads * inputs) + 4 * d)
    return 20 * params + 4 * activations + 16 * 8 * config.diffusion_steps


@functools.cache  # every Config is validated (each replace() too); the RAM does not change meanwhile
def machine_memory_bytes() -> int | None:
    """This machine's RAM (MemTotal in /proc/meminfo, else sysconf), None where neither says."""
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return None


def check_memory(config: Config) -> None:
    """Refuse sizes (width, depth, seq_len, batch_size, embed_dim, diffusion_steps) whose training
    would need more memory than the machine has, before anything is allocated."""
    need, have = training_memory_bytes(config), machine_memory_bytes()
    if have is not None and need > have:
        raise ConfigError(
            f"This config needs about {need / 2**30:,.1f} GiB to train (width {config.width}, depth {config.depth}, "
            f"embed_dim {config.embed_dim}, seq_len {config.seq_len}, batch_size {config.batch_size}, diffusion_steps "
            f"{config.diffusion_steps}); this machine has {have / 2**30:,.1f} GiB. Make them smaller."
        )


class _DuplicateKey(Exception):
    pass


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml.safe_load that refuses a key given twice in one mapping (PyYAML keeps the last silently)."""

    def construct_mapping(self, node, deep=False):
        lines: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            line = key_node.start_mark.line + 1
            if key in lines:
                raise _DuplicateKey(f"'{key}' is set twice (lines {lines[key]} and {line})")
            lines[key] = line
        return super().construct_mapping(node, deep)


def load_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"No preset file at '{path}'. Presets live in params/ (e.g. params/default.yaml).")
    try:
        values = yaml.load(path.read_text(), Loader=_UniqueKeyLoader) or {}
    except yaml.YAMLError as error:
        raise ConfigError(f"'{path}' is not valid YAML: {error}") from None
    except _DuplicateKey as error:
        raise ConfigError(f"In {path}, {error}: keep the one you mean and delete the other.") from None
    if not isinstance(values, dict):
        raise ConfigError(f"'{path}' must hold a mapping of config keys to values.")
    for key in values:
        if key not in field_types():
            raise unknown_key_error(str(key), where=f" in {path}")
    if "model" in values:
        values["model"] = current_model(values["model"])
    return values


def load_config(path: str | Path | None = None, **overrides: Any) -> Config:
    """Defaults, then the YAML preset at `path`, then `overrides` (already typed values)."""
    values = load_yaml(path) if path is not None else {}
    values.update(overrides)
    return from_dict(values)


def save_config(config: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
