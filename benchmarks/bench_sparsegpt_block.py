#!/usr/bin/env python
"""SparseGPT's time and memory on one LLaVA-1.5-7B decoder block: the Hessians, their factors, the seven layers.

    OMP_NUM_THREADS=2 python benchmarks/bench_sparsegpt_block.py
    git show 6446e97:src/multiflow/pruning/sparsegpt.py > /tmp/sparsegpt_old.py
    OMP_NUM_THREADS=2 python benchmarks/bench_sparsegpt_block.py --module /tmp/sparsegpt_old.py   # another version
    OMP_NUM_THREADS=2 python benchmarks/bench_sparsegpt_block.py --group row     # each tile's count per row

What `run --method sparsegpt` does per block, on random data of the block's shapes (hidden 4096, MLP 11008;
--tokens calibration tokens, 8 samples of ~621 by default): each shared input's `HessianAccumulator` (q/k/v,
o, gate/up, down) over 8 batches, then its layers pruned at 0.5. A module with `Factor` (this version) factors
each Hessian once, in place, for all its layers; one without (the code before) calls `sparsegpt_prune` with the
Hessian per layer, as its `reconstruction.py` did. Prints seconds per phase and the peak RSS (`VmHWM`) above
the start, and a checksum of the pruned weights (equal across versions up to float32 rounding).
"""

from __future__ import annotations

import argparse
import time

import torch

from _common import memory_mib, sparsegpt_module

# (the input, its in_features, the rows of each layer that reads it)
BLOCK = (("q/k/v", 4096, (4096, 4096, 4096)), ("o", 4096, (4096,)), ("gate/up", 4096, (11008, 11008)),
         ("down", 11008, (4096,)))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--module", help="a sparsegpt.py to load instead of multiflow.pruning.sparsegpt")
    parser.add_argument("--tokens", type=int, default=4968)
    parser.add_argument("--group", choices=("layer", "row"), default="layer",
                        help="what one tile's k is counted over: the whole tile, or each row of it (default layer)")
    args = parser.parse_args()
    sg = sparsegpt_module(args.module)
    group = {"group": args.group} if args.group != "layer" else {}  # older modules lack the argument
    g = torch.Generator().manual_seed(0)
    start, times, checksum = memory_mib()["hwm"], {"accumulate": 0.0, "factor + prune": 0.0}, 0.0
    for name, features, layers in BLOCK:
        with torch.inference_mode():
            x = torch.randn(args.tokens, features, generator=g)
            t0 = time.perf_counter()
            acc = sg.HessianAccumulator(features)
            for batch in x.chunk(8):
                acc.add_batch(batch)
            del x, batch
            times["accumulate"] += time.perf_counter() - t0
        weights = [torch.randn(rows, features, generator=g) for rows in layers]
        t0 = time.perf_counter()
        hessian = acc.take_hessian() if hasattr(acc, "take_hessian") else acc.hessian()
        del acc
        if hasattr(sg, "Factor"):
            hessian = sg.Factor.of(hessian, in_place=True)
        for w in weights:
            new, _ = sg.sparsegpt_prune(w, hessian, sparsity=0.5, **group)
            checksum += float(new.double().abs().sum())
            del new
        del hessian
        elapsed = time.perf_counter() - t0
        times["factor + prune"] += elapsed
        print(f"  {name}: {len(layers)} x {layers[0]} x {features}: factor + prune {elapsed:.1f} s", flush=True)
    peak = memory_mib()["hwm"] - start
    print(f"{args.module or 'multiflow.pruning.sparsegpt'} (group {args.group}): accumulate "
          f"{times['accumulate']:.1f} s, factor + prune {times['factor + prune']:.1f} s, total {sum(times.values()):.1f} s; peak RSS {peak:.0f} MiB above the "
          f"start; checksum {checksum:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
