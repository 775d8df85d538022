"""Importance scores of one layer's weights (docs/algorithm.md, "Scores"). Pure tensor math.

`sq_mean[j]` is the mean of x_j^2 over calibration tokens (the Step 2 statistic);
`a_j = sqrt(sq_mean[j])`. All scores are float32 tensors shaped like W
(out x in), compared only inside one layer (no normalisation). Higher = more
important. Each takes `out=`: float32 memory to hold the scores (at least the
weight's size; a pipeline reuses one, which spares the page faults of fresh
memory per layer); the scores are the same bit for bit. `SCORES` is the registry `--method` chooses from (`score(name, ...)`;
an unknown name is an error). `tile_scorer` gives the same scores on tiles of
weights that SparseGPT's OBS update keeps changing (`--update obs`).
"""

from __future__ import annotations

from typing import Callable

import torch

from multiflow.errors import MultiflowError

ScoreFn = Callable[..., torch.Tensor]  # (weight [out, in], sq_mean [in], out=None) -> scores
TileScorer = Callable[[torch.Tensor, torch.Tensor, slice], torch.Tensor]  # sparsegpt_prune's `score` hook


def activation_norm(sq_mean: torch.Tensor) -> torch.Tensor:
    """a_j = sqrt(mean x_j^2)."""
    return sq_mean.float().sqrt()


