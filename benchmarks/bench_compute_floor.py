#!/usr/bin/env python
"""How fast can Step 2 (calibration) of a LLaVA be on this CPU, whatever the code? The matrix-product floor.

    python benchmarks/bench_compute_floor.py --checkpoint /work/bench/llava-7b-hub-fp16 --nsamples 128

Calibration has to run every sample through every layer (the statistics are the inputs of every linear), so its
time is at least the FLOPs of that forward divided by the CPU's matrix-product speed. This script
1. counts the forward's FLOPs from the checkpoint's config.json: 2 x weights x tokens for every linear of the
   vision tower (all patches + CLS), projector (image tokens) and decoder (image + text tokens per sample), plus
   the attention products (2 x 2 x tokens^2 x hidden per layer); every vision layer counts (transformers runs
   them all), the lm_head is not needed and not counted;
2. measures the speed of `torch.nn.functional.linear` in float32 and bfloat16 on the decoder's MLP shape
   (tokens-per-sample x hidden by intermediate x hidden, the bulk of the FLOPs), best of --repeats, with the
   threads torch uses (OMP_NUM_THREADS);
3. prints the floor = FLOPs / speed for each dtype, and whether the CPU exposes AMX (the bf16 matrix units;
   without them bfloat16 products run on AVX-512 and can be slower than float32).
Results as JSON with --json.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def forward_flops(config: dict, text_tokens: int) -> dict[str, float]:
    """FLOPs of one sample's forward through the vision tower, projector and decoder (no lm_head)."""
    v, t = config["vision_config"], config["text_config"]
    patches = (v["image_size"] // v["patch_size"]) ** 2
    vis_tokens = patches + 1
    vh, vi, vl = v["hidden_size"], v["intermediate_size"], v["num_hidden_layers"]
    vision = vl * (2 * vis_tokens * (4 * vh * vh + 2 * vh * vi) + 4 * vis_tokens**2 * vh)
    th, ti, tl = t["hidden_size"], t["intermediate_size"], t["num_hidden_layers"]
    kv = th * t.get("num_key_value_heads", t["num_attention_heads"]) // t["num_attention_heads"]
    projector = 2 * patches * (vh * th + th * th)
    tokens = patches + text_tokens
    decoder = tl * (2 * tokens * (2 * th * th + 2 * th * kv + 3 * th * ti) + 4 * tokens**2 * th)
    return {"vision": vision, "projector": projector, "decoder": decoder, "tokens": tokens,
            "total": vision + projector + decoder}


def product_speed(dtype, m: int, k: int, n: int, repeats: int) -> float:
    """Best FLOP/s of an [m, k] x [k, n] product (a linear with an [n, k] weight)."""
    import torch

    torch.manual_seed(0)
    x, w = torch.randn(m, k).to(dtype), torch.randn(n, k).to(dtype)
    torch.nn.functional.linear(x, w)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        torch.nn.functional.linear(x, w)
        best = min(best, time.perf_counter() - t0)
    return 2 * m * k * n / best


def cpu_flags() -> set[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def main(argv: list[str] | None = None) -> int:
    import torch

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", type=Path, required=True, help="LLaVA folder with config.json")
    parser.add_argument("--nsamples", type=int, default=128, help="calibration samples (the seed's Step 2: 128)")
    parser.add_argument("--text-tokens", type=int, default=45,
                        help="text tokens per sample besides the image tokens (the bundled prompts: ~45)")
    parser.add_argument("--repeats", type=int, default=5, help="timed products per dtype (best is kept)")
    parser.add_argument("--json", type=Path, help="write the numbers here")
    args = parser.parse_args(argv)
    config = json.loads((args.checkpoint / "config.json").read_text())
    flops = forward_flops(config, args.text_tokens)
    t = config["text_config"]
    shape = (flops["tokens"], t["hidden_size"], t["intermediate_size"])
    flags = cpu_flags()
    result = {"checkpoint": str(args.checkpoint), "nsamples": args.nsamples, "tokens_per_sample": flops["tokens"],
              "tflop_per_sample": flops["total"] / 1e12, "tflop_total": flops["total"] * args.nsamples / 1e12,
              "torch_threads": torch.get_num_threads(), "amx": sorted(f for f in flags if f.startswith("amx")),
              "avx512_bf16": "avx512_bf16" in flags, "product_shape": shape, "dtypes": {}}
    print(f"{args.nsamples} samples x {flops['tokens']} tokens: {result['tflop_total']:.0f} TFLOP "
          f"(vision {flops['vision'] / flops['total']:.1%}, projector {flops['projector'] / flops['total']:.1%}, "
          f"decoder {flops['decoder'] / flops['total']:.1%}); AMX: {result['amx'] or 'not exposed'}; "
          f"{torch.get_num_threads()} torch threads")
    print("| dtype | GFLOP/s on the MLP product | floor for the forward (min) |\n|---|---:|---:|")
    for name, dtype in (("float32", torch.float32), ("bfloat16", torch.bfloat16)):
        speed = product_speed(dtype, *shape, args.repeats)
        floor = flops["total"] * args.nsamples / speed
        result["dtypes"][name] = {"gflops": speed / 1e9, "floor_minutes": floor / 60}
        print(f"| {name} | {speed / 1e9:.0f} | {floor / 60:.1f} |")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
