"""The pruning table of issue 7 on the dual encoder (pretrained MiniLM text tower, from-scratch vision tower).

For each setting (prune the text tower only, the vision tower only, both; plus a diagnostic: the text
tower with its pooler kept dense), each configuration
(method x allocation x comparison group the tool has today) and each target sparsity, the dense
model is restored, pruned in memory with `multiflow.prune_module`, and judged against the dense
model on the evaluation split (397 images, the 40 held-out-template captions):

- text-to-image retrieval mAP and R@1 (held-out captions as queries),
- KL(dense || pruned) of each caption's softmax over images (nats), cosine drift of the text and
  of the image embeddings,
- zero-shot accuracy with the held-out templates (the judge of the vision-only and both settings;
  reported for text-only too, but it is NOT a text judge: see the issue).

wanda and multiflow are calibrated on the dense model with 64 calibration-split images and 64
training-template captions picked by the seed (one calibration per seed serves every setting and
sparsity); magnitude needs no calibration and runs once. Also: the activation-outlier ratio per
layer of the dense model (max / median per-channel input RMS over the whole calibration split).

    python -m experiments.dual_encoder.bench --out experiments/results/dual_encoder            # the full table
    python -m experiments.dual_encoder.bench --out /tmp/de_quick --quick                      # smoke test

Writes results.json (every row), table.md (mean +- population std over seeds), one plot per
setting (<setting>.png) and outliers.md.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import torch

import multiflow
from multiflow.calibration.statistics import collect_statistics
from multiflow.models.families import ModalityRules, Rule, family_by_name
from multiflow.storage.stats_file import from_collector

from . import data, judges
from .model import IMAGE_SIZE, build_processor, load_from_parts

HERE = Path(__file__).resolve().parent
PARTS = HERE / "trained" / "trained_parts.safetensors"

SPARSITIES = (0.5, 0.63, 0.75, 0.85, 0.9)
QUICK_SPARSITIES = (0.5, 0.9)
SEEDS = (0, 1, 2)
CAL_IMAGES = 64
CAL_CAPTIONS = 64

# Layers whose inputs line up with the caption's tokens [batch, seq] (padding masked out): the family's
# `aligned_layers`. Only the encoder layers: the pooler's input is the [CLS] state alone ([batch, hidden]);
# its rows carry no padding and all count.
ALIGNED = family_by_name("vision-text-dual-encoder").aligned_layers

HEADS = Rule(r"^(visual|text)_projection$", "skip", "projection head (skipped, as CLIP's)")
SETTINGS: dict[str, ModalityRules | None] = {
    "text": ModalityRules("dual-encoder text only", ("text",), (
        Rule(r"^vision_model\.", "skip", "vision tower kept dense"),
        Rule(r"^text_model\.", "text", "text encoder"), HEADS)),
    "vision": ModalityRules("dual-encoder vision only", ("vision",), (
        Rule(r"^vision_model\.", "vision", "vision tower"),
        Rule(r"^text_model\.", "skip", "text tower kept dense"), HEADS)),
    "both": None,  # the tool's own preset for the family 'vision-text-dual-encoder'
    # Diagnostic, not in the table: the text tower with its pooler kept dense. MiniLM's
    # `pooler.dense` (never trained by sentence-transformers) has tiny weights (mean |W| 0.007 vs
    # 0.03-0.07 in the encoder), so a magnitude-prior allocation prunes it first and whole; this
    # setting shows what the allocations do to the encoder layers alone.
    "text-pooler-dense": ModalityRules("dual-encoder text only, pooler dense", ("text",), (
        Rule(r"^vision_model\.", "skip", "vision tower kept dense"),
        Rule(r"^text_model\.pooler\.", "skip", "pooler kept dense (diagnostic)"),
        Rule(r"^text_model\.", "text", "text encoder"), HEADS)),
}
SETTING_TITLES = {"text": "text tower only (pretrained MiniLM)", "vision": "vision tower only (from scratch)",
                  "both": "both towers",
                  "text-pooler-dense": "text tower only, pooler kept dense (diagnostic)"}

# (method, allocation, group); label = how the configuration is named everywhere
CONFIGS = (
    ("magnitude", "uniform", "layer"),
    ("magnitude", "modality", "layer"),
    ("wanda", "uniform", "layer"),
    ("wanda", "modality", "layer"),
    ("wanda", "uniform", "row"),
    ("multiflow", "uniform", "layer"),
    ("multiflow", "modality", "layer"),
    ("multiflow", "uniform", "row"),
    # allocation variants from the scores (issue 7): src/multiflow/allocation.py
    ("wanda", "owl", "layer"),
    ("multiflow", "scores", "layer"),
    ("multiflow", "owl", "layer"),
    ("multiflow", "modality", "row"),
)
PRIMARY = {"text": "map", "vision": "zero_shot", "both": "zero_shot", "text-pooler-dense": "map"}
SECONDARY = {"text": "kl", "vision": "image_drift", "both": "map", "text-pooler-dense": "kl"}
JUDGES = {  # key: (title, format, higher is better)
    "map": ("retrieval mAP (held-out captions)", "{:.3f}", True),
    "r1": ("retrieval R@1 (held-out captions)", "{:.3f}", True),
    "kl": ("KL(dense || pruned) of the similarity distributions, nats", "{:.4f}", False),
    "text_drift": ("cosine drift of text embeddings", "{:.4f}", False),
    "image_drift": ("cosine drift of image embeddings", "{:.4f}", False),
    "zero_shot": ("zero-shot accuracy (held-out templates)", "{:.3f}", True),
}
JUDGES_BY_SETTING = {
    "text": ("map", "r1", "kl", "text_drift", "zero_shot"),
    "vision": ("zero_shot", "image_drift", "map", "r1", "kl"),
    "both": ("zero_shot", "map", "r1", "kl", "text_drift", "image_drift"),
    "text-pooler-dense": ("map", "r1", "kl", "text_drift", "zero_shot"),
}


def label(method: str, allocation: str, group: str) -> str:
    return f"{method} · {allocation}" + (" · per-row" if group == "row" else "")


# --- data and judges ---------------------------------------------------------------------------------

class Evaluation:
    """The evaluation split, the held-out captions and the dense model's embeddings."""

    def __init__(self, model, processor):
        self.tokenizer = processor.tokenizer
        splits = data.split_indices()
        self.pixels, self.image_labels = data.pixel_values(processor, splits["evaluation"], IMAGE_SIZE)
        texts, labels = data.captions(data.HELD_OUT_TEMPLATES)
        self.texts, self.text_labels = texts, torch.tensor(labels)
        self.logit_scale = float(model.logit_scale.detach().exp())
        self.dense_images, self.dense_texts = self.embed(model)
        self.dense = self.judge(model)

    def embed(self, model) -> tuple[torch.Tensor, torch.Tensor]:
        return judges.embed_images(model, self.pixels), judges.embed_texts(model, self.tokenizer, self.texts)

    def judge(self, model) -> dict[str, float]:
        """Every judge. A pruned tower can output an all-zero feature (e.g. MiniLM's pooler pruned whole):
        normalising it gives NaN. Such a row counts as collapsed and is judged as the zero vector
        (cosine 0 with everything: ties, broken by order), so the judges stay finite; the counts are
        reported (`text_collapsed`, `image_collapsed`), and so is a tower whose embeddings are all the same
        whatever the input (`text_constant`, `image_constant`: e.g. the pooler pruned whole, its bias left)."""
        images, texts = self.embed(model)
        collapsed = {"text_collapsed": int(texts.isnan().any(dim=1).sum()),
                     "image_collapsed": int(images.isnan().any(dim=1).sum())}
        images, texts = torch.nan_to_num(images, nan=0.0), torch.nan_to_num(texts, nan=0.0)
        collapsed["text_constant"] = bool((texts - texts[:1]).abs().max() < 1e-6)
        collapsed["image_constant"] = bool((images - images[:1]).abs().max() < 1e-6)
        r = judges.retrieval(images, texts, self.image_labels, self.text_labels)
        classes = torch.nan_to_num(judges.class_embeddings(texts, self.text_labels, data.NUM_CLASSES), nan=0.0)
        return {**collapsed,
            "map": r["map"], "r1": r["r1"],
            "kl": judges.similarity_kl(self.dense_texts, self.dense_images, texts, images, self.logit_scale),
            "text_drift": judges.cosine_drift(self.dense_texts, texts),
            "image_drift": judges.cosine_drift(self.dense_images, images),
            "zero_shot": judges.zero_shot_accuracy(images, self.image_labels, classes),
        }


