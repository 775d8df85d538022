"""What pruning costs a real pretrained LLM: SmolLM2-135M-Instruct, perplexity and KL to dense, with the CLI.

    HF_HUB_OFFLINE=1 OMP_NUM_THREADS=2 .venv/bin/python -m experiments.smollm2.bench \
        --workdir ~/.cache/multiflow-bench/smollm2 --out experiments/results/smollm2

--workdir is what `experiments.smollm2.prepare` wrote (model/, calibration.txt, evaluation.txt). Every
configuration is one `multiflow run` (calibration on calibration.txt: --nsamples windows of --seq-len tokens
picked by --seed) followed by one `multiflow eval --reference model/` on evaluation.txt (the first --eval-windows
non-overlapping windows of --seq-len tokens): perplexity, KL(dense || pruned) per token and top-1 agreement.
Results are appended to results.jsonl as they come (a rerun skips what is there), then table.md and
ppl_vs_sparsity.png are written. One configuration at a time: two torch processes on 2 cores slow each other.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from benchmarks._common import git_rev, gnu_time

REPO = Path(__file__).resolve().parents[2]
CLI = [sys.executable, "-m", "multiflow.cli"]

# (method, allocation, group): the grid of issue 13. A method "<score>+obs" is `--method <score> --update obs`.
# For a plain LLM every layer is in one modality ("text"), so `modality` is one magnitude threshold over the
# whole model (Step 1 over one modality).
METHODS = ("magnitude", "wanda", "multiflow", "sparsegpt")
ALLOCATIONS = ("uniform", "modality", "scores", "owl")
GROUPS = ("layer", "row")


def config_key(c: dict) -> str:
    """What makes two rows the same configuration: method, allocation, group, sparsity, seed and extra flags."""
    key = "|".join(f"{k}={c[k]}" for k in ("method", "allocation", "group", "sparsity", "seed"))
    return key + (f"|extra={' '.join(c['extra'])}" if c.get("extra") else "")


def method_label(c: dict) -> str:
    """The method column of a table or plot: the method, then its extra `multiflow run` flags, if any."""
    return " ".join([c["method"], *c.get("extra", [])])


def method_flags(c: dict) -> list[str]:
    """The `multiflow run` flags of one configuration: method (`<score>+obs` = --update obs), sparsity or N:M,
    allocation and group, then its extra flags."""
    flags = ["--seed", str(c["seed"]), "--method", c["method"].removesuffix("+obs")]
    if c["method"].endswith("+obs"):  # the score chooses the mask inside SparseGPT's pass, with its OBS update
        flags += ["--update", "obs"]
    if c["sparsity"] == "2:4":
        flags += ["--structure", "2:4"]
    else:
        flags += ["--target-sparsity", str(c["sparsity"]), "--allocation", c["allocation"], "--group", c["group"]]
    return flags + c.get("extra", [])


def add_grid_arguments(parser: argparse.ArgumentParser, seeds: list[int]) -> None:
    """The options both judges' benchmarks share: output, scratch, the grid, the extra run flags (last)."""
    parser.add_argument("--out", type=Path, required=True, help="folder for results.jsonl, table.md, the plot")
    parser.add_argument("--scratch", type=Path, default=None, help="folder for pruned copies (default: system tmp)")
    parser.add_argument("--methods", nargs="+", default=list(METHODS))
    parser.add_argument("--allocations", nargs="+", default=list(ALLOCATIONS))
    parser.add_argument("--groups", nargs="+", default=list(GROUPS))
    parser.add_argument("--configs", nargs="+", default=None, metavar="METHOD/ALLOCATION/GROUP",
                        help="run these combinations instead of the product of --methods, --allocations, --groups")
    parser.add_argument("--sparsities", nargs="+", default=["0.5", "0.6", "0.7", "0.8", "2:4"])
    parser.add_argument("--seeds", type=int, nargs="+", default=seeds)


def add_extra_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--extra", nargs=argparse.REMAINDER, default=[],
                        help="more `multiflow run` flags for every configuration (last on the line)")