def float_abs(weight: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """|W| as float32, a new tensor (never `weight` itself, even in float32), written into `out` when given
    (float32, at least weight.numel() elements)."""
    if out is None:
        return weight.abs() if weight.dtype == torch.float32 else weight.float().abs_()
    return out.reshape(-1)[: weight.numel()].view(weight.shape).copy_(weight).abs_()


def magnitude_score(weight: torch.Tensor, sq_mean: torch.Tensor | None = None, out: torch.Tensor | None = None,
                    ) -> torch.Tensor:
    """magnitude: |W_ij| (no calibration statistics)."""
    return float_abs(weight, out)


def wanda_score(weight: torch.Tensor, sq_mean: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """wanda: |W_ij| * a_j (Wanda, Sun et al. 2023)."""
    return float_abs(weight, out).mul_(activation_norm(sq_mean)[None, :])


def _flow(weight: torch.Tensor, sq_mean: torch.Tensor, out: torch.Tensor | None = None,
          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(|W| as float32, imp_out, imp_in) of MULTIFLOW's Eq. 6."""
    score = float_abs(weight, out)
    a = activation_norm(sq_mean)
    imp_out = (score @ a) / score.shape[1]
    imp_in = a * score.sum(dim=0) / score.shape[0]
    return score, imp_out, imp_in


def multiflow_score(weight: torch.Tensor, sq_mean: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """multiflow: information flow imp_out[i] * |W_ij| * imp_in[j] (MULTIFLOW, paper Eq. 6; prune's default; run without --method uses sparsegpt).

    imp_out[i] = mean_j |W_ij| a_j (how much signal output neuron i carries),
    imp_in[j]  = mean_i |W_ij| a_j (how much signal input neuron j sends).
    """
    score, imp_out, imp_in = _flow(weight, sq_mean, out)  # one full-size buffer, scaled in place (7B: 45M weights)
    return score.mul_(imp_out[:, None]).mul_(imp_in[None, :])


def _ria_parts(weight: torch.Tensor, sq_mean: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(sum_k |W_ik| per row i, sum_k |W_kj| per column j, a_j^0.5) of RIA."""
    w = weight.float().abs()
    return w.sum(dim=1), w.sum(dim=0), activation_norm(sq_mean).sqrt()


def _ria(w_abs: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, act: torch.Tensor) -> torch.Tensor:
    """(|W_ij| / rows_i + |W_ij| / cols_j) * act_j in place on w_abs; a zero sum is replaced by 1 (its |W| are
    all zero in the plain score, so the term is 0)."""
    by_col = w_abs / torch.where(cols > 0, cols, 1)[None, :]
    return w_abs.div_(torch.where(rows > 0, rows, 1)[:, None]).add_(by_col).mul_(act[None, :])


def ria_score(weight: torch.Tensor, sq_mean: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """ria: (|W_ij| / sum_k |W_ik| + |W_ij| / sum_k |W_kj|) * a_j^0.5 (RIA, Zhang et al., ICLR 2024).

    Relative importance and activations ("Plug-and-Play: An Efficient Post-training
    Pruning Method for Large Language Models", Eq. 3 with a = 0.5): each weight's share
    of its output row's and of its input column's total |W|, times ||X_j||_2^0.5. As in
    the authors' code (biomedical-cybernetics/Relative-importance-and-activation-pruning,
    lib/prune.py: `(|W|/sum(|W|, dim=0) + |W|/sum(|W|, dim=1)) * sqrt(scaler_row)**a`),
    where sqrt(scaler_row) is ||X_j|| up to a factor common to the layer, so a_j gives
    the same order within a layer. A row or column with no non-zero weight adds 0.
    """
    rows, cols, act = _ria_parts(weight, sq_mean)
    return _ria(float_abs(weight, out), rows, cols, act)


SCORES: dict[str, ScoreFn] = {
    "multiflow": multiflow_score,
    "wanda": wanda_score,
    "magnitude": magnitude_score,
    "ria": ria_score,
}
NO_STATISTICS = ("magnitude",)  # scores that read no calibration statistic


def check_score(name: str, flag: str = "--method") -> str:
    if name not in SCORES:
        raise MultiflowError(f"{flag} {name!r}: no such score; choose one of {', '.join(SCORES)}")
    return name


def score(name: str, weight: torch.Tensor, sq_mean: torch.Tensor | None, out: torch.Tensor | None = None,
          ) -> torch.Tensor:
    """SCORES[name](weight, sq_mean, out=out); an unknown name is an error (never a fallback to another score)."""
    if name not in NO_STATISTICS and sq_mean is None:
        raise MultiflowError(f"--method {name} needs activation statistics (sq_mean), got none")
    fn = SCORES[check_score(name)]
    return fn(weight, sq_mean) if out is None else fn(weight, sq_mean, out=out)


def describe(name: str) -> str:
    """A score's one-line description for --help: the first line of its docstring."""
    return SCORES[check_score(name)].__doc__.strip().splitlines()[0].rstrip(".")


def _magnitude_tiles(weight: torch.Tensor, sq_mean: torch.Tensor | None) -> TileScorer:
    return lambda tile, d, columns: tile.float().abs()


def _wanda_tiles(weight: torch.Tensor, sq_mean: torch.Tensor) -> TileScorer:
    a = activation_norm(sq_mean)
    return lambda tile, d, columns: tile.float().abs().mul_(a[None, columns])


def _multiflow_tiles(weight: torch.Tensor, sq_mean: torch.Tensor) -> TileScorer:
    _, imp_out, imp_in = _flow(weight, sq_mean)
    return lambda tile, d, columns: tile.float().abs().mul_(imp_out[:, None]).mul_(imp_in[None, columns])


def _ria_tiles(weight: torch.Tensor, sq_mean: torch.Tensor) -> TileScorer:
    rows, cols, act = _ria_parts(weight, sq_mean)
    return lambda tile, d, columns: _ria(tile.float().abs(), rows, cols[columns], act[columns])


# Each score's tile form for SparseGPT's OBS update: a new SCORES entry adds its line here too (tested).
TILE_SCORERS: dict[str, Callable[[torch.Tensor, "torch.Tensor | None"], TileScorer]] = {
    "multiflow": _multiflow_tiles,
    "wanda": _wanda_tiles,
    "magnitude": _magnitude_tiles,
    "ria": _ria_tiles,
}


def tile_scorer(name: str, weight: torch.Tensor, sq_mean: torch.Tensor | None) -> TileScorer:
    """`SCORES[name]` as sparsegpt_prune's `score` hook, for the OBS update (`--update obs`).

    SparseGPT chooses each tile's mask from the current, already updated weights, so the
    element term |W_ij| is taken from the tile it is given. The row and column
    aggregates (multiflow's imp_out and imp_in, RIA's row and column sums of |W|) are
    whole-matrix quantities: they are computed once, from `weight` as the layer stood
    before its update started (SparseGPT's own saliency w^2/d^2 likewise uses only
    fixed factors besides the current w). `sq_mean` is the statistic on the same
    inputs as the Hessian (H_jj / 2). On `weight` itself, any tile's scores equal
    `SCORES[name](weight, sq_mean)[:, columns]` bit for bit (tested).
    """
    return TILE_SCORERS[check_score(name)](weight, sq_mean)
