"""The human console reports: Step 1's distribution (in the seed's structure), the modality grouping, the
statistics of Step 2, Step 3's pruning report, and the evaluation (accuracy or perplexity).

Machine-readable output is the JSON each step writes; this module only formats text for a person.
"""

from __future__ import annotations

import io
from typing import TextIO

from multiflow.distribution.distribute import Distribution
from multiflow.models.inventory import Inventory

RULE = "=" * 78


def _pct(x: float) -> str:
    return f"{100 * x:6.2f}%"


def _table(rows: list[list[str]], right: set[int]) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    out = []
    for j, row in enumerate(rows):
        cells = [c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths))]
        out.append("  " + "  ".join(cells).rstrip())
        if j == 0:
            out.append("  " + "  ".join("-" * w for w in widths))
    return out


def modality_table(dist: Distribution) -> list[str]:
    total = sum(s.numel for s in dist.layers.values())
    rows = [["Modality", "Layers", "Parameters", "% of prunable"]]
    for m in dist.modalities:
        shares = dist.modality_layers(m).values()
        n = sum(s.numel for s in shares)
        rows.append([m.upper(), str(len(shares)), f"{n:,}", _pct(n / total if total else 0.0)])
    rows.append(["TOTAL", str(len(dist.layers)), f"{total:,}", _pct(1.0 if total else 0.0)])
    return _table(rows, {1, 2, 3})


def _choices_lines(dist: Distribution) -> list[str]:
    """Step 1's --prune-only and --max-layer-sparsity, and what they did, in words."""
    meta, lines = dist.meta, []
    dense = set(meta.get("dense_layers") or ())
    if dense:
        numel = sum(s.numel for n, s in dist.layers.items() if n in dense)
        total = sum(s.numel for s in dist.layers.values())
        pruned = sum(s.pruned for s in dist.layers.values())
        lines.append(f"--prune-only {meta.get('prune_only')}: {len(dense)} layers ({numel:,} parameters) kept dense; "
                     f"the target applies to the other {total - numel:,} parameters "
                     f"({_pct(pruned / (total - numel)).strip() if total > numel else '-'} pruned), "
                     f"{_pct(pruned / total).strip()} of all prunable parameters")
    if meta.get("max_layer_sparsity") is not None:
        capped = meta.get("capped_layers") or []
        lines.append(f"--max-layer-sparsity {meta['max_layer_sparsity']:g}: {len(capped)} layers held at the cap, "
                     "the rest of their modality's target spread over its other layers (thresholds below: before "
                     "the cap)")
    return lines


