"""Benchmark `multiflow prune` against `cp` of the same files, cold and warm, side by side in one run.

Statistics are synthetic (seeded random positive sq_mean per layer): this measures the pruning pass
(scores, k-th value per layer, the streamed copy), not calibration. Each round runs, one after the other:
`cp -r` of the checkpoint folder, then `multiflow prune --distribution FILE` (Step 3 only: the
distribution was computed once before the rounds) and `multiflow prune` (Step 1 computed inside), each
with the code under test and, with --baseline-src, with another source tree (e.g. the code before a
change: `git archive <commit> src | tar -x -C DIR`, then --baseline-src DIR/src), so that before/after
ratios are taken under the same load. Every command runs cold (the input files dropped from the page
cache with posix_fadvise(POSIX_FADV_DONTNEED), no root needed; the bytes still cached afterwards are
counted with mincore and reported) and warm (the input files read once just before). The output is
removed and `sync`ed between commands (not timed), so no command pays for the previous one's writeback.
The load of other processes is measured too (/proc/stat busy CPU seconds minus the command's own).

    python benchmarks/bench_prune.py --checkpoint /work/bench/llava-7b-hub-fp16 --scratch /work/bench/prune \\
        --baseline-src /work/bench/old/src --rounds 2
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import busy_cpu_seconds, git_rev, gnu_time  # noqa: E402
from bench_distribute import resident_bytes, run_child  # noqa: E402

from multiflow import api  # noqa: E402
from multiflow.models import inventory as layers  # noqa: E402
from multiflow.storage.stats_file import LayerStats, save_stats  # noqa: E402

CLI = "import sys; from multiflow.cli import main; sys.exit(main())"


def drop_from_cache(files: list[Path]) -> None:
    """Evict the files' clean pages from the page cache (no root: posix_fadvise on each file)."""
    os.sync()
    for path in files:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def warm_up(files: list[Path]) -> None:
    for path in files:
        with open(path, "rb", buffering=0) as f:
            while f.read(1 << 24):
                pass


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, required=True)
    parser.add_argument("--scratch", type=Path, required=True,
                        help="folder for stats, distribution and outputs (needs the checkpoint's size free)")
    parser.add_argument("--target", type=float, default=0.5)
    parser.add_argument("--method", default="multiflow")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--baseline-src", type=Path, help="another multiflow source tree (its src/ folder) to run "
                        "side by side, labelled 'before'")
    parser.add_argument("--results", type=Path, help="write every measurement here as JSON")
    args = parser.parse_args()

    args.scratch.mkdir(parents=True, exist_ok=True)
    inv = layers.from_checkpoint(args.checkpoint)
    g = torch.Generator().manual_seed(0)
    stats = {l.name: LayerStats(torch.rand(l.shape[1], generator=g) + 0.01, 1000) for l in inv.layers}
    stats_path = save_stats(args.scratch / "synthetic-stats.safetensors", stats, {"data": "synthetic"})
    dist_path = args.scratch / "distribution.json"
    api.compute_distribution(args.checkpoint, args.target, progress=False).save(dist_path)
    inputs = sorted(p for p in args.checkpoint.iterdir() if p.is_file())
    size = sum(p.stat().st_size for p in inputs)
    out = args.scratch / "out"
    here = Path(__file__).resolve().parents[1] / "src"
    sources = {"after": here, **({"before": args.baseline_src.resolve()} if args.baseline_src else {})}
    prune = ["prune", "--model", str(args.checkpoint), "--method", args.method, "--output", str(out), "--quiet"]
    if args.method != "magnitude":
        prune += ["--stats", str(stats_path)]
    commands = {"cp -r": (["cp", "-r", str(args.checkpoint), str(out)], None)}
    for label, src in sources.items():
        commands[f"prune --distribution ({label})"] = ([sys.executable, "-c", CLI, *prune, "--distribution",
                                                         str(dist_path)], src)
        commands[f"prune, Step 1 inside ({label})"] = ([sys.executable, "-c", CLI, *prune, "--target-sparsity",
                                                         str(args.target)], src)
    timer = gnu_time()
    rows = []
    for r in range(args.rounds):
        for cache in ("cold", "warm"):
            for name, (argv, src) in commands.items():
                shutil.rmtree(out, ignore_errors=True)
                os.sync()
                if cache == "cold":
                    drop_from_cache(inputs)
                else:
                    warm_up(inputs)
                cached = resident_bytes(inputs)
                env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", str(os.cpu_count())))
                if src is not None:
                    env["PYTHONPATH"] = str(src)
                saved = dict(os.environ)
                os.environ.update(env)  # run_child's command inherits this process's environment
                try:
                    busy0 = busy_cpu_seconds()
                    wall, rss, status, cpu = run_child(argv, args.scratch / "child.log", timer)
                    busy1 = busy_cpu_seconds()
                finally:
                    os.environ.clear()
                    os.environ.update(saved)
                if status:
                    sys.exit(f"{name} failed:\n{(args.scratch / 'child.log').read_text()[-3000:]}")
                others = None if busy0 is None else max(0.0, busy1 - busy0 - cpu)
                rows.append(dict(round=r + 1, cache=cache, command=name, wall=wall, cpu=cpu, rss_mb=rss,
                                 cached_mb=None if cached is None else cached / 2**20, others_cpu=others))
                print(f"round {r + 1} {cache:4s} {name:36s} {wall:7.2f} s  cpu {cpu:6.2f} s  rss {rss:6.0f} MB  "
                      f"other load {others if others is None else round(others / wall, 2)} cores", flush=True)
    shutil.rmtree(out, ignore_errors=True)

    print(f"\ncheckpoint {args.checkpoint}: {size / 1e9:.2f} GB in {len(inputs)} files, "
          f"{sum(l.numel for l in inv.layers):,} prunable weights in {len(inv.layers)} layers; target {args.target}, "
          f"--method {args.method}; code {git_rev(here.parent)}; {os.cpu_count()} cores")
    print("| command | cold s (median) | cold / cp | warm s (median) | warm / cp | CPU s (warm) | peak RSS MB | "
          "other load (cores) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    med = {}
    for name in commands:
        for cache in ("cold", "warm"):
            these = [x for x in rows if x["command"] == name and x["cache"] == cache]
            med[name, cache] = {k: statistics.median(x[k] for x in these) for k in ("wall", "cpu", "rss_mb")}
            load = [x["others_cpu"] / x["wall"] for x in these if x["others_cpu"] is not None]
            med[name, cache]["load"] = statistics.median(load) if load else None
    for name in commands:
        cold, warm = med[name, "cold"], med[name, "warm"]
        print(f"| {name} | {cold['wall']:.2f} | {cold['wall'] / med['cp -r', 'cold']['wall']:.2f} | "
              f"{warm['wall']:.2f} | {warm['wall'] / med['cp -r', 'warm']['wall']:.2f} | {warm['cpu']:.1f} | "
              f"{max(cold['rss_mb'], warm['rss_mb']):.0f} | {cold['load'] or 0:.2f} / {warm['load'] or 0:.2f} |")
    if args.results:
        args.results.parent.mkdir(parents=True, exist_ok=True)
        args.results.write_text(json.dumps({"checkpoint": str(args.checkpoint), "bytes": size,
                                            "code": git_rev(here.parent), "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
