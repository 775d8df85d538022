#!/usr/bin/env python
"""multiflow against llm-compressor's Wanda and SparseGPT, side by side on one LLaVA checkpoint: time, memory, masks.

    . .venv/bin/activate
    # once: llm-compressor in its own venv (it pins transformers <= 5.17); see benchmarks/llmc_llava.py
    # a small LLaVA checkpoint with processor files (~100 M parameters; --make-size base: ~242 M)
    python benchmarks/bench_llmcompressor.py --make-model /work/bench/llava-small
    python benchmarks/bench_llmcompressor.py --model /work/bench/llava-small --nsamples 8 \\
        --results benchmarks/results/llmcompressor --repeats 3

Each measurement is one child process, run one after the other (never two at once), in this order in
every round (--repeats rounds):

  llmc          llm-compressor 0.14 `oneshot` + `WandaPruningModifier(sparsity, "0:0")` on the language
                model's linears (vision tower, projector and lm_head ignored, as its LLaVA example), sequential
                pipeline over LlamaDecoderLayer: `benchmarks/llmc_llava.py` run by --llmc-python;
  mf-wanda-lm   `multiflow run --method wanda --allocation uniform --group row --rules RULES`, RULES (written
                to --results) = vision tower and projector skipped, `^model\\.language_model\\.layers\\.` text:
                the same layers at the same sparsity;
  mf-wanda-lm-seq  the same with `--sequential` (each decoder layer calibrated on the pruned layers' outputs,
                as llm-compressor's default propagate_error=True);
  mf-multiflow  `multiflow run --method multiflow --allocation modality` (default rules: whole model);
  mf-wanda-all  `multiflow run --method wanda --allocation uniform --group row` (default rules: whole model).
  llmc-sparsegpt   llm-compressor's `SparseGPTModifier(sparsity, "0:0")` on the language model, as `llmc`;
  mf-sparsegpt-lm  `multiflow run --method sparsegpt --allocation uniform --group layer --rules RULES`: the same
                layers, one count per matrix as SparseGPT's (block by block, each calibrated on the pruned ones).

The SparseGPT pair runs only when `--runs` names it (each takes tens of minutes at 7B); its ratios are against
llmc-sparsegpt, and its masks are compared with llmc-sparsegpt's.

`--also-llmc-dense` adds `llmc-dense` (llm-compressor with propagate_error=False: every decoder layer is
calibrated on the dense model's activations, as multiflow's default single pass is). `--runs` picks a subset.

All runs see the same calibration inputs: `--nsamples` samples picked by `--seed` from `--data` (default:
what multiflow uses, i.e. the demo model's calibration split for the demo model, else the bundled photos),
prompts from `multiflow.models.prompts.build_prompt`, one sample per forward pass, the same `--dtype`.

Wall time: the child's whole life (import, load, calibrate, prune, save). Peak RSS: the child's own
maximum resident set size, GNU `/usr/bin/time -f %M` when there is GNU time, else ru_maxrss from `os.wait4`
(this process never imports torch, so the floor a fork or vfork inherits from it is a few tens of MiB;
`parent_maxrss_mib` in the JSON says how much). Also the child's CPU seconds, and how many cores other
processes kept busy meanwhile (from /proc/stat; a warning above 0.25 cores: on 2 cores that slows a run).

Masks (round 1, right after mf-wanda-lm, in a child process so that this one stays small): for every
language-model linear, the zero pattern of llm-compressor's output against multiflow's Wanda (language model):
the fraction of positions where both agree (pruned in both or kept in both; two independent 50% masks agree
on ~50%), overall and per decoder layer, and the share of multiflow's pruned weights that llm-compressor also
pruned; and per layer the sparsity of each output against the input (the same set of layers at the
target?). Outputs are written under --scratch and deleted once measured (--keep-outputs keeps them; at 7B
each is the checkpoint's size). What to expect:
llmc-dense and mf-wanda-lm compute the same scores (llm-compressor's per-feature sum of x^2 divided by the
number of samples is multiflow's mean over tokens times a constant) and agree on all but a handful of weights
(ties, float summation order); llmc feeds each decoder layer the pruned layers' outputs, so agreement falls
with depth (`--mf-extra=--sequential` gives multiflow the same behaviour, where `multiflow run` has it).

A 7B checkpoint (transformers layout with processor files): `--dtype bfloat16` (this CPU's bf16 matrix
products are ~5x its float16 and float32 ones); llm-compressor holds the whole model in memory in that dtype
(~14 GB at 7B) plus its activation cache, so float32 does not fit in 24 GiB.

Results: a markdown table on stdout, `results.json` (every run, every number, the commands, the machine)
and `table.md` under --results.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import re
import resource
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _common import busy_cpu_seconds, fmt, git_rev, gnu_time  # noqa: E402

REPO = HERE.parent
DEFAULT_LLMC_PYTHON = "/work/llmc-venv/bin/python"
LANGUAGE = re.compile(r"^model\.language_model\.layers\.(\d+)\.")
RULES_YAML = """\
# multiflow rules: llm-compressor's LLaVA scope (language-model decoder linears only)
modalities: [text]
rules:
  - {pattern: '^model\\.vision_tower\\.', group: skip, why: "llm-compressor ignore re:.*vision_tower.*"}
  - {pattern: '^model\\.multi_modal_projector\\.', group: skip,
     why: "llm-compressor ignore re:.*multi_modal_projector.*"}
  - {pattern: '^model\\.language_model\\.layers\\.', group: text}
