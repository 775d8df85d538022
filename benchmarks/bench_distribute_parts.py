#!/usr/bin/env python
"""Where warm Step 1's time goes: the parts of `multiflow distribute`, each timed alone in one process.

    python benchmarks/bench_distribute_parts.py --checkpoint /work/bench/7b/llava-7b-hub-fp16
    python benchmarks/bench_distribute_parts.py --checkpoint CKPT --shard model-00001-of-00006.safetensors

Reads the chosen shard files once first (so that they are in the page cache when they fit) and says how much of
them the page cache holds (mincore, as bench_distribute.py), then times, one after the other:
  import      torch and multiflow's Step 1 modules (from this script's start);
  numba       the first call of the histogram kernel (numba loads its cached machine code);
  plain read  the shard files read in order with 16 MiB readinto calls (bench_distribute.py's yardstick);
  reader      `read_tensors` over the prunable 2-D weights of those files, nothing done with them;
  reader + histograms  the same with `selection.coarse_histogram` on each (Step 1's first pass before pieces);
  pieces + histograms  `pieces.map_pieces` with the histogram of each piece (Step 1's first pass now);
  histograms  the same number of elements histogrammed from memory (2 threads).
fp16 checkpoints only (the key space of the 7B- and 13B-shaped benchmark checkpoints).
"""

from __future__ import annotations

import time

_started = time.perf_counter()

import argparse  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

from multiflow.distribution import selection  # noqa: E402
from multiflow.storage.checkpoint import list_tensors, read_tensors  # noqa: E402
from multiflow.storage.pieces import map_pieces  # noqa: E402

IMPORT_S = time.perf_counter() - _started
sys.path.insert(0, str(Path(__file__).parent))
from bench_distribute import read_bytes, resident_bytes  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--checkpoint", type=Path, required=True)
    ap.add_argument("--shard", action="append", help="only this shard file (repeatable; default: every shard)")
    args = ap.parse_args(argv)
    files = sorted(args.checkpoint.glob("*.safetensors"))
    if args.shard:
        files = [args.checkpoint / s for s in args.shard]
    entries = [e for e in list_tensors(args.checkpoint) if Path(e.file) in files and len(e.shape) == 2
               and e.dtype == torch.float16 and not any(x in e.key for x in ("embed", "lm_head", "position"))]
    space = selection.KEY_SPACES[torch.float16]
    row = {"import_s": IMPORT_S}
    t0 = time.perf_counter()
    selection.coarse_histogram(torch.zeros(8, dtype=torch.float16), space)
    row["numba_first_call_s"] = time.perf_counter() - t0
    read_bytes(files)  # into the page cache, when it fits
    cached, size = resident_bytes(files), sum(f.stat().st_size for f in files)
    row["page_cache"] = "unknown" if cached is None else f"{cached / size:.1%} of {size / 1e9:.2f} GB"
    row["plain_read_s"], row["bytes"] = read_bytes(files)
    t0 = time.perf_counter()
    for _ in read_tensors(entries):
        pass
    row["reader_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _, weight in read_tensors(entries):
        selection.coarse_histogram(weight, space)
    row["reader_and_histograms_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in map_pieces(entries, lambda e, piece: selection.coarse_histogram(piece, space, sliced=False)):
        pass
    row["pieces_and_histograms_s"] = time.perf_counter() - t0
    n = sum(e.shape[0] * e.shape[1] for e in entries)
    chunk = (torch.randn(n // 64) * 0.02).half()
    t0 = time.perf_counter()
    for _ in range(64):
        selection.coarse_histogram(chunk, space)
    row["histograms_from_memory_s"] = time.perf_counter() - t0
    row.update(elements=n, tensors=len(entries), files=[f.name for f in files], threads=torch.get_num_threads())
    print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
