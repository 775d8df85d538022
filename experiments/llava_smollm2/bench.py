"""What pruning costs a LLaVA whose LLM is the real SmolLM2-135M-Instruct: VQA accuracy and KL to dense, with the CLI.

    HF_HUB_OFFLINE=1 OMP_NUM_THREADS=2 .venv/bin/python -m experiments.llava_smollm2.bench \
        --model /work/bench/llava_smollm2/model --out experiments/results/llava_smollm2

--model is what `experiments.llava_smollm2.rebuild` wrote. Every configuration is one `multiflow run`
(calibration: --nsamples records of the package's demo calibration split, drawn by --seed) followed by one
`multiflow eval --reference MODEL` on the first --eval-nsamples records of the demo evaluation split (drawn with
seed 0): exact-match accuracy (overall and per question kind), KL(dense || pruned) per answer token and top-1
agreement. Same grid options as experiments.smollm2.bench; results.jsonl is appended as results come (a rerun
skips what is there), then table.md and accuracy_vs_sparsity.png are written. One configuration at a time.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks._common import git_rev, gnu_time
from experiments.smollm2.bench import (Metric, add_extra_argument, add_grid_arguments, method_flags, plot, run_grid,
                                      table)

REPO = Path(__file__).resolve().parents[2]
CLI = [sys.executable, "-m", "multiflow.cli"]
DATA = REPO / "src/multiflow/demo_data"


def evaluate(model: Path, reference: Path | None, args, scratch: Path) -> dict:
    out = scratch / "eval.json"
    cmd = [*CLI, "eval", "--model", str(model), "--data", str(DATA / "evaluation.jsonl"),
           "--nsamples", str(args.eval_nsamples), "--output", str(out), "--quiet"]
    done = subprocess.run(cmd + (["--reference", str(reference)] if reference else []), capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError("eval: " + (done.stderr.strip().splitlines() or ["?"])[-1])
    result = json.loads(out.read_text())
    return {"accuracy": result["accuracy"], "per_kind": {k: v["accuracy"] for k, v in result["per_kind"].items()},
            "kl": result.get("kl", 0.0), "top1_agreement": result.get("top1_agreement", 1.0),
            "nsamples_eval": result["nsamples"]}


def run_config(c: dict, args) -> dict:
    with tempfile.TemporaryDirectory(prefix="llava-smollm2-", dir=args.scratch) as scratch:
        out = Path(scratch) / "pruned"
        cmd = [*CLI, "run", "--model", str(args.model), "--data", str(DATA / "calibration.jsonl"),
               "--nsamples", str(args.nsamples), "--output", str(out), "--quiet", *method_flags(c)]
        timed = [gnu_time(), "-f", "%M", "-o", str(Path(scratch) / "rss")] if gnu_time() else []
        t0 = time.perf_counter()
        done = subprocess.run(timed + cmd, capture_output=True, text=True)
        run_s = time.perf_counter() - t0
        if done.returncode:
            return {**c, "error": (done.stderr.strip().splitlines() or ["?"])[-1]}
        rss = int((Path(scratch) / "rss").read_text().split()[-1]) / 2**20 if timed else None
        report = json.loads((out / "multiflow_report.json").read_text())
        t1 = time.perf_counter()
        try:
            result = evaluate(out, args.model, args, Path(scratch))
        except RuntimeError as exc:
            return {**c, "error": str(exc)}
        return {**c, **result, "achieved_sparsity": report["global"]["achieved_sparsity"],
                "by_modality": {m: v.get("achieved_sparsity") for m, v in report.get("modalities", {}).items()}
                if isinstance(report.get("modalities"), dict) else None,
                "run_s": round(run_s, 1), "eval_s": round(time.perf_counter() - t1, 1), "peak_rss_gib": rss}


ACCURACY = Metric("accuracy", 100, 1, "Exact-match accuracy % (mean over calibration seeds; KL(dense||pruned) per "
                  "answer token in brackets)", "digits VQA exact match (%)",
                  "LLaVA with SmolLM2-135M-Instruct: what pruning costs")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, required=True, help="what experiments.llava_smollm2.rebuild wrote")
    add_grid_arguments(parser, seeds=[0])
    parser.add_argument("--nsamples", type=int, default=128, help="calibration records (default 128, the seed's)")
    parser.add_argument("--eval-nsamples", type=int, default=500, help="evaluation records (default 500)")
    add_extra_argument(parser)
    args = parser.parse_args()
    args.sparsities = [s if s == "2:4" else float(s) for s in args.sparsities]
    args.out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    dense_path = args.out / "dense.json"
    if not dense_path.is_file():
        with tempfile.TemporaryDirectory(prefix="llava-smollm2-", dir=args.scratch) as scratch:
            dense_row = {"method": "dense", **evaluate(args.model, None, args, Path(scratch))}
        dense_path.write_text(json.dumps({**dense_row, "git": git_rev(REPO)}, indent=2) + "\n")
    dense_row = json.loads(dense_path.read_text())
    rows = run_grid(args, lambda c: run_config(c, args), {"nsamples": args.nsamples})
    header = (f"Dense accuracy {100 * dense_row['accuracy']:.1f}% on {dense_row['nsamples_eval']} evaluation records "
              f"(per kind: {', '.join(f'{k} {100 * v:.1f}%' for k, v in dense_row['per_kind'].items())}).")
    (args.out / "table.md").write_text(table(rows, header, ACCURACY))
    plot(rows, dense_row, args.out / "accuracy_vs_sparsity.png", ACCURACY)
    print((args.out / "table.md").read_text())


if __name__ == "__main__":
    main()