"""
# name -> (tool, method, scope)
RUNS = {
    "llmc": ("llm-compressor", "Wanda", "language model"),
    "llmc-dense": ("llm-compressor", "Wanda, propagate_error=False", "language model"),
    "mf-wanda-lm": ("multiflow", "Wanda (uniform)", "language model"),
    "mf-wanda-lm-seq": ("multiflow", "Wanda (uniform), --sequential", "language model"),
    "mf-multiflow": ("multiflow", "MULTIFLOW (modality)", "whole model"),
    "mf-wanda-all": ("multiflow", "Wanda (uniform)", "whole model"),
    "llmc-sparsegpt": ("llm-compressor", "SparseGPT", "language model"),
    "mf-sparsegpt-lm": ("multiflow", "SparseGPT (uniform, group layer)", "language model"),
}
SPARSEGPT_RUNS = ("llmc-sparsegpt", "mf-sparsegpt-lm")
# multiflow's run -> the llm-compressor runs its masks are compared with (round 1, right after it)
COMPARED = {"mf-wanda-lm": ("llmc", "llmc-dense"), "mf-wanda-lm-seq": ("llmc", "llmc-dense"),
            "mf-sparsegpt-lm": ("llmc-sparsegpt",)}


def reference_run(name: str) -> str:
    """The llm-compressor run that `name`'s ratios are against."""
    return "llmc-sparsegpt" if name in SPARSEGPT_RUNS else "llmc"
SIZES = {  # --make-model presets for bench_calibrate.build_model (CLIP ViT-B/16-shaped tower, Llama decoder)
    "small": {"vision_layers": 6, "text_hidden": 768, "text_layers": 8, "text_intermediate": 2048, "text_heads": 12},
    "base": {"vision_layers": 12, "text_hidden": 1024, "text_layers": 12, "text_intermediate": 2816, "text_heads": 16},
}


# ---------------------------------------------------------------------------------------------------------------
# a small LLaVA checkpoint with processor files (imports torch: a mode of its own, not the benchmark's process)


