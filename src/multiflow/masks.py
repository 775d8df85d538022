"""Step 3 masks (ALGORITHM.md Eq. 8 and the baselines). Pure tensor math on one layer.

Conventions, named once:
- A mask is a bool tensor shaped like W: True = keep, False = prune (zero).
- `layer` group: one threshold for the whole matrix. `row` group: one threshold
  per output row (row i = W[i, :], the weights feeding output neuron i).
- Threshold = the k-th smallest score (1-based, as torch.kthvalue) of the group;
  weights with score <= threshold are pruned, so ties with it are pruned too
  and a group can lose more than k. k = 0 keeps everything.
- N:M: in every group of M consecutive input weights of a row (W[i, jM:(j+1)M]),
  keep the N highest scores and prune the other M - N (2:4 keeps 2 of every 4).
  Ties are broken by position (earlier input kept), so masks are deterministic.
"""

from __future__ import annotations

import math

import torch

from multiflow import selection


_HISTOGRAM_AT = 1 << 20  # scores from this size on: bit-pattern selection, several times faster than kthvalue


def kth_smallest(score: torch.Tensor, k: int) -> torch.Tensor:
    """The k-th smallest value (1-based) of a non-negative float32 tensor, exactly (as torch.kthvalue)."""
    if score.numel() < _HISTOGRAM_AT or score.dtype != torch.float32:
        return torch.kthvalue(score.reshape(-1), k).values
    space = selection.KEY_SPACES[torch.float32]
    coarse, rank = selection.locate(selection.coarse_histogram(score, space), k)
    fine, _ = selection.locate(selection.fine_histogram(score, space, coarse), rank)
    return torch.tensor(space.value((coarse << space.shift) | fine), dtype=torch.float32)


def layer_mask(score: torch.Tensor, k: int) -> torch.Tensor:
    """Prune the k lowest scores of the whole matrix (ties with the k-th pruned too). Scores are >= 0."""
    if not 0 <= k <= score.numel():
        raise ValueError(f"k={k} outside 0..{score.numel()}")
    if k == 0:
        return torch.ones_like(score, dtype=torch.bool)
    return score > kth_smallest(score, k)


def row_mask(score: torch.Tensor, k_per_row: int) -> torch.Tensor:
    """Prune the k lowest scores of every row (ties with each row's k-th pruned too)."""
    if not 0 <= k_per_row <= score.shape[1]:
        raise ValueError(f"k={k_per_row} outside 0..{score.shape[1]}")
    if k_per_row == 0:
        return torch.ones_like(score, dtype=torch.bool)
    thresholds = torch.kthvalue(score, k_per_row, dim=1, keepdim=True).values
    return score > thresholds


def n_m_mask(score: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keep the n highest of every m consecutive inputs of each row (n < m; in_features % m == 0)."""
    if not 0 < n < m:
        raise ValueError(f"N:M needs 0 < N < M, got {n}:{m}")
    rows, cols = score.shape
    if cols % m:
        raise ValueError(f"in_features {cols} is not a multiple of M={m}")
    groups = score.reshape(rows, cols // m, m)
    # stable descending sort: among equal scores the earlier input ranks first
    order = torch.sort(groups, dim=-1, descending=True, stable=True).indices
    keep = torch.zeros_like(groups, dtype=torch.bool)
    keep.scatter_(-1, order[..., :n], True)
    return keep.reshape(rows, cols)


def count_for(sparsity: float, size: int) -> int:
    """k = floor(s * size), the number a sparsity asks to prune from `size` weights."""
    return math.floor(sparsity * size)
