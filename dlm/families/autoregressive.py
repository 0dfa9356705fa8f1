"""The autoregressive baseline: the same TinyTransformer blocks with a causal mask and a head tied
to the token embedding. It is the competitor a user would otherwise pick, and the teacher that
scores samples (generative perplexity, as Diffusion-LM's lm-score does)."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from dlm.core.config import Config
from dlm.core.embeddings import LearnedEmbedding, LearnedRounding
from dlm.core.nets import TinyTransformer
from dlm.families import Terms
from dlm.families.contract import LoadedRun, SampleOptions


class AutoregressiveLM(nn.Module):
    """p(w_i | w_<i): token embedding -> causal TinyTransformer -> tied head."""

    def __init__(self, config: Config, vocab_size: int, pretrained_embeddings: torch.Tensor | None = None):
        super().__init__()
        d = config.embed_dim
        self.embedding = LearnedEmbedding(vocab_size, d, pretrained_embeddings, init_std=config.embedding_init_std)
        self.transformer = TinyTransformer(d, config.width, config.depth, config.heads, config.seq_len,
                                           config.dropout, causal=True, time_conditioned=False,
                                           positions=config.positions)
        self.head = LearnedRounding(d, vocab_size, tied_embedding=self.embedding)

    def table(self) -> torch.Tensor:
        """The token embedding table, (V, d) (the training log follows its geometry, as for diffusion)."""
        return self.embedding.table()

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """Logits (B, L, V) for the token after each position."""
        return self.head(self.transformer(self.embedding(ids)))

    def losses(self, ids: torch.Tensor) -> dict[str, torch.Tensor]:
        """Next-token cross-entropy on a batch of windows (the first token of each has no context)."""
        hidden = self.transformer(self.embedding(ids[:, :-1]))
        nll = self.head.loss(hidden, ids[:, 1:])  # the rounding head's chunked CE: no (B, L, V) logits kept
        return {"total": nll, "nll": nll}

    @torch.inference_mode()
    def token_nll(self, ids: torch.Tensor) -> torch.Tensor:
        """Per-token negative log-likelihood (nats) of ids[:, 1:] given what precedes, (B, L-1)."""
        logits = self(ids[:, :-1]).float()
        return F.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")

    @torch.inference_mode()
    def generate(self, count: int, length: int, start_id: int, *, temperature: float = 1.0,
                 generator: torch.Generator | None = None, prompt: torch.Tensor | None = None,
                 banned: Sequence[int] = (), cached: bool = True) -> torch.Tensor:
        """Sample `count` sequences of `length` tokens after a `start_id` token (a newline is a
        natural start in line-structured text), (count, length). With `prompt` (k,) the sequences
        continue those k tokens instead, or (count, k): a prompt per sequence (prefix continuation;
        the prompt is not part of the result). A `banned` id is never drawn.

        `cached`: each step runs the newest token only, reading the keys and values of the ones
        before it (TinyTransformer.extend): one token's forward per token, not the whole prefix's.
        The same samples as `cached=False` (which runs the prefix again each step); past seq_len
        tokens the window slides, its positions change, and every step runs the whole window."""
        device = self.embedding.weight.device
        if prompt is None:
            prompt = torch.full((count, 1), start_id, dtype=torch.long, device=device)
        else:
            prompt = prompt.to(device).expand(count, -1)
        ids, cache, fresh = prompt, None, prompt
        window = self.transformer.seq_len
        while ids.shape[1] < length + prompt.shape[1]:
            if cached and ids.shape[1] <= window:
                hidden, cache = self.transformer.extend(self.embedding(fresh), cache)
                logits = self.head(hidden[:, -1:])[:, -1].float()
            else:
                logits = self(ids[:, -window:])[:, -1].float()
            if banned:
                logits[:, list(banned)] = -torch.inf
            # float64: a tiny temperature's logits / T overflow float32's softmax
            probs = torch.softmax(logits.double() / max(temperature, 1e-6), dim=-1).cpu()
            fresh = torch.multinomial(probs, 1, generator=generator).to(device)
            ids = torch.cat([ids, fresh], dim=1)
        return ids[:, prompt.shape[1]:]


class NextTokenObjective:
    """The AR model's training objective, shaped like GaussianDiffusion for the training loop."""

    terms = ("total", "nll")
    timestep_sampler = None  # no timesteps

    def training_losses(self, model: AutoregressiveLM, ids: torch.Tensor,
                        generator: torch.Generator | None = None, uniform_t: bool = False,
                        keys=None) -> dict[str, torch.Tensor]:
        # generator, uniform_t and keys: the diffusion loss's signature (no noise, no timesteps here)
        return model.losses(ids)


# --- the family interface (see dlm.families) ---------------------------------------------------

