"""Per-layer sparsity from the importance scores themselves (allocation variants beside Step 1's |W| prior).

Step 1 gives each layer the share of a modality's weights that fall under one
magnitude threshold, so a layer whose weights are small because of how it was
initialised (not because they matter) is pruned hardest. Two variants that look
at the scores (`--method`'s, any of `scores.SCORES`; wanda's for sparsegpt) instead:

- `scores`: one threshold per modality over per-layer-normalised scores (each
  layer's scores divided by their mean): the modality's k-th smallest
  normalised score, found exactly with Step 1's selection over the scores.
- `owl`: outlier-weighted layerwise sparsity (Yin et al., 2023): a layer's
  outlier share D_l = fraction of its scores above M x their mean (M = 5);
  within a modality, keep ratios are D_l rescaled to [0, 2 lambda] (lambda =
  0.08), shifted so that the modality keeps 1 - s of its weights (weighted by
  layer size: layers here differ in size), clamped to [0, 1].
"""

from __future__ import annotations

from dataclasses import replace
from typing import Callable, Iterator

import torch

from multiflow.distribution.distribute import distribute
from multiflow.models.inventory import Inventory, Layer

OWL_M = 5.0
OWL_LAMBDA = 0.08

ScoreFn = Callable[[Layer, torch.Tensor], torch.Tensor]  # (layer, weight) -> float32 scores shaped like W


def normalised(score: torch.Tensor) -> torch.Tensor:
    """A layer's scores over their mean (in place); an all-zero layer stays zero."""
    mean = score.mean()
    return score.div_(mean) if mean > 0 else score


def score_counts(inventory: Inventory, score: ScoreFn, target: float, progress: bool = False) -> dict[str, int]:
    """Pruned weights per layer under one threshold per modality over per-layer-normalised scores."""

    def reader(wanted: list[Layer]) -> Iterator[tuple[Layer, torch.Tensor]]:
        by_name = {l.name: l for l in wanted}
        for layer, weight in inventory.read([original[l.name] for l in wanted]):
            yield by_name[layer.name], normalised(score(layer, weight))

    original = {l.name: l for l in inventory.layers}
    as_scores = replace(inventory, layers=[replace(l, dtype=torch.float32) for l in inventory.layers], reader=reader)
    dist = distribute(as_scores, [target], progress)[0]
    return {name: share.pruned for name, share in dist.layers.items()}


def outlier_share(score: torch.Tensor, m: float = OWL_M) -> float:
    """OWL's D_l: the fraction of a layer's scores above m times their mean."""
    return float((score > m * score.mean()).double().mean())


def owl_keep_ratios(shares: list[float], sizes: list[int], target: float, lam: float = OWL_LAMBDA) -> list[float]:
    """Keep ratios of one modality's layers from their outlier shares (OWL's rescale, size-weighted shift)."""
    d = torch.tensor(shares, dtype=torch.float64)
    n = torch.tensor(sizes, dtype=torch.float64)
    span = d.max() - d.min()
    keep = (d - d.min()) / span * 2 * lam if span > 0 else torch.zeros_like(d)
    keep = keep - (keep * n).sum() / n.sum() + (1 - target)
    return keep.clamp(0, 1).tolist()


def owl_sparsities(inventory: Inventory, score: ScoreFn, target: float) -> dict[str, float]:
    """Per-layer sparsity by OWL, per modality."""
    shares = {layer.name: outlier_share(score(layer, weight)) for layer, weight in inventory.read(inventory.layers)}
    out = {}
    for layers in inventory.by_modality().values():
        if not layers:
            continue
        keep = owl_keep_ratios([shares[l.name] for l in layers], [l.numel for l in layers], target)
        out.update({l.name: 1 - k for l, k in zip(layers, keep)})
    return out