def make_model(folder: Path, size: str, seed: int) -> None:
    from bench_calibrate import build_model, build_processor

    opts = argparse.Namespace(image_size=224, patch_size=16, seed=seed, dtype="float32", **SIZES[size])
    processor = build_processor(opts.image_size, opts.patch_size)
    model = build_model(opts, processor)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    n = sum(p.numel() for p in model.parameters())
    print(f"{folder}: LlavaForConditionalGeneration, {n:,} parameters ({size}: {SIZES[size]}), 224 px / patch 16, "
          f"seeded random weights (seed {seed}), float32, with processor files")


# ---------------------------------------------------------------------------------------------------------------
# mask comparison (a mode of its own: reads the outputs with multiflow + torch)


def compare_masks(original: Path, reference: Path, others: list[Path]) -> dict:
    """Zero patterns of every prunable linear: per-layer sparsity of each folder, agreement with `reference`.

    Reads tensor by tensor (multiflow's checkpoint reader), so memory stays flat whatever the model size.
    """
    from multiflow.models import inventory as layers

    def sparsities(folder: Path) -> dict[str, float]:
        inv = layers.from_checkpoint(folder)
        return {layer.name: float((w == 0).sum()) / w.numel() for layer, w in inv.read()}

    def pruned(sp: dict[str, float]) -> list[str]:  # layers with >= 1 point more zeros than the input
        return sorted(name for name, x in sp.items() if x > base.get(name, 0.0) + 0.01)

    base = sparsities(original)
    ref_inv = layers.from_checkpoint(reference)
    ref_lm = [layer for layer in ref_inv.layers if LANGUAGE.match(layer.name)]
    ref_sp = sparsities(reference)
    out = {"original": str(original), "reference": str(reference),
           "folders": {str(reference): {"pruned_layers": pruned(ref_sp)}},
           "per_layer_sparsity": {"original": base, str(reference): ref_sp}}
    for other in others:
        other_inv = layers.from_checkpoint(other)
        by_name = {layer.name: layer for layer in other_inv.layers}
        missing = [layer.name for layer in ref_lm if layer.name not in by_name]
        if missing:
            raise SystemExit(f"{other} has no layer {missing[0]} ({len(missing)} missing)")
        agree = both = ref_zero = total = 0
        per_block: dict[int, list[int]] = {}
        # both readers in lockstep, same order (a yielded tensor is valid until that reader's next one)
        pairs = zip(ref_inv.read(ref_lm), other_inv.read([by_name[layer.name] for layer in ref_lm]), strict=True)
        for (ref_layer, wr), (layer, w) in pairs:
            if ref_layer.name != layer.name or wr.shape != w.shape:
                raise SystemExit(f"{reference} and {other} disagree on {layer.name}: {wr.shape} vs {w.shape}")
            zr, zo = wr == 0, w == 0
            a, b, r = int((zr == zo).sum()), int((zr & zo).sum()), int(zr.sum())
            agree, both, ref_zero, total = agree + a, both + b, ref_zero + r, total + w.numel()
            block = per_block.setdefault(int(LANGUAGE.match(layer.name).group(1)), [0, 0])
            block[0] += a
            block[1] += w.numel()
        other_sp = sparsities(other)
        out["per_layer_sparsity"][str(other)] = other_sp
        out["folders"][str(other)] = {
            "pruned_layers": pruned(other_sp),
            "same_pruned_layers_as_reference": pruned(other_sp) == pruned(ref_sp),
            "agreement": agree / total if total else None,
            "reference_pruned_also_pruned": both / ref_zero if ref_zero else None,
            "language_weights": total,
            "agreement_per_block": {k: v[0] / v[1] for k, v in sorted(per_block.items())},
            "language_sparsity": {"reference": ref_zero / total if total else None,
                                  "other": sum(other_sp[x.name] * x.numel for x in ref_lm) / total if total else None},
            "max_abs_layer_sparsity_gap": max(abs(ref_sp[x.name] - other_sp[x.name]) for x in ref_lm),
        }
    return out


# ---------------------------------------------------------------------------------------------------------------
# children



