"""Step 3 masks (docs/algorithm.md, Step 3; the N:M convention there too). Pure tensor math on one layer.

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
from dataclasses import dataclass

import numpy as np
import torch

from multiflow.distribution import selection


_HISTOGRAM_AT = 1 << 20  # scores from this size on: bit-pattern selection, several times faster than kthvalue


def kth_smallest(score: torch.Tensor, k: int) -> torch.Tensor:
    """The k-th smallest value (1-based) of a non-negative float32 tensor, exactly (as torch.kthvalue)."""
    if score.numel() < _HISTOGRAM_AT or score.dtype != torch.float32:
        return torch.kthvalue(score.reshape(-1), k).values
    space = selection.KEY_SPACES[torch.float32]
    flat = score.contiguous().reshape(-1)
    coarse, rank = selection.locate(selection.coarse_histogram(flat, space), k)
    fine, _ = selection.locate(selection.fine_histogram(flat, space, coarse), rank)
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


try:  # one pass instead of three for the layer-group check below; optional, as in `selection`
    import numba

    @numba.njit(nogil=True, cache=True)
    def _threshold_counts(score, keep, t):  # pragma: no cover - compiled
        mismatched = below = 0
        for i in range(score.shape[0]):
            if (score[i] > t) != keep[i]:
                mismatched += 1
            if score[i] < t:
                below += 1
        return mismatched, below

except ImportError:  # pragma: no cover - exercised only without numba
    _threshold_counts = None


def mask_violation(score: torch.Tensor, keep: torch.Tensor, k: int, *, row: bool = False,
                   n_m: tuple[int, int] | None = None) -> str | None:
    """Check a keep-mask against the conventions above, from the score alone; None if it holds, else why not.

    Sound whatever found the mask: for a group (the matrix, or each row) and any
    candidate t, "pruned exactly where score <= t, and #(score < t) < k <= #(score <= t)"
    holds only when t is the k-th smallest score and the mask prunes it and all
    below it, ties included. Scores must be finite. k = 0: nothing pruned.
    N:M: exactly N kept in every group of M, no pruned score above a kept one.
    """
    if n_m is not None:
        n, m = n_m
        groups, kept = score.reshape(score.shape[0], -1, m), keep.reshape(score.shape[0], -1, m)
        counts = torch.count_nonzero(kept, dim=-1)
        if not bool((counts == n).all()):
            return f"a group of {m} keeps {int(counts[counts != n][0])} weights, not {n}"
        top_pruned = groups.masked_fill(kept, float("-inf")).amax(-1)
        low_kept = groups.masked_fill(~kept, float("inf")).amin(-1)
        if not bool((top_pruned <= low_kept).all()):
            return "a pruned weight does not score at or below every kept one of its group"
        return None
    if k == 0:
        pruned = keep.numel() - int(torch.count_nonzero(keep))
        return None if not pruned else f"{pruned} weights pruned where k = 0"
    low, high = torch.aminmax(score)
    if not (bool(torch.isfinite(low)) and bool(torch.isfinite(high))):
        return "the scores hold NaN or inf (they overflow float32)"
    pruned = score.shape[1] - keep.sum(1, dtype=torch.int32) if row else torch.tensor(
        keep.numel() - int(torch.count_nonzero(keep)))
    if not bool((pruned >= k).all()):
        return f"{int(pruned.min())} weights pruned{' in a row' if row else ''}, fewer than k = {k}"
    # candidate t: per row its largest pruned score; for the matrix the k-th smallest as found here (the
    # checks below do not trust either)
    t = score.masked_fill(keep, float("-inf")).amax(1, keepdim=True) if row else kth_smallest(score, k)
    if not row and _threshold_counts is not None and score.device.type == "cpu" and score.is_contiguous():
        mismatched, below = _threshold_counts(score.reshape(-1).numpy(), keep.reshape(-1).numpy(), float(t))
        if mismatched:
            return f"the pruned weights are not exactly those scoring at or below the k-th smallest score (k = {k})"
        if below >= k and int(pruned) > k:
            return (f"{below} weights score below the largest pruned one: more than the k = {k} lowest and "
                    "their ties were pruned")
        return None
    if not torch.equal(score > t, keep):
        return ("a kept weight scores at or below a pruned one of its row" if row else
                f"the pruned weights are not exactly those scoring at or below the k-th smallest score (k = {k})")
    if bool((pruned > k).any()):  # beyond k: only ties with the k-th (exactly k pruned below t is right as is)
        below = (score < t).sum(1, dtype=torch.int32) if row else torch.count_nonzero(score < t)
        if not bool((below < k).all()):
            return (f"{int(below.max())} weights score below the largest pruned one: more than the k = {k} "
                    "lowest and their ties were pruned")
    return None


@dataclass(frozen=True)
class Zeroed:
    """What `zero_at_or_below` did to one tensor: weights zeroed (score <= t), how many of them scored strictly
    below t, scores that were NaN or inf, and the zeros in the tensor afterwards (zeroed ones included)."""

    pruned: int
    below: int
    nonfinite: int
    zeros: int


_BITS = {torch.float16: (torch.int16, np.uint16, 0x7FFF), torch.bfloat16: (torch.int16, np.uint16, 0x7FFF),
         torch.float32: (torch.int32, np.uint32, 0x7FFFFFFF)}  # same-width integer view; bits of |value|
_FLOAT32_MAX = float(torch.finfo(torch.float32).max)

try:  # the layer group's mask applied in one pass; optional, as in `selection`
    @numba.njit(nogil=True, cache=True)
    def _zero_kernel(score, t, bits, magnitude, finite):  # pragma: no cover - compiled
        pruned = below = nonfinite = zeros = 0
        for i in range(score.shape[0]):  # without branches: 50% pruned at random defeats branch prediction
            s = score[i]
            nonfinite += not (-finite <= s <= finite)
            keep = s > t  # as layer_mask: kept exactly where score > t (a NaN score is pruned, and reported)
            b = bits[i] if keep else bits.dtype.type(0)
            bits[i] = b
            pruned += not keep
            below += s < t
            zeros += (b & magnitude) == 0
        return pruned, below, nonfinite, zeros

except NameError:  # pragma: no cover - numba missing (imported above)
    _zero_kernel = None


def zero_at_or_below(weight: torch.Tensor, score: torch.Tensor, threshold: torch.Tensor | float) -> Zeroed:
    """Zero, in place, the weights whose score is at or below `threshold` (the weights `layer_mask` prunes when
    the threshold is its k-th smallest score), counting on the way what `threshold_violation` checks.

    Bit for bit `weight.masked_fill_(~(score > threshold), 0)`; one pass over score and weight, no mask tensor.
    `weight`: float16, bfloat16 or float32, contiguous; `score`: float32, the same number of elements."""
    t = torch.as_tensor(threshold, dtype=torch.float32)
    if weight.numel() != score.numel():
        raise ValueError(f"{score.numel()} scores for {weight.numel()} weights")
    if (_zero_kernel is not None and weight.dtype in _BITS and score.dtype == torch.float32
            and weight.is_contiguous() and score.is_contiguous() and weight.device.type == score.device.type == "cpu"):
        int_dtype, unsigned, magnitude = _BITS[weight.dtype]
        limits = np.float32(t.item()), unsigned(magnitude), np.float32(_FLOAT32_MAX)
        counts = selection.in_slices(
            lambda s, w: _zero_kernel(s.numpy(), limits[0], w.numpy().view(unsigned), *limits[1:]),
            score.reshape(-1), weight.reshape(-1).view(int_dtype))
        return Zeroed(*(sum(int(c[i]) for c in counts) for i in range(4)))
    pruned_at = ~(score > t).reshape(weight.shape)
    weight.masked_fill_(pruned_at, 0)
    finite = torch.isfinite(score)
    return Zeroed(int(pruned_at.sum()), int((score < t).sum()), int(finite.numel() - finite.sum()),
                  weight.numel() - int(torch.count_nonzero(weight)))


def threshold_violation(zeroed: Zeroed, k: int) -> str | None:
    """Check `zero_at_or_below`'s counts against the layer group's convention for k > 0; None if it holds.

    Sound whatever the threshold t was: pruned exactly where score <= t (by construction) and
    #(score < t) < k <= #(score <= t) hold only when t is the k-th smallest score."""
    if zeroed.nonfinite:
        return "the scores hold NaN or inf (they overflow float32)"
    if zeroed.pruned < k:
        return f"{zeroed.pruned} weights pruned, fewer than k = {k}"
    if zeroed.below >= k:
        return (f"{zeroed.below} weights score below the largest pruned one: more than the k = {k} lowest and "
                "their ties were pruned")
    return None
