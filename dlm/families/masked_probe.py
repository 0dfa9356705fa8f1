"""The masked family's probe of its denoiser (its `probe`; benchmarks/probe.py): does it read its
context at all?"""

from __future__ import annotations

from collections.abc import Sequence

import pandas as pd
import torch
import torch.nn.functional as F

from dlm.families.contract import LoadedRun

MASK_RATES = (0.02, 0.1, 0.3, 0.5, 0.7, 0.9, 1.0)


@torch.no_grad()
def masked_context_use(model, ids: torch.Tensor, unigram: torch.Tensor, rates: Sequence[float] = MASK_RATES,
                       seed: int = 0) -> pd.DataFrame:
    """Does a masked-diffusion model read its context? For each mask rate, the cross-entropy
    (nats) at the masked positions of held-out windows ids (B, L), beside the unigram model's on
    the same positions (`unigram`: log-probabilities (V,), e.g. the training counts'). A model
    that reads its context does far better than the unigram when few positions are masked; a bag
    of words does no better with 2% masked than with all of it (docs/journal.md, "Where things
    stand"). model(z) -> logits (B, L, V) for ids z with model.mask_id where masked."""
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for rate in rates:
        masked = torch.rand(ids.shape, generator=generator) < rate
        if not masked.any():
            continue
        logits = model(torch.where(masked, model.mask_id, ids)).float()
        rows.append({"mask_rate": rate, "positions": int(masked.sum()),
                     "cross_entropy": float(F.cross_entropy(logits[masked], ids[masked])),
                     "unigram": float(-unigram[ids[masked]].mean())})
    return pd.DataFrame(rows)


def probe(run: LoadedRun, ids: torch.Tensor, unigram: torch.Tensor,
          start_ts: Sequence[float] = ()) -> list[tuple[str, pd.DataFrame]]:
    """The family's probe (dlm.families.contract): `masked_context_use` on held-out windows ids
    beside the training unigram (no chain is started from a noise level: start_ts is not read)."""
    return [(f"Cross-entropy at masked positions of {len(ids)} held-out windows by mask rate, beside the training "
             f"unigram's", masked_context_use(run.model, ids, unigram))]
