#!/usr/bin/env python
"""Benchmark Step 2 (`multiflow calibrate`): the statistics pass against a plain forward pass.

    python benchmarks/bench_calibrate.py                # float32, 32 samples, batches of 4
    python benchmarks/bench_calibrate.py --dtype bfloat16

The model is a LlavaForConditionalGeneration built from a config with seeded random
weights (nothing is downloaded): a CLIP ViT-B/16-shaped vision tower (hidden 768,
12 layers, MLP 3072, 224 px images, patch 16 -> 196 image tokens,
`vision_feature_layer=-2`) and a Llama decoder (by default hidden 1024, 12 layers,
MLP 2816, 16 heads), ~242 M parameters. The processor is the demo one
(`multiflow.demo.build_demo_processor`: character-level tokenizer, LLaVA-1.5 chat
template) with the image processor and patch size set to 224 px / 16.

Calibration batches: `--nsamples` bundled photos with their questions
(`load_samples(None, n, seed)`), prompts from `build_prompt(processor, q, None)`,
in batches of `--batch-size`, encoded once up front (encoding is not timed).

Time (one process, the same batches): after a warm-up of each variant (over the first
--warmup-batches batches, default 2), rounds of [plain, stats, split] passes over all batches:

  plain  `model(**inputs, use_cache=False)` under `torch.inference_mode()`;
  stats  the same inside `collect_statistics(model, names, aligned)` and one
         `collector.batch(attention_mask, image_positions)` per batch, hooks on every
         prunable layer (`multiflow.models.inventory.from_module(model)`), as `calibrate()` does;
  split  the same with `split_token_types=True`.

The ratio of a round is (stats seconds) / (plain seconds of the same round). Each pass
also records this process's CPU seconds and how many cores other processes kept busy
meanwhile (from /proc/stat); a round where that exceeds --disturbed-cores (0.1) in any
pass is "disturbed" and another round is added (up to --max-rounds), and the medians use
the undisturbed rounds when there are --repeats of them. Before each round the script
waits (up to --wait-quiet seconds, 300) until the others used < 0.1 cores over 3 s: with
torch's 2 threads on 2 cores, a tenth of a core taken by someone else already slows a
pass by several percent. Target: median ratio <= 1.15.

Memory, two ways:

1. peak RSS, one fresh child process per variant (this script with --mode): build the
   model, encode the batches, gc + malloc_trim, read VmRSS, reset the kernel's
   high-water mark (write "5" to /proc/self/clear_refs), run one pass over all batches,
   read VmHWM. The child's peak is VmHWM - VmRSS before the pass. The children run with
   glibc's mmap threshold fixed at 64 KiB (MALLOC_MMAP_THRESHOLD_=65536, which also turns
   off its dynamic growth), so every buffer above 64 KiB is mmap'ed and unmapped when
   freed and RSS follows the live bytes instead of what the heap happens to keep;
   `--malloc-default` runs them with glibc's defaults instead. By default the children are
   cold: the stats child's peak also holds what running the hooks' kernels for the first
   time costs (library code pages and buffers; ~1 MiB, once per process). With
   `--prewarm` every child (plain too) first runs one batch with split statistics, so
   that this one-time memory is in everyone's baseline.
2. peak live tensor bytes, in this process: one pass of each variant under
   `torch.profiler` with profile_memory=True; the peak is the largest "Total Allocated"
   of its [memory] events (bytes allocated through PyTorch's CPU allocator since the
   profiler started). Exact, and independent of malloc, but blind to non-tensor memory.

Size of the statistics: the bytes of every float64 vector the collector holds at the
end (per layer in_features * 8, times 3 for the layers split by token type).
Target: (peak of stats - peak of plain) / size of the statistics <= 2.

`--profile` adds a diagnosis: one plain and one stats/split pass under torch.profiler
(self CPU time per op, stats minus plain), the seconds spent inside the hooks, and how
often an input was read (`masked_square_sums`: the q/k/v and gate/up inputs are meant to be
read once, with all their masks).
"""

from __future__ import annotations

import argparse
import ctypes
import datetime as _dt
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import busy_cpu_seconds, fmt, git_rev, self_cpu_seconds  # noqa: E402

