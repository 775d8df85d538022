"""Benchmark `multiflow prune` on a large checkpoint: wall time and peak RSS (target < 4 GB at 7B).

Statistics are synthetic (seeded random positive sq_mean per layer): this measures the pruning pass
(scores, k-th value per layer, the streamed copy), not calibration. Baseline in the same run: copying
the checkpoint's weight files with `cp` (the I/O the streamed copy cannot avoid).

    python benchmarks/bench_prune.py --checkpoint /work/bench/llava-7b-hub-fp16 --scratch /work/bench
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

from multiflow.models import inventory as layers
from multiflow.storage.stats_file import LayerStats, save_stats


def timed(cmd: list[str]) -> tuple[float, int]:
    """Wall seconds and peak RSS (MB, GNU time's %M) of a command."""
    start = time.perf_counter()
    done = subprocess.run(["/usr/bin/time", "-f", "%M", *cmd], capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode:
        sys.exit(f"command failed: {' '.join(cmd)}\n{done.stderr[-2000:]}")
    return wall, int(done.stderr.strip().splitlines()[-1]) // 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, required=True)
    parser.add_argument("--scratch", type=Path, required=True, help="folder for stats and outputs (needs the "
                        "checkpoint's size free, twice)")
    parser.add_argument("--target", type=float, default=0.5)
    parser.add_argument("--methods", nargs="+", default=["multiflow", "magnitude"])
    args = parser.parse_args()

    inv = layers.from_checkpoint(args.checkpoint)
    g = torch.Generator().manual_seed(0)
    stats = {l.name: LayerStats(torch.rand(l.shape[1], generator=g) + 0.01, 1000) for l in inv.layers}
    stats_path = save_stats(args.scratch / "synthetic-stats.safetensors", stats, {"data": "synthetic"})
    weights = sorted(args.checkpoint.glob("*.safetensors"))
    size = sum(p.stat().st_size for p in weights)
    copy_dir = args.scratch / "copy-baseline"
    shutil.rmtree(copy_dir, ignore_errors=True)
    copy_dir.mkdir(parents=True)
    rows = []
    wall, rss = timed(["cp", *map(str, weights), str(copy_dir)])
    rows.append(("cp of the weight files (baseline)", wall, rss))
    shutil.rmtree(copy_dir)
    for method in args.methods:
        out = args.scratch / f"pruned-{method}"
        cmd = [str(Path(sys.executable).parent / "multiflow"), "prune", "--model", str(args.checkpoint),
               "--target-sparsity", str(args.target), "--method", method, "--output", str(out), "--overwrite",
               "--quiet"]
        if method != "magnitude":
            cmd += ["--stats", str(stats_path)]
        wall, rss = timed(cmd)
        rows.append((f"multiflow prune --method {method}", wall, rss))
        shutil.rmtree(out)
    print(f"checkpoint {args.checkpoint}: {size / 1e9:.2f} GB in {len(weights)} files, "
          f"{sum(l.numel for l in inv.layers):,} prunable weights in {len(inv.layers)} layers; target {args.target}")
    print("| run | seconds | ratio to cp | peak RSS MB |")
    print("|---|---:|---:|---:|")
    for name, wall, rss in rows:
        print(f"| {name} | {wall:.1f} | {wall / rows[0][1]:.2f} | {rss} |")
    worst = max(rss for name, _, rss in rows[1:])
    print(f"peak RSS target < 4096 MB: {'PASS' if worst < 4096 else 'FAIL'} ({worst} MB)")


if __name__ == "__main__":
    main()