def run_child(argv: list[str], log: Path, timer: str | None) -> dict:
    """Run argv (stdout+stderr to log); wall seconds, the child's peak RSS (MiB), CPU seconds, exit status."""
    stats = log.with_suffix(".time")
    full = [timer, "-f", "%M %U %S", "-o", str(stats), *argv] if timer else argv
    busy0 = busy_cpu_seconds()
    with open(log, "wb") as out:
        t0 = time.perf_counter()
        proc = subprocess.Popen(full, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
    busy1 = busy_cpu_seconds()
    proc.returncode = os.waitstatus_to_exitcode(status)  # already reaped: keep Popen from waiting again
    rss_kib, cpu, source = usage.ru_maxrss, usage.ru_utime + usage.ru_stime, "os.wait4 ru_maxrss"
    if timer:
        try:  # GNU time writes "Command exited with non-zero status N" first when the child fails
            kib, user, system = stats.read_text().strip().splitlines()[-1].split()
            rss_kib, cpu, source = int(kib), float(user) + float(system), "GNU time %M"
        except (OSError, ValueError, IndexError):
            pass
    others = None if busy0 is None or busy1 is None else max(0.0, (busy1 - busy0 - cpu) / wall)
    return {"wall_s": round(wall, 3), "peak_rss_mib": round(rss_kib / 1024, 1), "cpu_s": round(cpu, 2),
            "other_cores": None if others is None else round(others, 3), "rss_source": source,
            "exit_status": proc.returncode}


def last_json(log: Path) -> dict | None:
    for line in reversed(log.read_text(errors="replace").splitlines()):
        if line.startswith("{"):
            try:
                return json.loads(line)
            except ValueError:
                return None
    return None


def command(name: str, args, out: Path, rules: Path) -> list[str]:
    common = ["--nsamples", str(args.nsamples), "--seed", str(args.seed), "--dtype", args.dtype]
    if args.data:
        common += ["--data", str(args.data)]
    if name.startswith("llmc"):
        cmd = [args.llmc_python, str(HERE / "llmc_llava.py"), "--model", str(args.model), "--output", str(out),
               "--sparsity", str(args.sparsity), *common]
        cmd += ["--method", "sparsegpt"] if name == "llmc-sparsegpt" else []
        return cmd + (["--no-propagate"] if name == "llmc-dense" else []) + shlex.split(args.llmc_extra)
    exe = Path(sys.executable).parent / "multiflow"
    mf = [str(exe)] if exe.is_file() else [sys.executable, "-m", "multiflow.cli"]
    mf += ["run", "--model", str(args.model), "--output", str(out),
          "--target-sparsity", str(args.sparsity), *common, "--quiet"]
    if name.startswith("mf-wanda-lm"):
        mf += ["--method", "wanda", "--allocation", "uniform", "--group", args.wanda_group, "--rules", str(rules)]
        mf += ["--sequential"] if name == "mf-wanda-lm-seq" else []
    elif name == "mf-multiflow":
        mf += ["--method", "multiflow", "--allocation", "modality"]
    elif name == "mf-wanda-all":
        mf += ["--method", "wanda", "--allocation", "uniform", "--group", args.wanda_group]
    elif name == "mf-sparsegpt-lm":
        mf += ["--method", "sparsegpt", "--allocation", "uniform", "--group", "layer", "--rules", str(rules)]
    return mf + shlex.split(args.mf_extra)


def achieved(name: str, out: Path, log: Path) -> dict:
    """What the run itself says it pruned."""
    if name.startswith("llmc"):
        j = last_json(log) or {}
        keep = ("oneshot_s", "load_s", "inputs_s", "save_s", "language_sparsity", "language_layers", "other_sparsity",
                "tokens", "nsamples", "data", "versions")
        return {k: j.get(k) for k in keep}
    try:
        r = json.loads((out / "multiflow_report.json").read_text())
    except (OSError, ValueError):
        return {}
    total = r.get("global") or {}
    return {"global_sparsity": total.get("achieved_sparsity"), "global_layers": total.get("layers"),
            "modalities": {m: v.get("achieved_sparsity") for m, v in (r.get("modalities") or {}).items()},
            "timings": r.get("timings"), "calibration": r.get("calibration")}


def own_seconds(rec: dict) -> float | None:
    """The tool's own timer: llm-compressor's oneshot call; multiflow's distribute + calibrate + prune."""
    if rec["run"].startswith("llmc"):
        return rec.get("oneshot_s")
    t = rec.get("timings") or {}
    parts = [t.get(k) for k in ("distribute_seconds", "plan_seconds", "calibrate_seconds", "prune_seconds")]
    return sum(x for x in parts if x) if any(x is not None for x in parts) else None


def wait_quiet(max_wait: float, threshold: float = 0.25, window: float = 3.0) -> tuple[float, float | None]:
    """Wait (up to max_wait s) until other processes keep < threshold cores busy over `window` s; (waited, cores)."""
    t0, cores = time.perf_counter(), None
    while True:
        b0 = busy_cpu_seconds()
        time.sleep(window)
        b1 = busy_cpu_seconds()
        if b0 is None or b1 is None:
            return time.perf_counter() - t0, None
        cores = (b1 - b0) / window
        if cores < threshold or time.perf_counter() - t0 >= max_wait:
            return time.perf_counter() - t0, cores


# ---------------------------------------------------------------------------------------------------------------


def compare(args, logs: Path, timer: str | None, outs: dict[str, Path], mine: str = "mf-wanda-lm") -> dict:
    """Round 1's masks: `mine` (a key of COMPARED) against its llm-compressor runs that ran, in a child process
    (torch stays out of this one)."""
    others = [r for r in COMPARED[mine] if r in outs]
    log = logs / f"compare-masks-{mine}.log"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--compare-masks", str(args.model), str(outs[mine]),
           *(str(outs[r]) for r in others)]
    res = run_child(cmd, log, timer)
    masks = last_json(log) if not res["exit_status"] else None
    if masks is None:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-25:])
        sys.exit(f"mask comparison failed (exit {res['exit_status']}); {log} ends:\n{tail}")
    masks["by_run"] = {r: masks["folders"][str(outs[r])] for r in others}
    masks["compare_wall_s"], masks["compare_peak_rss_mib"] = res["wall_s"], res["peak_rss_mib"]
    for r, m in masks["by_run"].items():
        print(f"masks, {r} vs {mine}: agree on {m['agreement']:.6f} of {m['language_weights']:,} "
              f"language-model weights; {m['reference_pruned_also_pruned']:.6f} of multiflow's pruned weights also "
              f"pruned by {r}; same pruned layers: {m['same_pruned_layers_as_reference']}; per decoder layer "
              f"{min(m['agreement_per_block'].values()):.4f}-{max(m['agreement_per_block'].values()):.4f}", flush=True)
    return masks


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, help="LLaVA checkpoint folder (transformers layout, with processor files)")
    p.add_argument("--results", type=Path, help="folder for results.json, table.md, the rules file and the "
                   "children's logs (required to benchmark)")
    p.add_argument("--scratch", type=Path, help="parent folder for the pruned outputs (default: the system's temporary "
                   "folder); needs the checkpoint's size free twice (three times with llmc-dense), every output with "
                   "--keep-outputs")
    p.add_argument("--repeats", type=int, default=1, help="rounds of all runs, alternating (default 1); the table "
                   "shows medians")
    p.add_argument("--runs", nargs="+", choices=list(RUNS), metavar="RUN",
                   help=f"which runs, of {', '.join(RUNS)} (default: all but llmc-dense and the SparseGPT pair)")
    p.add_argument("--also-llmc-dense", action="store_true", help="add llmc-dense: llm-compressor with "
                   "propagate_error=False (dense activations for every decoder layer, as multiflow's single pass)")
    p.add_argument("--sparsity", type=float, default=0.5, help="target sparsity of every run (default 0.5)")
    p.add_argument("--nsamples", type=int, default=128, help="calibration samples (default 128)")
    p.add_argument("--seed", type=int, default=0, help="which samples, in which order (default 0)")
    p.add_argument("--data", type=Path, help="calibration data (multiflow's --data formats; default: multiflow's "
                   "default, passed to every run explicitly)")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32",
                   help="dtype every run loads and runs the model in (default float32); llm-compressor also SAVES "
                        "in it, multiflow keeps the checkpoint's dtype")
    p.add_argument("--wanda-group", choices=("row", "layer"), default="row", help="multiflow's --group for its Wanda "
                   "runs: row (default) is Wanda's and llm-compressor's choice (k lowest per output row); layer is "
                   "multiflow's default (one threshold per matrix)")
    p.add_argument("--llmc-python", default=DEFAULT_LLMC_PYTHON, help="python of the llm-compressor venv "
                   f"(default {DEFAULT_LLMC_PYTHON})")
    p.add_argument("--llmc-extra", default="", help="extra arguments for llmc_llava.py (one string)")
    p.add_argument("--mf-extra", default="", help="extra arguments for every `multiflow run` (one string, e.g. "
                   "'--sequential' or '--batch-size 4')")
    p.add_argument("--wait-quiet", type=float, default=120, help="before each run, wait up to this many seconds "
                   "for other processes to keep < 0.25 cores busy over 3 s (default 120; 0: never wait)")
    p.add_argument("--keep-outputs", action="store_true", help="keep every pruned output under --scratch")
    p.add_argument("--make-model", type=Path, metavar="FOLDER", help="only write a small LLaVA checkpoint with "
                   "processor files to FOLDER (seeded random weights) and exit")
    p.add_argument("--make-size", choices=list(SIZES), default="small", help="--make-model size: small ~100 M "
                   "parameters (6 CLIP layers, 8 Llama layers of 768), base ~242 M (bench_calibrate's model)")
    p.add_argument("--compare-masks", nargs="+", type=Path, metavar="FOLDER", help=argparse.SUPPRESS)  # internal
    args = p.parse_args(argv)
    if args.make_model is None and args.compare_masks is None and args.model is None:
        p.error("--model is required (or --make-model FOLDER)")
    if args.make_model is None and args.compare_masks is None and args.results is None:
        p.error("--results DIR is required")
    if args.runs is None:
        args.runs = [r for r in RUNS if r not in SPARSEGPT_RUNS and (r != "llmc-dense" or args.also_llmc_dense)]
    elif args.also_llmc_dense and "llmc-dense" not in args.runs:
        args.runs.insert(1, "llmc-dense")
    args.runs = [r for r in RUNS if r in args.runs]  # fixed order: llm-compressor first
    if args.repeats < 1 or args.nsamples < 1 or not 0 < args.sparsity < 1:
        p.error("--repeats and --nsamples must be >= 1 and --sparsity in (0, 1)")
    return args