def run_grid(args, run_config, fields: dict) -> list[dict]:
    """Every configuration of the grid not yet in --out/results.jsonl, one at a time: `run_config(c)` gives its
    row (plus `fields` and the git revision), appended to results.jsonl as it comes. Returns all rows."""
    results = args.out / "results.jsonl"
    rows = [json.loads(line) for line in results.read_text().splitlines()] if results.is_file() else []
    done = {config_key(r) for r in rows if "error" not in r}
    todo = [c for c in grid(args) if config_key(c) not in done]
    for i, c in enumerate(todo, 1):
        row = {**run_config(c), "git": git_rev(REPO), **fields}
        print(f"[{i}/{len(todo)}] {json.dumps(row)}", flush=True)
        rows = [r for r in rows if config_key(r) != config_key(row)] + [row]
        results.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return rows


def run_config(c: dict, args, work: Path) -> dict:
    model = work / "model"
    with tempfile.TemporaryDirectory(prefix="smollm2-", dir=args.scratch) as scratch:
        out = Path(scratch) / "pruned"
        cmd = [*CLI, "run", "--model", str(model), "--data", str(work / "calibration.txt"),
               "--seq-len", str(args.seq_len), "--nsamples", str(args.nsamples), "--output", str(out), "--quiet",
               *method_flags(c)]
        timed = [gnu_time(), "-f", "%M", "-o", str(Path(scratch) / "rss")] if gnu_time() else []
        t0 = time.perf_counter()
        done = subprocess.run(timed + cmd, capture_output=True, text=True)
        run_s = time.perf_counter() - t0
        if done.returncode:
            return {**c, "error": (done.stderr.strip().splitlines() or ["?"])[-1]}
        rss = int((Path(scratch) / "rss").read_text().split()[-1]) / 2**20 if timed else None
        report = json.loads((out / "multiflow_report.json").read_text())
        evaluated = Path(scratch) / "eval.json"
        t1 = time.perf_counter()
        done = subprocess.run([*CLI, "eval", "--model", str(out), "--reference", str(model), "--data",
                               str(work / "evaluation.txt"), "--seq-len", str(args.seq_len), "--nsamples",
                               str(args.eval_windows), "--output", str(evaluated), "--quiet"],
                              capture_output=True, text=True)
        if done.returncode:
            return {**c, "error": "eval: " + (done.stderr.strip().splitlines() or ["?"])[-1]}
        result = json.loads(evaluated.read_text())
        return {**c, "perplexity": result["perplexity"], "kl": result.get("kl"),
                "top1_agreement": result.get("top1_agreement"), "tokens": result.get("tokens"),
                "achieved_sparsity": report["global"]["achieved_sparsity"], "run_s": round(run_s, 1),
                "eval_s": round(time.perf_counter() - t1, 1), "peak_rss_gib": rss}


def dense(args, work: Path) -> dict:
    with tempfile.TemporaryDirectory(prefix="smollm2-", dir=args.scratch) as scratch:
        evaluated = Path(scratch) / "eval.json"
        subprocess.run([*CLI, "eval", "--model", str(work / "model"), "--data", str(work / "evaluation.txt"),
                        "--seq-len", str(args.seq_len), "--nsamples", str(args.eval_windows), "--output",
                        str(evaluated), "--quiet"], check=True, capture_output=True, text=True)
        result = json.loads(evaluated.read_text())
    return {"method": "dense", "allocation": "-", "group": "-", "sparsity": 0.0, "seed": 0,
            "perplexity": result["perplexity"], "kl": 0.0, "top1_agreement": 1.0, "tokens": result.get("tokens")}


def grid(args) -> list[dict]:
    configs = []
    for s, seed in itertools.product(args.sparsities, args.seeds):
        triples = ([tuple(c.split("/")) for c in args.configs] if args.configs else
                   itertools.product(args.methods, args.allocations, args.groups))
        for method, allocation, group in triples:
            if method == "magnitude" and seed != args.seeds[0]:
                continue  # magnitude uses no data
            if s == "2:4" and any(c["method"] == method and c["sparsity"] == s and c["seed"] == seed
                                  for c in configs):
                continue  # N:M fixes every layer's sparsity: one run per method
            configs.append({"method": method, "allocation": "-" if s == "2:4" else allocation,
                            "group": "-" if s == "2:4" else group, "sparsity": s, "seed": seed,
                            **({"extra": list(args.extra)} if args.extra else {})})
    return configs


@dataclass(frozen=True)
class Metric:
    """What a judge's table and plot show: the result field, its scale and decimals, and the captions."""

    key: str            # the field of a result row ("perplexity", "accuracy")
    scale: float        # shown as scale * value (100 for a percentage)
    digits: int         # decimals of a cell and of its spread over seeds
    caption: str        # the line above the table
    axis: str           # the plot's y label
    title: str          # the plot's title
    log: bool = False   # log-scale y axis


