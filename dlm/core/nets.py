"""TinyTransformer: the blocks of the denoiser and, with a causal mask, of the autoregressive baseline.
It knows nothing of noise schedules or tokens."""

from __future__ import annotations

import math
from dataclasses import dataclass

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


def rotary_angles(positions: torch.Tensor, head_size: int, base: float = 10000.0) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin (L, head_size / 2) of rotary position embeddings (RoPE, Su et al. 2021) at
    integer positions (L,): what `rotate` turns each query and key by."""
    half = head_size // 2
    freqs = base ** (-torch.arange(half, device=positions.device, dtype=torch.float32) / half)
    angles = positions.float()[:, None] * freqs[None]
    return angles.cos(), angles.sin()


def rotate(x: torch.Tensor, angles: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """x (B, heads, L, head_size) with each pair (x_i, x_{i + head_size/2}) turned by its position's
    angle, so that a query-key product depends on the two positions only through their distance."""
    cos, sin = (a.to(x.dtype) for a in angles)
    first, second = x.chunk(2, dim=-1)
    return torch.cat([first * cos - second * sin, first * sin + second * cos], dim=-1)


# One layer's keys and values, (B, heads, P, head size) each.
KeysValues = tuple[torch.Tensor, torch.Tensor]


@dataclass
class PrefixCache:
    """The keys and values every layer computed for a prefix of P positions (TinyTransformer.
    cache_prefix): what later positions attend to without running the prefix again."""

    layers: list[KeysValues]

    @property
    def length(self) -> int:
        return self.layers[0][0].shape[2] if self.layers else 0


class SelfAttention(nn.Module):
    def __init__(self, width: int, heads: int, dropout: float, causal: bool):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.dropout = dropout
        self.causal = causal

    def forward(self, x: torch.Tensor, attend: torch.Tensor | None = None,
                past: KeysValues | None = None,
                angles: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, KeysValues]:
        """(output, the keys and values the queries read: past's, then x's own; keys rotated).
        angles: x's positions' rotary angles (`rotary_angles`), None without rotary positions.

        attend, optional (False: masked out): (B, K) bool, the keys every query may read, or
        (B or 1, L, K) bool, the keys each query may read; K counts past's keys first.
        past: keys and values of earlier positions (a PrefixCache layer), read by every query
        (causal: x's queries are the positions right after them)."""
        batch, length, width = x.shape
        q, k, v = self.qkv(x).split(width, dim=-1)
        # (B, L, W) -> (B, nh, L, hs)
        q, k, v = (z.view(batch, length, self.heads, -1).transpose(1, 2) for z in (q, k, v))
        if angles is not None:
            q, k = rotate(q, angles), rotate(k, angles)
        if past is not None:
            k, v = torch.cat([past[0].to(k.dtype), k], dim=2), torch.cat([past[1].to(v.dtype), v], dim=2)
        dropout_p = self.dropout if self.training else 0.0
        mask = None
        if attend is not None:  # broadcast over heads (and over queries, for a (B, K) mask)
            mask = attend[:, None, None, :] if attend.ndim == 2 else attend[:, None]
        causal = self.causal
        if causal and past is not None:
            # is_causal aligns the first query with the first key; here it comes after past's keys
            earlier = past[0].shape[2]
            lower = torch.ones(length, earlier + length, dtype=torch.bool, device=x.device).tril(earlier)
            mask = lower if mask is None else mask & lower
            causal = False
        if q.device.type == "cpu" and q.dtype == torch.bfloat16:
            # PyTorch's bf16 flash-attention backward on a CPU took 5x the float32 one here
            # (profiled: a quarter of a bf16 training step); attention is a few % of the FLOPs.
            with torch.autocast("cpu", enabled=False):
                y = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), dropout_p=dropout_p,
                                                   is_causal=causal, attn_mask=mask)
        else:
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=causal, attn_mask=mask)
        return self.proj(y.transpose(1, 2).reshape(batch, length, width)), (k, v)


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

    def forward(self, x: torch.Tensor, attend: torch.Tensor | None = None,
                past: KeysValues | None = None,
                angles: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, KeysValues]:
        """(output, the attention's keys and values, past's included)."""
        attended, keys_values = self.attn(self.ln1(x), attend, past, angles)
        x = x + self.drop(attended)
        return x + self.mlp(self.ln2(x)), keys_values


