"""Step 3's report (multiflow_report.json): per layer, per modality and global counts, the choices and the
inputs; checked against the plan and the counts written before anything is moved into place."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from multiflow._version import __version__
from multiflow.distribution.distribute import Distribution
from multiflow.errors import MultiflowError
from multiflow.pruning.plan import SCORE_ALLOCATIONS, LayerPlan, planned_count

if TYPE_CHECKING:
    from multiflow.pruning.config import PruneConfig

# What differs between two runs with the same inputs and options (the weights never do): seconds and
# peak memory. `--deterministic-report` leaves them out, so that the report is byte-identical.
VOLATILE_REPORT_FIELDS = ("timings", "calibration.peak_device_memory_gib")


def drop_volatile(report: dict[str, Any]) -> dict[str, Any]:
    """`report` without VOLATILE_REPORT_FIELDS (in place; returned for convenience)."""
    for field_name in VOLATILE_REPORT_FIELDS:
        *parents, leaf = field_name.split(".")
        holder = report
        for parent in parents:
            holder = holder.get(parent) if isinstance(holder, dict) else None
        if isinstance(holder, dict):
            holder.pop(leaf, None)
    return report


def check_achieved(plans: list[LayerPlan], config: PruneConfig, report: dict[str, Any],
                   dist: Distribution | None) -> None:
    """Before the output is moved into place: every layer written with its zeros checked, its count what the
    plan allows (N:M and dead layers exactly), and the report's layer, modality and global counts those counts,
    never below the plan's totals (Step 1's per-modality count for a distribution). A mismatch is an error."""
    totals: dict[str, list[int]] = {}
    for p in plans:
        name, need = p.layer.name, planned_count(p, config)
        if not p.written:
            raise MultiflowError(f"layer {name} was not found in the files written")
        exact = p.dead or p.dense or config.structure.is_n_m
        if p.pruned < need or (exact and p.pruned != need) or p.pruned > p.layer.numel:
            raise MultiflowError(f"layer {name}: {p.pruned} weights pruned, the plan says "
                                 f"{'exactly' if exact else 'at least'} {need}")
        if report["layers"][name]["pruned"] != p.pruned:
            raise MultiflowError(f"layer {name}: the report says {report['layers'][name]['pruned']} pruned, "
                                 f"{p.pruned} were written")
        t = totals.setdefault(p.layer.modality, [0, 0])
        t[0], t[1] = t[0] + p.pruned, t[1] + need
    stats = dist.modality_stats() if dist is not None and config.group == "layer" else {}
    for m, (pruned, need) in totals.items():
        if m in stats and stats[m]["pruned_params"] != need:
            raise MultiflowError(f"modality {m}: the layer plans prune {need} weights, the distribution "
                                 f"{stats[m]['pruned_params']}")
        if report["modalities"][m]["pruned"] != pruned or pruned < need:
            raise MultiflowError(f"modality {m}: {pruned} weights pruned, the report says "
                                 f"{report['modalities'][m]['pruned']} and the plan at least {need}")
    if report["global"]["pruned"] != sum(t[0] for t in totals.values()):
        raise MultiflowError("the report's global pruned count is not the sum of its layers")


def method_fields(config: PruneConfig) -> dict[str, Any]:
    """The report's record of the weight update and of the score a score-based allocation planned from."""
    by_scores = config.allocation in SCORE_ALLOCATIONS and not config.structure.is_n_m
    return {"update": "obs" if config.reconstructs else "none",
            "obs": {"blocksize": config.blocksize, "percdamp": config.percdamp} if config.reconstructs else None,
            "allocation_score": config.allocation_score if by_scores else None}


def build_report(config, inventory, plans, dist, calibration, digest) -> dict[str, Any]:
    """The report's fields (`config` a PruneConfig, or a ModuleConfig, which has no model path)."""
    import safetensors
    import transformers

    per_layer = {
        p.layer.name: {"modality": p.layer.modality, "numel": p.layer.numel, "target_sparsity": p.target,
                       "achieved_sparsity": p.pruned / p.layer.numel, "pruned": p.pruned,
                       "kept": p.layer.numel - p.pruned, **({"dead": True} if p.dead else {}),
                       **({"dense": True} if p.dense else {})}
        for p in plans
    }
    totals = {}
    for m in inventory.rules.modalities:
        ps = [p for p in plans if p.layer.modality == m]
        n = sum(p.layer.numel for p in ps)
        pruned = sum(p.pruned for p in ps)
        totals[m] = {"layers": len(ps), "params": n, "pruned": pruned, "achieved_sparsity": pruned / n if n else 0.0}
    n_all = sum(p.layer.numel for p in plans)
    pruned_all = sum(p.pruned for p in plans)
    notes = list(inventory.notes)
    if config.structure.is_n_m:
        notes.append(f"--structure {config.structure}: every layer keeps {config.structure.n} of every "
                     f"{config.structure.m} inputs; the allocation ({config.allocation}) does not apply")
    return {
        "tool": "multiflow", "version": __version__,
        "libraries": {"torch": torch.__version__, "transformers": transformers.__version__,
                      "safetensors": safetensors.__version__},
        "model": str(getattr(config, "model", None)), "naming": inventory.naming, "input_sha256": digest,
        "method": config.method, "allocation": None if config.structure.is_n_m else config.allocation,
        **method_fields(config),
        "group": config.group, "structure": str(config.structure), "dead_layers": config.dead_layers,
        "dead_layer_names": inventory.dead_layers(),
        "target_sparsity": config.target_sparsity if dist is None else dist.target_sparsity,
        "calibration": {k: calibration.get(k) for k in ("data", "nsamples", "seed", "prompt", "dtype", "device",
                                                                   "execution", "sequential", "peak_device_memory_gib")} if calibration else None,
        "global": {"layers": len(plans), "params": n_all, "pruned": pruned_all,
                   "achieved_sparsity": pruned_all / n_all if n_all else 0.0},
        "modalities": totals,
        **_choices_fields(config, plans),
        "layers": per_layer,
        "skipped": [{"name": name, "params": numel, "why": rule.why or rule.pattern}
                    for name, numel, rule in inventory.skipped],
        "notes": notes,
    }


def _choices_fields(config, plans: list[LayerPlan]) -> dict[str, Any]:
    """Step 1's choices: the cap, and with --prune-only the layers kept dense and the sparsity of the pruned part
    (the target's; "global" stays the sparsity over every prunable layer)."""
    out: dict[str, Any] = {"max_layer_sparsity": config.max_layer_sparsity, "prune_only": config.prune_only}
    dense = [p for p in plans if p.dense]
    if dense:
        part = [p for p in plans if not p.dense]
        n, pruned = sum(p.layer.numel for p in part), sum(p.pruned for p in part)
        out["kept_dense"] = {"layers": len(dense), "params": sum(p.layer.numel for p in dense),
                             "modalities": sorted({p.layer.modality for p in dense})}
        out["pruned_part"] = {"layers": len(part), "params": n, "pruned": pruned,
                              "achieved_sparsity": pruned / n if n else 0.0}
    return out
