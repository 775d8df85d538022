"""Quality benchmark: what pruning costs the bundled demo model, per method, allocation and sparsity.

Dense vs {magnitude, wanda, multiflow} x {uniform, modality} x sparsity, plus 2:4, on the demo model,
calibrated on its calibration split and evaluated on its evaluation split (accuracy = exact match,
ROUGE-L, KL(dense || pruned) and top-1 agreement on the reference answers). Then MULTIFLOW's
sensitivity to the number of calibration samples and to --include-answers.

    python benchmarks/bench_quality.py --out benchmarks/results/quality

With --sequential, instead: one-pass calibration (the paper's, the default) against sequential
calibration (`multiflow run --sequential`: each block calibrated on the outputs of the already-pruned
blocks before it, as Wanda and SparseGPT do), for wanda and multiflow x {uniform, modality} x
sparsity x seeds; written to sequential.json / sequential.md.

    python benchmarks/bench_quality.py --sequential --seeds 0 1 2 --out benchmarks/results/quality
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import multiflow
from multiflow.demo import TRAINED, demo_split
from multiflow.evaluation.evaluate import EvalConfig, evaluate

METHODS = ("magnitude", "wanda", "multiflow")
ALLOCATIONS = ("uniform", "modality")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=TRAINED)
    parser.add_argument("--out", type=Path, required=True, help="folder for results.json, table.md and the plot")
    parser.add_argument("--sparsities", type=float, nargs="+", default=[0.5, 0.63, 0.75, 0.9])
    parser.add_argument("--nsamples", type=int, default=128, help="calibration samples (default 128)")
    parser.add_argument("--eval-samples", type=int, default=600, help="evaluation items (default 600)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="calibration seeds (mean and spread)")
    parser.add_argument("--skip-ablations", action="store_true", help="only the main table")
    parser.add_argument("--sequential", action="store_true",
                        help="only compare one-pass and sequential calibration (sequential.json, sequential.md)")
    args = parser.parse_args()
    calib, evalset = demo_split("calibration"), demo_split("evaluation")
    if calib is None or evalset is None or not (args.model / "config.json").is_file():
        raise SystemExit("the trained demo model and its splits are not installed (see training/README.md)")
    args.out.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []

    def score(folder: Path, label: dict) -> None:
        t0 = time.perf_counter()
        r = evaluate(EvalConfig(model=folder, data=evalset, reference=args.model, nsamples=args.eval_samples,
                                batch_size=32, max_new_tokens=3), progress=False)
        row = {**label, "accuracy": r["accuracy"], "rouge_l": r["rouge_l"], "kl": r.get("kl"),
               "top1_agreement": r.get("top1_agreement"),
               "per_kind": {k: v["accuracy"] for k, v in r["per_kind"].items()}, "eval_s": time.perf_counter() - t0}
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "per_kind"}), flush=True)

    if args.sequential:
        with tempfile.TemporaryDirectory(prefix="mf-quality-") as tmp:
            score(args.model, {"method": "dense", "allocation": "-", "sparsity": 0.0, "seed": None})
            compare_sequential(args, calib, Path(tmp), score)
        (args.out / "sequential.json").write_text(json.dumps(rows, indent=2) + "\n")
        (args.out / "sequential.md").write_text(sequential_table(rows, args.sparsities))
        print(sequential_table(rows, args.sparsities))
        return
    with tempfile.TemporaryDirectory(prefix="mf-quality-") as tmp:
        tmp = Path(tmp)
        score(args.model, {"method": "dense", "allocation": "-", "sparsity": 0.0, "seed": None})
        for seed in args.seeds:
            stats = tmp / f"stats-{seed}.safetensors"
            multiflow.calibrate(args.model, stats, data=calib, nsamples=args.nsamples, seed=seed, batch_size=16)
            for s in args.sparsities:
                for method in METHODS:
                    for allocation in ALLOCATIONS:
                        if method == "magnitude" and seed != args.seeds[0]:
                            continue  # no data: one seed suffices
                        out = tmp / "pruned"
                        multiflow.prune(args.model, out, s, stats=stats, method=method, allocation=allocation,
                                        overwrite=True)
                        score(out, {"method": method, "allocation": allocation, "sparsity": s, "seed": seed})
            for method in METHODS:
                out = tmp / "pruned"
                multiflow.prune(args.model, out, stats=stats, method=method, structure="2:4", overwrite=True)
                score(out, {"method": method, "allocation": "2:4", "sparsity": 0.5, "seed": seed})
        if not args.skip_ablations:
            for n in (8, 32, 128):
                for answers in (False, True):
                    stats = tmp / "abl.safetensors"
                    multiflow.calibrate(args.model, stats, data=calib, nsamples=n, seed=0, batch_size=16,
                                        include_answers=answers, overwrite=True)
                    for s in (0.63, 0.75):
                        out = tmp / "pruned"
                        multiflow.prune(args.model, out, s, stats=stats, method="multiflow", overwrite=True)
                        score(out, {"method": "multiflow", "allocation": "modality", "sparsity": s, "seed": 0,
                                    "ablation": f"nsamples={n}, include_answers={answers}"})
    (args.out / "results.json").write_text(json.dumps(rows, indent=2) + "\n")
    (args.out / "table.md").write_text(table(rows, args.sparsities))
    plot(rows, args.sparsities, args.out / "accuracy_vs_sparsity.png")
    print(table(rows, args.sparsities))


def compare_sequential(args, calib: Path, tmp: Path, score) -> None:
    for seed in args.seeds:
        for s in args.sparsities:
            for method in ("wanda", "multiflow"):
                for allocation in ALLOCATIONS:
                    for sequential in (False, True):
                        out = tmp / "pruned"
                        multiflow.run(args.model, out, s, data=calib, nsamples=args.nsamples, seed=seed,
                                      batch_size=16, method=method, allocation=allocation, sequential=sequential,
                                      overwrite=True)
                        score(out, {"method": method, "allocation": allocation, "sparsity": s, "seed": seed,
                                    "calibration": "sequential" if sequential else "one pass"})


def sequential_table(rows: list[dict], sparsities: list[float]) -> str:
    lines = ["| method | allocation | sparsity | one pass: accuracy % | sequential: accuracy % | one pass: KL | "
             "sequential: KL |", "|---|---|---:|---:|---:|---:|---:|"]
    for s in sparsities:
        for method in ("wanda", "multiflow"):
            for allocation in ALLOCATIONS:
                cells = []
                for key in ("accuracy", "kl"):
                    for mode in ("one pass", "sequential"):
                        group = [r for r in rows if r.get("calibration") == mode and r["method"] == method
                                 and r["allocation"] == allocation and r["sparsity"] == s]
                        cells.append(_agg(group, key))
                lines.append(f"| {method} | {allocation} | {s:g} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _agg(rows: list[dict], key: str) -> str:
    values = [r[key] for r in rows if r[key] is not None]
    if not values:
        return "-"
    mean = statistics.fmean(values)
    spread = f" ± {statistics.pstdev(values):.3f}" if len(values) > 1 else ""
    return f"{mean:.4f}{spread}" if key == "kl" else f"{100 * mean:.1f}{'' if not spread else f' ± {100 * statistics.pstdev(values):.1f}'}"


def table(rows: list[dict], sparsities: list[float]) -> str:
    main_rows = [r for r in rows if "ablation" not in r]
    lines = ["| method | allocation | sparsity | accuracy % | ROUGE-L % | KL(dense‖pruned) | top-1 agree % |",
             "|---|---|---:|---:|---:|---:|---:|"]
    keys = []
    for r in main_rows:
        key = (r["method"], r["allocation"], r["sparsity"])
        if key not in keys:
            keys.append(key)
    for key in keys:
        group = [r for r in main_rows if (r["method"], r["allocation"], r["sparsity"]) == key]
        lines.append(f"| {key[0]} | {key[1]} | {key[2]:g} | {_agg(group, 'accuracy')} | {_agg(group, 'rouge_l')} | "
                     f"{_agg(group, 'kl')} | {_agg(group, 'top1_agreement')} |")
    ablations = [r for r in rows if "ablation" in r]
    if ablations:
        lines += ["", "| MULTIFLOW (modality) calibration | sparsity | accuracy % | KL |", "|---|---:|---:|---:|"]
        for r in ablations:
            lines.append(f"| {r['ablation']} | {r['sparsity']:g} | {100 * r['accuracy']:.1f} | {r['kl']:.4f} |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], sparsities: list[float], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dense = next(r["accuracy"] for r in rows if r["method"] == "dense")
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=110)
    for method in METHODS:
        for allocation, style in (("uniform", "--"), ("modality", "-")):
            xs, ys = [], []
            for s in sparsities:
                group = [r["accuracy"] for r in rows if "ablation" not in r and r["method"] == method
                         and r["allocation"] == allocation and r["sparsity"] == s]
                if group:
                    xs.append(s)
                    ys.append(100 * statistics.fmean(group))
            ax.plot(xs, ys, style, marker="o", label=f"{method} / {allocation}")
    ax.axhline(100 * dense, color="black", linewidth=1, label="dense")
    ax.set_xlabel("target sparsity")
    ax.set_ylabel("exact-match accuracy (%)")
    ax.set_title("Pruning the bundled demo LLaVA: accuracy vs sparsity")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


if __name__ == "__main__":
    main()
