"""The learned embedding table, the rounding decoders that map vectors back to tokens, and
pretrained-vector loading."""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from dlm.core.errors import UserError


class LearnedEmbedding(nn.Module):
    """EMB(w): a (vocab_size, embed_dim) table trained jointly with the network (Diffusion-LM's; every
    family's token embeddings).

    `norm` fixes the table's geometry: 'l2' scales every row to norm sqrt(embed_dim) (CDCD),
    'layernorm' normalises each row without affine parameters (Difformer). Either stops the
    Gaussian family's MSE from shrinking the table, one road to collapse.
    """

    def __init__(self, vocab_size: int, embed_dim: int, pretrained_embeddings: torch.Tensor | None = None,
                 trainable: bool = True, norm: str = "none", init_std: float = 1.0, scale: float = 1.0):
        super().__init__()
        if norm not in ("none", "l2", "layernorm"):
            raise ValueError(f"Unknown embedding norm '{norm}': use none, l2 or layernorm.")
        if pretrained_embeddings is not None:
            if tuple(pretrained_embeddings.shape) != (vocab_size, embed_dim):
                raise ValueError(
                    f"Pretrained table has shape {tuple(pretrained_embeddings.shape)}, "
                    f"expected ({vocab_size}, {embed_dim})."
                )
            weight = pretrained_embeddings.detach().clone().float()
        else:
            weight = torch.randn(vocab_size, embed_dim) * init_std
        self.weight = nn.Parameter(weight, requires_grad=trainable)
        self.norm = norm
        self.scale = scale  # normalised rows get norm scale * sqrt(d): the signal against unit noise

    @property
    def embed_dim(self) -> int:
        return self.weight.shape[1]

    def table(self) -> torch.Tensor:
        """The table as the network sees it (after normalisation), (V, d)."""
        if self.norm == "l2":
            return F.normalize(self.weight, dim=-1) * (self.scale * math.sqrt(self.embed_dim))
        if self.norm == "layernorm":
            return F.layer_norm(self.weight, (self.embed_dim,)) * self.scale
        return self.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.table())


# Rows of logits per chunk in linear_cross_entropy and LearnedRounding.expectation: (rows x V)
# floats stay in the CPU's cache.
CROSS_ENTROPY_CHUNK_ELEMENTS = 1 << 20


