"""llm-compressor's SparseGPT and Wanda beside multiflow's on SmolLM2-135M-Instruct: same model, same data, same eval.

    # once: llm-compressor in its own venv, recipe in benchmarks/llmc_llava.py (/work/llmc-venv)
    HF_HUB_OFFLINE=1 OMP_NUM_THREADS=2 .venv/bin/python -m experiments.smollm2.bench_llmcompressor \\
        --workdir /work/bench/smollm2 --out experiments/results/smollm2 --scratch /work/bench

For each of {sparsegpt, wanda} x {0.5 unstructured, 2:4}, one after the other (never two at once):
  1. `experiments/smollm2/llmc.py` in llm-compressor's venv (--llmc-python): `oneshot` with SparseGPTModifier or
     WandaPruningModifier on every decoder linear (lm_head ignored), sequential over LlamaDecoderLayer, on the
     calibration windows `multiflow run` uses (`--data calibration.txt --seq-len 256 --nsamples 32 --seed 0`:
     multiflow's own loader, imported there); the pruned model saved as dense safetensors;
  2. `multiflow eval --model <that> --reference model/ --data evaluation.txt --seq-len 256 --nsamples 32`,
     with this venv's multiflow: the protocol of experiments/smollm2/bench.py.
Before the runs, the calibration windows' SHA-256 is computed with both venvs (two transformers versions) and must
agree. Wall time and peak RSS (GNU time %M, else the child's own VmHWM) are the llm-compressor child's whole life.
multiflow's rows for the same settings are read from --out/results.jsonl (bench.py's; never run here):
sparsegpt/uniform/layer and wanda/uniform/row at 0.5, sparsegpt and wanda at 2:4, seed 0.

Writes llmcompressor.json (every run, the commands, versions) and llmcompressor.md under --out; a rerun skips the
runs already in llmcompressor.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks._common import git_rev, gnu_time

REPO = Path(__file__).resolve().parents[2]
LLMC = REPO / "experiments" / "smollm2" / "llmc.py"
CLI = [sys.executable, "-m", "multiflow.cli"]
RUNS = [("sparsegpt", "0.5"), ("wanda", "0.5"), ("sparsegpt", "2:4"), ("wanda", "2:4")]
# multiflow's matching configuration in bench.py's results.jsonl: (method, allocation, group)
MULTIFLOW = {("sparsegpt", "0.5"): ("sparsegpt", "uniform", "layer"), ("wanda", "0.5"): ("wanda", "uniform", "row"),
             ("sparsegpt", "2:4"): ("sparsegpt", "-", "-"), ("wanda", "2:4"): ("wanda", "-", "-")}


def key(method: str, sparsity: str) -> str:
    return f"{method}|{sparsity}"


def last_json(text: str) -> dict | None:
    for line in reversed(text.splitlines()):
        if line.startswith("{"):
            try:
                return json.loads(line)
            except json.JSONDecodeError:
                continue
    return None


def windows_hash(python: str, args) -> dict:
    cmd = [python, str(LLMC), "--model", str(args.workdir / "model"), "--data", str(args.workdir / "calibration.txt"),
           "--seq-len", str(args.seq_len), "--nsamples", str(args.nsamples), "--seed", str(args.seed),
           "--windows-hash"]
    done = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return last_json(done.stdout)


def run_one(method: str, sparsity: str, args, scratch: Path) -> dict:
    work = args.workdir
    out = scratch / f"llmc-{method}-{sparsity.replace(':', 'of')}"
    cmd = [args.llmc_python, str(LLMC), "--model", str(work / "model"), "--data", str(work / "calibration.txt"),
           "--seq-len", str(args.seq_len), "--nsamples", str(args.nsamples), "--seed", str(args.seed),
           "--method", method, "--output", str(out)]
    cmd += ["--structure", sparsity] if ":" in sparsity else ["--sparsity", sparsity]
    rss_file = scratch / f"rss-{method}-{sparsity.replace(':', 'of')}"
    timer = gnu_time()
    timed = [timer, "-f", "%M", "-o", str(rss_file)] if timer else []
    t0 = time.perf_counter()
    done = subprocess.run(timed + cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    (scratch / f"{out.name}.log").write_text(done.stdout + done.stderr)
    row: dict = {"method": method, "sparsity": sparsity, "llmc_command": cmd}
    if done.returncode:
        return {**row, "error": (done.stderr.strip().splitlines() or ["?"])[-1]}
    report = last_json(done.stdout)
    peak = (int(rss_file.read_text().split()[-1]) / 1024 if timer else report["memory_mib"]["saved"]["hwm"])
    evaluated = scratch / f"{out.name}-eval.json"
    eval_cmd = [*CLI, "eval", "--model", str(out), "--reference", str(work / "model"), "--data",
                str(work / "evaluation.txt"), "--seq-len", str(args.seq_len), "--nsamples", str(args.eval_windows),
                "--output", str(evaluated), "--quiet"]
    t1 = time.perf_counter()
    done = subprocess.run(eval_cmd, capture_output=True, text=True)
    eval_s = time.perf_counter() - t1
    row["eval_command"] = eval_cmd
    if done.returncode:
        return {**row, "llmc": report, "error": "eval: " + (done.stderr.strip().splitlines() or ["?"])[-1]}
    result = json.loads(evaluated.read_text())
    if not args.keep_outputs:
        for f in out.iterdir():
            f.unlink()
        out.rmdir()
    return {**row, "perplexity": result["perplexity"], "kl": result.get("kl"),
            "top1_agreement": result.get("top1_agreement"), "tokens": result.get("tokens"),
            "achieved_sparsity": report["decoder_sparsity"], "lm_head_sparsity": report["other_sparsity"],
            "run_s": round(wall, 1), "oneshot_s": report["oneshot_s"], "eval_s": round(eval_s, 1),
            "peak_rss_mib": round(peak, 1), "llmc": report}


def multiflow_rows(results: Path, seed: int) -> dict[str, dict | None]:
    rows = [json.loads(line) for line in results.read_text().splitlines()] if results.is_file() else []
    found: dict[str, dict | None] = {}
    for (method, sparsity), (m, allocation, group) in MULTIFLOW.items():
        match = [r for r in rows if "error" not in r and r["method"] == m and r["allocation"] == allocation
                 and r["group"] == group and str(r["sparsity"]) == sparsity and r["seed"] == seed]
        found[key(method, sparsity)] = match[-1] if match else None
    return found


def fmt(x, spec: str) -> str:
    return "—" if x is None else format(x, spec)


def markdown(record: dict, mf: dict[str, dict | None], dense: dict | None) -> str:
    runs = {key(r["method"], r["sparsity"]): r for r in record["runs"]}
    v = next((r["llmc"]["versions"] for r in record["runs"] if "llmc" in r), {})
    lines = [
        "# SmolLM2-135M-Instruct: llm-compressor beside multiflow",
        "",
        f"Same model ({record['workdir']}/model, float32), same calibration windows (calibration.txt, --seq-len "
        f"{record['seq_len']}, --nsamples {record['nsamples']}, --seed {record['seed']}; SHA-256 of the token ids "
        f"`{record['windows_sha256'][:16]}…`, identical under both venvs' transformers), same evaluation "
        f"(`multiflow eval --reference model/` on evaluation.txt, {record['eval_windows']} windows of "
        f"{record['seq_len']} tokens, {dense['tokens'] if dense else '?'} predicted tokens).",
        f"llm-compressor {v.get('llmcompressor', '?')} (compressed-tensors {v.get('compressed_tensors', '?')}, "
        f"transformers {v.get('transformers', '?')}, torch {v.get('torch', '?')}): `oneshot` with "
        "SparseGPTModifier (block_size 128, dampening_frac 0.01) or WandaPruningModifier, targets every Linear but "
        "lm_head, sequential over LlamaDecoderLayer (each layer calibrated on the pruned layers' outputs); 2:4 is "
        "mask_structure \"2:4\" (llm-compressor prunes n of m, multiflow keeps N of M: the same for 2:4). "
        "multiflow: `multiflow run` rows of experiments/smollm2/bench.py (results.jsonl), seed 0.",
        "",
        f"Dense perplexity: {fmt(dense and dense['perplexity'], '.3f')}.",
        "",
        "| method | sparsity | multiflow config | ppl llm-compressor | ppl multiflow | KL llmc | KL mf | top-1 llmc "
        "| top-1 mf | achieved llmc | achieved mf | wall s llmc | wall s mf | peak RSS GiB llmc | peak RSS GiB mf |",
        "|---|---|---|" + "---:|" * 12,
    ]
    missing = []
    for method, sparsity in RUNS:
        k = key(method, sparsity)
        r, m = runs.get(k), mf.get(k)
        cfg = "/".join(MULTIFLOW[(method, sparsity)])
        if m is None:
            missing.append(f"{cfg} at {sparsity}")
        if r is not None and "error" in r:
            lines.append(f"| {method} | {sparsity} | {cfg} | error: {r['error']} |" + " |" * 11)
            continue
        r = r or {}
        m = m or {}
        lines.append(" | ".join([
            f"| {method}", sparsity, cfg, fmt(r.get("perplexity"), ".2f"), fmt(m.get("perplexity"), ".2f"),
            fmt(r.get("kl"), ".3f"), fmt(m.get("kl"), ".3f"), fmt(r.get("top1_agreement"), ".3f"),
            fmt(m.get("top1_agreement"), ".3f"), fmt(r.get("achieved_sparsity"), ".4f"),
            fmt(m.get("achieved_sparsity"), ".4f"), fmt(r.get("run_s"), ".0f"), fmt(m.get("run_s"), ".0f"),
            fmt(r.get("peak_rss_mib") and r["peak_rss_mib"] / 1024, ".2f"), fmt(m.get("peak_rss_gib"), ".2f")]) + " |")
    lines += [
        "",
        "Wall time: the whole child process (imports, load, calibration, pruning, save), without the evaluation. "
        "Peak RSS: the child's maximum resident set (GNU time %M). Timings were taken under load: each run had "
        "OMP_NUM_THREADS=2 on a 2-core machine while another benchmark process (experiments/smollm2/bench.py) kept "
        "the other core busy, so wall times are indicative only, for both tools.",
        "Achieved sparsity: zeros / weights over the 210 decoder linears (the dense input already has 0.03% zeros "
        "from its Q4_1 quantization; its tied embedding / lm_head has 1.03% and stays as it is).",
        "Differences in method: llm-compressor accumulates the Hessian (SparseGPT) and the input norms (Wanda) in "
        "float32, multiflow in float64; llm-compressor's Wanda is sequential (pruned layers' outputs feed the "
        "next layer), multiflow's Wanda calibrates on the dense model in one pass; SparseGPT is sequential in both.",
    ]
    if missing:
        lines += ["", "Not yet in results.jsonl (bench.py will fill them; not run here): " + ", ".join(missing) + "."]
    lines += ["", "Commands: see llmcompressor.json (`llmc_command`, `eval_command` per run)."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, required=True, help="what experiments.smollm2.prepare wrote")
    parser.add_argument("--out", type=Path, required=True, help="folder of bench.py's results.jsonl; gets "
                        "llmcompressor.json and llmcompressor.md")
    parser.add_argument("--scratch", type=Path, default=None, help="folder for pruned copies (default: system tmp)")
    parser.add_argument("--llmc-python", default="/work/llmc-venv/bin/python", help="python of llm-compressor's venv")
    parser.add_argument("--nsamples", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--eval-windows", type=int, default=32)
    parser.add_argument("--keep-outputs", action="store_true", help="keep the pruned checkpoints under --scratch")
    parser.add_argument("--table-only", action="store_true", help="rewrite llmcompressor.md from the JSON files")
    args = parser.parse_args()
    args.workdir = args.workdir.expanduser()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "llmcompressor.json"
    record = json.loads(path.read_text()) if path.is_file() else None
    if not args.table_only:
        hashes = {"multiflow venv": windows_hash(sys.executable, args), "llm-compressor venv":
                  windows_hash(args.llmc_python, args)}
        if len({h["windows_sha256"] for h in hashes.values()}) != 1:
            sys.exit(f"the two venvs cut different calibration windows: {hashes}")
        settings = {"workdir": str(args.workdir), "seq_len": args.seq_len, "nsamples": args.nsamples,
                    "seed": args.seed, "eval_windows": args.eval_windows}
        if record is None or {k: record.get(k) for k in settings} != settings:
            record = {**settings, "runs": []}
        record.update(windows_sha256=hashes["multiflow venv"]["windows_sha256"], windows_hash=hashes,
                      machine={"cpus": os.cpu_count(), "platform": platform.platform(),
                               "omp_num_threads": os.environ.get("OMP_NUM_THREADS")})
        done = {key(r["method"], r["sparsity"]) for r in record["runs"] if "error" not in r}
        for method, sparsity in RUNS:
            if key(method, sparsity) in done:
                continue
            scratch = Path(tempfile.mkdtemp(prefix="llmc-smollm2-", dir=args.scratch))  # logs stay there
            row = {**run_one(method, sparsity, args, scratch), "git": git_rev(REPO), "scratch": str(scratch)}
            print(json.dumps({k: v for k, v in row.items() if k != "llmc"}), flush=True)
            record["runs"] = [r for r in record["runs"] if key(r["method"], r["sparsity"]) != key(method, sparsity)]
            record["runs"].append(row)
            path.write_text(json.dumps(record, indent=2) + "\n")
    if record is None:
        sys.exit(f"no {path}: run without --table-only first")
    dense_path = args.out / "dense.json"
    dense = json.loads(dense_path.read_text()) if dense_path.is_file() else None
    (args.out / "llmcompressor.md").write_text(markdown(record, multiflow_rows(args.out / "results.jsonl", args.seed),
                                                        dense))
    print((args.out / "llmcompressor.md").read_text())


if __name__ == "__main__":
    main()
