"""Step 3 masks and Step 2 scores against naive, obviously-right references.

The references below use plain Python lists, sorting and loops (no torch ops on
the tensors under test), so a shared bug between implementation and reference
is unlikely. Masks are compared exactly (torch.equal); scores with allclose
because float summation order may differ.
"""

from __future__ import annotations

import math

import pytest
import torch

from multiflow.pruning.masks import count_for, layer_mask, n_m_mask, row_mask
from multiflow.pruning.scores import magnitude_score, multiflow_score, wanda_score


# ----------------------------------------------------------------------------
# naive references
# ----------------------------------------------------------------------------

def to_rows(t: torch.Tensor) -> list[list[float]]:
    """2-D tensor -> list of rows of Python floats (exact for f16/bf16/f32)."""
    return [[float(v) for v in row] for row in t.tolist()]


def ref_threshold(values: list[float], k: int) -> float | None:
    """k-th smallest (1-based) of values; None for k = 0 (keep all)."""
    if k == 0:
        return None
    return sorted(values)[k - 1]


def ref_keep(values: list[float], k: int) -> list[bool]:
    thr = ref_threshold(values, k)
    if thr is None:
        return [True] * len(values)
    return [v > thr for v in values]


def ref_layer_mask(score: torch.Tensor, k: int) -> torch.Tensor:
    rows = to_rows(score)
    ncols = len(rows[0])
    flat = [v for row in rows for v in row]
    keep = ref_keep(flat, k)
    out = [keep[i * ncols:(i + 1) * ncols] for i in range(len(rows))]
    return torch.tensor(out, dtype=torch.bool)


def ref_row_mask(score: torch.Tensor, k: int) -> torch.Tensor:
    return torch.tensor([ref_keep(row, k) for row in to_rows(score)], dtype=torch.bool)


def ref_n_m_mask(score: torch.Tensor, n: int, m: int) -> torch.Tensor:
    out = []
    for row in to_rows(score):
        keep_row = [False] * len(row)
        for start in range(0, len(row), m):
            positions = list(range(start, start + m))
            # highest score first; among equals the earlier position first
            positions.sort(key=lambda p: (-row[p], p))
            for p in positions[:n]:
                keep_row[p] = True
        out.append(keep_row)
    return torch.tensor(out, dtype=torch.bool)


def ref_scores(weight: torch.Tensor, sq_mean: torch.Tensor):
    """(|W|, wanda, multiflow) via explicit loops in float64."""
    w = to_rows(weight)
    a = [math.sqrt(float(v)) for v in sq_mean.tolist()]
    n_out, n_in = len(w), len(w[0])
    absw = [[abs(w[i][j]) for j in range(n_in)] for i in range(n_out)]
    wanda = [[absw[i][j] * a[j] for j in range(n_in)] for i in range(n_out)]
    imp_out = [sum(wanda[i][j] for j in range(n_in)) / n_in for i in range(n_out)]
    imp_in = [sum(wanda[i][j] for i in range(n_out)) / n_out for j in range(n_in)]
    mf = [[imp_out[i] * absw[i][j] * imp_in[j] for j in range(n_in)] for i in range(n_out)]
    as_t = lambda x: torch.tensor(x, dtype=torch.float64)  # noqa: E731
    return as_t(absw), as_t(wanda), as_t(mf)


