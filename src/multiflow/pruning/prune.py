"""Step 3 end to end: plan (plan.py), mask (masking.py), write (writer.py) and report (report.py), for a
checkpoint folder (`prune`: a pruned copy, written to a temporary folder and moved into place at the end) or an
nn.Module in memory (`prune_module`)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch

from multiflow.distribution.distribute import Distribution, target_name
from multiflow.errors import MultiflowError
from multiflow.models import inventory as layers_mod
from multiflow.pruning import report as reporting
from multiflow.pruning import writer
from multiflow.pruning.config import ModuleConfig, PruneConfig, Structure
from multiflow.pruning.masking import checked_mask
from multiflow.pruning.methods import METHODS, SPARSEGPT_NEEDS_RUN, UPDATE_NEEDS_RUN
from multiflow.pruning.plan import LayerPlan, check_stats, plan
from multiflow.storage.checkpoint import list_tensors
from multiflow.storage.outputs import REPORT_NAME, FolderOutput, write_atomic
from multiflow.storage.stats_file import LayerStats, load_stats


def prune_module(model: torch.nn.Module, target_sparsity: float | None, *, stats: dict[str, LayerStats] | None = None,
                 method: str = "multiflow", allocation: str = "modality", group: str = "layer",
                 structure: str = "unstructured", dead_layers: str = "keep", rules=None,
                 max_layer_sparsity: float | None = None, prune_only: str = "all") -> dict[str, Any]:
    """Step 3 on an nn.Module in memory: zero the pruned weights of its prunable nn.Linear layers in place.

    The same allocation (Step 1 on the module's own weights), scores and masks as `prune` on a
    checkpoint (tested equal). `stats` maps module names to `LayerStats` (`stats_file.from_collector`
    of a `statistics.collect_statistics` run), needed by wanda and multiflow. `rules`: as Step 1's.
    Returns the report (`prune`'s fields without the file ones).
    """
    config = ModuleConfig(target_sparsity=target_sparsity, method=method, allocation=allocation, group=group,
                          structure=Structure.parse(structure), dead_layers=dead_layers,
                          max_layer_sparsity=max_layer_sparsity, prune_only=prune_only)
    needs_stats = config.needs_statistics
    inventory = layers_mod.from_module(model, rules)
    if needs_stats:
        check_stats(stats or {}, inventory, Path("stats"))
    plans, dist = plan(config, inventory, progress=False, stats=stats)
    with torch.no_grad():
        for p in plans:
            weight = p.layer.handle
            sq_mean = stats[p.layer.name].sq_mean if needs_stats else None
            keep = checked_mask(weight.detach().cpu(), p, config, sq_mean).to(weight.device)
            weight.masked_fill_(~keep, 0)
            p.pruned, p.written = int(keep.numel() - keep.sum()), True
    report = reporting.build_report(config, inventory, plans, dist, None, None)
    reporting.check_achieved(plans, config, report, dist)
    for key in ("model", "input_sha256"):
        report.pop(key)
    return report


def prune(config: PruneConfig, progress: bool = True, calibration: dict[str, Any] | None = None,
          planned: tuple[list[LayerPlan], Distribution | None] | None = None,
          timings: dict[str, float] | None = None, updated=None) -> dict[str, Any]:
    """Step 3: write the pruned checkpoint folder; return the report (also saved as multiflow_report.json).

    `planned`: `plan(config, ...)`'s result when the caller already made it (sequential calibration).
    `timings`: earlier stages' seconds, listed first in the report's "timings".
    `updated(layer name, tensor) -> keep mask` writes a layer's new weights into its tensor instead of
    masking it (--method sparsegpt, --update obs: `reconstruction.SparseGPTStep.updated`)."""
    if config.reconstructs and updated is None:
        raise MultiflowError(SPARSEGPT_NEEDS_RUN if METHODS[config.method].reconstructs else UPDATE_NEEDS_RUN)
    target = FolderOutput(config.output, writer.output_inputs(config), config.overwrite)
    inventory = layers_mod.from_checkpoint(config.model, config.rules)
    if any(e.begin is None for e in list_tensors(config.model, allow_pickle=True)):
        raise MultiflowError(f"{config.model} holds pickled weights; convert them to safetensors before pruning")
    stats, stats_meta = (None, {})
    if METHODS[config.method].needs_statistics:
        stats, stats_meta = load_stats(config.stats)
        check_stats(stats, inventory, config.stats)
    started = time.perf_counter()
    plans, dist = planned if planned is not None else plan(config, inventory, progress, stats)
    planned_at = time.perf_counter()
    by_key = {(p.layer.handle.file, p.layer.handle.key): p for p in plans}
    with target.building() as tmp:
        digest = writer.write_pruned(Path(config.model), tmp, by_key, config, stats, progress, updated)
        report = reporting.build_report(config, inventory, plans, dist,
                                        stats_meta if calibration is None else calibration, digest)
        reporting.check_achieved(plans, config, report, dist)
        report["timings"] = {**(timings or {}), "distribute_seconds": round(planned_at - started, 3),
                             "prune_seconds": round(time.perf_counter() - planned_at, 3)}
        if config.deterministic_report:
            reporting.drop_volatile(report)
        if dist is not None:
            from multiflow.reporting.plots import plot_distribution

            name = f"sparsity_distribution_{target_name(dist.target_sparsity)}"
            dist.save(tmp / f"{name}.json")
            plot_distribution(dist, tmp / f"{name}.png")
        write_atomic(tmp / REPORT_NAME, json.dumps(report, indent=2) + "\n")
    return report
