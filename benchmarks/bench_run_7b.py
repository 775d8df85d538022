#!/usr/bin/env python
"""Benchmark `multiflow run` end to end on the LLaVA-1.5-7B-shaped checkpoint: wall time per stage, peak RSS.

    python benchmarks/make_llava7b_checkpoint.py /work/bench/llava-7b-hub-fp16   # once: 14 GB + processor files
    python benchmarks/bench_run_7b.py --checkpoint /work/bench/llava-7b-hub-fp16 --scratch /work/bench/run-out
    python benchmarks/bench_run_7b.py ... --variant fp32 --variant bf16 --variant fp32-sequential

Each variant runs `multiflow run CHECKPOINT --target-sparsity 0.5 --nsamples 8` (the bundled photos as
calibration data, block by block: the default) as a child process; this script waits for it with
`os.wait4` and reports the child's own peak RSS (`ru_maxrss`), its wall time, and the per-stage seconds
that `multiflow run` writes to `multiflow_report.json` ("timings": Step 1 distribute, Step 2 calibrate,
Step 3 prune = masks + writing the copy). The pruned copy is deleted after each variant (14 GB).
`--check-load` first checks that the copy would load (`check_output`): its keys and shapes against
transformers' LlavaForConditionalGeneration built on the meta device from the copy's config.json, dtypes
against the input, and a spot check of a few tensors (a pruned one: as many zeros as the report's pruned
count, and without a weight update every weight kept unchanged or zeroed; one left dense: byte-identical). A 13B-shaped checkpoint
(`make_llava7b_checkpoint.py --size 13b`, 26.7 GB) goes through the same script.
Results: a markdown table on stdout and JSON under --results. On a GPU machine,
`benchmarks/gpu_7b.sh` makes the checkpoint and runs this with `--device cuda` (peak GPU memory of
Step 2 comes from `torch.cuda.max_memory_allocated`).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _common import git_rev  # noqa: E402

VARIANTS = {
    "fp32": ["--dtype", "float32"],
    "fp16": ["--dtype", "float16"],
    "bf16": ["--dtype", "bfloat16"],
    "fp32-sequential": ["--dtype", "float32", "--sequential"],
    "bf16-sequential": ["--dtype", "bfloat16", "--sequential"],
}


def run_variant(args, name: str) -> dict:
    out = Path(args.scratch) / f"pruned-{name}"
    if out.exists():
        shutil.rmtree(out)
    cmd = [sys.executable, "-m", "multiflow.cli", "--log-level", "WARNING", "run", "--model", str(args.checkpoint),
           "--output", str(out), "--target-sparsity", str(args.sparsity), "--nsamples", str(args.nsamples),
           "--method", args.method, "--device", args.device, *VARIANTS[name]]
    print("$ " + " ".join(cmd), flush=True)
    started = time.perf_counter()
    child = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             env=dict(os.environ, HF_HUB_OFFLINE="1"))
    log_lines = child.stdout.read().splitlines()
    _, status, usage = os.wait4(child.pid, 0)
    wall = time.perf_counter() - started
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        print("\n".join(log_lines[-30:]))
        raise SystemExit(f"variant {name} failed with exit code {code}")
    report = json.loads((out / "multiflow_report.json").read_text())
    result = {"variant": name, "command": " ".join(cmd), "wall_seconds": round(wall, 1),
              "peak_rss_gib": round(usage.ru_maxrss / 2**20, 2), "timings": report["timings"],
              "execution": report["calibration"]["execution"], "achieved_sparsity": report["global"]["achieved_sparsity"],
              "device": report["calibration"].get("device"),
              "peak_device_memory_gib": report["calibration"].get("peak_device_memory_gib")}
    if args.check_load:
        result["load_check"] = check_output(Path(args.checkpoint), out, report)
        print(f"load check: {result['load_check']}", flush=True)
    shutil.rmtree(out)
    return result


def _signature(name: str) -> tuple[bool, str]:
    """A layer's identity across namings: (in the vision tower?, its last four dotted parts), e.g.
    `language_model.model.layers.3.mlp.down_proj` and `model.language_model.layers.3.mlp.down_proj` match."""
    name = name.removesuffix(".weight")
    return "vision" in name, ".".join(name.split(".")[-4:])


def check_output(checkpoint: Path, out: Path, report: dict) -> dict:
    """Would the pruned copy load? Keys/shapes against transformers on the meta device, dtypes against the
    input, and a spot check of tensors (see the module docstring). Raises SystemExit on a mismatch."""
    from make_llava7b_checkpoint import compare_specs, transformers_specs

    from multiflow.storage.checkpoint import list_tensors, read_config, read_tensor

    started = time.perf_counter()
    before = {e.key: e for e in list_tensors(checkpoint)}
    after = {e.key: e for e in list_tensors(out)}
    diff = compare_specs({k: tuple(e.shape) for k, e in after.items()}, transformers_specs(read_config(out)))
    if diff:
        raise SystemExit(f"{out}: keys/shapes differ from transformers' model: {diff}")
    wrong_dtype = [k for k, e in after.items() if k not in before or e.dtype != before[k].dtype]
    if wrong_dtype:
        raise SystemExit(f"{out}: {len(wrong_dtype)} tensors missing from the input or of another dtype, "
                         f"e.g. {wrong_dtype[0]}")
    pruned = {_signature(name): layer["pruned"] for name, layer in report["layers"].items()}
    layers = sorted(k for k in after if k.endswith("_proj.weight") and ".layers." in k and "vision" not in k)
    spots = [layers[0], layers[-1], next(k for k in after if "vision" in k and k.endswith("fc1.weight")),
             next(k for k in after if k.endswith("embed_tokens.weight"))]
    checked = {}
    for key in spots:
        w0, w1 = read_tensor(before[key]), read_tensor(after[key])
        expect = pruned.get(_signature(key))
        if expect is None:  # left dense: the very bytes of the input
            if not torch.equal(w0.view(torch.uint8), w1.view(torch.uint8)):
                raise SystemExit(f"{out}: {key} is not pruned but differs from the input")
            checked[key] = "dense, byte-identical"
            continue
        if report.get("update") in (None, "none") and not bool(((w1 == w0) | (w1 == 0)).all()):
            raise SystemExit(f"{out}: {key} has weights that are neither the input's nor zero")
        zeros, zeros_before = int((w1 == 0).sum()), int((w0 == 0).sum())
        if not zeros - zeros_before <= expect <= zeros:
            raise SystemExit(f"{out}: {key} has {zeros} zeros ({zeros_before} in the input), the report says "
                             f"{expect} pruned")
        checked[key] = f"{zeros:,} zeros, report {expect:,} pruned"
    return {"tensors": len(after), "spot_checks": checked, "seconds": round(time.perf_counter() - started, 1)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--checkpoint", type=Path, required=True, help="the 7B-shaped folder (make_llava7b_checkpoint.py)")
    ap.add_argument("--scratch", type=Path, required=True, help="where the pruned copies go (needs ~15 GB free)")
    ap.add_argument("--variant", action="append", choices=sorted(VARIANTS),
                    help="what to run (repeatable; default fp32): dtype, and one pass or --sequential")
    ap.add_argument("--nsamples", type=int, default=8, help="calibration samples (default 8)")
    ap.add_argument("--device", default="cpu", help="--device of multiflow run: cpu (default) or cuda")
    ap.add_argument("--sparsity", type=float, default=0.5, help="target sparsity (default 0.5)")
    ap.add_argument("--method", default="multiflow", help="--method of multiflow run (default multiflow)")
    ap.add_argument("--check-load", action="store_true",
                    help="before deleting each pruned copy, check that it would load (see the docstring)")
    ap.add_argument("--results", type=Path, default=Path(__file__).parent / "results" / "run_7b",
                    help="folder for results.json")
    args = ap.parse_args(argv)
    args.scratch.mkdir(parents=True, exist_ok=True)
    rows = [run_variant(args, v) for v in (args.variant or ["fp32"])]
    print("\n| variant | device | wall s | Step 1 s | Step 2 s | Step 3 s | peak RSS GiB | peak GPU GiB | calibration |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---|")
    for r in rows:
        t = r["timings"]
        print(f"| {r['variant']} | {r['device']} | {r['wall_seconds']:.0f} | {t['distribute_seconds']:.0f} | "
              f"{t['calibrate_seconds'] + t.get('sequential_plan_seconds', 0):.0f} | {t['prune_seconds']:.0f} | "
              f"{r['peak_rss_gib']:.2f} | {r['peak_device_memory_gib'] or '-'} | {r['execution']} |")
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / "results.json").write_text(json.dumps(
        {"git": git_rev(Path(__file__).parent.parent), "machine": f"{platform.node()} {os.cpu_count()} cpus",
         "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