class TinyTransformer(nn.Module):
    """embed_dim -> width up-projection, learned positions, (optional) time embedding through an
    MLP, pre-LN blocks on scaled_dot_product_attention, width -> out_dim down-projection.

    positions: 'learned' (a table added to the input, GPT-2's) or 'rotary' (RoPE in every layer's
    queries and keys, as MDLM's and BD3-LM's DiT backbone has). A causal model learns word order
    from its mask; a bidirectional one with learned positions reads its window as a bag of words
    until it has learned them (docs/journal.md, "Where things stand"), where rotary attention
    sees distances from the first step.

    A prefix that later positions read but that never reads them (the finished blocks of block
    diffusion, under a block-causal mask; a causal model's past) can be run once and cached:

        cache = net.cache_prefix(x_prefix, t_prefix)       # positions 0 .. P-1
        out = net(x_block, t_block, cache=cache)           # positions P .. P+L-1, reading the prefix
        cache = net.cache_prefix(x_block_clean, t_clean, cache=cache)   # the prefix grows by L

    `net(x_block, t, cache=cache)` gives x_block's rows of `net(cat(x_prefix, x_block), t', attend)`
    for an attend mask under which the prefix never reads x_block, and x_block reads all of the
    prefix and all of itself (unless `attend` says otherwise), to float rounding. Each call to
    cache_prefix is one such step: its positions read the cache and each other, so a prefix built
    block by block is what a block-causal mask computes (block diffusion's finished blocks). The
    cache is only valid while the prefix's inputs (x, t) stay what they were cached with.
    """

    def __init__(self, embed_dim: int, width: int, depth: int, heads: int, seq_len: int,
                 dropout: float = 0.1, *, causal: bool = False, time_conditioned: bool = True,
                 in_dim: int | None = None, out_dim: int | None = None, positions: str = "learned"):
        super().__init__()
        if positions not in ("learned", "rotary"):
            raise ValueError(f"Unknown positions '{positions}': use learned or rotary.")
        if positions == "rotary" and (width // heads) % 2:
            raise ValueError(f"Rotary positions need an even head size; width {width} / heads {heads} is odd.")
        self.width = width
        self.head_size = width // heads
        self.seq_len = seq_len
        self.rotary = positions == "rotary"
        self.in_proj = nn.Linear(in_dim or embed_dim, width)
        # rotary runs keep no table (their state dict says which kind they are)
        self.positions = None if self.rotary else nn.Parameter(torch.randn(seq_len, width) * 0.02)
        self.time_mlp = (
            nn.Sequential(nn.Linear(width, 4 * width), nn.SiLU(), nn.Linear(4 * width, width))
            if time_conditioned else None
        )
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(Block(width, heads, dropout, causal) for _ in range(depth))
        self.ln_f = nn.LayerNorm(width)
        self.out_proj = nn.Linear(width, out_dim or embed_dim)

    def forward(self, x: torch.Tensor, t: torch.Tensor | None = None, attend: torch.Tensor | None = None,
                positions: torch.Tensor | None = None, cache: PrefixCache | None = None) -> torch.Tensor:
        """attend, optional: what every position may attend to, (B, K) or (B or 1, L, K) bool, K
        the keys: the cache's, then x's (see SelfAttention; block diffusion's masks); None: all of
        them. positions (L,) long, optional: each input's position in the window (by default the
        L positions after the cache's; block diffusion trained on every block at once feeds the
        window twice, noised and clean, at the same positions). cache: a prefix x reads (see the
        class docstring)."""
        h, angles = self._inputs(x, t, positions, cache)
        for index, block in enumerate(self.blocks):
            h, _ = block(h, attend, None if cache is None else cache.layers[index], angles)
        return self.out_proj(self.ln_f(h))

    def extend(self, x: torch.Tensor, cache: PrefixCache | None = None,
               t: torch.Tensor | None = None) -> tuple[torch.Tensor, PrefixCache]:
        """forward's output for x's L positions right after the cache's, and the cache grown by
        them, in one pass: a causal model's decoding step (KV caching). Each new position reads
        the cache and, causally, the positions of x before it."""
        h, angles = self._inputs(x, t, None, cache)
        layers = []
        for index, block in enumerate(self.blocks):
            h, keys_values = block(h, None, None if cache is None else cache.layers[index], angles)
            layers.append(keys_values)
        return self.out_proj(self.ln_f(h)), PrefixCache(layers)

    def cache_prefix(self, x: torch.Tensor, t: torch.Tensor | None = None, cache: PrefixCache | None = None,
                     attend: torch.Tensor | None = None, positions: torch.Tensor | None = None) -> PrefixCache:
        """`cache` (None: empty) grown by x's L positions, which read the cache and each other
        (attend, positions: as in forward). Nothing is returned of x but its keys and values."""
        h, angles = self._inputs(x, t, positions, cache)
        layers = []
        for index, block in enumerate(self.blocks):
            past = None if cache is None else cache.layers[index]
            if index == len(self.blocks) - 1:  # the last block's keys need no more than its input
                layers.append(block.attn(block.ln1(h), attend, past, angles)[1])
            else:
                h, keys_values = block(h, attend, past, angles)
                layers.append(keys_values)
        return PrefixCache(layers)

    def _inputs(self, x: torch.Tensor, t: torch.Tensor | None, positions: torch.Tensor | None,
                cache: PrefixCache | None) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]:
        """The first block's input (projected x, its positions' embeddings and its timesteps') and,
        with rotary positions, the rotary angles of x's positions."""
        length = x.shape[1]
        if positions is None:
            first = 0 if cache is None else cache.length
            positions = torch.arange(first, first + length, device=x.device)
        h = self.in_proj(x)  # (B, L, W)
        angles = None
        if self.rotary:
            angles = rotary_angles(positions, self.head_size)
        else:
            h = h + self.positions[positions]
        if self.time_mlp is not None:
            # t is one timestep per sequence (B,) or one per position (B, L) (left-to-right chains)
            time = self.time_mlp(timestep_embedding(t.reshape(-1), self.width))
            h = h + (time[:, None, :] if t.ndim == 1 else time.view(*t.shape, -1))
        return self.drop(h), angles