TARGETS = {"time_ratio": 1.15, "memory_ratio": 2.0}
VARIANTS = ("plain", "stats", "split")


# ---------------------------------------------------------------------------------------------------------------
# model, processor, batches


def build_processor(image_size: int, patch_size: int):
    from transformers import CLIPImageProcessor

    from multiflow.demo import build_demo_processor

    processor = build_demo_processor()
    processor.image_processor = CLIPImageProcessor(size={"shortest_edge": image_size},
                                                   crop_size={"height": image_size, "width": image_size})
    processor.patch_size = patch_size
    return processor


def build_model(args, processor):
    import torch
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    vision = CLIPVisionConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=args.vision_layers,
                              num_attention_heads=12, image_size=args.image_size, patch_size=args.patch_size)
    text = LlamaConfig(hidden_size=args.text_hidden, intermediate_size=args.text_intermediate,
                       num_hidden_layers=args.text_layers, num_attention_heads=args.text_heads,
                       num_key_value_heads=args.text_heads, vocab_size=len(processor.tokenizer),
                       max_position_embeddings=2048, pad_token_id=processor.tokenizer.pad_token_id)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_index=processor.image_token_id,
                         vision_feature_layer=-2, vision_feature_select_strategy="default",
                         image_seq_length=(args.image_size // args.patch_size) ** 2)
    torch.manual_seed(args.seed)
    model = LlavaForConditionalGeneration(config).eval()  # transformers' own seeded random init
    return model.to(getattr(torch, args.dtype))


def build_batches(args, processor, dtype):
    from multiflow.calibration.data import load_samples
    from multiflow.models.prompts import build_prompt

    samples, _ = load_samples(None, args.nsamples, args.seed)
    batches = []
    for i in range(0, len(samples), args.batch_size):
        chunk = samples[i : i + args.batch_size]
        prompts = [build_prompt(processor, s.question, None) for s in chunk]
        inputs = processor(images=[s.image for s in chunk], text=prompts, return_tensors="pt", padding=True)
        inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
        batches.append((inputs, inputs["input_ids"] == processor.image_token_id))
    expected = (args.image_size // args.patch_size) ** 2
    for inputs, image in batches:
        if not bool((image.sum(1) == expected).all()):
            raise SystemExit(f"processor inserted {image.sum(1).tolist()} image tokens, expected {expected} each")
    return samples, batches


class Setup:
    def __init__(self, args):
        import logging

        import torch

        from multiflow.models import inventory as layers

        logging.getLogger("multiflow").setLevel(logging.WARNING)
        self.torch = torch
        t0 = time.perf_counter()
        self.processor = build_processor(args.image_size, args.patch_size)
        self.model = build_model(args, self.processor)
        self.build_seconds = time.perf_counter() - t0
        inventory = layers.from_module(self.model)
        self.names = [layer.name for layer in inventory.layers]
        self.aligned = inventory.family.aligned_layers if inventory.family else None
        self.params = sum(p.numel() for p in self.model.parameters())
        self.prunable = sum(layer.numel for layer in inventory.layers)
        t0 = time.perf_counter()
        self.samples, self.batches = build_batches(args, self.processor, getattr(torch, args.dtype))
        self.encode_seconds = time.perf_counter() - t0
        self.tokens = sum(int(inputs["attention_mask"].sum()) for inputs, _ in self.batches)
        self.positions = sum(inputs["input_ids"].numel() for inputs, _ in self.batches)

    def run_pass(self, variant: str, batches=None):
        """One pass over the batches; returns the Collector (None for plain)."""
        from multiflow.calibration.statistics import collect_statistics

        torch, model = self.torch, self.model
        batches = self.batches if batches is None else batches
        if variant == "plain":
            with torch.inference_mode():
                for inputs, _ in batches:
                    model(**inputs, use_cache=False)
            return None
        with collect_statistics(model, self.names, self.aligned, variant == "split") as collector:
            for inputs, image in batches:  # as calibrate() does
                with collector.batch(inputs["attention_mask"], image), torch.inference_mode():
                    model(**inputs, use_cache=False)
        return collector


def stats_bytes(collector) -> int:
    total = 0
    for st in collector.layers.values():
        for rm in [st.all, *st.by_type.values()]:
            if rm.sq_sum is not None:
                total += rm.sq_sum.numel() * rm.sq_sum.element_size()
    return total


def check_collector(collector, variant: str, names: list[str]) -> None:
    silent = [n for n in names if not collector.layers[n].all.tokens]
    if silent:
        raise SystemExit(f"{variant}: {len(silent)} layer(s) got no statistics, e.g. {silent[0]}")


# ---------------------------------------------------------------------------------------------------------------
# process and machine measurements


def wait_quiet(max_wait: float, threshold: float, window: float = 3.0) -> tuple[float, float | None]:
    """Wait until other processes keep < threshold cores busy over `window` seconds, or max_wait passed.

    Returns (seconds waited, the last measured load of the others).
    """
    t0 = time.perf_counter()
    others = None
    while True:
        b0, s0 = busy_cpu_seconds(), self_cpu_seconds()
        time.sleep(window)
        b1, s1 = busy_cpu_seconds(), self_cpu_seconds()
        if b0 is None or b1 is None:
            return time.perf_counter() - t0, None
        others = max(0.0, (b1 - b0 - (s1 - s0)) / window)
        waited = time.perf_counter() - t0
        if others < threshold or waited >= max_wait:
            return waited, others


def proc_status_kb(key: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def reset_hwm() -> str | None:
    """Reset VmHWM to the current RSS; None on success, else why not."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError as exc:
        return f"cannot write /proc/self/clear_refs: {exc}"
    hwm, rss = proc_status_kb("VmHWM"), proc_status_kb("VmRSS")
    if hwm is None or rss is None or hwm > rss + 1024:
        return f"VmHWM {hwm} kB did not come down to VmRSS {rss} kB after clear_refs 5"
    return None


def malloc_trim() -> None:
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def mem_total() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def mib(n: float | None) -> str:
    return "—" if n is None else f"{n / 2**20:.2f}"


# ---------------------------------------------------------------------------------------------------------------
# child: peak RSS of one variant


def child_main(args) -> int:
    setup = Setup(args)
    if args.prewarm:  # first-use costs (kernel code pages, library buffers) of every variant, before measuring
        collector = setup.run_pass("split", setup.batches[:1])
        del collector
    gc.collect()
    malloc_trim()
    before = proc_status_kb("VmRSS")
    why = reset_hwm()
    busy0, self0, t0 = busy_cpu_seconds(), self_cpu_seconds(), time.perf_counter()
    collector = setup.run_pass(args.mode)
    seconds, cpu = time.perf_counter() - t0, self_cpu_seconds() - self0
    busy1 = busy_cpu_seconds()
    hwm, after = proc_status_kb("VmHWM"), proc_status_kb("VmRSS")
    if collector is not None:
        check_collector(collector, args.mode, setup.names)
    print(json.dumps({
        "mode": args.mode, "rss_before_kb": before, "hwm_kb": hwm, "rss_after_kb": after, "hwm_reset_error": why,
        "peak_above_before_kb": None if why or hwm is None or before is None else hwm - before,
        "stats_bytes": stats_bytes(collector) if collector is not None else 0, "seconds": seconds, "cpu": cpu,
        "other_cores": None if busy0 is None or busy1 is None else max(0.0, (busy1 - busy0 - cpu) / seconds),
        "malloc_mmap_threshold": os.environ.get("MALLOC_MMAP_THRESHOLD_"), "prewarm": args.prewarm,
    }))
    return 0


def run_child(args, mode: str, argv: list[str]) -> dict:
    env = dict(os.environ)
    if not args.malloc_default:
        env["MALLOC_MMAP_THRESHOLD_"] = "65536"
    else:
        env.pop("MALLOC_MMAP_THRESHOLD_", None)
    cmd = [sys.executable, str(Path(__file__).resolve()), *argv, "--mode", mode]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"child --mode {mode} exited {proc.returncode}:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------------------------------------------
# in-process: peak live tensor bytes, and the --profile diagnosis


def tensor_peak(setup: Setup, variant: str) -> tuple[int, int, int]:
    """(peak live tensor bytes above the start, bytes live at the end, size of the statistics) of one pass."""
    from torch.profiler import ProfilerActivity, profile

    gc.collect()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        collector = setup.run_pass(variant)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "trace.json"
        prof.export_chrome_trace(str(path))
        events = json.loads(path.read_text())["traceEvents"]
    totals = [e["args"]["Total Allocated"] for e in events
              if e.get("name") == "[memory]" and e.get("args", {}).get("Device Type") == 0]
    size = 0 if collector is None else stats_bytes(collector)
    del collector
    return (max(totals) if totals else 0), (totals[-1] if totals else 0), size


def profile_main(setup: Setup, args) -> None:
    """Where the hook time goes: per-op self CPU time (stats - plain), time inside hooks, square_sums calls."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    import multiflow.calibration.statistics as mstats

    batches = setup.batches[: args.profile_batches] if args.profile_batches else setup.batches
    counts = {"square_sums": 0, "hook_calls": 0, "hook_seconds": 0.0}
    orig_square_sums, orig_hook_for = mstats.masked_square_sums, mstats.Collector.hook_for

    def counted_square_sums(x, keeps):  # one call per input read (every mask of that input at once)
        counts["square_sums"] += 1
        return orig_square_sums(x, keeps)

    def timed_hook_for(self, name):
        hook = orig_hook_for(self, name)

        def wrapper(module, inputs):
            t0 = time.perf_counter()
            try:
                with torch.profiler.record_function("multiflow_hook"):
                    return hook(module, inputs)
            finally:
                counts["hook_seconds"] += time.perf_counter() - t0
                counts["hook_calls"] += 1

        return wrapper

    def ops(variant):
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            t0 = time.perf_counter()
            setup.run_pass(variant, batches)
            seconds = time.perf_counter() - t0
        table = {}
        for ev in prof.key_averages():
            table[ev.key] = (ev.self_cpu_time_total / 1e6, ev.count)
        return seconds, table

    print(f"\n## --profile: {len(batches)} batch(es), torch.profiler (self CPU seconds per op)\n", flush=True)
    ops("plain")  # the profiler's own first-use costs land here (thrown away)
    plain_s, plain_ops = ops("plain")
    mstats.masked_square_sums, mstats.Collector.hook_for = counted_square_sums, timed_hook_for
    try:
        for variant in ("stats", "split"):
            counts.update(square_sums=0, hook_calls=0, hook_seconds=0.0)
            t0 = time.perf_counter()
            setup.run_pass(variant, batches)  # timed, without the profiler
            wall = time.perf_counter() - t0
            hook_calls, square_calls, hook_s = counts["hook_calls"], counts["square_sums"], counts["hook_seconds"]
            var_s, var_ops = ops(variant)
            print(f"{variant}: {hook_calls} hook calls, {square_calls} square_sums calls "
                  f"({square_calls / max(1, len(batches)):.0f} per batch; hooked layers: {len(setup.names)}), "
                  f"{hook_s:.3f} s inside the hooks of a {wall:.3f} s pass without the profiler "
                  f"(plain pass under the profiler {plain_s:.3f} s, {variant} under the profiler {var_s:.3f} s)\n")
            rows = []
            for key, (sec, n) in var_ops.items():
                psec, pn = plain_ops.get(key, (0.0, 0))
                if abs(sec - psec) > 0.002 or n != pn:
                    rows.append((sec - psec, key, sec, n, psec, pn))
            rows.sort(reverse=True)
            print(f"| op | extra self CPU s | {variant} s | {variant} calls | plain s | plain calls |")
            print("|---|---:|---:|---:|---:|---:|")
            for diff, key, sec, n, psec, pn in rows[:16]:
                print(f"| {key} | {diff:+.3f} | {sec:.3f} | {n} | {psec:.3f} | {pn} |")
            print(flush=True)
    finally:
        mstats.masked_square_sums, mstats.Collector.hook_for = orig_square_sums, orig_hook_for


# ---------------------------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nsamples", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3, help="undisturbed timed rounds wanted (each: plain, stats, split)")
    ap.add_argument("--max-rounds", type=int, default=None, help="give up adding rounds after this many (repeats+2)")
    ap.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--text-hidden", type=int, default=1024)
    ap.add_argument("--text-layers", type=int, default=12)
    ap.add_argument("--text-intermediate", type=int, default=2816)
    ap.add_argument("--text-heads", type=int, default=16)
    ap.add_argument("--vision-layers", type=int, default=12)
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--patch-size", type=int, default=16)
    ap.add_argument("--warmup-batches", type=int, default=2, help="batches of each variant's warm-up pass (0: all)")
    ap.add_argument("--disturbed-cores", type=float, default=0.1,
                    help="a timed pass is disturbed when other processes kept more cores than this busy meanwhile")
    ap.add_argument("--wait-quiet", type=float, default=300,
                    help="before each round wait up to this many seconds for the others to go quiet (0: never)")
    ap.add_argument("--no-timing", action="store_true")
    ap.add_argument("--no-memory", action="store_true")
    ap.add_argument("--malloc-default", action="store_true", help="RSS children with glibc's default malloc settings")
    ap.add_argument("--prewarm", action="store_true",
                    help="RSS children first run one batch with split statistics (every child, plain too), so that "
                         "one-time first-use memory is in the baseline")
    ap.add_argument("--profile", action="store_true", help="also diagnose where the hook time goes")
    ap.add_argument("--profile-batches", type=int, default=2, help="batches for --profile (0: all)")
    ap.add_argument("--json", type=Path, help="write every number here")
    ap.add_argument("--mode", choices=VARIANTS, help=argparse.SUPPRESS)  # internal: one RSS child
    args = ap.parse_args(argv)
    if args.max_rounds is None:
        args.max_rounds = args.repeats + 2
    return args, [a for a in (argv if argv is not None else sys.argv[1:])]


def main(argv: list[str] | None = None) -> int:
    args, raw = parse_args(argv)
    if args.mode:
        return child_main(args)
    t_start = time.perf_counter()
    import torch
    import transformers

    setup = Setup(args)
    print(f"# multiflow calibrate benchmark, {_dt.datetime.now().isoformat(timespec='seconds')}")
    print(f"machine: {platform.node()}, {os.cpu_count()} CPUs, {fmt((mem_total() or 0) / 2**30, 1)} GiB; "
          f"python {platform.python_version()}, torch {torch.__version__} ({torch.get_num_threads()} threads), "
          f"transformers {transformers.__version__}; multiflow at {git_rev(Path(__file__).resolve().parents[1])}")
    print(f"model: LlavaForConditionalGeneration from a config, random weights (seed {args.seed}), {args.dtype}: "
          f"{setup.params:,} parameters ({setup.params / 1e6:.1f} M), {len(setup.names)} prunable linear layers "
          f"({setup.prunable / 1e6:.1f} M weights) hooked; built in {setup.build_seconds:.1f} s")
    lengths = [inputs["input_ids"].shape[1] for inputs, _ in setup.batches]
    print(f"data: {len(setup.samples)} bundled samples in {len(setup.batches)} batches of <= {args.batch_size}, "
          f"sequence lengths {min(lengths)}-{max(lengths)} (196 image tokens each), {setup.tokens} tokens "
          f"({setup.positions - setup.tokens} padding positions); encoded in {setup.encode_seconds:.1f} s (not timed)")
    print(f"load average at start: {' '.join(f'{x:.2f}' for x in os.getloadavg())}\n", flush=True)
    result: dict = {"args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                    "params": setup.params, "layers": len(setup.names), "tokens": setup.tokens}
    verdicts: list[tuple[str, str, str, str]] = []

    # ---- time ------------------------------------------------------------------------------------------------
    if not args.no_timing:
        print("## time: passes over all batches, one process (a warm-up of each variant, then rounds of plain, stats, "
              "split)\n", flush=True)
        warm = setup.batches[: args.warmup_batches] if args.warmup_batches else setup.batches
        for variant in VARIANTS:
            t0 = time.perf_counter()
            collector = setup.run_pass(variant, warm)
            if collector is not None:
                check_collector(collector, variant, setup.names)
            print(f"  warm-up {variant} ({len(warm)} batches): {time.perf_counter() - t0:.2f} s", flush=True)
        rounds: list[dict] = []
        while len(rounds) < args.max_rounds:
            if args.wait_quiet:
                waited, others = wait_quiet(args.wait_quiet, args.disturbed_cores)
                if waited > 2 * 3.0 + 1:
                    print(f"  (waited {waited:.0f} s for the other processes to go quiet; now {fmt(others)} cores)",
                          flush=True)
            rnd: dict = {}
            for variant in VARIANTS:
                gc.collect()
                busy0, self0, t0 = busy_cpu_seconds(), self_cpu_seconds(), time.perf_counter()
                setup.run_pass(variant)
                seconds, cpu = time.perf_counter() - t0, self_cpu_seconds() - self0
                busy1 = busy_cpu_seconds()
                others = None if busy0 is None or busy1 is None else max(0.0, (busy1 - busy0 - cpu) / seconds)
                rnd[variant] = {"seconds": seconds, "cpu": cpu, "other_cores": others}
            rnd["disturbed"] = any((rnd[v]["other_cores"] or 0) > args.disturbed_cores for v in VARIANTS)
            rounds.append(rnd)
            print(f"  round {len(rounds)}: " + ", ".join(
                f"{v} {rnd[v]['seconds']:.2f} s (CPU {rnd[v]['cpu']:.1f} s, others {fmt(rnd[v]['other_cores'])} "
                f"cores)" for v in VARIANTS) + ("  DISTURBED" if rnd["disturbed"] else ""), flush=True)
            if sum(not r["disturbed"] for r in rounds) >= args.repeats:
                break
        clean = [r for r in rounds if not r["disturbed"]]
        used = clean if len(clean) >= args.repeats else rounds
        disturbed_note = None if used is clean else (
            f"only {len(clean)} of {len(rounds)} rounds undisturbed: medians over all rounds, numbers unreliable")
        if disturbed_note:
            print(f"\n  WARNING: {disturbed_note}", flush=True)
        print("\n| round | plain s | stats s | split s | stats / plain | split / plain | CPU s plain / stats / split "
              "| other cores busy (max) | used |")
        print("|---|---:|---:|---:|---:|---:|---|---:|---|")
        for i, r in enumerate(rounds, 1):
            others = max((r[v]["other_cores"] or 0) for v in VARIANTS)
            print(f"| {i} | {r['plain']['seconds']:.2f} | {r['stats']['seconds']:.2f} | {r['split']['seconds']:.2f} | "
                  f"{r['stats']['seconds'] / r['plain']['seconds']:.3f} | "
                  f"{r['split']['seconds'] / r['plain']['seconds']:.3f} | "
                  f"{r['plain']['cpu']:.1f} / {r['stats']['cpu']:.1f} / {r['split']['cpu']:.1f} | {others:.2f} | "
                  f"{'yes' if r in used else 'no (disturbed)'} |")
        med = {v: statistics.median(r[v]["seconds"] for r in used) for v in VARIANTS}
        ratio = {v: statistics.median(r[v]["seconds"] / r["plain"]["seconds"] for r in used) for v in ("stats", "split")}
        print(f"| median ({len(used)} rounds) | {med['plain']:.2f} | {med['stats']:.2f} | {med['split']:.2f} | "
              f"{ratio['stats']:.3f} | {ratio['split']:.3f} | | | |")
        per_token = med["plain"] / setup.tokens * 1e3
        print(f"\nplain pass: {med['plain']:.2f} s for {setup.tokens} tokens ({per_token:.2f} ms/token); "
              f"median/median: stats {med['stats'] / med['plain']:.3f}, split {med['split'] / med['plain']:.3f}")
        for v, label in (("stats", "stats pass / plain pass (median of rounds)"),
                         ("split", "split_token_types pass / plain pass (median of rounds)")):
            verdicts.append((label, f"<= {TARGETS['time_ratio']}", f"{ratio[v]:.3f}",
                             ("PASS" if ratio[v] <= TARGETS["time_ratio"] else "FAIL")
                             + (" (disturbed)" if disturbed_note else "")))
        result["time"] = {"rounds": rounds, "median_seconds": med, "median_ratio": ratio, "note": disturbed_note}
        print(flush=True)

    # ---- memory ----------------------------------------------------------------------------------------------
    if not args.no_memory:
        print("## memory: one pass over all batches per variant\n", flush=True)
        tensor = {}
        for variant in VARIANTS:
            tensor[variant] = tensor_peak(setup, variant)
            print(f"  live tensor bytes, {variant}: peak {mib(tensor[variant][0])} MiB above the start, "
                  f"{mib(tensor[variant][1])} MiB at the end", flush=True)
        size = {v: tensor[v][2] for v in ("stats", "split")}
        del setup  # free this process's model before the children build theirs
        gc.collect()
        child_argv = [a for a in raw if a not in ("--profile",)]
        rss = {}
        for variant in VARIANTS:
            rss[variant] = run_child(args, variant, child_argv)
            r = rss[variant]
            print(f"  RSS child {variant}: VmRSS before the pass {r['rss_before_kb'] / 1024:.1f} MiB, VmHWM "
                  f"{r['hwm_kb'] / 1024:.1f} MiB, peak above before "
                  f"{fmt(None if r['peak_above_before_kb'] is None else r['peak_above_before_kb'] / 1024)} MiB, "
                  f"after {r['rss_after_kb'] / 1024:.1f} MiB ({r['seconds']:.1f} s, others {fmt(r['other_cores'])} "
                  f"cores)" + (f"  [{r['hwm_reset_error']}]" if r["hwm_reset_error"] else ""), flush=True)
        print(f"\nsize of the statistics: {size['stats']:,} B ({mib(size['stats'])} MiB) without split, "
              f"{size['split']:,} B ({mib(size['split'])} MiB) with split_token_types\n")
        print("| variant | size of statistics MiB | peak RSS above before MiB | extra vs plain MiB | "
              "extra / size | peak tensor bytes MiB | extra vs plain MiB | extra / size |")
        print("|---|---:|---:|---:|---:|---:|---:|---:|")
        mem_result = {"tensor_peak": tensor, "stats_bytes": size, "rss_children": rss, "prewarm": args.prewarm,
                      "malloc": "default" if args.malloc_default else "MALLOC_MMAP_THRESHOLD_=65536"}
        plain_rss = rss["plain"]["peak_above_before_kb"]
        for variant in VARIANTS:
            r = rss[variant]["peak_above_before_kb"]
            s = size.get(variant)
            extra_rss = None if r is None or plain_rss is None else (r - plain_rss) * 1024
            extra_t = tensor[variant][0] - tensor["plain"][0]
            cells = [variant, mib(s) if s else "—", mib(None if r is None else r * 1024),
                     mib(extra_rss) if s else "—", fmt(extra_rss / s) if s and extra_rss is not None else "—",
                     mib(tensor[variant][0]), mib(extra_t) if s else "—", fmt(extra_t / s) if s else "—"]
            print("| " + " | ".join(cells) + " |")
            if s:
                mem_result[variant] = {"extra_rss_bytes": extra_rss, "extra_tensor_bytes": extra_t,
                                       "rss_ratio": None if extra_rss is None else extra_rss / s,
                                       "tensor_ratio": extra_t / s}
                if extra_rss is not None:
                    verdicts.append((f"{variant}: (peak RSS - plain's) / size of statistics",
                                     f"<= {TARGETS['memory_ratio']}", f"{extra_rss / s:.2f}",
                                     "PASS" if extra_rss / s <= TARGETS["memory_ratio"] else "FAIL"))
                verdicts.append((f"{variant}: (peak tensor bytes - plain's) / size of statistics",
                                 f"<= {TARGETS['memory_ratio']}", f"{extra_t / s:.2f}",
                                 "PASS" if extra_t / s <= TARGETS["memory_ratio"] else "FAIL"))
        result["memory"] = mem_result
        print(flush=True)
        if args.profile:
            setup = Setup(args)

    if args.profile:
        profile_main(setup, args)

    if verdicts:
        print("| target | limit | measured | result |")
        print("|---|---|---:|---|")
        for v in verdicts:
            print("| " + " | ".join(v) + " |")
    print(f"\ntotal benchmark time {time.perf_counter() - t_start:.0f} s; load average at end: "
          f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    if args.json:
        result["verdicts"] = verdicts
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
