"""SparseGPT (Frantar & Alistarh, ICML 2023): one layer's mask and OBS weight update. Pure tensor math.

`HessianAccumulator` sees one layer's inputs (`add_batch`) and keeps the running
sum X^T X in float64 with its token count (padding excluded by a mask);
`hessian()` is H = 2 X^T X / n. `sparsegpt_prune(weight, H, k)` returns the
updated weight and its keep-mask, as the reference code (`fasterprune`) does:

1. Dead inputs (H_jj = 0: the feature was exactly zero on every calibration
   token) get H_jj = 1 and W[:, j] = 0; they are pruned before any other weight.
2. Dampening: H += percdamp * mean(diag H) * I (1% by default).
3. U = the upper Cholesky factor of H^-1 (Cholesky of H, its inverse, Cholesky
   again; float64); `Factor` holds U once for all the layers that share H.
   Row q of U / U_qq is row q of the inverse of H restricted to the columns
   q.. (the ones not yet processed), so the update below is the optimal brain
   surgeon (OBS) update for the remaining columns.
4. Columns are processed left to right in blocks of `blocksize`. At the start of
   a block the mask of the whole (rows x block) tile is chosen from the current
   (already updated) weights by saliency w^2 / d^2, d = diag(U) (or by `score`).
   Then column by column: pruned weights are zeroed, and the error
   (w_q - 0) / U_qq times U[q, q:] is subtracted from the columns q.. of the
   block; after the block, its errors update every later column at once.
   (The same update, lazily: each column updates the rest of its sub-block of
   `inner` columns, each sub-block the rest of the block by one matrix product;
   the block is held transposed so that a column is contiguous. The values are
   those of column by column up to rounding: masks, counts and order unchanged.)

Counts (where this differs from the reference code, on purpose): `k` is exact.
The reference prunes the lowest `sparsity` fraction of each tile by threshold
(`sorted[int(numel * s)]`, ties included: one or more extra per block). Here
the dead weights (D of them) are pruned and counted first, and the other k - D
are split over the blocks in proportion to their live weights (`block_counts`:
floor(r * end / total) - floor(r * start / total) over the cumulative live
counts, which sums to r exactly); each tile prunes exactly its share plus its
dead weights. `group="row"`: k is per row, split the same way over each row's
blocks. Only when k < D does a layer prune more than k (its dead inputs are
zero whatever k says, as in the reference). Ties in the score: the earlier
position (row-major in the tile) is kept, the same rule as `masks.n_m_mask`.

N:M (`structure=(n, m)`): n weights KEPT in every m consecutive inputs of a row
(2:4 keeps 2). The group's mask is chosen when the runner reaches its first
column, from the weights as updated so far, as the reference code does. The
block size is rounded down to a multiple of m (at least m) so no group straddles
two blocks. Dead inputs rank lowest in their group; a group with more than m - n
of them keeps the rest in the mask (zero all the same).

`score` replaces the saliency as the selection criterion, keeping the OBS update
(e.g. MULTIFLOW's information-flow scores, "multiflow + reconstruction"):
either a tensor shaped like the weight (a fixed score, sliced per tile) or a
callable `(w_tile, d_tile, columns) -> scores` called with the current tile
weights [rows, c], the matching d [c] and the tile's column slice. Higher is
more important; the lowest are pruned.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Union

import torch

from multiflow.pruning import masks

Score = Union[torch.Tensor, Callable[[torch.Tensor, torch.Tensor, slice], torch.Tensor]]


class HessianAccumulator:
    """Running X^T X (float64) and token count of one layer's inputs; activations are never kept."""

    def __init__(self, in_features: int, device: torch.device | str | None = None):
        self.in_features = in_features
        self.device = device
        self.xtx: torch.Tensor | None = None
        self.tokens = 0

    def add_batch(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> None:
        """x: [..., in_features]; mask: bool over x's leading dims (True = a real token), or None for all rows."""
        if x.shape[-1] != self.in_features:
            raise ValueError(f"input has {x.shape[-1]} features, the layer {self.in_features}")
        rows = x.detach().reshape(-1, self.in_features)
        if mask is not None:
            mask = mask.reshape(-1).to(device=rows.device, dtype=torch.bool)
            if mask.shape[0] != rows.shape[0]:
                raise ValueError(f"mask covers {mask.shape[0]} positions, input has {rows.shape[0]}")
            rows = rows[mask]
        rows = rows.double()
        if self.xtx is None:
            device = self.device if self.device is not None else rows.device
            self.xtx = torch.zeros(self.in_features, self.in_features, dtype=torch.float64, device=device)
        self.xtx.addmm_(rows.T.to(self.xtx.device), rows.to(self.xtx.device))
        self.tokens += rows.shape[0]

    def _scale(self) -> float:
        if not self.tokens:
            raise ValueError("no calibration token was seen")
        return 2.0 / self.tokens

    def hessian(self) -> torch.Tensor:
        """H = 2 X^T X / n (float64)."""
        return self.xtx * self._scale()

    def take_hessian(self) -> torch.Tensor:
        """`hessian()` computed in place of the running sum, which the accumulator gives up (no second
        in_features x in_features float64 copy: 969 MB for LLaVA-1.5-7B's down_proj); the same values bit for bit."""
        scale = self._scale()
        with torch.inference_mode(self.xtx.is_inference()):  # summed under the calibration's inference mode
            h, self.xtx = self.xtx.mul_(scale), None
        return h


def obs_saliency(w: torch.Tensor, d: torch.Tensor, columns: slice) -> torch.Tensor:
    """SparseGPT's selection criterion w^2 / d^2 (d: the diagonal of the upper Cholesky factor of H^-1)."""
    return w.square() / d.square()[None, :]


def inverse_cholesky(hessian: torch.Tensor, percdamp: float = 0.01, *,
                     in_place: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(U, dead): U = upper Cholesky factor of (H + damp I)^-1 in float64, after dead inputs got H_jj = 1.

    in_place: a float64 `hessian` is consumed: dampened in place, then emptied (its memory freed, for every
    holder of it) once its Cholesky factor exists; at LLaVA-1.5-7B's down_proj that is one 969 MB buffer less."""
    if hessian.ndim != 2 or hessian.shape[0] != hessian.shape[1]:
        raise ValueError(f"the Hessian must be square, got {tuple(hessian.shape)}")
    in_place = in_place and hessian.dtype == torch.float64
    h = hessian.detach() if in_place else hessian.detach().to(torch.float64).clone()
    with torch.inference_mode(h.is_inference()):  # a Hessian summed under the calibration's inference mode
        dead = torch.diagonal(h) == 0
        h[dead, dead] = 1
        h.diagonal().add_(percdamp * torch.mean(torch.diagonal(h)))
        lower, info = torch.linalg.cholesky_ex(h)
        if in_place:
            hessian.set_()  # the caller's tensor too: its storage goes now
        del h  # each in_features x in_features float64 intermediate is freed once the next exists (two at a time)
    if int(info):
        raise ValueError(f"the dampened Hessian is not positive definite (percdamp={percdamp}); raise percdamp "
                         "or calibrate with more tokens")
    inverse = torch.cholesky_inverse(lower)
    del lower
    return torch.linalg.cholesky(inverse, upper=True), dead


def update_dtype(weight: torch.Tensor) -> torch.dtype:
    """The weight update's default precision: float32 (as the reference code), float64 for a float64 weight."""
    return torch.promote_types(weight.dtype, torch.float32)


@dataclass
class Factor:
    """What the pass needs of one Hessian, computed once for all the layers that share it (q/k/v, gate/up):
    U (`inverse_cholesky`) in the update's dtype and the dead inputs."""

    u: torch.Tensor
    dead: torch.Tensor

    @classmethod
    def of(cls, hessian: torch.Tensor, percdamp: float = 0.01, dtype: torch.dtype = torch.float32, *,
           in_place: bool = False) -> "Factor":
        u, dead = inverse_cholesky(hessian, percdamp, in_place=in_place)
        return cls(u if u.dtype == dtype else u.to(dtype), dead)


def block_counts(k: int, sizes: list[int]) -> list[int]:
    """k split over consecutive blocks in proportion to their sizes; sums to k exactly (k <= sum(sizes))."""
    total, out, before = sum(sizes), [], 0
    for size in sizes:
        out.append(k * (before + size) // total - k * before // total if total else 0)
        before += size
    return out


def _prune_lowest(score: torch.Tensor, k: int, per_row: bool) -> torch.Tensor:
    """True at the k lowest scores of the tile (per row: of each row); ties: the earlier position is kept.

    The k-th lowest value v (`kthvalue`, linear time; a stable sort of a 11008 x 128 tile took 6x longer):
    everything below v is pruned, and of the scores equal to v the last ones, as many as k still needs."""
    flat = score if per_row else score.reshape(1, -1)
    if k <= 0 or k >= flat.shape[1]:
        return torch.full_like(score, k > 0, dtype=torch.bool)
    v = torch.kthvalue(flat, k, dim=1, keepdim=True).values
    below, tie = flat < v, flat == v
    need = k - below.sum(dim=1, keepdim=True)
    from_end = tie.flip(1).cumsum(1).flip(1)  # ties at this position or after it
    return (below | (tie & (from_end <= need))).reshape(score.shape)


def sparsegpt_prune(weight: torch.Tensor, hessian: torch.Tensor | Factor, k: int | None = None, *,
                    sparsity: float | None = None, group: str = "layer", structure: tuple[int, int] | None = None,
                    blocksize: int = 128, percdamp: float = 0.01, score: Score | None = None,
                    dtype: torch.dtype | None = None, inner: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """Prune one layer with SparseGPT; returns (new weight in weight's dtype, keep mask: True = kept).

    weight: [out, in]; hessian: [in, in] (e.g. `HessianAccumulator.hessian()`), or its `Factor` (computed
    once for the layers that share the Hessian; percdamp is then the factor's).
    k: how many weights to prune (`group="layer"`) or per row (`group="row"`); or `sparsity`, giving
    k = floor(sparsity * size). Ignored with `structure=(n, m)` (n kept of every m).
    dtype: the weight update's precision, default float32 (as the reference code) or float64 for a float64
    weight; U is computed in float64 either way.
    inner: the update runs in sub-blocks of `inner` columns (a multiple of m with N:M): each column updates the
    rest of its sub-block at once, each sub-block the rest of its block by one matrix product (the same values
    as column by column up to rounding; the block's column order, masks and counts are unchanged).
    Exactly k weights (per row) are pruned (more only if the dead inputs alone hold more than k);
    pruned weights are exactly 0 in the result.
    """
    rows, cols = weight.shape
    if group not in ("layer", "row"):
        raise ValueError(f"group {group!r}: choose layer or row")
    size = cols if group == "row" else rows * cols
    if structure is not None:
        n, m = structure
        if not 0 < n < m or cols % m:
            raise ValueError(f"N:M {n}:{m} needs 0 < N < M and in_features ({cols}) a multiple of M")
        blocksize = max(m, blocksize - blocksize % m)
    else:
        if (k is None) == (sparsity is None):
            raise ValueError("give exactly one of k and sparsity")
        if k is None:
            k = masks.count_for(sparsity, size)
        if not 0 <= k <= size:
            raise ValueError(f"k={k} outside 0..{size}")
    if blocksize < 1:
        raise ValueError(f"blocksize {blocksize}: give at least 1")
    if score is None:
        score = obs_saliency
    if isinstance(score, torch.Tensor) and score.shape != weight.shape:
        raise ValueError(f"score is {tuple(score.shape)}, the weight {tuple(weight.shape)}")

    dtype = dtype or update_dtype(weight)
    if isinstance(hessian, Factor):
        factor = hessian
        if factor.u.shape != (cols, cols):
            raise ValueError(f"the factor is {tuple(factor.u.shape)}, the weight has {cols} inputs")
    else:
        if hessian.shape != (cols, cols):
            raise ValueError(f"the Hessian is {tuple(hessian.shape)}, the weight has {cols} inputs")
        factor = Factor.of(hessian.to(weight.device), percdamp, dtype)
    u, dead = factor.u.to(device=weight.device, dtype=dtype), factor.dead.to(weight.device)
    starts = range(0, cols, blocksize)
    if structure is None:  # per block (per row of it with group row): its dead weights + its share of the rest
        dead_in = [int(dead[i : i + blocksize].sum()) for i in starts]
        live_in = [min(blocksize, cols - i) - d for i, d in zip(starts, dead_in)]
        per = 1 if group == "row" else rows
        shares = block_counts(max(k - per * sum(dead_in), 0), [per * n for n in live_in])
        counts = [per * d + share for d, share in zip(dead_in, shares)]
    step = max(m, inner - inner % m) if structure is not None else max(inner, 1)
    w = weight.detach().to(dtype).clone()
    w[:, dead] = 0
    keep = torch.ones(rows, cols, dtype=torch.bool, device=w.device)

    def tile_score(tile: torch.Tensor, d: torch.Tensor, columns: slice) -> torch.Tensor:
        s = score[:, columns] if isinstance(score, torch.Tensor) else score(tile, d, columns)
        s = s.to(device=w.device, dtype=torch.float64).clone()
        s[:, dead[columns]] = -torch.inf  # dead inputs are zero already: pruned first
        return s

    for b, i1 in enumerate(starts):
        i2 = min(i1 + blocksize, cols)
        # the block transposed: column i of the weights is the contiguous row i of `wt` (and of `prune`, `err`)
        wt, ub = w[:, i1:i2].T.contiguous(), u[i1:i2, i1:i2]
        d = torch.diagonal(ub)
        prune = torch.zeros_like(wt, dtype=torch.bool)
        if structure is None:
            prune[:] = _prune_lowest(tile_score(wt.T, d, slice(i1, i2)), counts[b], group == "row").T
        err = torch.empty_like(wt)
        for j1 in range(0, i2 - i1, step):  # sub-blocks of `inner` columns; the block's later ones updated lazily
            j2 = min(j1 + step, i2 - i1)
            for i in range(j1, j2):
                if structure is not None and i % m == 0:
                    group_cols = slice(i1 + i, i1 + i + m)
                    prune[i : i + m] = ~masks.n_m_mask(tile_score(wt[i : i + m].T, d[i : i + m], group_cols), n, m).T
                err[i] = wt[i].masked_fill(~prune[i], 0).div_(d[i])  # (w_q - q) / U_qq, q = w_q kept, 0 pruned
                wt[i:j2].addr_(ub[i, i:j2], err[i], alpha=-1)
            if j2 < i2 - i1:
                wt[j2:].addmm_(ub[j1:j2, j2:].T, err[j1:j2], alpha=-1)
        wt.masked_fill_(prune, 0)  # exactly 0 (w - U_qq (w / U_qq) may round to a tiny remainder)
        w[:, i1:i2] = wt.T
        keep[:, i1:i2] = ~prune.T
        if i2 < cols:  # the block's errors update every later column at once
            w[:, i2:].addmm_(err.T, u[i1:i2, i2:], alpha=-1)
    return w.to(weight.dtype), keep
