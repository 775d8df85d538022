#!/usr/bin/env python
"""The Step 2 hook's own cost: `masked_square_sums` against the float32 formula it replaced, per call.

    OMP_NUM_THREADS=1 python benchmarks/bench_square_sums.py

For each input shape (rows x features, bfloat16, a random 80% of rows kept) and 1 or 3 masks (the statistics with
and without --split-token-types): the median time of `masked_square_sums` (bfloat16: one numba pass over the bits)
and of the previous code (`x.float()`, `square()`, one `keep @ squares` product per mask), both in this process,
interleaved. Shapes: the benchmark model's hooked inputs (4 x 271 tokens by 1024 / 2816) and a LLaVA-1.5-7B MLP
input (621 tokens by 11008).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from multiflow.calibration.statistics import masked_square_sums


def previous(x: torch.Tensor, keeps: list[torch.Tensor]) -> list[torch.Tensor]:
    rows = x.reshape(-1, x.shape[-1])
    return [(keep.reshape(-1).float() @ rows.float().square()).double() for keep in keeps]


def median_ms(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args()
    g = torch.Generator().manual_seed(0)
    print(f"torch threads: {torch.get_num_threads()}\n")
    print("| input (bfloat16) | masks | masked_square_sums ms | previous ms | previous / new |")
    print("|---|---:|---:|---:|---:|")
    for rows, features in ((1084, 1024), (1084, 2816), (621, 11008)):
        x = torch.randn(rows, features, generator=g).bfloat16()
        keep = torch.rand(rows, generator=g) > 0.2
        image = keep & (torch.rand(rows, generator=g) > 0.5)
        for keeps in ([keep], [keep, image, keep & ~image]):
            masked_square_sums(x, keeps), previous(x, keeps)  # first use (numba's cache load) not timed
            new = median_ms(lambda: masked_square_sums(x, keeps), args.repeats)
            old = median_ms(lambda: previous(x, keeps), args.repeats)
            print(f"| {rows} x {features} | {len(keeps)} | {new:.2f} | {old:.2f} | {old / new:.1f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
