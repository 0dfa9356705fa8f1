"""The embedding table's geometry at one checkpoint: per-token norm, nearest-neighbour distance
and rounding bias against training frequency, table-wide summaries, and a 2-D projection.

Rows that shrink or merge below the noise scale sigma0 of q(x0 | w) predict collapse; the
rounding decoder's bias says where a vector that carries no information decodes to.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import pandas as pd
import torch

from dlm.core.embeddings import nearest_neighbour_distances, pca_project
from dlm.core.textstats import is_punctuation
from dlm.runs.build import LoadedRun


@torch.no_grad()
def embedding_geometry(run: LoadedRun, counts: torch.Tensor) -> pd.DataFrame:
    """One row per vocabulary entry: training count, frequency rank, row norm, nearest-neighbour
    distance, the rounding decoder's bias, and whether the token is punctuation."""
    table = run.model.table().detach().float().cpu()
    itos = run.tokenizer.itos
    order = torch.argsort(counts, descending=True, stable=True)
    rank = torch.empty_like(order)
    rank[order] = torch.arange(1, len(order) + 1)
    return pd.DataFrame({
        "id": range(len(itos)),
        "token": itos,
        "count": counts.tolist(),
        "rank": rank.tolist(),
        "norm": table.norm(dim=-1).tolist(),
        "nn_distance": nearest_neighbour_distances(table).tolist(),
        "bias": run.family.rounding_bias(run).detach().float().cpu().tolist(),
        "punctuation": [is_punctuation(t) for t in itos],
    })


@torch.no_grad()
def projection_2d(run: LoadedRun) -> torch.Tensor:
    """The embedding table on its top two principal components, (V, 2)."""
    return pca_project(run.model.table().detach().float().cpu(), 2)


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Rank correlation (ties averaged); nan when either side is constant."""
    rx, ry = pd.Series(x).rank(), pd.Series(y).rank()
    value = rx.corr(ry)
    return float(value) if value == value else math.nan


def geometry_summary(geometry: pd.DataFrame, sigma0: float) -> dict:
    """Table-wide geometry numbers over the tokens seen in training."""
    seen = geometry[geometry["count"] > 0]
    mean_nn = float(seen["nn_distance"].mean())
    return {
        "embedding_norm": float(seen["norm"].mean()),
        "nn_distance": mean_nn,
        "sigma0": sigma0,
        "nn_over_sigma0": mean_nn / sigma0 if sigma0 > 0 else math.inf,
        "bias_frequency_spearman": spearman(seen["bias"], seen["count"]),
        "punctuation_norm": float(seen.loc[seen["punctuation"], "norm"].mean()) if seen["punctuation"].any() else math.nan,
    }
