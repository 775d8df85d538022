#!/usr/bin/env python
"""Peak memory of SparseGPT on one down_proj-shaped layer: the Hessian's accumulation, H and the pruning pass.

    OMP_NUM_THREADS=1 python benchmarks/bench_sparsegpt_memory.py
    git show afabe18:src/multiflow/pruning/sparsegpt.py > /tmp/sparsegpt_old.py
    OMP_NUM_THREADS=1 python benchmarks/bench_sparsegpt_memory.py --module /tmp/sparsegpt_old.py   # another version

One process per version (run the script once each): a `HessianAccumulator` over 4 batches of 1,300 random tokens
of --features inputs (LLaVA-1.5-7B's down_proj: 11008), then H (`take_hessian` where the module has it, else
`hessian()` with the accumulator kept, as the code before it did) and `sparsegpt_prune` at 0.5 on a --rows x
--features weight. Prints the peak RSS (`VmHWM`) above the RSS once the accumulator is full, and a checksum of the
pruned weights (the same across versions: same results).
"""

from __future__ import annotations

import argparse
import time

import torch

from _common import memory_mib, sparsegpt_module


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--module", help="a sparsegpt.py to load instead of multiflow.pruning.sparsegpt")
    parser.add_argument("--features", type=int, default=11008)
    parser.add_argument("--rows", type=int, default=256)
    args = parser.parse_args()
    sg = sparsegpt_module(args.module)
    g = torch.Generator().manual_seed(0)
    acc = sg.HessianAccumulator(args.features)
    with torch.inference_mode():
        for _ in range(4):
            acc.add_batch(torch.randn(1300, args.features, generator=g))
    weight = torch.randn(args.rows, args.features, generator=g)
    start, t0 = memory_mib()["hwm"], time.perf_counter()
    hessian = acc.take_hessian() if hasattr(acc, "take_hessian") else acc.hessian()
    new, _ = sg.sparsegpt_prune(weight, hessian, sparsity=0.5)
    peak = memory_mib()["hwm"] - start
    print(f"{args.module or 'multiflow.pruning.sparsegpt'}: peak RSS {peak:.0f} MiB above the full "
          f"accumulator, {time.perf_counter() - t0:.1f} s, checksum {float(new.double().abs().sum()):.6f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