def calibration_sample(seed: int) -> tuple[list[int], list[str]]:
    """CAL_IMAGES calibration-split images and CAL_CAPTIONS training-template captions, picked by the seed."""
    rng = np.random.default_rng(seed)
    pool = data.split_indices()["calibration"]
    images = sorted(int(i) for i in rng.choice(pool, size=CAL_IMAGES, replace=False))
    texts, _ = data.captions(data.TRAIN_TEMPLATES)
    picked = sorted(int(i) for i in rng.choice(len(texts), size=CAL_CAPTIONS, replace=False))
    return images, [texts[i] for i in picked]


def calibrate(model, processor, names: list[str], seed: int) -> dict:
    """Step 2 on the dense model: {layer: LayerStats} for every prunable layer of both towers."""
    image_ids, texts = calibration_sample(seed)
    pixels, _ = data.pixel_values(processor, image_ids, IMAGE_SIZE)
    enc = processor.tokenizer(texts, padding=True, return_tensors="pt")
    with torch.inference_mode(), collect_statistics(model, names, aligned_pattern=ALIGNED) as collector:
        # vision layers are not aligned: every row of their input counts; the mask is not read
        with collector.batch(torch.ones(pixels.shape[0], 1, dtype=torch.bool)):
            model.get_image_features(pixel_values=pixels)
        with collector.batch(enc["attention_mask"]):
            model.get_text_features(**enc)
    stats = from_collector(collector)
    missing = [n for n, st in stats.items() if not st.tokens]
    if missing:
        raise RuntimeError(f"calibration: layers saw no token: {missing[:5]}")
    return stats


