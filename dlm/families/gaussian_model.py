"""The Gaussian family's network (Diffusion-LM): the embedding table EMB(w), the denoiser
f(x_t, t) and the rounding decoder p(w | x), trained jointly; and decoding vectors to words."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from dlm.core.config import Config
from dlm.core.embeddings import CosineRounding, LearnedEmbedding, LearnedRounding
from dlm.core.nets import PrefixCache, TinyTransformer


class DiffusionLM(nn.Module):
    """Everything trained jointly: EMB(w), the denoiser f(x_t, t) and the rounding p(w | x)."""

    def __init__(self, config: Config, vocab_size: int, pretrained_embeddings: torch.Tensor | None = None):
        super().__init__()
        d = config.embed_dim
        self.embedding = LearnedEmbedding(
            vocab_size, d, pretrained_embeddings, trainable=config.use_learned_embeddings,
            norm=config.embedding_norm, init_std=config.embedding_init_std, scale=config.embedding_scale,
        )
        self.self_conditioned = config.self_condition > 0
        # With self-conditioning the denoiser also reads its previous x0 estimate, concatenated.
        self.denoiser = TinyTransformer(
            d, config.width, config.depth, config.heads, config.seq_len, config.dropout,
            in_dim=2 * d if self.self_conditioned else d, positions=config.positions,
        )
        tied = self.embedding if config.rounding == "tied" else None
        self.rounding = LearnedRounding(d, vocab_size, tied_embedding=tied)

    def denoise(self, x_t: torch.Tensor, t: torch.Tensor, x0_estimate: torch.Tensor | None = None,
                attend: torch.Tensor | None = None, positions: torch.Tensor | None = None,
                cache: PrefixCache | None = None) -> torch.Tensor:
        """attend: what each position may read, (B, L) or (B or 1, L, L) bool (block diffusion's
        masks); positions (L,): each input's window position; cache: a clean prefix x_t reads
        (`cache_prefix`; TinyTransformer.forward)."""
        if self.self_conditioned:
            if x0_estimate is None:
                x0_estimate = torch.zeros_like(x_t)
            x_t = torch.cat([x_t, x0_estimate], dim=-1)
        # float32 out whatever autocast ran inside, so the diffusion arithmetic stays float32.
        return self.denoiser(x_t, t, attend, positions, cache).float()

    def cache_prefix(self, clean: torch.Tensor, cache: PrefixCache | None = None) -> PrefixCache:
        """`cache` grown by the clean embeddings (B, L, d) of the words after it, at t = 0, as a
        block-causal mask shows finished blocks (TinyTransformer.cache_prefix)."""
        if self.self_conditioned:  # the prefix would read an x0 estimate that changes every step
            raise ValueError("A prefix cache needs a denoiser without self-conditioning.")
        t = torch.zeros(clean.shape[0], dtype=torch.long, device=clean.device)
        return self.denoiser.cache_prefix(clean, t, cache)

    # The rest of the denoiser interface: what samplers and probes use instead of the modules.

    @property
    def embed_dim(self) -> int:
        return self.embedding.embed_dim

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """EMB(w): token ids (..., L) to vectors (..., L, d)."""
        return self.embedding(ids)

    def table(self) -> torch.Tensor:
        """The embedding table as the diffusion sees it, (V, d)."""
        return self.embedding.table()

    def round(self, x: torch.Tensor) -> torch.Tensor:
        """The rounding decoder p(w | x): vectors (..., d) to logits (..., V)."""
        return self.rounding(x)

    def expected_embedding(self, x: torch.Tensor) -> torch.Tensor:
        """E[EMB(w)] under the rounding softmax p(w | x): vectors (..., d) to (..., d), float32."""
        return self.rounding.expectation(x, self.table())

    def rounding_bias(self) -> torch.Tensor:
        """The rounding decoder's per-word bias (V,): where a vector that carries nothing lands."""
        return self.rounding.output_bias


@torch.inference_mode()
def rounding_logits(model: DiffusionLM, x0: torch.Tensor, decoder: str = "learned",
                    banned: Sequence[int] = ()) -> torch.Tensor:
    """Vectors (B, L, d) to float32 scores (B, L, V): the learned rounding's logits or the cosine
    baseline's similarities (what `decode` takes the argmax of, and constrained decoding masks),
    the `banned` ids' scores -inf."""
    logits = (model.round(x0) if decoder == "learned" else CosineRounding(model.embedding)(x0)).float()
    if banned:
        logits[..., list(banned)] = -torch.inf
    return logits


@torch.inference_mode()
def decode(model: DiffusionLM, x0: torch.Tensor, decoder: str = "learned", temperature: float = 0.0,
           generator: torch.Generator | None = None, banned: Sequence[int] = ()) -> torch.Tensor:
    """Vectors (B, L, d) to token ids (B, L): the learned rounding (argmax, or drawn at a
    temperature) or the cosine baseline, never a `banned` id."""
    logits = rounding_logits(model, x0, decoder, banned)
    if decoder == "cosine" or temperature == 0:
        return logits.argmax(-1)
    # float64: at a small temperature float32 logits / T overflow and the softmax turns to NaN
    probs = torch.softmax(logits.double() / temperature, dim=-1).cpu()
    flat = torch.multinomial(probs.view(-1, probs.shape[-1]), 1, generator=generator)
    return flat.view(logits.shape[:-1]).to(x0.device)
