"""Step 3's masks of one layer by its plan: the --method's scores (methods.py) and the comparison group's mask
(masks.py), checked against the plan; and the masker that prunes blocks during sequential calibration."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

import torch

from multiflow.errors import MultiflowError
from multiflow.pruning import masks
from multiflow.pruning.methods import layer_score

if TYPE_CHECKING:  # annotations only: config.py imports this module
    from multiflow.models.inventory import Inventory
    from multiflow.pruning.config import PruneConfig
    from multiflow.pruning.plan import LayerPlan

# --group: what one threshold compares -> the keep-mask of k pruned per group (masks.py, looked up at call time)
COMPARISON_GROUPS: dict[str, Callable[[torch.Tensor, int], torch.Tensor]] = {
    "layer": lambda score, k: masks.layer_mask(score, k),  # the whole matrix, k pruned
    "row": lambda score, k: masks.row_mask(score, k),  # each output row, k pruned per row
}


def planned_mask(weight: torch.Tensor, layer_plan: LayerPlan, config: PruneConfig, sq_mean: torch.Tensor | None) -> torch.Tensor:
    """The keep-mask of one layer (pure: weight and statistic in, mask out)."""
    if layer_plan.dense:
        return torch.ones(weight.shape, dtype=torch.bool)
    if layer_plan.dead:
        return torch.zeros(weight.shape, dtype=torch.bool)
    return _mask_of(layer_score(config.method, weight, sq_mean), layer_plan, config)


def _mask_of(score: torch.Tensor, layer_plan: LayerPlan, config: PruneConfig) -> torch.Tensor:
    if config.structure.is_n_m:
        return masks.n_m_mask(score, config.structure.n, config.structure.m)
    return COMPARISON_GROUPS[config.group](score, layer_plan.k)


def checked_mask(weight: torch.Tensor, layer_plan: LayerPlan, config: PruneConfig, sq_mean: torch.Tensor | None,
                 where: Any = None) -> torch.Tensor:
    """`planned_mask`, checked against the plan from the score alone (`masks.mask_violation`): at least k pruned,
    beyond k only ties with the k-th score, never a pruned score above a kept one; N:M exactly N kept per group."""
    if layer_plan.dense:
        return torch.ones(weight.shape, dtype=torch.bool)
    if layer_plan.dead:
        return torch.zeros(weight.shape, dtype=torch.bool)
    score = layer_score(config.method, weight, sq_mean)
    keep = _mask_of(score, layer_plan, config)
    s = config.structure
    why = masks.mask_violation(score, keep, layer_plan.k, row=config.group == "row", n_m=(s.n, s.m) if s.is_n_m else None)
    if why is not None:
        raise MultiflowError(f"layer {layer_plan.layer.name}{f' ({where})' if where else ''}: the mask does not match "
                             f"the plan ({why}). Please report this")
    return keep


def zero_in_place(weight: torch.Tensor, layer_plan: LayerPlan, config: PruneConfig, sq_mean: torch.Tensor | None,
                  where: Any = None, workspace: torch.Tensor | None = None) -> masks.Zeroed | None:
    """`checked_mask` and `weight.masked_fill_(~keep, 0)` in one pass where the plan allows it (the layer group,
    unstructured, k > 0, a live layer): the same zeros bit for bit (`masks.zero_at_or_below` at the k-th smallest
    score), checked from the counts of that pass (`masks.threshold_violation`). None (weight untouched) for the
    other plans: use `checked_mask`. `workspace`: float32 memory for the scores, reused from layer to layer."""
    if (layer_plan.dead or layer_plan.k <= 0 or config.group != "layer" or config.structure.is_n_m
            or weight.dtype not in (torch.float16, torch.bfloat16, torch.float32)):
        return None
    score = layer_score(config.method, weight, sq_mean, workspace)
    zeroed = masks.zero_at_or_below(weight, score, masks.kth_smallest(score, layer_plan.k))
    why = masks.threshold_violation(zeroed, layer_plan.k)
    if why is not None:
        raise MultiflowError(f"layer {layer_plan.layer.name}{f' ({where})' if where else ''}: the mask does not match "
                             f"the plan ({why}). Please report this")
    return zeroed


def masker_for(config: PruneConfig, inventory: Inventory, progress: bool = False):
    """`(layer name, weight, sq_mean) -> keep mask` by this config's plan, for sequential calibration
    (blocks pruned in memory as it goes; the checkpoint is written by `prune` from the same statistics,
    which gives the same masks when the calibration dtype holds the checkpoint's values exactly)."""
    from multiflow.pruning.plan import plan

    return masker_from_plans(config, plan(config, inventory, progress)[0])


def masker_from_plans(config: PruneConfig, plans: list[LayerPlan]):
    """`masker_for` with the plan already made (`run --sequential` hands the same plan to `prune`)."""
    by_name = {p.layer.name: p for p in plans}

    def masker(name: str, weight: torch.Tensor, sq_mean: torch.Tensor) -> torch.Tensor | None:
        if name not in by_name:  # e.g. a --vision-tower folder's layers: calibrated, never written, never pruned
            return None
        return planned_mask(weight.cpu(), by_name[name], config, sq_mean)

    return masker