def outliers(model, processor, names: list[str]) -> dict[str, dict]:
    """Per prunable layer of the dense model: max / median per-channel input RMS over the whole
    calibration split (200 images, the 80 training-template captions, no padding)."""
    splits = data.split_indices()
    pixels, _ = data.pixel_values(processor, splits["calibration"], IMAGE_SIZE)
    texts, _ = data.captions(data.TRAIN_TEMPLATES)
    with torch.inference_mode(), judges.record_input_rms(model, names) as rms:
        model.get_image_features(pixel_values=pixels)
        for batch in judges.unpadded_text_batches(processor.tokenizer, texts):
            model.get_text_features(**batch)
    ratios = rms.ratios()
    return {n: {"tower": "text" if n.startswith("text_model.") else "vision",
                "in_features": int(rms.sum_squares[n].shape[0]), "tokens": int(rms.count[n]), "ratio": ratios[n]}
            for n in names}


# --- model state --------------------------------------------------------------------------------------

def zeros_per_layer(model, names: list[str]) -> dict[str, int]:
    """Zero weights per layer: the restore check, and proof that layers outside a setting stay dense."""
    with torch.no_grad():
        return {n: int((model.get_submodule(n).weight == 0).sum()) for n in names}


def layer_type(name: str) -> str:
    return re.sub(r"\.\d+\.", ".N.", name)


# --- the run ------------------------------------------------------------------------------------------

