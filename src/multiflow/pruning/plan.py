"""Step 3's plan: how many weights each layer loses (`LayerPlan`), by the --allocation (`ALLOCATIONS`), checked
against the model (a --distribution for another model, statistics that do not fit, are errors)."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import torch

from multiflow.distribution.distribute import Distribution, check_target, distribute
from multiflow.errors import MultiflowError
from multiflow.models.inventory import Inventory, Layer
from multiflow.pruning import masks, scores
from multiflow.pruning.methods import layer_score
from multiflow.storage.stats_file import LayerStats

if TYPE_CHECKING:  # annotations only: config.py imports this module
    from multiflow.pruning.config import PruneConfig

@dataclass
class LayerPlan:
    """How one layer is pruned: its allocated count (unstructured) and what the mask achieved."""

    layer: Layer
    k: int  # weights to prune (layer group) or per row (row group); ignored for N:M
    target: float
    dead: bool = False
    dense: bool = False  # kept dense by --prune-only: k = 0, never masked
    pruned: int = 0
    written: bool = False  # set by Step 3 once its zeros are checked in the bytes written


_Planned = tuple[list[LayerPlan], "Distribution | None"]


def plan(config: PruneConfig, inventory: Inventory, progress: bool = True,
         stats: dict[str, LayerStats] | None = None) -> tuple[list[LayerPlan], Distribution | None]:
    """Per-layer pruning counts from the allocation (ALLOCATIONS); validates the distribution against the model.
    `stats` (the score allocations need them unless --method magnitude): {layer name: LayerStats}."""
    dense = set(config.dense_layers(inventory))  # --prune-only (a --distribution file's own: checked in the config)
    dead = set(inventory.dead_layers()) - dense if config.dead_layers == "prune" else set()
    if config.structure.is_n_m:
        s = config.structure
        for layer in inventory.layers:
            if layer.shape[1] % s.m and layer.name not in dense:
                raise MultiflowError(f"layer {layer.name} has {layer.shape[1]} inputs, not a multiple of M={s.m} "
                                     f"for --structure {s}")
        return [LayerPlan(l, 0, 0.0, dense=True) if l.name in dense else LayerPlan(l, 0, 1 - s.n / s.m)
                for l in inventory.layers], None
    plans, dist = ALLOCATIONS[config.allocation].plan(config, inventory, stats, progress, dead)
    if dist is not None:
        dense |= set(dist.meta.get("dense_layers", ()))
    for p in plans:
        if p.layer.name in dead:
            p.dead, p.k, p.target = True, (p.layer.numel if config.group == "layer" else p.layer.shape[1]), 1.0
        if p.layer.name in dense:
            p.dense, p.k, p.target = True, 0, 0.0
    return plans, dist


def _pruned_part(config: PruneConfig, inventory: Inventory) -> Inventory:
    """The inventory without the layers --prune-only keeps dense (the score allocations plan the rest over it)."""
    dense = set(config.dense_layers(inventory))
    return replace(inventory, layers=[l for l in inventory.layers if l.name not in dense]) if dense else inventory


def _uniform(config: PruneConfig, inventory: Inventory, stats, progress: bool, dead: set[str]) -> _Planned:
    s = check_target(config.target_sparsity)
    return [LayerPlan(l, _k(config, l, s), s) for l in inventory.layers], None  # plan() zeroes the dense ones' k


def _from_distribution(config: PruneConfig, inventory: Inventory, stats, progress: bool, dead: set[str]) -> _Planned:
    """modality (Step 1's map, from --distribution or computed) and global (one threshold over all modalities)."""
    if config.distribution is not None:
        dist = Distribution.load(config.distribution)
        _check_distribution(dist, inventory, config.distribution)
        if config.target_sparsity is not None and config.target_sparsity != dist.target_sparsity:
            raise MultiflowError(f"--target-sparsity {config.target_sparsity} but {config.distribution} was "
                                 f"computed for {dist.target_sparsity}")
    else:
        dist = distribute(inventory, [config.target_sparsity], progress, pooled=config.allocation == "global",
                          dead=dead, choices=config)[0]
    plans = []
    for l in inventory.layers:
        share = dist.layers[l.name]
        plans.append(LayerPlan(l, share.pruned if config.group == "layer" else _k(config, l, share.sparsity),
                               share.sparsity))
    return plans, dist


def _score_plans(config: PruneConfig, inventory: Inventory, stats, progress: bool, dead: set[str]) -> _Planned:
    from multiflow.pruning import allocation

    s = check_target(config.target_sparsity)
    name = config.allocation_score
    if stats is None and name not in scores.NO_STATISTICS:
        raise MultiflowError(f"--allocation {config.allocation} derives each layer's sparsity from the "
                             f"{name} scores: it needs the statistics (and cannot be fixed before "
                             "calibration, as --sequential would need)")

    def score(layer: Layer, weight: torch.Tensor) -> torch.Tensor:
        return layer_score(name, weight, None if stats is None else stats[layer.name].sq_mean)

    part = _pruned_part(config, inventory)  # the dense layers (plan() marks them) take no share of the target
    pruned = {l.name for l in part.layers}
    if config.allocation == "scores":
        counts = allocation.score_counts(part, score, s, progress)
    else:
        sparsities = allocation.owl_sparsities(part, score, s)
    plans = []
    for l in inventory.layers:
        if l.name not in pruned:
            plans.append(LayerPlan(l, 0, 0.0))
        elif config.allocation == "scores":
            plans.append(LayerPlan(l, counts[l.name] if config.group == "layer" else
                                   _k(config, l, counts[l.name] / l.numel), counts[l.name] / l.numel))
        else:
            plans.append(LayerPlan(l, _k(config, l, sparsities[l.name]), sparsities[l.name]))
    return plans, None


@dataclass(frozen=True)
class Allocation:
    """An --allocation: how each layer's share of the target is decided."""

    help: str
    plan: Callable[..., _Planned]  # (config, inventory, stats, progress, dead layer names) -> (plans, distribution)
    from_scores: bool = False  # needs every layer's scores (so the statistics) before planning


ALLOCATIONS: dict[str, Allocation] = {
    "modality": Allocation("Step 1's per-modality magnitude map (default)", _from_distribution),
    "uniform": Allocation("every layer at the target", _uniform),
    "global": Allocation("one magnitude threshold over all modalities (ablation)", _from_distribution),
    "scores": Allocation("one threshold per modality over each layer's --method scores divided by their mean",
                         _score_plans, from_scores=True),
    "owl": Allocation("outlier-weighted (OWL, per block: decoder/encoder layers with more scores above 5x "
                      "their mean keep more, within +-0.08 of the target)", _score_plans, from_scores=True),
}


SCORE_ALLOCATIONS = tuple(name for name, a in ALLOCATIONS.items() if a.from_scores)


def _k(config: PruneConfig, layer: Layer, s: float) -> int:
    return masks.count_for(s, layer.numel if config.group == "layer" else layer.shape[1])


def _check_distribution(dist: Distribution, inventory: Inventory, where: Path) -> None:
    have = {l.name: l for l in inventory.layers}
    missing = [n for n in have if n not in dist.layers]
    extra = [n for n in dist.layers if n not in have]
    if missing or extra:
        example = (f"it lacks {missing[0]}" if missing else f"it names {extra[0]}, which the model does not have")
        raise MultiflowError(f"{where} is a distribution for another model: {example} "
                             f"({len(missing)} missing, {len(extra)} unknown layers)")
    for name, share in dist.layers.items():
        if share.numel != have[name].numel:
            raise MultiflowError(f"{where}: layer {name} has {share.numel} weights there but {have[name].numel} here")


def check_stats(stats: dict[str, LayerStats], inventory: Inventory, where: Path) -> None:
    for layer in inventory.layers:
        st = stats.get(layer.name)
        if st is None:
            raise MultiflowError(f"{where} has no statistics for layer {layer.name}: was it made for this model?")
        if st.sq_mean is None or not st.tokens:
            raise MultiflowError(f"{where}: layer {layer.name} saw no calibration token; recalibrate with more data")
        if st.sq_mean.shape != (layer.shape[1],):
            raise MultiflowError(f"{where}: layer {layer.name} statistics have {tuple(st.sq_mean.shape)} features, "
                                 f"the layer has {layer.shape[1]} inputs")


def planned_count(p: LayerPlan, config: PruneConfig) -> int:
    """The fewest weights the plan prunes in this layer (ties with the k-th score can add more, N:M cannot)."""
    rows, cols = p.layer.shape
    if p.dense:
        return 0
    if p.dead:
        return rows * cols
    if config.structure.is_n_m:
        return rows * (cols // config.structure.m) * (config.structure.m - config.structure.n)
    return p.k * rows if config.group == "row" else p.k