def default_data(model: Path) -> Path | None:
    """multiflow's default (cli._calibration_data: demo_split / is_demo) without importing it: importing multiflow
    imports torch, and this process stays small so that no child inherits its memory."""
    demo = REPO / "src" / "multiflow" / "demo_model"
    split = REPO / "src" / "multiflow" / "demo_data" / "calibration.jsonl"
    try:
        is_demo = model.resolve() == demo.resolve() or model.name == "random-tiny-llava-v2"
    except OSError:
        is_demo = False
    return split if is_demo and split.is_file() else None


def table(summary: list[dict], wanda_group: str) -> str:
    by_run = {s["run"]: s for s in summary}
    lines = ["| run | tool | method | scope | wall s | of which own timer s | peak RSS GiB | CPU s "
             "| achieved sparsity | wall / llm-compressor | RSS / llm-compressor |",
             "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for s in summary:
        tool, method, scope = RUNS[s["run"]]
        if s["run"] in ("mf-wanda-lm", "mf-wanda-all"):
            method += f", group {wanda_group}"
        wall = fmt(s["wall_s"], 1)
        if len(s["walls"]) > 1:
            wall += f" ({fmt(min(s['walls']), 1)}-{fmt(max(s['walls']), 1)})"
        ref = by_run.get(reference_run(s["run"]))
        ratio = fmt(s["wall_s"] / ref["wall_s"]) if ref else "—"
        rss_ratio = fmt(s["peak_rss_mib"] / ref["peak_rss_mib"]) if ref else "—"
        lines.append(f"| {s['run']} | {tool} | {method} | {scope} | {wall} | {fmt(s['own_s'], 1)} | "
                     f"{fmt(s['peak_rss_mib'] / 1024, 2)} | "
                     f"{fmt(s['cpu_s'], 1)} | {fmt(s['sparsity'], 4)} | {ratio} | {rss_ratio} |")
    lines.append("")
    lines.append("wall s: the child process's whole life (median over rounds; range when more than one). Own timer: "
                 "llm-compressor: the `oneshot` call (tracing, calibration, pruning; no load, no save); multiflow: "
                 "distribute + calibrate + prune seconds of multiflow_report.json (prune includes writing the "
                 "output). Peak RSS: max over rounds. Achieved sparsity: llm-compressor: zeros of the language-model "
                 "linears; multiflow: its report's global figure over the layers in scope.")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.make_model is not None:
        make_model(args.make_model, args.make_size, args.seed)
        return 0
    if args.compare_masks is not None:
        original, reference, *others = args.compare_masks
        print(json.dumps(compare_masks(original, reference, others)))
        return 0

    if not args.model.joinpath("config.json").is_file():
        sys.exit(f"--model {args.model}: no config.json")
    if any(r.startswith("llmc") for r in args.runs) and not os.access(args.llmc_python, os.X_OK):
        sys.exit(f"--llmc-python {args.llmc_python}: not found (set up the venv: see benchmarks/llmc_llava.py)")
    args.model = args.model.resolve()
    if args.data is None:
        args.data = default_data(args.model)
    results = args.results.resolve()
    logs = results / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    rules = results / "language_model_rules.yaml"
    rules.write_text(RULES_YAML)
    if args.scratch:
        args.scratch.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix="bench-llmc-", dir=args.scratch))
    timer = gnu_time()
    print(f"model {args.model}; {args.nsamples} samples (seed {args.seed}) from {args.data or 'the bundled photos'}; "
          f"{args.dtype}; sparsity {args.sparsity}; runs {' '.join(args.runs)}; {args.repeats} round(s); "
          f"peak RSS from {'GNU time' if timer else 'os.wait4'}; outputs under {scratch}", flush=True)

    records, masks = [], {}
    try:
        for rnd in range(1, args.repeats + 1):
            outs: dict[str, Path] = {}
            for name in args.runs:
                out = scratch / f"{name}-r{rnd}"
                shutil.rmtree(out, ignore_errors=True)
                cmd = command(name, args, out, rules)
                log = logs / f"{name}-r{rnd}.log"
                waited, quiet = wait_quiet(args.wait_quiet) if args.wait_quiet > 0 else (0.0, None)
                if quiet is not None and quiet >= .25:
                    print(f"[round {rnd}] {name}: others still keep {quiet:.2f} cores busy after {waited:.0f} s; "
                          "running anyway", flush=True)
                res = run_child(cmd, log, timer)
                rec = {"run": name, "round": rnd, **res, "command": shlex.join(cmd), "log": str(log),
                       **achieved(name, out, log)}
                records.append(rec)
                sp = rec.get("language_sparsity") if name.startswith("llmc") else rec.get("global_sparsity")
                busy = res["other_cores"] or 0
                warn = f"  WARNING: others kept {busy:.2f} cores busy" if busy > .25 else ""
                print(f"[round {rnd}] {name}: {res['wall_s']:.1f} s, peak RSS {res['peak_rss_mib']:.0f} MiB, "
                      f"CPU {res['cpu_s']:.1f} s, sparsity {fmt(sp, 4)}, exit {res['exit_status']}{warn}", flush=True)
                if res["exit_status"]:
                    tail = "\n".join(log.read_text(errors="replace").splitlines()[-25:])
                    sys.exit(f"{name} failed (exit {res['exit_status']}); {log} ends:\n{tail}")
                outs[name] = out
                if rnd == 1 and name in COMPARED and any(r in outs for r in COMPARED[name]):
                    masks[name] = compare(args, logs, timer, outs, name)  # right away: at 7B an output is ~14 GB
                if not args.keep_outputs:  # delete every output no later comparison needs
                    waiting = {o for r in args.runs if rnd == 1 and r in COMPARED and r not in outs
                               for o in COMPARED[r]}
                    for r, folder in outs.items():
                        if r not in waiting:
                            shutil.rmtree(folder, ignore_errors=True)
    finally:
        if not args.keep_outputs:
            shutil.rmtree(scratch, ignore_errors=True)

    summary = []
    for name in args.runs:
        rs = [r for r in records if r["run"] == name]
        sp = [r.get("language_sparsity") if name.startswith("llmc") else r.get("global_sparsity") for r in rs]
        summary.append({"run": name, "walls": [r["wall_s"] for r in rs],
                        "wall_s": statistics.median(r["wall_s"] for r in rs),
                        "peak_rss_mib": max(r["peak_rss_mib"] for r in rs),
                        "cpu_s": statistics.median(r["cpu_s"] for r in rs), "sparsity": sp[0],
                        "own_s": statistics.median(own_seconds(r) for r in rs) if all(own_seconds(r) is not None
                                                                                      for r in rs) else None})
    md = table(summary, args.wanda_group)
    for mine, compared in masks.items():
        for r, m in compared["by_run"].items():
            md += (f"\nMasks, {r} vs {mine} (round 1): agree on {m['agreement']:.4%} of "
                   f"{m['language_weights']:,} language-model weights ({m['reference_pruned_also_pruned']:.4%} of "
                   f"multiflow's pruned weights also pruned by llm-compressor); per decoder layer "
                   f"{min(m['agreement_per_block'].values()):.4%}-{max(m['agreement_per_block'].values()):.4%}; "
                   f"same set of pruned layers: {'yes' if m['same_pruned_layers_as_reference'] else 'NO'} "
                   f"({len(m['pruned_layers'])} layers).\n")
    disturbed = [r for r in records if (r["other_cores"] or 0) > .25]
    if disturbed:
        md += f"\nWARNING: {len(disturbed)} run(s) shared the CPUs with other processes (> 0.25 cores busy).\n"
    print()
    print(md)
    (results / "table.md").write_text(md)
    payload = {
        "benchmark": "bench_llmcompressor", "date": _dt.datetime.now().isoformat(timespec="seconds"),
        "multiflow_rev": git_rev(REPO), "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                                                   "python": platform.python_version()},
        "model": str(args.model), "sparsity": args.sparsity, "nsamples": args.nsamples, "seed": args.seed,
        "data": str(args.data) if args.data else None, "dtype": args.dtype, "wanda_group": args.wanda_group,
        "repeats": args.repeats, "rules_file": RULES_YAML, "rss_source": "GNU time %M" if timer else "os.wait4",
        "parent_maxrss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "summary": summary, "runs": records, "masks": masks,
    }
    (results / "results.json").write_text(json.dumps(payload, indent=2) + "\n")
    print(f"wrote {results / 'results.json'} and {results / 'table.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