def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="folder for results.json, table.md, plots, outliers.md")
    p.add_argument("--seeds", type=int, nargs="+", default=list(SEEDS), help="calibration seeds (default 0 1 2)")
    p.add_argument("--sparsities", type=float, nargs="+", default=list(SPARSITIES))
    p.add_argument("--settings", nargs="+", choices=list(SETTINGS), default=list(SETTINGS))
    p.add_argument("--quick", action="store_true",
                   help=f"smoke test: the first seed only and sparsities {' '.join(map(str, QUICK_SPARSITIES))}")
    p.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    p.add_argument("--parts", type=Path, default=PARTS, help="trained parts of the dual encoder")
    p.add_argument("--render-only", action="store_true",
                   help="rewrite table.md, outliers.md and the plots from OUT/results.json, computing nothing")
    args = p.parse_args(argv)
    if args.quick:
        args.seeds, args.sparsities = args.seeds[:1], list(QUICK_SPARSITIES)
    return args


def render(out: Path, results: dict) -> None:
    meta = results["meta"]
    args = argparse.Namespace(settings=meta["settings"], sparsities=meta["sparsities"], seeds=meta["seeds"])
    (out / "table.md").write_text(table_md(meta, results["dense"], results["summary"],
                                           results["modality_allocation"], args))
    (out / "outliers.md").write_text(outliers_md(results["outliers"]))
    for setting in meta["settings"]:
        plot(setting, results["summary"], results["dense"], out / f"{setting}.png")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.render_only:
        render(args.out, json.loads((args.out / "results.json").read_text()))
        print(f"rewrote {args.out}/table.md, outliers.md and the plots from results.json", flush=True)
        return 0
    started = time.perf_counter()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    torch.use_deterministic_algorithms(True)
    args.out.mkdir(parents=True, exist_ok=True)

    t0 = time.perf_counter()
    model = load_from_parts(args.parts).eval()
    processor = build_processor()
    inventory = multiflow.inventory(model)  # the family preset: every prunable layer, both towers
    names = [layer.name for layer in inventory.layers]
    prunable = {m: {"layers": len(ls), "params": sum(l.numel for l in ls)} for m, ls in inventory.by_modality().items()}
    dense_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    dense_zeros = zeros_per_layer(model, names)
    ev = Evaluation(model, processor)
    load_s = time.perf_counter() - t0
    print(f"dense model loaded and judged in {load_s:.1f} s: " + fmt_judges(ev.dense), flush=True)

    t0 = time.perf_counter()
    outlier_rows = outliers(model, processor, names)
    outlier_s = time.perf_counter() - t0
    print(f"outlier ratios in {outlier_s:.1f} s", flush=True)

    def restore() -> None:
        model.load_state_dict(dense_state)
        if zeros_per_layer(model, names) != dense_zeros:
            raise RuntimeError("the dense weights were not restored")

    jobs = []  # (setting, method, allocation, group, seed)
    for setting in args.settings:
        for method, allocation, group in CONFIGS:
            for seed in ([None] if method == "magnitude" else args.seeds):
                jobs.append((setting, method, allocation, group, seed))
    total = len(jobs) * len(args.sparsities)
    print(f"{total} rows: settings {args.settings}, {len(CONFIGS)} configurations, seeds {args.seeds}, "
          f"sparsities {args.sparsities}, {args.threads} threads", flush=True)

    calibration: dict[int, dict] = {}
    calibration_s: dict[int, float] = {}
    rows: list[dict] = []
    # per setting, non-uniform configuration (seed: none or the first) and sparsity: each layer's achieved sparsity
    allocations: dict[str, dict[str, dict[str, dict[str, float]]]] = {}
    # calibrated configurations seed by seed, so each seed's statistics are computed once
    jobs.sort(key=lambda j: (j[4] is not None, j[4] or 0, list(SETTINGS).index(j[0])))
    for setting, method, allocation, group, seed in jobs:
        rules = SETTINGS[setting]
        stats = None
        if seed is not None:
            if seed not in calibration:
                restore()
                t0 = time.perf_counter()
                calibration[seed] = calibrate(model, processor, names, seed)
                calibration_s[seed] = time.perf_counter() - t0
                print(f"calibrated seed {seed} in {calibration_s[seed]:.1f} s", flush=True)
            stats = calibration[seed]
        for sparsity in args.sparsities:
            t_row = time.perf_counter()
            restore()
            t0 = time.perf_counter()
            report = multiflow.prune_module(model, sparsity, stats=stats, method=method, allocation=allocation,
                                            group=group, rules=rules)
            prune_s = time.perf_counter() - t0
            zeros = zeros_per_layer(model, names)
            changed = [n for n in names if n not in report["layers"] and zeros[n] != dense_zeros[n]]
            if changed:  # a layer outside the setting must stay dense
                raise RuntimeError(f"{setting}: layers outside the setting were pruned: {changed[:3]}")
            if sum(zeros[n] - dense_zeros[n] for n in report["layers"]) > sum(
                    l["pruned"] for l in report["layers"].values()):
                raise RuntimeError(f"{setting}: more zeros than the report's pruned counts")
            t0 = time.perf_counter()
            judged = ev.judge(model)
            eval_s = time.perf_counter() - t0
            if allocation != "uniform" and seed in (None, args.seeds[0]):
                allocations.setdefault(setting, {}).setdefault(label(method, allocation, group), {})[
                    f"{sparsity:g}"] = {n: layer["achieved_sparsity"] for n, layer in report["layers"].items()}
            row = {"setting": setting, "config": label(method, allocation, group), "method": method,
                   "allocation": allocation, "group": group, "sparsity": sparsity, "seed": seed, **judged,
                   "achieved_sparsity": report["global"]["achieved_sparsity"],
                   "achieved_by_modality": {m: v["achieved_sparsity"] for m, v in report["modalities"].items()},
                   "layer_sparsity_min": min(l["achieved_sparsity"] for l in report["layers"].values()),
                   "layer_sparsity_max": max(l["achieved_sparsity"] for l in report["layers"].values()),
                   "prune_s": prune_s, "eval_s": eval_s, "seconds": time.perf_counter() - t_row}
            rows.append(row)
            print(f"[{len(rows):3d}/{total}] {setting:6s} {row['config']:32s} s={sparsity:<4g} "
                  f"seed={'-' if seed is None else seed}  {fmt_judges(judged)}  "
                  f"achieved {row['achieved_sparsity']:.4f}  {row['seconds']:.1f} s", flush=True)
    restore()

    wall = time.perf_counter() - started
    meta = {
        "command": "python -m experiments.dual_encoder.bench " + " ".join(argv if argv is not None else sys.argv[1:]),
        "quick": args.quick, "seeds": args.seeds, "sparsities": args.sparsities, "settings": args.settings,
        "threads": args.threads, "calibration": {"images": CAL_IMAGES, "captions": CAL_CAPTIONS,
                                                 "image_pool": "calibration split (200)",
                                                 "caption_pool": "training templates x 10 classes (80)",
                                                 "aligned_pattern": ALIGNED},
        "evaluation": {"images": len(ev.pixels), "captions": len(ev.texts), "templates": "held-out"},
        "prunable": prunable, "parts": str(args.parts), "multiflow": multiflow.__version__, "torch": torch.__version__,
        "python": platform.python_version(), "machine": platform.machine(), "cpus": os.cpu_count(),
        "load_s": load_s, "outlier_s": outlier_s, "calibration_s": calibration_s, "wall_s": wall,
        "rows": len(rows), "row_seconds_mean": statistics.fmean(r["seconds"] for r in rows) if rows else None,
    }
    summary = summarise(rows)
    results = {"meta": meta, "dense": ev.dense, "rows": rows, "summary": summary,
               "modality_allocation": allocations, "outliers": outlier_rows}
    (args.out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    render(args.out, results)
    print(f"wrote {args.out}: {len(rows)} rows in {wall:.0f} s "
          f"({meta['row_seconds_mean']:.2f} s per row)", flush=True)
    return 0


def clean(x: float) -> float:
    """For display: float rounding gives drifts like -1e-8 where nothing changed."""
    return 0.0 if abs(x) < 1e-6 else x


def degenerate(entry: dict) -> bool:
    """Some embeddings collapsed to zero, or a tower's embeddings are the same for every input."""
    return bool(entry["text_collapsed"] or entry["image_collapsed"] or entry["text_constant"]
                or entry["image_constant"])


def fmt_judges(j: dict[str, float]) -> str:
    j = {k: clean(v) if isinstance(v, float) else v for k, v in j.items()}
    collapsed = "".join(f" {k}={j[k]}" for k in ("text_collapsed", "image_collapsed", "text_constant",
                                                   "image_constant") if j[k])
    return (f"mAP={j['map']:.3f} R@1={j['r1']:.3f} KL={j['kl']:.4f} "
            f"tdrift={j['text_drift']:.4f} idrift={j['image_drift']:.4f} zs={j['zero_shot']:.3f}{collapsed}")


# --- summaries ----------------------------------------------------------------------------------------

def summarise(rows: list[dict]) -> list[dict]:
    """Mean and population std over seeds per (setting, configuration, sparsity)."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["setting"], r["config"], r["sparsity"]), []).append(r)
    out = []
    for (setting, config, sparsity), rs in groups.items():
        entry = {"setting": setting, "config": config, "method": rs[0]["method"], "allocation": rs[0]["allocation"],
                 "group": rs[0]["group"], "sparsity": sparsity, "n": len(rs),
                 "seeds": [r["seed"] for r in rs]}
        for key in JUDGES:
            values = [r[key] for r in rs]
            if any(math.isnan(v) for v in values):
                entry[key] = {"mean": math.nan, "std": math.nan}
            else:
                entry[key] = {"mean": statistics.fmean(values), "std": statistics.pstdev(values)}
        entry["text_collapsed"] = max(r["text_collapsed"] for r in rs)
        entry["image_collapsed"] = max(r["image_collapsed"] for r in rs)
        entry["text_constant"] = any(r["text_constant"] for r in rs)
        entry["image_constant"] = any(r["image_constant"] for r in rs)
        out.append(entry)
    return out


def _cell(entry: dict, key: str, bold: bool) -> str:
    fmt = JUDGES[key][1]
    text = fmt.format(clean(entry[key]["mean"]))
    if entry["n"] > 1:
        text += " ± " + fmt.format(clean(entry[key]["std"]))
    text = f"**{text}**" if bold else text
    return text + (" †" if degenerate(entry) else "")


def judge_table(summary: list[dict], setting: str, key: str, sparsities: list[float], dense: dict) -> str:
    by = {(e["config"], e["sparsity"]): e for e in summary if e["setting"] == setting}
    configs = [label(*c) for c in CONFIGS]
    higher = JUDGES[key][2]
    best = {}
    for s in sparsities:  # collapsed entries are never "best" (a collapsed text tower gives a uniform Q: low KL)
        means = [by[(c, s)][key]["mean"] for c in configs
                 if (c, s) in by and not degenerate(by[(c, s)])]
        if means:
            best[s] = max(means) if higher else min(means)
    lines = ["| configuration | " + " | ".join(f"{s:g}" for s in sparsities) + " |",
             "|---|" + "---|" * len(sparsities)]
    for c in configs:
        cells = []
        for s in sparsities:
            e = by.get((c, s))
            cells.append("" if e is None else _cell(e, key, s in best and e[key]["mean"] == best[s]
                                                   and not degenerate(e)))
        lines.append(f"| {c} | " + " | ".join(cells) + " |")
    return (f"{JUDGES[key][0]} ({'higher' if higher else 'lower'} is better; dense "
            f"{JUDGES[key][1].format(clean(dense[key]))}; best mean per column in bold, † excluded)\n\n" + "\n".join(lines) + "\n")


def allocation_md(allocations: dict, setting: str, sparsities: list[float], seed: int) -> str:
    """Per layer type, the sparsity each non-uniform allocation gives (mean over the 6 blocks, min-max)."""
    per = allocations.get(setting)
    if not per:
        return ""
    at = min(sparsities, key=lambda x: abs(x - 0.75))
    key = f"{at:g}"
    configs, step1 = [], None  # Step 1 ("modality", layer group) is the same for every method: one column
    for c in per:
        if key not in per[c]:
            continue
        if c.split(" · ")[1] == "modality" and not c.endswith("per-row"):
            if step1 is None:
                step1 = c
                configs.append(c)
        else:
            configs.append(c)
    first = per[configs[0]][key]
    types = list(dict.fromkeys(layer_type(n) for n in first))
    heads = ["modality (Step 1, any method)" if c == step1 else c for c in configs]
    lines = ["| layer type | " + " | ".join(heads) + " |", "|---|" + "---|" * len(configs)]
    for t in types:
        cells = []
        for c in configs:
            values = [v for n, v in per[c][key].items() if layer_type(n) == t]
            cells.append(f"{statistics.fmean(values):.2f}" + (f" ({min(values):.2f}-{max(values):.2f})"
                                                               if len(values) > 1 else ""))
        lines.append(f"| `{t}` | " + " | ".join(cells) + " |")
    return (f"Where the allocations put the sparsity at target {at:g}: achieved sparsity per layer type (mean over "
            f"its layers, min-max in brackets; calibrated allocations: seed {seed}):\n\n" + "\n".join(lines) + "\n")


def table_md(meta: dict, dense: dict, summary: list[dict], allocations: dict, args) -> str:
    out = [
        "# Dual encoder: what pruning costs, per tower, method, allocation and sparsity (issue 7)",
        "",
        (f"`{meta['command']}` — {meta['rows']} rows in {meta['wall_s'] / 60:.1f} min on {meta['cpus']} CPU cores "
         f"({meta['threads']} torch threads; torch {meta['torch']}, multiflow {meta['multiflow']})."),
        "",
        ("Model: `VisionTextDualEncoderModel`, vision tower = CLIP ViT trained from scratch on 32 px digits "
         f"({meta['prunable']['vision']['layers']} prunable linears, {meta['prunable']['vision']['params']:,} "
         "weights), text tower = pretrained all-MiniLM-L6-v2 "
         f"({meta['prunable']['text']['layers']} prunable linears incl. the pooler, "
         f"{meta['prunable']['text']['params']:,} weights); projection heads never pruned. Each row restores the "
         "dense weights, prunes with `multiflow.prune_module` and judges against the dense model on the "
         "evaluation split (397 images; queries = the 40 held-out-template captions)."),
        "",
        (f"Calibration (wanda, multiflow): {meta['calibration']['images']} calibration-split images + "
         f"{meta['calibration']['captions']} training-template captions, picked by the seed (seeds "
         f"{' '.join(map(str, meta['seeds']))}); padding excluded. Cells: mean ± population std over seeds; "
         "magnitude needs no calibration and has one run (no ±)."),
        "",
        ("Configurations: `method · allocation[ · per-row]`. The method scores the weights (magnitude |W|, "
         "wanda |W|·‖x‖, multiflow's information flow); the allocation sets each layer's sparsity: `uniform` = "
         "the target in every layer; `modality` = MULTIFLOW's Step 1 (one magnitude threshold per modality: "
         "per-layer sparsities differ, the modality total equals the target); `scores` = one threshold per "
         "modality over per-layer-normalised scores of the method; `owl` = outlier-weighted layerwise sparsity "
         "(OWL, M = 5, lambda = 0.08) from the method's scores (`src/multiflow/allocation.py`). Then the lowest "
         "scores are pruned within each layer, or within each output row with `per-row` (Wanda's own "
         "comparison group)."),
        "",
        "Dense: " + ", ".join(f"{k} {JUDGES[k][1].format(clean(dense[k]))}" for k in JUDGES) + ".",
        "",
        ("† = degenerate in at least one seed: a tower's embeddings are the same for every input (the text "
         "pooler pruned whole leaves tanh(its bias)), or collapsed to the zero vector (then judged as zero "
         "vectors: cosine 0 with everything, ties broken by order); retrieval and zero-shot are then at chance "
         "level, and KL is that of a uniform (or constant) distribution, which can look better than a damaged "
         "but informative one. † entries are never marked best. Per row in results.json (`text_constant`, "
         "`text_collapsed` = how many of the 40 captions, and the same for images)."),
        "",
    ]
    for setting in args.settings:
        out += [f"## {SETTING_TITLES[setting]}", ""]
        for i, key in enumerate(JUDGES_BY_SETTING[setting]):
            note = ""
            if setting == "text" and key == "zero_shot":
                note = ("Not a text judge (the class word reaches the output along unpruned embeddings and the "
                        "residual path; it falls only where the text embedding itself dies); shown for "
                        "completeness.\n\n")
            out += [("Primary judge: " if i == 0 else "") + note + judge_table(summary, setting, key,
                                                                             args.sparsities, dense), ""]
        alloc = allocation_md(allocations, setting, args.sparsities, args.seeds[0])
        if alloc:
            out += [alloc, ""]
    return "\n".join(out)


def outliers_md(rows: dict[str, dict]) -> str:
    out = ["# Activation-outlier ratio per layer of the dense dual encoder", "",
           ("max / median over input channels of the per-channel input RMS, over every token of the whole "
            "calibration split (200 images x 65 tokens; the 80 training-template captions, unpadded). "
            "Large ratios = a few input channels carry much larger activations than the rest: there Wanda's "
            "|W|·‖x‖ and MULTIFLOW's scores rank weights differently from |W|."), "",
           "| tower | layers | median ratio | max ratio | layer of the max |", "|---|---|---|---|---|"]
    for tower in ("text", "vision"):
        rs = {n: r for n, r in rows.items() if r["tower"] == tower}
        ratios = [r["ratio"] for r in rs.values()]
        peak = max(rs, key=lambda n: rs[n]["ratio"])
        out.append(f"| {tower} | {len(rs)} | {statistics.median(ratios):.1f} | {max(ratios):.1f} | `{peak}` |")
    out += ["", "Per layer type (median over the 6 blocks, min-max):", "",
            "| tower | layer type | median | min | max |", "|---|---|---|---|---|"]
    types: dict[str, list[float]] = {}
    for n, r in rows.items():
        types.setdefault(layer_type(n), []).append(r["ratio"])
    for t, ratios in types.items():
        tower = "text" if t.startswith("text_model.") else "vision"
        out.append(f"| {tower} | `{t}` | {statistics.median(ratios):.1f} | {min(ratios):.1f} | {max(ratios):.1f} |")
    out += ["", "Every layer:", "", "| layer | tower | inputs | tokens | ratio |", "|---|---|---|---|---|"]
    for n, r in rows.items():
        out.append(f"| `{n}` | {r['tower']} | {r['in_features']} | {r['tokens']} | {r['ratio']:.1f} |")
    return "\n".join(out) + "\n"


def plot(setting: str, summary: list[dict], dense: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = (PRIMARY[setting], SECONDARY[setting])
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
    styles = {"magnitude": ("tab:gray", "o"), "wanda": ("tab:blue", "s"), "multiflow": ("tab:red", "^")}
    for ax, key in zip(axes, keys):
        for method, allocation, group in CONFIGS:
            c = label(method, allocation, group)
            es = sorted((e for e in summary if e["setting"] == setting and e["config"] == c),
                        key=lambda e: e["sparsity"])
            if not es:
                continue
            color, marker = styles[method]
            ls = {"uniform": "-", "modality": "--", "scores": "-.", "owl": (0, (1, 1))}.get(allocation, ":")
            if group == "row":
                marker = "x"
            ax.errorbar([e["sparsity"] for e in es], [e[key]["mean"] for e in es],
                        yerr=[e[key]["std"] for e in es], color=color, marker=marker, linestyle=ls, capsize=3,
                        label=c, alpha=0.85)
        if key in ("kl", "text_drift", "image_drift"):
            ax.set_yscale("log")  # dense is 0 there: no dense line
        else:
            ax.axhline(dense[key], color="black", linewidth=0.8, linestyle="-.", label="dense")
        ax.set_xlabel("target sparsity")
        ax.set_ylabel(JUDGES[key][0])
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"Dual encoder, pruning the {SETTING_TITLES[setting]}: mean ± std over calibration seeds")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