PERPLEXITY = Metric("perplexity", 1, 2, "Perplexity (mean over calibration seeds; KL(dense||pruned) per token in "
                    "brackets)", "perplexity (GNU standards text, log scale)",
                    "SmolLM2-135M-Instruct: what pruning costs", log=True)


def table(rows: list[dict], header: str, metric: Metric) -> str:
    """Markdown: one row per (method, allocation, group), one column per sparsity; mean (± spread over seeds)
    and mean KL in brackets; failed configurations listed below."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        if "error" not in r:
            groups.setdefault((method_label(r), r["allocation"], r["group"], str(r["sparsity"])), []).append(r)
    sparsities = sorted({k[3] for k in groups}, key=lambda s: (s == "2:4", s))
    lines = [header, "", metric.caption, "", "| method | allocation | group | " + " | ".join(sparsities) + " |",
             "|---|---|---|" + "---|" * len(sparsities)]
    for cfg in sorted({k[:3] for k in groups}):
        cells = []
        for s in sparsities:
            rs = groups.get((*cfg, s))
            if not rs:
                cells.append("")
                continue
            values = [metric.scale * r[metric.key] for r in rs]
            spread = f" ±{statistics.stdev(values):.{metric.digits}f}" if len(rs) > 1 else ""
            cells.append(f"{statistics.mean(values):.{metric.digits}f}{spread} "
                         f"({statistics.mean(r['kl'] for r in rs):.3f})")
        lines.append(f"| {cfg[0]} | {cfg[1]} | {cfg[2]} | " + " | ".join(cells) + " |")
    errors = [r for r in rows if "error" in r]
    if errors:
        lines += ["", "Failed configurations:", ""] + [f"- {config_key(r)}: {r['error']}" for r in errors]
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], dense_row: dict, path: Path, metric: Metric) -> None:
    """The metric against sparsity, one line per configuration (mean over seeds; 2:4 left out), dense dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    series: dict[str, dict[float, list[float]]] = {}
    for r in rows:
        if "error" not in r and r["sparsity"] != "2:4":
            series.setdefault(f"{method_label(r)} / {r['allocation']} / {r['group']}", {}).setdefault(
                float(r["sparsity"]), []).append(metric.scale * r[metric.key])
    for label, points in sorted(series.items()):
        xs = sorted(points)
        ax.plot(xs, [statistics.mean(points[x]) for x in xs], marker="o", label=label)
    ax.axhline(metric.scale * dense_row[metric.key], color="black", linestyle="--", label="dense")
    if metric.log:
        ax.set_yscale("log")
    ax.set_xlabel("target sparsity")
    ax.set_ylabel(metric.axis)
    ax.set_title(metric.title)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, required=True, help="what experiments.smollm2.prepare wrote")
    add_grid_arguments(parser, seeds=[0, 1, 2])
    parser.add_argument("--nsamples", type=int, default=32, help="calibration windows (default 32)")
    parser.add_argument("--seq-len", type=int, default=256, help="tokens per window (default 256)")
    parser.add_argument("--eval-windows", type=int, default=32, help="evaluation windows (default 32)")
    add_extra_argument(parser)
    args = parser.parse_args()
    args.sparsities = [s if s == "2:4" else float(s) for s in args.sparsities]
    work = args.workdir.expanduser()
    args.out.mkdir(parents=True, exist_ok=True)
    dense_path = args.out / "dense.json"
    if not dense_path.is_file():
        dense_path.write_text(json.dumps({**dense(args, work), "git": git_rev(REPO), "seq_len": args.seq_len,
                                          "eval_windows": args.eval_windows}, indent=2) + "\n")
    dense_row = json.loads(dense_path.read_text())
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    rows = run_grid(args, lambda c: run_config(c, args, work), {"nsamples": args.nsamples, "seq_len": args.seq_len})
    header = f"Dense perplexity {dense_row['perplexity']:.3f} on {dense_row['tokens']} evaluation tokens."
    (args.out / "table.md").write_text(table(rows, header, PERPLEXITY))
    plot(rows, dense_row, args.out / "ppl_vs_sparsity.png", PERPLEXITY)
    print((args.out / "table.md").read_text())


if __name__ == "__main__":
    main()