class LearnedRounding(nn.Module):
    """p(w | x): logits over the vocabulary for each vector.

    Untied (the seed): one nn.Linear. Tied (Diffusion-LM): logits = x @ E^T + b with E the
    embedding table, so a vector decodes to the row it is closest to in dot product; with a
    normalised table a learnable scale sets how peaked the softmax can get.
    """

    def __init__(self, embed_dim: int, vocab_size: int, tied_embedding: LearnedEmbedding | None = None):
        super().__init__()
        self.tied_embedding = tied_embedding
        if tied_embedding is None:
            self.decoder = nn.Linear(embed_dim, vocab_size)
        else:
            self.bias = nn.Parameter(torch.zeros(vocab_size))
            self.log_scale = nn.Parameter(torch.zeros(()), requires_grad=tied_embedding.norm != "none")

    @property
    def output_bias(self) -> torch.Tensor:
        return self.decoder.bias if self.tied_embedding is None else self.bias

    def _weights(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(input, weight, bias) with logits = input @ weight^T + bias."""
        if self.tied_embedding is None:
            return x, self.decoder.weight, self.decoder.bias
        # Scale the (B, L, d) input rather than the (B, L, V) logits: the logits are the largest
        # tensor of a training step.
        return x * self.log_scale.exp(), self.tied_embedding.table(), self.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(*self._weights(x))

    def expectation(self, x: torch.Tensor, values: torch.Tensor,
                    chunk_elements: int = CROSS_ENTROPY_CHUNK_ELEMENTS) -> torch.Tensor:
        """E[values[w]] under p(w | x) for x (..., d) and values (V, k): (..., k) in float32 (the
        expected embedding when values is the table). Without gradients the softmax is made a chunk
        of rows at a time, as in `linear_cross_entropy`, so the (rows, V) probabilities stay in the
        CPU's cache instead of one (N, V) block going through memory three times (faster at a
        sampler's batch: docs/journal.md, "The posterior x0")."""
        inputs, weight, bias = self._weights(x)
        with torch.autocast(x.device.type, enabled=False):
            inputs, weight, bias, values = inputs.float(), weight.float(), bias.float(), values.float()
            if torch.is_grad_enabled() and any(t.requires_grad for t in (inputs, weight, bias, values)):
                return torch.softmax(F.linear(inputs, weight, bias), dim=-1) @ values
            flat = inputs.reshape(-1, inputs.shape[-1])
            out = flat.new_empty(flat.shape[0], values.shape[-1])
            rows = max(1, chunk_elements // weight.shape[0])
            for start in range(0, flat.shape[0], rows):
                logits = torch.addmm(bias, flat[start: start + rows], weight.t())
                out[start: start + rows] = torch.softmax(logits, dim=-1) @ values
            return out.view(*inputs.shape[:-1], values.shape[-1])

    def loss(self, x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy of the rounding softmax at x (..., d) against ids (...): the same
        value as F.cross_entropy(self(x), ids), computed in row chunks without keeping the
        (..., V) logits (see `linear_cross_entropy`)."""
        inputs, weight, bias = self._weights(x)
        return linear_cross_entropy(inputs.reshape(-1, inputs.shape[-1]), weight, bias, ids.reshape(-1))

    def weighted_loss(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(the mean of weights * cross-entropy over the positions, each position's cross-entropy
        detached (...)) for x (..., d), ids and weights (...): `loss` with a weight per position."""
        inputs, weight, bias = self._weights(x)
        mean, rows = linear_cross_entropy_rows(inputs.reshape(-1, inputs.shape[-1]), weight, bias, ids.reshape(-1),
                                               weights.reshape(-1))
        return mean, rows.view(ids.shape)


def linear_cross_entropy(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, targets: torch.Tensor,
                         chunk_elements: int = CROSS_ENTROPY_CHUNK_ELEMENTS) -> torch.Tensor:
    """F.cross_entropy(F.linear(x, weight, bias), targets) for x (N, d), weight (V, d), bias (V,),
    targets (N,), without materialising the (N, V) logits.

    The logits are made and used a chunk of rows at a time; when gradients are needed they are
    computed in the same pass ((softmax - onehot) / N, then into x, weight and bias), so what
    backward keeps is the size of the inputs, not N x V. Always in float32 (autocast is off here).
    """
    return linear_cross_entropy_rows(x, weight, bias, targets, chunk_elements=chunk_elements)[0]


def linear_cross_entropy_rows(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, targets: torch.Tensor,
                              row_weights: torch.Tensor | None = None,
                              chunk_elements: int = CROSS_ENTROPY_CHUNK_ELEMENTS) -> tuple[torch.Tensor, torch.Tensor]:
    """`linear_cross_entropy` with a weight per row: (sum_i w_i CE_i / N, each row's CE_i (N,),
    detached). No row_weights: every w_i is 1, the plain mean."""
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (x, weight, bias))
    with torch.autocast(x.device.type, enabled=False):
        x, weight, bias = x.float(), weight.float(), bias.float()
        row_weights = row_weights.float() if row_weights is not None else None
        rows = max(1, chunk_elements // weight.shape[0])
        if needs_grad:
            return _LinearCrossEntropy.apply(x, weight, bias, targets, rows, row_weights)
        total, each = x.new_zeros(()), x.new_empty(x.shape[0])
        for start in range(0, x.shape[0], rows):
            logits = torch.addmm(bias, x[start: start + rows], weight.t())
            picked = logits.gather(1, targets[start: start + rows, None]).squeeze(1)
            ce = each[start: start + rows] = torch.logsumexp(logits, dim=-1) - picked
            total += (ce if row_weights is None else ce * row_weights[start: start + rows]).sum()
        return total / x.shape[0], each


class _LinearCrossEntropy(torch.autograd.Function):
    """Forward computes the (weighted) mean CE and, chunk by chunk, its gradients; backward scales
    them. The second output, each row's CE, takes no gradient.

    Per chunk: e = exp(logits - max) in place, p = e / sum(e); the gradient of the summed CE with
    respect to the logits is p - onehot (w (p - onehot) for a row of weight w). The 1 / sum(e)
    scaling is applied to the small operands (rows of x, the (rows, d) result) and the onehot part
    is an index_add of rows, so the (rows, V) block is only written once and read four times (max,
    exp, sum, two matmuls).
    """

    @staticmethod
    def forward(ctx, x, weight, bias, targets, rows, row_weights):
        n, d = x.shape
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        grad_x = torch.empty_like(x) if need_x else None
        # The weight and bias gradients come out of one matmul: [x / sum(e), 1 / sum(e)]^T e.
        grad_wb = torch.zeros(weight.shape[0], d + 1, dtype=x.dtype, device=x.device) if need_w or need_b else None
        total, each = x.new_zeros(()), x.new_empty(n)
        for start in range(0, n, rows):
            xs, ts = x[start: start + rows], targets[start: start + rows]
            logits = torch.addmm(bias, xs, weight.t())  # (rows, V)
            picked = logits.gather(1, ts[:, None])
            top = logits.amax(dim=-1, keepdim=True)
            e = logits.sub_(top).exp_()  # in place: the chunk's logits become exp(logits - max)
            norm = e.sum(dim=-1, keepdim=True)
            ce = top + norm.log() - picked  # (rows, 1)
            each[start: start + rows] = ce[:, 0]
            inv = norm.reciprocal()  # (rows, 1)
            w = row_weights[start: start + rows, None] if row_weights is not None else None
            if w is not None:  # row i's gradients scale by w_i
                ce, inv = ce * w, inv * w
            total += ce.sum()
            if need_x:
                out = grad_x[start: start + rows]
                torch.mm(e, weight, out=out)
                out.mul_(inv).sub_(weight[ts] if w is None else weight[ts] * w)
            if grad_wb is not None:
                grad_wb.addmm_(e.t(), torch.cat([xs * inv, inv], dim=1))
                onehot = torch.cat([xs, torch.ones_like(inv)], dim=1)
                grad_wb.index_add_(0, ts, onehot if w is None else onehot * w, alpha=-1.0)
        grads = (grad_x, grad_wb[:, :d] if need_w else None, grad_wb[:, d] if need_b else None)
        ctx.present = tuple(g is not None for g in grads)
        ctx.save_for_backward(*(g for g in grads if g is not None))
        ctx.n = n
        ctx.mark_non_differentiable(each)
        return total / n, each

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_output, _grad_each):
        saved = iter(ctx.saved_tensors)
        scale = grad_output / ctx.n
        grads = [next(saved) * scale if present else None for present in ctx.present]
        return (*grads, None, None, None)


class CosineRounding(nn.Module):
    """The baseline learned rounding replaces: cosine similarity to each table row, then argmax."""

    def __init__(self, embedding: LearnedEmbedding):
        super().__init__()
        self.embedding = embedding

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        table = F.normalize(self.embedding.table(), dim=-1)
        return F.linear(F.normalize(x, dim=-1), table)


@torch.no_grad()
def nearest_rows(x: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """Index of the nearest table row (Euclidean) for every vector in x (..., d) -> (...)."""
    flat = x.reshape(-1, x.shape[-1])
    # ||x - e||^2 = ||x||^2 - 2 x.e + ||e||^2; ||x||^2 is constant per row so it is dropped.
    scores = flat @ table.T * 2 - (table * table).sum(-1)
    return scores.argmax(-1).view(x.shape[:-1])


def read_word_vectors(path: str | Path) -> dict[str, torch.Tensor]:
    """word2vec / GloVe text format: an optional 'count dim' header, then 'word v1 v2 ...' lines."""
    vectors: dict[str, torch.Tensor] = {}
    dim = None
    with open(path, encoding="utf-8") as handle:
        for line_number, line in enumerate(handle, 1):
            parts = line.rstrip().split(" ")
            if line_number == 1 and len(parts) == 2 and all(p.isdigit() for p in parts):
                continue  # word2vec header
            if len(parts) < 2:
                continue
            try:
                values = torch.tensor([float(v) for v in parts[1:]])
            except ValueError:
                raise UserError(f"{path}:{line_number} is not 'word v1 v2 ...' text.") from None
            if not torch.isfinite(values).all():
                raise UserError(f"{path}:{line_number} ('{parts[0]}') has a value that is not a finite number "
                                 f"(nan or inf): fix or drop that line.")
            if dim is None:
                dim = len(values)
            elif len(values) != dim:
                raise UserError(f"{path}:{line_number} has {len(values)} values, expected {dim}.")
            vectors.setdefault(parts[0], values)
    if not vectors:
        raise UserError(f"No word vectors found in '{path}'.")
    return vectors


@torch.no_grad()
def nearest_neighbour_distances(table: torch.Tensor, rows: int | None = None, chunk: int = 1024) -> torch.Tensor:
    """Euclidean distance from each of the first `rows` rows (all when None) to its nearest other
    row of the table, (rows,), in chunks of rows so a large vocabulary never needs a V x V matrix.
    Shrinking or merging rows show up here before samples fail."""
    table = table.detach().float()
    count = len(table) if rows is None else min(rows, len(table))
    out = torch.empty(count, device=table.device)
    for first in range(0, count, chunk):
        block = table[first: min(first + chunk, count)]
        distances = torch.cdist(block, table)
        index = torch.arange(len(block), device=table.device)
        distances[index, index + first] = float("inf")
        out[first: first + len(block)] = distances.min(dim=-1).values
    return out


def pca_project(matrix: torch.Tensor, dim: int) -> torch.Tensor:
    """Project rows onto their top `dim` principal components; zero-pad if they have fewer dims.

    PCA keeps the directions along which the vectors differ most, where a random projection
    (the seed's choice) would mix signal and noise evenly.
    """
    centred = matrix - matrix.mean(0, keepdim=True)
    if matrix.shape[1] <= dim:
        return F.pad(centred, (0, dim - matrix.shape[1]))
    _, _, v = torch.linalg.svd(centred, full_matrices=False)
    return centred @ v[:dim].T


def pretrained_table(vectors: dict[str, torch.Tensor], itos: list[str], embed_dim: int,
                     init_std: float, generator: torch.Generator | None = None) -> tuple[torch.Tensor, int]:
    """An initial (V, embed_dim) table: covered words from `vectors` (PCA-projected and rescaled to
    `init_std` per dimension), the rest random. Returns the table and how many words were covered."""
    covered = [i for i, word in enumerate(itos) if word in vectors]
    table = torch.randn(len(itos), embed_dim, generator=generator) * init_std
    if covered:
        found = torch.stack([vectors[itos[i]] for i in covered]).float()
        projected = pca_project(found, embed_dim)
        projected = projected / projected.std().clamp_min(1e-8) * init_std
        table[covered] = projected
    return table, len(covered)