NAME = "ar"
TITLE = "autoregressive"
DESCRIPTION = "the baseline and the teacher: a causal transformer that predicts each next word"
SUPPORTS = frozenset({"likelihood_exact", "prefix", "temperature"})
# No chain: one network call per token, so no steps, spacing, clamping, eta, x0, decoder or trajectory.
SAMPLE_OPTIONS = frozenset({"temperature", "unk", "seed", "batch_size", "num_samples"})
ROUNDS_FIXED_WORDS = False  # the prefix is given to the model as it is
TERMS = Terms(
    name="the autoregressive baseline (the same transformer blocks, causal)",
    losses="The next-token cross-entropy: the exact NLL of the held-out words in nats per token, on training batches "
           "and on fixed validation windows.",
    table="Mean row norm and mean nearest-neighbour distance of the token embedding table (tied to the output head), "
          "the learning rate schedule and training throughput.",
    titles={"nll": "next-token NLL"},
)
_NO_CHAIN = "it has no reverse chain: it draws one token after another, left to right"
WHY_NOT = {
    "likelihood_bound": "its NLL is exact: its validation loss is it (dlm evaluate --nll)",
    "infill": "it writes left to right: it continues a prefix but cannot fill blanks before given words",
    "length": "it writes left to right: it cannot fit a speech of exactly N tokens before a fixed blank line",
    "guidance": f"{_NO_CHAIN}, so there are no latents for a classifier's gradient to move",
    "latent": f"{_NO_CHAIN}, so there are no noised latents for a classifier to read",
    "geometry": "it has no Gaussian q(x0|w) (no sigma0) and no rounding decoder, so the Gaussian family's collapse and "
                "geometry signals do not apply; its samples are judged against held-out text on the samples page",
    "probe": "it has no noise for a denoiser to remove: its exact NLL says how well it predicts held-out words",
    **{option: _NO_CHAIN for option in ("steps", "spacing", "clamp", "clamp_fraction", "eta", "x0", "decoder",
                                        "record_every", "sampler")},
}


# The family-specific Config keys it reads (dlm.families.check_config refuses the others'): how its
# tokens are drawn.
CONFIG_KEYS = frozenset({"decode_temperature", "decode_unk"})


def likelihood_kind(config: Config) -> str:
    """Its validation loss is the NLL itself, by the chain rule."""
    return "exact NLL"


def recipe(config: Config) -> list[str]:
    """Nothing of its own to tell one AR run from another: the shared keys say it."""
    return []


def check_config(config: Config) -> None:
    """Nothing beyond the shared checks: its keys are the shared ones and CONFIG_KEYS."""


def new_model(config: Config, vocab_size: int, pretrained: torch.Tensor | None = None) -> AutoregressiveLM:
    return AutoregressiveLM(config, vocab_size, pretrained)


def objective(config: Config) -> NextTokenObjective:
    return NextTokenObjective()


def trunk(model: AutoregressiveLM) -> nn.Module:
    return model.transformer


def chain(config: Config) -> None:
    """No reverse chain: one network call per token."""
    return None


def check_given_options(given: Mapping[str, object], flag: Callable[[str], str]) -> None:
    """Its sampler takes any of its SAMPLE_OPTIONS together."""


def check_steps(options: SampleOptions, config: Config) -> None:
    """The options' own ranges; with no chain, its steps are not checked."""
    options.validate()


def generate(run: LoadedRun, options: SampleOptions, generator: torch.Generator,
             device: torch.device | str = "cpu") -> tuple[torch.Tensor, list[dict]]:
    """One batch of `run` (model, tokenizer, config) sampled left to right at options.temperature
    (0: greedy), each sample starting after a newline, the way the corpus's lines start. No trajectory."""
    check_steps(options, run.config)
    start_id = run.tokenizer.stoi.get("\n", run.tokenizer.pad_id)
    ids = run.model.generate(options.num_samples, run.config.seq_len, start_id, temperature=options.temperature,
                             generator=generator, banned=options.banned_ids(run.tokenizer))
    return ids.cpu(), []


def fill(run: LoadedRun, ids: torch.Tensor, known: torch.Tensor, options: SampleOptions, generator: torch.Generator,
         device: torch.device | str = "cpu") -> tuple[torch.Tensor, None]:
    """Control (prefix only), one batch: the first k = known.sum() tokens of each window of ids (N, L)
    given, the rest generated left to right. No scores."""
    k = int(known.sum())
    rest = run.model.generate(len(ids), run.config.seq_len - k, run.tokenizer.pad_id, temperature=options.temperature,
                              generator=generator, prompt=ids[:, :k], banned=options.banned_ids(run.tokenizer))
    return torch.cat([ids[:, :k], rest.cpu()], dim=1), None


def token_nll(run: LoadedRun, ids: torch.Tensor) -> torch.Tensor:
    """-log p of each token after the first given what precedes it (nats), (B, L-1): the teacher's score."""
    return run.model.token_nll(ids.to(next(run.model.parameters()).device)).cpu()


def decode_again(run: LoadedRun, options: SampleOptions, device: torch.device | str = "cpu") -> None:
    """The temperature enters every token's draw: each temperature is sampled afresh."""
    return None
