"""SparseGPT's math on one layer: the OBS update against a hand-rolled sequential OBS, counts, N:M, ties."""

import pytest
import torch

from multiflow.pruning import masks
from multiflow.pruning.sparsegpt import (Factor, HessianAccumulator, _prune_lowest, block_counts, inverse_cholesky,
                                         sparsegpt_prune)


def hessian_of(x: torch.Tensor) -> torch.Tensor:
    return 2 * x.double().T @ x.double() / x.shape[0]


def reference(weight, hessian, k=None, group="layer", structure=None, blocksize=128, percdamp=0.01):
    """Obviously right, slow: sequential OBS one column at a time with explicit inverses of H restricted to the
    columns not yet processed; per block, the k_b lowest w^2 / [H_F^-1]_00 are chosen on the current weights."""
    w, h = weight.double().clone(), hessian.double().clone()
    rows, cols = w.shape
    dead = [j for j in range(cols) if h[j, j] == 0]
    for j in dead:
        h[j, j] = 1
        w[:, j] = 0
    h += percdamp * torch.diagonal(h).mean() * torch.eye(cols, dtype=torch.float64)
    inv_from = [torch.linalg.inv(h[q:, q:]) for q in range(cols)]  # H^-1 over the columns q..cols-1
    d2 = [inv_from[q][0, 0] for q in range(cols)]
    prune = torch.zeros(rows, cols, dtype=torch.bool)

    def lowest(cells, count):
        """cells: [(score, position)]; prune the `count` lowest, ties: the earlier position kept."""
        ranked = sorted(cells, key=lambda c: (-c[0], c[1]))  # most important first
        return [pos for _, pos in ranked[len(ranked) - count:]] if count else []

    def saliency(r, j):
        return -float("inf") if j in dead else float(w[r, j] ** 2 / d2[j])

    if structure is not None:
        n, m = structure
        blocksize = max(m, blocksize - blocksize % m)
    per = rows if group == "layer" else 1
    live = [j for j in range(cols) if j not in dead]
    rest = max(k - per * len(dead), 0) if structure is None else 0  # dead weights are pruned and counted first
    for start in range(0, cols, blocksize):
        end = min(start + blocksize, cols)
        if structure is None:  # this block's dead weights + its share of `rest` by live weights before/through it
            through = lambda c: rest * per * len([j for j in live if j < c]) // (per * len(live))  # noqa: E731
            k_b = per * len([j for j in dead if start <= j < end]) + through(end) - through(start)
            if group == "layer":
                for r, j in lowest([(saliency(r, j), (r, j)) for r in range(rows) for j in range(start, end)], k_b):
                    prune[r, j] = True
            else:
                for r in range(rows):
                    for _, j in lowest([(saliency(r, j), (r, j)) for j in range(start, end)], k_b):
                        prune[r, j] = True
        for q in range(start, end):
            if structure is not None and q % m == 0:
                for r in range(rows):
                    for _, j in lowest([(saliency(r, j), (r, j)) for j in range(q, q + m)], m - n):
                        prune[r, j] = True
            hinv = inv_from[q]
            for r in range(rows):
                if prune[r, q]:
                    w[r, q:] -= w[r, q] / hinv[0, 0] * hinv[:, 0]
    return w, ~prune


def layer(rows=3, cols=6, tokens=20, seed=0, dead=(), quantized=False):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g, dtype=torch.float64)
    if quantized:  # few distinct magnitudes: many exact ties
        w = torch.randint(-2, 3, (rows, cols), generator=g).double()
    x = torch.randn(tokens, cols, generator=g, dtype=torch.float64) @ torch.randn(cols, cols, generator=g,
                                                                                   dtype=torch.float64)
    for j in dead:
        x[:, j] = 0
    return w, x


@pytest.mark.parametrize("case", [
    dict(k=7), dict(k=0), dict(k=18), dict(k=2, group="row"), dict(k=9, dead=(1, 4)), dict(k=4, dead=(1, 4)),
    dict(k=3, group="row", dead=(0, 3)), dict(k=8, quantized=True),
    dict(structure=(1, 3)), dict(structure=(2, 3)), dict(structure=(1, 2), dead=(2,)),
    dict(k=3, group="row", quantized=True),
], ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()))
@pytest.mark.parametrize("blocksize,inner", [(2, 32), (6, 2)], ids=["blocks-of-2", "blocks-of-6-in-sub-blocks-of-2"])
def test_obs_update_and_mask_match_sequential_reference(case, blocksize, inner):
    """Sub-blocks (the lazy update inside a block) change nothing but rounding: the same masks, the same weights."""
    case = dict(case)
    dead = case.pop("dead", ())
    w, x = layer(dead=dead, quantized=case.pop("quantized", False))
    h = hessian_of(x)
    got_w, got_keep = sparsegpt_prune(w, h, blocksize=blocksize, inner=inner, dtype=torch.float64, **case)
    want_w, want_keep = reference(w, h, blocksize=blocksize, **case)
    assert torch.equal(got_keep, want_keep)
    assert torch.allclose(got_w, want_w, rtol=0, atol=1e-10)
    assert torch.all(got_w[~got_keep] == 0)
    if "k" in case:  # exactly k pruned (per row with group row), ties or not; more only if the dead are more
        row = case.get("group") == "row"
        group_dead = len(dead) * (1 if row else w.shape[0])
        assert int((~got_keep).sum()) == max(case["k"], group_dead) * (w.shape[0] if row else 1)


