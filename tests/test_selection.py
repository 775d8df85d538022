"""Pure functions: bit-pattern keys and exact k-th selection against torch.kthvalue."""

import math

import pytest
import torch

from multiflow.distribution import selection


def kth_via_histograms(t: torch.Tensor, k: int, use_numba: bool = True) -> float:
    space = selection.KEY_SPACES[t.dtype]
    hist = selection.coarse_histogram(t, space, use_numba=use_numba)
    coarse, rank = selection.locate(hist, k)
    if not space.two_level:
        return space.value(coarse)
    fine_hist = selection.fine_histogram(t, space, coarse, use_numba=use_numba)
    assert torch.equal(fine_hist, selection.fine_histogram(t, space, coarse, use_numba=not use_numba))
    fine, _ = selection.locate(fine_hist, rank)
    return space.value((coarse << space.shift) | fine)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("use_numba", [True, False])
def test_kth_equals_kthvalue(dtype, use_numba):
    g = torch.Generator().manual_seed(1)
    t = (torch.randn(3000, generator=g) * torch.logspace(-6, 1, 3000)).to(dtype)
    t[::7] = 0.0
    t[1::11] = -0.0
    t[2::13] = t[5]  # ties
    flat = t.abs()
    for k in (1, 2, 100, 1499, 1500, 2999, 3000):
        assert kth_via_histograms(t, k, use_numba) == torch.kthvalue(flat, k).values.item()


def test_subnormals_and_huge_values_are_ordered():
    t = torch.tensor([1e-45, -2e-45, 1e-40, 3e38, -3e38, 0.0, 1.0], dtype=torch.float32)
    for k in range(1, t.numel() + 1):
        assert kth_via_histograms(t, k) == torch.kthvalue(t.abs(), k).values.item()


def test_locate_on_hand_made_histogram():
    hist = torch.tensor([2, 0, 3, 1])  # values: 0,0,2,2,2,3
    assert selection.locate(hist, 1) == (0, 1)
    assert selection.locate(hist, 2) == (0, 2)
    assert selection.locate(hist, 3) == (2, 1)
    assert selection.locate(hist, 5) == (2, 3)
    assert selection.locate(hist, 6) == (3, 1)
    with pytest.raises(ValueError):
        selection.locate(hist, 7)
    assert selection.count_through(hist, 2) == 5


def test_numba_and_torch_histograms_agree():
    g = torch.Generator().manual_seed(2)
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        t = (torch.randn(10_000, generator=g) * 0.02).to(dtype)
        space = selection.KEY_SPACES[dtype]
        a = selection.coarse_histogram(t, space, use_numba=True)
        b = selection.coarse_histogram(t, space, use_numba=False)
        assert torch.equal(a, b) and int(a.sum()) == t.numel()


def test_mixed_dtypes_compare_in_float32():
    assert selection.key_space_for({torch.float16}).dtype == torch.float16
    assert selection.key_space_for({torch.float16, torch.bfloat16}).dtype == torch.float32
    half = torch.tensor([0.1, 0.2], dtype=torch.float16)
    space = selection.key_space_for({torch.float16, torch.float32})
    assert space.value(int(space.keys(half)[0])) == half[0].float().item()


def test_nonfinite_keys_are_above_every_finite_value():
    for dtype, space in selection.KEY_SPACES.items():
        finite_max = torch.tensor([torch.finfo(dtype).max], dtype=dtype)
        inf = torch.tensor([math.inf], dtype=dtype)
        assert int(space.keys(finite_max)[0]) < space.nonfinite_key <= int(space.keys(inf)[0])
