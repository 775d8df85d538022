"""Exact k-th smallest |W| over many tensors, without concatenating them.

For non-negative IEEE floats the bit pattern, read as an unsigned integer, is
monotone in the value. So |W| of a float16 or bfloat16 tensor maps to a 15-bit
integer key (the bits without the sign), and the k-th smallest |W| over any set
of tensors is found exactly from the sum of their key histograms: the first bin
at which the cumulative count reaches k. Ties are equal keys, so "pruned"
(|W| <= threshold) is the cumulative count up to that bin.

float32 keys have 31 bits, too many bins for one histogram. They are split in
two levels: a 65,536-bin histogram of the high 16 bits (bits 30..15) locates
the bin holding the k-th value, and a second, 32,768-bin histogram of the low
15 bits of only the elements inside that bin finds it exactly.

Everything here is pure and works on tensors; reading weights lives elsewhere.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch

try:  # numba makes the histogram ~3x faster than torch.bincount; optional.
    import numba

    @numba.njit(nogil=True, cache=True)
    def _histogram_kernel(bits, mask, shift, out):  # pragma: no cover - compiled
        for i in range(bits.shape[0]):
            out[(bits[i] & mask) >> shift] += 1

    @numba.njit(nogil=True, cache=True)
    def _fine_kernel(bits, mask, shift, coarse_bin, out):  # pragma: no cover - compiled
        low = (1 << shift) - 1
        for i in range(bits.shape[0]):
            key = bits[i] & mask
            if (key >> shift) == coarse_bin:
                out[key & low] += 1

except ImportError:  # pragma: no cover - exercised only without numba
    _histogram_kernel = _fine_kernel = None


_SLICE = 1 << 22  # the numba passes run on slices of at least this many elements, one thread each


def in_slices(fn, *flat) -> list:
    """[fn(*slices) for each slice]: the 1-D arrays or tensors `flat` cut into the same contiguous slices, one per
    thread (up to torch.get_num_threads()), run at once (the numba kernels release the GIL). Callers add the
    slices' integer counts, so the result does not depend on the number of threads."""
    n = len(flat[0])
    parts = max(1, min(torch.get_num_threads(), n // _SLICE))
    if parts == 1:
        return [fn(*flat)]
    bounds = [n * i // parts for i in range(parts + 1)]
    with ThreadPoolExecutor(parts - 1, thread_name_prefix="multiflow-slice") as pool:
        rest = [pool.submit(fn, *(t[a:b] for t in flat)) for a, b in zip(bounds[1:-1], bounds[2:])]
        first = fn(*(t[: bounds[1]] for t in flat))  # this thread takes the first slice
        return [first, *(f.result() for f in rest)]


@dataclass(frozen=True)
class KeySpace:
    """How |W| of one storage dtype maps to integer keys and histogram bins."""

    dtype: torch.dtype  # dtype the keys are taken from (float16, bfloat16, float32)
    int_dtype: torch.dtype  # same-width integer view of dtype
    mask: int  # clears the sign bit
    shift: int  # high-level bin = key >> shift (0: one level is exact)
    nonfinite_key: int  # keys >= this are inf or NaN

    @property
    def coarse_bins(self) -> int:
        return ((self.mask >> self.shift) + 1)

    @property
    def fine_bins(self) -> int:
        return 1 << self.shift

    @property
    def two_level(self) -> bool:
        return self.shift > 0

    def keys(self, weight: torch.Tensor) -> torch.Tensor:
        """Integer keys of |weight| in this space, monotone in |weight| (flattened)."""
        return weight.to(self.dtype).contiguous().reshape(-1).view(self.int_dtype) & self.mask

    def value(self, key: int) -> float:
        """The float |W| value a key stands for."""
        return torch.tensor([key], dtype=self.int_dtype).view(self.dtype).item()


KEY_SPACES = {
    torch.float16: KeySpace(torch.float16, torch.int16, 0x7FFF, 0, 0x7C00),
    torch.bfloat16: KeySpace(torch.bfloat16, torch.int16, 0x7FFF, 0, 0x7F80),
    torch.float32: KeySpace(torch.float32, torch.int32, 0x7FFFFFFF, 15, 0x7F800000),
}


def key_space_for(dtypes: set[torch.dtype]) -> KeySpace:
    """The key space in which |W| of tensors of these dtypes compare exactly.

    One 16-bit dtype keeps its own keys. A mix is compared in float32, which
    holds every float16 and bfloat16 value exactly (as torch.cat would promote).
    """
    if len(dtypes) == 1:
        return KEY_SPACES[next(iter(dtypes))]
    return KEY_SPACES[torch.float32]


def coarse_histogram(weight: torch.Tensor, space: KeySpace, use_numba: bool = True, sliced: bool = True,
                     ) -> torch.Tensor:
    """int64 histogram of key >> shift over all elements of weight (`sliced`: on all torch threads, else on the
    calling thread alone, for callers that run one piece per thread)."""
    weight = weight.to(space.dtype).contiguous()
    if use_numba and _histogram_kernel is not None:
        unsigned = np.uint16 if space.int_dtype == torch.int16 else np.uint32
        bits = weight.reshape(-1).view(space.int_dtype).numpy().view(unsigned)

        def count(part):
            hist = np.zeros(space.coarse_bins, np.int64)
            _histogram_kernel(part, unsigned(space.mask), unsigned(space.shift), hist)
            return hist

        return torch.from_numpy(sum(in_slices(count, bits)) if sliced else count(bits))
    coarse = space.keys(weight) >> space.shift
    return torch.bincount(coarse, minlength=space.coarse_bins)


def fine_histogram(weight: torch.Tensor, space: KeySpace, coarse_bin: int, use_numba: bool = True,
                   sliced: bool = True) -> torch.Tensor:
    """int64 histogram of the low `shift` bits of the keys inside one coarse bin (`sliced` as coarse_histogram)."""
    if use_numba and _fine_kernel is not None and space.int_dtype == torch.int32:
        bits = weight.to(space.dtype).contiguous().reshape(-1).view(torch.int32).numpy().view(np.uint32)

        def count(part):
            hist = np.zeros(space.fine_bins, np.int64)
            _fine_kernel(part, np.uint32(space.mask), np.uint32(space.shift), np.uint32(coarse_bin), hist)
            return hist

        return torch.from_numpy(sum(in_slices(count, bits)) if sliced else count(bits))
    keys = space.keys(weight)
    inside = keys[(keys >> space.shift) == coarse_bin] & (space.fine_bins - 1)
    return torch.bincount(inside, minlength=space.fine_bins)


def locate(hist: torch.Tensor, k: int) -> tuple[int, int]:
    """Bin holding the k-th smallest element (1-based) and k's rank inside it.

    Returns (bin, rank) with 1 <= rank <= hist[bin]; requires 1 <= k <= hist.sum().
    """
    total = int(hist.sum())
    if not 1 <= k <= total:
        raise ValueError(f"k={k} outside 1..{total}")
    cumulative = torch.cumsum(hist, 0)
    index = int(torch.searchsorted(cumulative, torch.tensor(k, dtype=cumulative.dtype)))
    before = int(cumulative[index - 1]) if index > 0 else 0
    return index, k - before


def count_through(hist: torch.Tensor, index: int) -> int:
    """Elements in bins 0..index inclusive."""
    return int(hist[: index + 1].sum())