def test_reference_blocksize_128_on_a_wider_layer():
    """Several blocks of the default size, one partial: the same as the sequential reference."""
    w, x = layer(rows=4, cols=300, tokens=400, seed=3)
    h = hessian_of(x)
    got_w, got_keep = sparsegpt_prune(w, h, 600, dtype=torch.float64)
    want_w, want_keep = reference(w, h, 600)
    assert torch.equal(got_keep, want_keep)
    assert torch.allclose(got_w, want_w, rtol=0, atol=1e-9)


def test_full_rank_and_sparsity_zero_leaves_the_weights_unchanged():
    w, x = layer(rows=5, cols=8, tokens=50)
    for dtype in (torch.float32, torch.float64):
        new, keep = sparsegpt_prune(w.to(dtype), hessian_of(x), sparsity=0.0)
        assert keep.all() and torch.equal(new, w.to(dtype))


def test_reconstruction_error_below_magnitude_pruning_at_the_same_count():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(32, 64, generator=g)
    # correlated inputs: mostly an 8-dimensional signal, plus noise
    x = torch.randn(512, 8, generator=g) @ torch.randn(8, 64, generator=g) + 0.3 * torch.randn(512, 64, generator=g)
    acc = HessianAccumulator(64)
    acc.add_batch(x)
    k = 32 * 64 // 2
    new, keep = sparsegpt_prune(w, acc.hessian(), k)
    magnitude = w * masks.layer_mask(w.abs(), k)
    error = lambda v: float(torch.linalg.norm((w - v).double() @ x.double().T))  # noqa: E731
    assert int((~keep).sum()) == int((magnitude == 0).sum()) == k
    assert error(new) < 0.5 * error(magnitude)  # measured: 0.30
    assert error(new) < error(w * keep)  # the update, not only the mask, lowers the error