def render(dist: Distribution, all_layers: bool = False, edge: int = 5) -> str:
    """The report for one target sparsity."""
    out = io.StringIO()
    w = lambda line="": print(line, file=out)  # noqa: E731
    meta = dist.meta
    w(RULE)
    w(f"MULTIFLOW Step 1: modality-aware sparsity distribution at {_pct(dist.target_sparsity).strip()}")
    w(f"Model: {meta.get('model')}   naming: {meta.get('naming')}   rules: {meta.get('rules', {}).get('name')}")
    w(RULE)
    for note in meta.get("notes", []):
        w(f"NOTE: {note}")
    for line in _choices_lines(dist):
        w(line)
    w()
    w("Prunable parameters by modality")
    for line in modality_table(dist):
        w(line)
    stats = dist.modality_stats()
    for m in dist.modalities:
        if m not in stats:
            continue
        t = dist.thresholds.get(m, {})
        w()
        thr = ("all layers kept dense (--prune-only)" if not t else "nothing pruned (k = 0)"
               if t.get("threshold") is None else f"threshold |W| <= {t['threshold']:.6g}, k = {t['k']:,}")
        w(f"{m.upper()}: {thr}")
        shares = list(dist.modality_layers(m).items())
        shown = shares if all_layers or len(shares) <= 2 * edge else shares[:edge] + [None] + shares[-edge:]
        rows = [["Layer", "Params", "Sparsity"]]
        for item in shown:
            if item is None:
                rows.append([f"... {len(shares) - 2 * edge} more layers (--all-layers lists them) ...", "", ""])
            else:
                name, share = item
                rows.append([name, f"{share.numel:,}", _pct(share.sparsity)])
        for line in _table(rows, {1, 2}):
            w(line)
        s = stats[m]
        w(
            f"  Summary: range {_pct(s['min_layer_sparsity']).strip()} - {_pct(s['max_layer_sparsity']).strip()}, "
            f"mean {_pct(s['mean_layer_sparsity']).strip()} ± {_pct(s['std_layer_sparsity']).strip()}"
        )
    w()
    w("Global summary")
    rows = [["Modality", "Target", "Actual", "Pruned", "Total"]]
    pruned_all = total_all = 0
    for m in dist.modalities:
        if m not in stats:
            rows.append([m.upper(), _pct(dist.target_sparsity), "-", "0", "0"])
            continue
        s = stats[m]
        pruned_all += s["pruned_params"]
        total_all += s["total_params"]
        rows.append([m.upper(), _pct(dist.target_sparsity), _pct(s["actual_sparsity"]),
                     f"{s['pruned_params']:,}", f"{s['total_params']:,}"])
    if total_all:
        rows.append(["GLOBAL", _pct(dist.target_sparsity), _pct(pruned_all / total_all), f"{pruned_all:,}", f"{total_all:,}"])
    for line in _table(rows, {1, 2, 3, 4}):
        w(line)
    w()
    w("Key insights")
    for m in dist.modalities:
        if m not in stats:
            w(f"  - {m.upper()}: no prunable layers, nothing pruned.")
            continue
        s = stats[m]
        spread = s["max_layer_sparsity"] - s["min_layer_sparsity"]
        w(
            f"  - {m.upper()}: {_pct(s['actual_sparsity']).strip()} overall vs target {_pct(dist.target_sparsity).strip()}; "
            f"its layers range over {100 * spread:.1f} points "
            f"({_pct(s['min_layer_sparsity']).strip()} to {_pct(s['max_layer_sparsity']).strip()}): "
            "layers with many small weights take more of the modality's budget."
        )
    return out.getvalue()


def render_inventory(inv: Inventory) -> str:
    """`multiflow modalities`: the grouping, what is skipped and why."""
    out = io.StringIO()
    w = lambda line="": print(line, file=out)  # noqa: E731
    w(f"Model: {inv.model_path or '(in-memory model)'}   naming: {inv.naming}   rules: {inv.rules.name}")
    for note in inv.notes:
        w(f"NOTE: {note}")
    w()
    groups = inv.by_modality()
    total = sum(l.numel for l in inv.layers)
    rows = [["Modality", "Layers", "Parameters", "% of prunable", "dtypes"]]
    for m, ls in groups.items():
        n = sum(l.numel for l in ls)
        dtypes = ",".join(sorted({str(l.dtype).removeprefix("torch.") for l in ls})) or "-"
        rows.append([m.upper(), str(len(ls)), f"{n:,}", _pct(n / total if total else 0.0), dtypes])
    for line in _table(rows, {1, 2, 3}):
        w(line)
    w()
    w("Skipped 2-D weights (never pruned)")
    reasons: dict[str, list] = {}
    for name, numel, rule in inv.skipped:
        reasons.setdefault(rule.why or rule.pattern, []).append((name, numel))
    rows = [["Why", "Tensors", "Parameters", "e.g."]]
    for why, items in reasons.items():
        rows.append([why, str(len(items)), f"{sum(n for _, n in items):,}", items[0][0]])
    if len(rows) == 1:
        rows.append(["(none)", "0", "0", ""])
    for line in _table(rows, {1, 2}):
        w(line)
    w(f"Other parameters (biases, norms, convolutions; never candidates): {inv.other_params:,}")
    w()
    w("Rules (first match wins; embeddings, norms and output heads are always skipped)")
    for rule in inv.rules.rules:
        w(f"  {rule.pattern:46} -> {rule.group:6} {rule.why}")
    return out.getvalue()


def write(text: str, stream: TextIO) -> None:
    stream.write(text)
    stream.flush()


