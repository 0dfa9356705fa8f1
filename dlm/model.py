"""TinyTransformer, the denoiser (and, with a causal mask, the autoregressive baseline), and
DiffusionLM, the module that owns the embedding table, the denoiser and the rounding decoder."""

from __future__ import annotations

import contextlib
import functools
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from dlm.config import Config
from dlm.embeddings import LearnedEmbedding, LearnedRounding


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal features of the (integer) timestep, (B,) -> (B, dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    features = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    return F.pad(features, (0, dim % 2))


@functools.cache
def cpu_has_amx_bf16() -> bool:
    """Whether this CPU multiplies bfloat16 matrices in AMX tiles (Linux's cpuinfo flag). There,
    bf16 autocast trained default.yaml 1.68x faster and sampled 2.6x faster, with the same sample
    quality (README, "Speed"); with AVX512-BF16 alone it measured 1.07x, not worth the rounding."""
    try:
        return "amx_bf16" in Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return False


def resolved_precision(precision: str, device: torch.device | str) -> str:
    """Config.precision made concrete: 'auto' is bf16 on CUDA and on CPUs with AMX, else fp32."""
    if precision != "auto":
        return precision
    device = torch.device(device)
    return "bf16" if device.type == "cuda" or (device.type == "cpu" and cpu_has_amx_bf16()) else "fp32"


def autocast(precision: str, device: torch.device | str) -> contextlib.AbstractContextManager:
    """The autocast context for Config.precision: bfloat16 matmuls when it resolves to bf16,
    nothing for fp32. Enter it around forward passes only, not backward."""
    device = torch.device(device)
    if resolved_precision(precision, device) == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


class SelfAttention(nn.Module):
    def __init__(self, width: int, heads: int, dropout: float, causal: bool):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.dropout = dropout
        self.causal = causal

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, width = x.shape
        q, k, v = self.qkv(x).split(width, dim=-1)
        # (B, L, W) -> (B, nh, L, hs)
        q, k, v = (z.view(batch, length, self.heads, -1).transpose(1, 2) for z in (q, k, v))
        dropout_p = self.dropout if self.training else 0.0
        if q.device.type == "cpu" and q.dtype == torch.bfloat16:
            # PyTorch's bf16 flash-attention backward on a CPU took 5x the float32 one here
            # (profiled: a quarter of a bf16 training step); attention is a few % of the FLOPs.
            with torch.autocast("cpu", enabled=False):
                y = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), dropout_p=dropout_p,
                                                   is_causal=self.causal)
        else:
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=self.causal)
        return self.proj(y.transpose(1, 2).reshape(batch, length, width))


class Block(nn.Module):
    """Pre-LN transformer block: x + attn(LN(x)), then x + MLP(LN(x))."""

    def __init__(self, width: int, heads: int, dropout: float, causal: bool):
        super().__init__()
        self.ln1 = nn.LayerNorm(width)
        self.attn = SelfAttention(width, heads, dropout, causal)
        self.ln2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(
            nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width), nn.Dropout(dropout)
        )
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop(self.attn(self.ln1(x)))
        return x + self.mlp(self.ln2(x))


class TinyTransformer(nn.Module):
    """embed_dim -> width up-projection, learned positions, (optional) time embedding through an
    MLP, pre-LN blocks on scaled_dot_product_attention, width -> out_dim down-projection."""

    def __init__(self, embed_dim: int, width: int, depth: int, heads: int, seq_len: int,
                 dropout: float = 0.1, causal: bool = False, time_conditioned: bool = True,
                 in_dim: int | None = None, out_dim: int | None = None):
        super().__init__()
        self.width = width
        self.in_proj = nn.Linear(in_dim or embed_dim, width)
        self.positions = nn.Parameter(torch.randn(seq_len, width) * 0.02)
        self.time_mlp = (
            nn.Sequential(nn.Linear(width, 4 * width), nn.SiLU(), nn.Linear(4 * width, width))
            if time_conditioned else None
        )
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(Block(width, heads, dropout, causal) for _ in range(depth))
        self.ln_f = nn.LayerNorm(width)
        self.out_proj = nn.Linear(width, out_dim or embed_dim)

    def forward(self, x: torch.Tensor, t: torch.Tensor | None = None) -> torch.Tensor:
        length = x.shape[1]
        h = self.in_proj(x) + self.positions[:length]  # (B, L, W)
        if self.time_mlp is not None:
            # t is one timestep per sequence (B,) or one per position (B, L) (left-to-right chains)
            time = self.time_mlp(timestep_embedding(t.reshape(-1), self.width))
            h = h + (time[:, None, :] if t.ndim == 1 else time.view(*t.shape, -1))
        h = self.drop(h)
        for block in self.blocks:
            h = block(h)
        return self.out_proj(self.ln_f(h))


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
            in_dim=2 * d if self.self_conditioned else d,
        )
        tied = self.embedding if config.rounding == "tied" else None
        self.rounding = LearnedRounding(d, vocab_size, tied_embedding=tied)

    def denoise(self, x_t: torch.Tensor, t: torch.Tensor, x0_estimate: torch.Tensor | None = None) -> torch.Tensor:
        if self.self_conditioned:
            if x0_estimate is None:
                x0_estimate = torch.zeros_like(x_t)
            x_t = torch.cat([x_t, x0_estimate], dim=-1)
        # float32 out whatever autocast ran inside, so the diffusion arithmetic stays float32.
        return self.denoiser(x_t, t).float()
