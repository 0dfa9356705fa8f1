"""Seeded draws per training window, so that how a batch is split (over processes, or not) does not
change what any window sees: a window's timestep and noise come from a generator seeded by
(seed, step, the window's index in the global batch), and a step's shared choices (the
self-conditioning coin) from one seeded by (seed, step)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

_MIX = 1_000_003
_STEP_SALT = -1  # the step's own generator: no window has this index


def mixed_seed(*parts: int) -> int:
    """One 63-bit seed from a few integers (a polynomial hash, the same on every machine)."""
    value = 0
    for part in parts:
        value = (value * _MIX + part) % (2**63 - 1)
    return value


@dataclass(frozen=True)
class WindowKeys:
    """What seeds a batch's draws: the run's seed, the optimizer step, and each window's index in
    the step's global batch (B,). A process holding a shard of the batch holds those windows' indices."""
    seed: int
    step: int
    index: torch.Tensor

    @classmethod
    def batch(cls, seed: int, step: int, size: int, first: int = 0) -> WindowKeys:
        return cls(seed, step, torch.arange(first, first + size))

    def generators(self) -> list[torch.Generator]:
        """One CPU generator per window."""
        return [torch.Generator().manual_seed(mixed_seed(self.seed, self.step, int(i))) for i in self.index]

    def step_generator(self) -> torch.Generator:
        """The step's generator, the same on every process."""
        return torch.Generator().manual_seed(mixed_seed(self.seed, self.step, _STEP_SALT))


def per_window(generators: list[torch.Generator], draw) -> torch.Tensor:
    """draw(generator) for every window's generator, stacked along a new first dimension."""
    return torch.stack([draw(g) for g in generators])