def render_stats(stats: dict, meta: dict, edge: int = 5) -> str:
    """`multiflow calibrate`: what was measured, per layer token counts and RMS input."""
    out = io.StringIO()
    w = lambda line="": print(line, file=out)  # noqa: E731
    w(RULE)
    w(f"MULTIFLOW Step 2: calibration statistics from {meta.get('nsamples')} samples ({meta.get('data')})")
    w(f"Model: {meta.get('model')}   dtype: {meta.get('dtype')}   device: {meta.get('device')}   "
      f"prompt: {meta.get('prompt')}")
    w(RULE)
    rows = [["Layer", "Tokens", "RMS input (mean a_j)", "max a_j / median a_j"]]
    items = list(stats.items())
    shown = items if len(items) <= 2 * edge else items[:edge] + [None] + items[-edge:]
    for item in shown:
        if item is None:
            rows.append([f"... {len(items) - 2 * edge} more layers ...", "", "", ""])
            continue
        name, st = item
        if st.sq_mean is None:
            rows.append([name, "0", "NO TOKENS", "-"])
            continue
        a = st.sq_mean.sqrt()
        median = float(a.median())
        ratio = f"{float(a.max()) / median:.1f}" if median > 0 else "inf"
        rows.append([name, f"{st.tokens:,}", f"{float(a.mean()):.4g}", ratio])
    for line in _table(rows, {1, 2, 3}):
        w(line)
    silent = [n for n, st in stats.items() if not st.tokens]
    if silent:
        w(f"Layers that saw no token ({len(silent)}): {', '.join(silent)}")
    typed = {k for st in stats.values() for k in st.by_type}
    if typed:
        w()
        w("Token types (language-model layers): " + ", ".join(
            f"{k}: {max(st.by_type[k][1] for st in stats.values() if k in st.by_type):,} tokens" for k in sorted(typed)))
    return out.getvalue()


def render_prune(report: dict, edge: int = 5) -> str:
    """`multiflow prune` / `run`: what was pruned, per modality and for the first and last layers."""
    out = io.StringIO()
    w = lambda line="": print(line, file=out)  # noqa: E731
    w(RULE)
    w(f"MULTIFLOW Step 3: {report['method']} scores, allocation {report['allocation']}, group {report['group']}, "
      f"structure {report['structure']}, dead layers {report['dead_layers']}")
    if report.get("update", "none") != "none" or report.get("allocation_score"):
        obs = report.get("obs") or {}
        w(f"Weight update: {report.get('update', 'none')}"
          + (f" (blocksize {obs['blocksize']}, percdamp {obs['percdamp']:g})" if obs else "")
          + (f"   allocation planned from {report['allocation_score']} scores on the dense model"
             if report.get("allocation_score") else ""))
    w(f"Model: {report['model']}   target sparsity: {report['target_sparsity']}")
    w(RULE)
    for note in report.get("notes", []):
        w(f"NOTE: {note}")
    if report.get("kept_dense"):
        dense, part = report["kept_dense"], report["pruned_part"]
        w(f"--prune-only {report['prune_only']}: {dense['layers']} layers ({dense['params']:,} parameters) kept "
          f"dense; the pruned layers reach {_pct(part['achieved_sparsity']).strip()}, all prunable layers "
          f"{_pct(report['global']['achieved_sparsity']).strip()} (GLOBAL below)")
    if report.get("max_layer_sparsity") is not None:
        w(f"--max-layer-sparsity {report['max_layer_sparsity']:g}: no layer above it")
    rows = [["Modality", "Layers", "Parameters", "Pruned", "Sparsity"]]
    for m, t in report["modalities"].items():
        rows.append([m.upper(), str(t["layers"]), f"{t['params']:,}", f"{t['pruned']:,}", _pct(t["achieved_sparsity"])])
    g = report["global"]
    rows.append(["GLOBAL", str(g["layers"]), f"{g['params']:,}", f"{g['pruned']:,}", _pct(g["achieved_sparsity"])])
    for line in _table(rows, {1, 2, 3, 4}):
        w(line)
    w()
    items = list(report["layers"].items())
    shown = items if len(items) <= 2 * edge else items[:edge] + [None] + items[-edge:]
    rows = [["Layer", "Target", "Achieved", "Kept"]]
    for item in shown:
        if item is None:
            rows.append([f"... {len(items) - 2 * edge} more layers (multiflow_report.json lists all) ...", "", "", ""])
            continue
        name, info = item
        rows.append([name + (" (dead)" if info.get("dead") else " (dense)" if info.get("dense") else ""),
                     _pct(info["target_sparsity"]),
                     _pct(info["achieved_sparsity"]), f"{info['kept']:,}"])
    for line in _table(rows, {1, 2, 3}):
        w(line)
    calibration = report.get("calibration") or {}
    if calibration.get("execution"):
        w(f"Calibration: {calibration['execution']}")
    timings = {k.removesuffix("_seconds"): v for k, v in (report.get("timings") or {}).items() if v is not None}
    if timings:
        w("Time: " + ", ".join(f"{k} {v:.1f} s" for k, v in timings.items()))
    return out.getvalue()