def test_score_hook_selects_and_the_update_still_applies():
    """A fixed score tensor replaces w^2/d^2 as the criterion: the mask is its per-block lowest k_b."""
    w, x = layer(rows=6, cols=10, tokens=40, seed=2)
    score = torch.rand(6, 10, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    new, keep = sparsegpt_prune(w, hessian_of(x), 25, blocksize=4, score=score, dtype=torch.float64)
    want = torch.ones(6, 10, dtype=torch.bool)
    for (i1, i2), k_b in zip(((0, 4), (4, 8), (8, 10)), block_counts(25, [24, 24, 12])):
        want[:, i1:i2] = masks.layer_mask(score[:, i1:i2], k_b)  # no ties in random floats
    assert torch.equal(keep, want)
    assert not torch.equal(new[keep], w[keep]) and torch.all(new[~keep] == 0)
    calls = []
    sparsegpt_prune(w, hessian_of(x), 25, blocksize=4, score=lambda t, d, c: calls.append((t.shape, c)) or t.abs())
    assert calls == [((6, 4), slice(0, 4)), ((6, 4), slice(4, 8)), ((6, 2), slice(8, 10))]


@pytest.mark.parametrize("n,m", [(1, 4), (2, 4), (3, 4), (2, 8)])
def test_n_m_keeps_exactly_n_of_every_m(n, m):
    g = torch.Generator().manual_seed(n * 10 + m)
    w = torch.randint(-3, 4, (8, 64), generator=g).float()  # ties within groups
    x = torch.randn(200, 64, generator=g)
    new, keep = sparsegpt_prune(w, hessian_of(x), structure=(n, m), blocksize=128)
    assert torch.equal(keep.reshape(8, -1, m).sum(-1), torch.full((8, 64 // m), n))
    assert torch.all(new[~keep] == 0)


def test_block_counts_sum_to_k_in_proportion():
    assert block_counts(10, [2, 2, 2]) == [3, 3, 4]
    assert block_counts(7, [128, 128, 44]) == [2, 3, 2]
    assert block_counts(0, [0, 0]) == [0, 0]
    for k in range(0, 31):  # one row of 30 columns: each block prunes at most its width
        counts = block_counts(k, [7, 7, 7, 7, 2])
        assert sum(counts) == k and all(0 <= c <= w for c, w in zip(counts, [7, 7, 7, 7, 2]))


def test_bit_for_bit_deterministic():
    w, x = layer(rows=16, cols=40, tokens=100, seed=4)
    runs = [sparsegpt_prune(w.float(), hessian_of(x), 300, blocksize=16) for _ in range(2)]
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])


@pytest.mark.parametrize("per_row", [False, True])
def test_prune_lowest_is_the_stable_sort_with_ties_kept_in_order(per_row):
    """The k lowest by k-th value and counted ties = the k last of a stable descending sort, on tiles full of ties
    (and -inf, the dead inputs), for every k."""
    g = torch.Generator().manual_seed(7)
    score = torch.randint(0, 4, (5, 9), generator=g).double()
    score[:, 2] = -torch.inf
    for k in range(0, (9 if per_row else 45) + 1):
        flat = score if per_row else score.reshape(1, -1)
        order = torch.sort(flat, dim=1, descending=True, stable=True).indices
        want = torch.ones_like(flat, dtype=torch.bool).scatter_(1, order[:, : flat.shape[1] - k], False)
        assert torch.equal(_prune_lowest(score, k, per_row), want.reshape(score.shape)), k


def test_a_shared_factor_gives_what_the_hessian_gives_bit_for_bit():
    """q/k/v (and gate/up) share one Hessian: its Factor, computed once (in place of the Hessian), prunes each of
    them exactly as the Hessian itself would."""
    _, x = layer(rows=16, cols=40, tokens=100, seed=4, dead=(3,))
    h = hessian_of(x)
    consumed = h.clone()
    factor = Factor.of(consumed, in_place=True)
    assert consumed.numel() == 0  # its memory went once factored
    assert torch.equal(factor.u, inverse_cholesky(h)[0].float()) and factor.dead.tolist() == [j == 3 for j in range(40)]
    for seed in (5, 6):
        w = torch.randn(16, 40, generator=torch.Generator().manual_seed(seed))
        want, got = sparsegpt_prune(w, h, 300, blocksize=16), sparsegpt_prune(w, factor, 300, blocksize=16)
        assert torch.equal(want[0], got[0]) and torch.equal(want[1], got[1])
    with pytest.raises(ValueError, match="factor is"):
        sparsegpt_prune(torch.zeros(16, 8), factor, 3)


@pytest.mark.parametrize("k,group,pruned", [(10, "layer", 10), (5, "layer", 8), (3, "row", 12)])
def test_dead_inputs_zeroed_pruned_first_and_counted(k, group, pruned):
    """Columns 0 and 5 never see a non-zero input: their 8 weights are zero, pruned, and part of k
    (a layer prunes more than k only when its dead weights alone are more)."""
    w, x = layer(rows=4, cols=12, tokens=60, seed=6, dead=(0, 5))
    new, keep = sparsegpt_prune(w, hessian_of(x), k, group=group, blocksize=4)
    assert torch.isfinite(new).all()
    assert not keep[:, [0, 5]].any() and torch.all(new[:, [0, 5]] == 0)
    assert int((~keep).sum()) == pruned


def test_hessian_accumulator_counts_only_masked_tokens_in_float64():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, 4, generator=g)
    mask = torch.rand(3, 5, generator=g) > 0.4
    acc = HessianAccumulator(4)
    acc.add_batch(x[:2], mask[:2])
    acc.add_batch(x[2:], mask[2:])
    rows = x[mask].double()
    assert acc.tokens == int(mask.sum()) and acc.xtx.dtype == torch.float64
    assert torch.allclose(acc.hessian(), 2 * rows.T @ rows / rows.shape[0], rtol=1e-14, atol=0)
    with pytest.raises(ValueError, match="features"):
        acc.add_batch(torch.zeros(2, 3))
    with pytest.raises(ValueError, match="no calibration token"):
        HessianAccumulator(4).hessian()


def test_bad_arguments():
    w, x = layer()
    h = hessian_of(x)
    with pytest.raises(ValueError, match="exactly one"):
        sparsegpt_prune(w, h)
    with pytest.raises(ValueError, match="outside"):
        sparsegpt_prune(w, h, 19)
    with pytest.raises(ValueError, match="inputs"):
        sparsegpt_prune(w, h[:5, :5], 1)
    with pytest.raises(ValueError, match="N:M"):
        sparsegpt_prune(w, h, structure=(2, 4))  # 6 inputs
