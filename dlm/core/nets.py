"""TinyTransformer: the blocks of the denoiser and, with a causal mask, of the autoregressive baseline.
It knows nothing of noise schedules or tokens."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal features of the (integer) timestep, (B,) -> (B, dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    features = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    return F.pad(features, (0, dim % 2))


class SelfAttention(nn.Module):
    def __init__(self, width: int, heads: int, dropout: float, causal: bool):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.dropout = dropout
        self.causal = causal

    def forward(self, x: torch.Tensor, attend: torch.Tensor | None = None) -> torch.Tensor:
        """attend, optional (False: masked out): (B, L) bool, the keys every query may read, or
        (B or 1, L, L) bool, the keys each query may read."""
        batch, length, width = x.shape
        q, k, v = self.qkv(x).split(width, dim=-1)
        # (B, L, W) -> (B, nh, L, hs)
        q, k, v = (z.view(batch, length, self.heads, -1).transpose(1, 2) for z in (q, k, v))
        dropout_p = self.dropout if self.training else 0.0
        mask = None
        if attend is not None:  # broadcast over heads (and over queries, for a (B, L) mask)
            mask = attend[:, None, None, :] if attend.ndim == 2 else attend[:, None]
        if q.device.type == "cpu" and q.dtype == torch.bfloat16:
            # PyTorch's bf16 flash-attention backward on a CPU took 5x the float32 one here
            # (profiled: a quarter of a bf16 training step); attention is a few % of the FLOPs.
            with torch.autocast("cpu", enabled=False):
                y = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), dropout_p=dropout_p,
                                                   is_causal=self.causal, attn_mask=mask)
        else:
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=self.causal, attn_mask=mask)
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

    def forward(self, x: torch.Tensor, attend: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.drop(self.attn(self.ln1(x), attend))
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

    def forward(self, x: torch.Tensor, t: torch.Tensor | None = None, attend: torch.Tensor | None = None,
                positions: torch.Tensor | None = None) -> torch.Tensor:
        """attend, optional: what every position may attend to, (B, L) or (B or 1, L, L) bool (see
        SelfAttention; block diffusion's masks); None: all of them. positions (L,) long, optional:
        each input's position in the window (0 .. L-1 by default; block diffusion trained on every
        block at once feeds the window twice, noised and clean, at the same positions)."""
        length = x.shape[1]
        position = self.positions[:length] if positions is None else self.positions[positions]
        h = self.in_proj(x) + position  # (B, L, W)
        if self.time_mlp is not None:
            # t is one timestep per sequence (B,) or one per position (B, L) (left-to-right chains)
            time = self.time_mlp(timestep_embedding(t.reshape(-1), self.width))
            h = h + (time[:, None, :] if t.ndim == 1 else time.view(*t.shape, -1))
        h = self.drop(h)
        for block in self.blocks:
            h = block(h, attend)
        return self.out_proj(self.ln_f(h))