def tie_scores(rows: int, cols: int, lo: int, hi: int, seed: int) -> torch.Tensor:
    """Integer-valued float32 scores from a small range: lots of ties."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(lo, hi, (rows, cols), generator=g).float()


# ----------------------------------------------------------------------------
# count_for
# ----------------------------------------------------------------------------

@pytest.mark.parametrize("s,size", [
    (0.0, 100), (0.1, 100), (0.5, 77), (0.77, 1000), (0.9, 10), (0.3, 10),
    (0.7, 10), (0.29, 100), (0.57, 100), (1 / 3, 9), (0.999, 1000),
])
def test_count_for_is_floor(s, size):
    k = count_for(s, size)
    assert isinstance(k, int)
    assert k == math.floor(s * size)
    assert 0 <= k <= size


def test_count_for_float_trap():
    # s_l = count / numel as Step 1 produces it (38667 pruned of 76800). The
    # float product 38667/76800*76800 == 38666.99999999999, so floor gives
    # 38666, one fewer than the true count. count_for follows the literal
    # floor(s * size) of docs/algorithm.md Step 3; we assert what the float math gives.
    s = 38667 / 76800
    assert s * 76800 < 38667
    assert count_for(s, 76800) == math.floor(s * 76800) == 38666


# ----------------------------------------------------------------------------
# layer_mask / row_mask on hand-built tie cases
# ----------------------------------------------------------------------------

def test_layer_mask_hand_example():
    score = torch.tensor([[3.0, 1.0, 2.0, 2.0],
                          [2.0, 5.0, 1.0, 4.0]])
    # sorted: 1 1 2 2 2 3 4 5 ; k=3 -> threshold 2 (inside the tie group of 2s)
    expected = torch.tensor([[True, False, False, False],
                             [False, True, False, True]])
    assert torch.equal(layer_mask(score, 3), expected)
    assert torch.equal(layer_mask(score, 0), torch.ones(2, 4, dtype=torch.bool))
    assert torch.equal(layer_mask(score, 8), torch.zeros(2, 4, dtype=torch.bool))
    assert torch.equal(layer_mask(score, 2), score > 1.0)


def test_row_mask_hand_example():
    score = torch.tensor([[3.0, 1.0, 2.0, 2.0],
                          [2.0, 5.0, 1.0, 4.0]])
    # row 0 sorted 1 2 2 3 -> k=2 threshold 2 -> keep only 3
    # row 1 sorted 1 2 4 5 -> k=2 threshold 2 -> keep 5, 4
    expected = torch.tensor([[True, False, False, False],
                             [False, True, False, True]])
    assert torch.equal(row_mask(score, 2), expected)
    assert torch.equal(row_mask(score, 0), torch.ones(2, 4, dtype=torch.bool))
    assert torch.equal(row_mask(score, 4), torch.zeros(2, 4, dtype=torch.bool))


@pytest.mark.parametrize("seed", range(4))
def test_layer_mask_ties_every_k(seed):
    score = tie_scores(6, 10, 0, 5, seed)  # 60 values from {0..4}
    flat = [v for row in to_rows(score) for v in row]
    for k in range(0, score.numel() + 1):
        got = layer_mask(score, k)
        assert got.dtype == torch.bool and got.shape == score.shape
        assert torch.equal(got, ref_layer_mask(score, k)), k
        pruned = int((~got).sum())
        if k == 0:
            assert pruned == 0
        else:
            thr = ref_threshold(flat, k)
            assert pruned >= k
            assert pruned == sum(v <= thr for v in flat)


@pytest.mark.parametrize("seed", range(4))
def test_row_mask_ties_every_k(seed):
    score = tie_scores(7, 12, -2, 3, seed)  # values from {-2..2}
    rows = to_rows(score)
    for k in range(0, score.shape[1] + 1):
        got = row_mask(score, k)
        assert got.dtype == torch.bool and got.shape == score.shape
        assert torch.equal(got, ref_row_mask(score, k)), k
        for i, row in enumerate(rows):
            pruned = int((~got[i]).sum())
            if k == 0:
                assert pruned == 0
            else:
                assert pruned >= k
                assert pruned == sum(v <= ref_threshold(row, k) for v in row)


def test_masks_reject_bad_k():
    score = torch.rand(3, 4)
    for bad in (-1, 13):
        with pytest.raises(ValueError):
            layer_mask(score, bad)
    for bad in (-1, 5):
        with pytest.raises(ValueError):
            row_mask(score, bad)


# ----------------------------------------------------------------------------
# N:M
# ----------------------------------------------------------------------------

NM = [(1, 4), (2, 4), (3, 4), (2, 8), (4, 8)]


def test_n_m_hand_example():
    score = torch.tensor([[1.0, 4.0, 3.0, 2.0, 5.0, 5.0, 5.0, 0.0]])
    # 1:4 keeps ONE per group (not prunes one)
    assert torch.equal(n_m_mask(score, 1, 4),
                       torch.tensor([[False, True, False, False, True, False, False, False]]))
    # 3:4 keeps THREE per group; ties in group 2 broken toward earlier inputs
    assert torch.equal(n_m_mask(score, 3, 4),
                       torch.tensor([[False, True, True, True, True, True, True, False]]))
    assert torch.equal(n_m_mask(score, 2, 4),
                       torch.tensor([[False, True, True, False, True, True, False, False]]))


@pytest.mark.parametrize("n,m", NM)
@pytest.mark.parametrize("kind", ["ties", "random", "all_equal"])
def test_n_m_matches_reference(n, m, kind):
    rows, cols = 5, 4 * m
    if kind == "ties":
        score = tie_scores(rows, cols, 0, 3, seed=n * 10 + m)
    elif kind == "random":
        score = torch.rand(rows, cols, generator=torch.Generator().manual_seed(m * 7 + n))
    else:
        score = torch.ones(rows, cols)
    got = n_m_mask(score, n, m)
    assert got.dtype == torch.bool and got.shape == score.shape
    assert torch.equal(got, ref_n_m_mask(score, n, m))
    kept = got.reshape(rows, cols // m, m).sum(dim=-1)
    assert torch.equal(kept, torch.full_like(kept, n))  # exactly N kept in every group
    if kind == "all_equal":  # ties -> the first N of every group
        pattern = torch.tensor([True] * n + [False] * (m - n))
        assert torch.equal(got, pattern.repeat(rows, cols // m))


@pytest.mark.parametrize("n,m,cols", [(4, 4, 8), (5, 4, 8), (0, 4, 8), (-1, 4, 8), (2, 4, 6), (2, 8, 12)])
def test_n_m_invalid(n, m, cols):
    with pytest.raises(ValueError):
        n_m_mask(torch.rand(3, cols), n, m)


# ----------------------------------------------------------------------------
# scores
# ----------------------------------------------------------------------------

def test_scores_hand_example():
    weight = torch.tensor([[1.0, -2.0, 0.0],
                           [-3.0, 1.0, 2.0]])
    sq_mean = torch.tensor([4.0, 1.0, 9.0])  # a = [2, 1, 3]
    # |W| a = [[2, 2, 0], [6, 1, 6]]
    # imp_out = [4/3, 13/3]; imp_in = [4, 3/2, 3]
    expected_wanda = torch.tensor([[2.0, 2.0, 0.0], [6.0, 1.0, 6.0]])
    imp_out = [4 / 3, 13 / 3]
    imp_in = [4.0, 1.5, 3.0]
    absw = [[1, 2, 0], [3, 1, 2]]
    expected_mf = torch.tensor([[imp_out[i] * absw[i][j] * imp_in[j] for j in range(3)] for i in range(2)])
    # = [[16/3, 4, 0], [52, 6.5, 26]]
    assert torch.allclose(expected_mf, torch.tensor([[16 / 3, 4.0, 0.0], [52.0, 6.5, 26.0]]))
    assert torch.equal(magnitude_score(weight), weight.abs())
    assert torch.equal(wanda_score(weight, sq_mean), expected_wanda)
    mf = multiflow_score(weight, sq_mean)
    assert mf.dtype == torch.float32 and mf.shape == weight.shape
    assert torch.allclose(mf, expected_mf, rtol=1e-6, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_scores_match_loops(dtype):
    g = torch.Generator().manual_seed(3)
    weight = torch.randn(6, 9, generator=g).to(dtype)
    sq_mean = torch.rand(9, generator=g) * 4 + 0.01
    ref_abs, ref_wanda, ref_mf = ref_scores(weight, sq_mean)
    for got, ref in ((magnitude_score(weight), ref_abs),
                     (wanda_score(weight, sq_mean), ref_wanda),
                     (multiflow_score(weight, sq_mean), ref_mf)):
        assert got.dtype == torch.float32 and got.shape == weight.shape
        assert torch.allclose(got.double(), ref, rtol=1e-6, atol=0)


# ----------------------------------------------------------------------------
# end to end: score -> count_for -> mask, against the list-based reference
# ----------------------------------------------------------------------------

SPARSITIES = [0.0, 0.1, 0.5, 0.77, 0.9]


def layer_case(dtype: torch.dtype, seed: int, inputs: int = 20):
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(12, inputs, generator=g).to(dtype)
    sq_mean = torch.rand(inputs, generator=g) * 3 + 1e-3
    return weight, sq_mean


METHODS = {
    "magnitude": lambda w, a: magnitude_score(w),
    "wanda": wanda_score,
    "multiflow": multiflow_score,
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("method", list(METHODS))
def test_end_to_end_layer_and_row(method, dtype):
    for seed in range(2):
        weight, sq_mean = layer_case(dtype, seed)
        score = METHODS[method](weight, sq_mean)
        assert score.dtype == torch.float32
        out_f, in_f = score.shape
        for s in SPARSITIES:
            k = count_for(s, score.numel())
            got = layer_mask(score, k)
            assert torch.equal(got, ref_layer_mask(score, k)), (method, dtype, s)
            assert int((~got).sum()) >= k

            k_row = count_for(s, in_f)
            got = row_mask(score, k_row)
            assert torch.equal(got, ref_row_mask(score, k_row)), (method, dtype, s)
            assert bool(((~got).sum(dim=1) >= k_row).all())


@pytest.mark.parametrize("method", list(METHODS))
def test_end_to_end_n_m(method):
    weight, sq_mean = layer_case(torch.bfloat16, 5, inputs=24)  # bf16 -> many ties in |W|; 24 = 6 x 4 = 3 x 8
    score = METHODS[method](weight, sq_mean)
    for n, m in [(1, 4), (2, 4), (3, 4), (4, 8), (1, 8)]:  # every case runs: 24 inputs is a multiple of each M
        assert score.shape[1] % m == 0
        keep = n_m_mask(score, n, m)
        assert torch.equal(keep, ref_n_m_mask(score, n, m)), (n, m)
        assert bool((keep.reshape(score.shape[0], -1, m).sum(-1) == n).all())  # N kept of every M


# ----------------------------------------------------------------------------
# determinism
# ----------------------------------------------------------------------------

def test_determinism():
    weight, sq_mean = layer_case(torch.float16, 11)
    for method in METHODS.values():
        s1 = method(weight, sq_mean)
        s2 = method(weight.clone(), sq_mean.clone())
        assert torch.equal(s1, s2)
        for fn, arg in ((layer_mask, count_for(0.5, s1.numel())),
                        (row_mask, count_for(0.5, s1.shape[1]))):
            assert torch.equal(fn(s1, arg), fn(s2, arg))
        assert torch.equal(n_m_mask(s1, 2, 4), n_m_mask(s2, 2, 4))
    ties = tie_scores(8, 16, 0, 2, 0)
    assert torch.equal(n_m_mask(ties, 2, 4), n_m_mask(ties.clone(), 2, 4))
    assert torch.equal(layer_mask(ties, 40), layer_mask(ties.clone(), 40))


def test_histogram_selection_equals_kthvalue_on_large_scores():
    """Scores from 2^20 elements on are thresholded by bit-pattern selection: same value as kthvalue."""
    from multiflow.pruning import masks as m

    g = torch.Generator().manual_seed(11)
    score = (torch.rand(1024, 1100, generator=g) * torch.logspace(-4, 0, 1100)).float()
    score[::3, ::5] = score[0, 0]  # ties
    assert score.numel() >= m._HISTOGRAM_AT
    for k in (1, 7, score.numel() // 3, score.numel() // 2, score.numel() - 1, score.numel()):
        assert m.kth_smallest(score, k).item() == torch.kthvalue(score.reshape(-1), k).values.item()
    assert torch.equal(m.layer_mask(score, score.numel() // 2), score > torch.kthvalue(score.reshape(-1), score.numel() // 2).values)