def _eval_header(results: dict, extra: str = "") -> list[str]:
    """The lines that open an evaluation report: the model, its data, and the dense reference if any."""
    lines = [f"Model: {results['model']}   data: {results['data']}{extra}"]
    if results.get("reference_model"):
        lines.append(f"Reference (dense): {results['reference_model']}")
    return lines


def render_eval(results: dict) -> str:
    """`multiflow eval`: overall and per-kind metrics."""
    out = io.StringIO()
    w = lambda line="": print(line, file=out)  # noqa: E731
    for line in _eval_header(results, f"   samples: {results['nsamples']}"):
        w(line)
    has_kl = "kl" in results
    rows = [["Kind", "Count", "Accuracy", "ROUGE-L"] + (["KL(dense||model)", "Top-1 agree"] if has_kl else [])]
    for label, r in [("ALL", results), *results.get("per_kind", {}).items()]:
        row = [label, str(r["count"]), _pct(r["accuracy"]), f"{r['rouge_l']:.4f}"]
        if has_kl:
            row += [f"{r['kl']:.4g}" if "kl" in r else "-", _pct(r["top1_agreement"]) if "kl" in r else "-"]
        rows.append(row)
    for line in _table(rows, set(range(1, len(rows[0])))):
        w(line)
    return out.getvalue()


def render_perplexity(results: dict) -> str:
    """`multiflow eval` on a plain language model: perplexity, and drift from the dense model."""
    out = io.StringIO()
    w = lambda line="": print(line, file=out)  # noqa: E731
    for line in _eval_header(results):
        w(line)
    w(f"{results['windows']} window(s) of {results['seq_len']} tokens ({results['windows_available']} in the text), "
      f"{results['tokens']:,} predicted tokens")
    rows = [["Perplexity", "Mean NLL"] + (["KL(dense||model)", "Top-1 agree"] if "kl" in results else [])]
    row = [f"{results['perplexity']:.4f}", f"{results['nll']:.4f}"]
    if "kl" in results:
        row += [f"{results['kl']:.4g}", _pct(results["top1_agreement"])]
    rows.append(row)
    for line in _table(rows, set(range(len(row)))):
        w(line)
    return out.getvalue()


def render_retrieval(results: dict) -> str:
    """`multiflow eval` on a retrieval model: recall@k both ways, zero-shot accuracy, agreement with the dense model."""
    out = io.StringIO()
    w = lambda line="": print(line, file=out)  # noqa: E731
    for line in _eval_header(results, f"   images: {results['images']}   captions: {results['captions']}"):
        w(line)
    ks = list(results["text_to_image"])
    rows = [["Direction"] + [k.replace("recall", "R") for k in ks]]
    for label, key in (("image -> text", "image_to_text"), ("text -> image", "text_to_image")):
        rows.append([label] + [_pct(results[key][k]) for k in ks])
    for line in _table(rows, set(range(1, len(rows[0])))):
        w(line)
    if "zero_shot" in results:
        z = results["zero_shot"]
        w(f"Zero-shot accuracy: {_pct(z['accuracy'])} ({z['images']} images, {len(z['classes'])} classes)")
    if "agreement" in results:
        a = results["agreement"]
        w("Agreement with the dense model: top-1 text -> image " + _pct(a["text_to_image_top1"]) +
          ", image -> text " + _pct(a["image_to_text_top1"]) +
          (f", zero-shot prediction {_pct(a['zero_shot_prediction'])}" if "zero_shot_prediction" in a else "") +
          f"; embedding drift (1 - cos) image {a['image_embedding_drift']:.4g}, text {a['text_embedding_drift']:.4g}" +
          (f"; KL(dense||model) {a['kl']:.4g}" if "kl" in a else ""))
    return out.getvalue()
