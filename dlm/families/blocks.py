"""The block layout shared by the block-diffusion families (Gaussian SSD-LM / BD3-LM, masked BD3-LM):
which positions may read which, as attention masks. Pure layout: no network, no noise."""

from __future__ import annotations

import torch


def block_causal_mask(length: int, block_size: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """(L, L) bool: position q may read position k when k's block is not after q's."""
    block = torch.arange(length, device=device) // block_size
    return block[None, :] <= block[:, None]


def every_block_mask(length: int, block_size: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """(2L, 2L) bool over [noised window, clean window] (BD3-LM's training mask): a noised
    position reads its own block's noised positions and the clean positions of earlier blocks;
    a clean position reads the clean positions of its own and earlier blocks, never noise. So
    each block sees what it sees when it is sampled: the finished blocks clean, itself noised."""
    block = torch.arange(length, device=device) // block_size
    same, earlier = block[None, :] == block[:, None], block[None, :] < block[:, None]
    top = torch.cat([same, earlier], dim=1)
    bottom = torch.cat([torch.zeros_like(same), block_causal_mask(length, block_size, device)], dim=1)
    return torch.cat([top, bottom], dim=0)
