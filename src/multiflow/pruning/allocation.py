"""Per-layer sparsity from the importance scores themselves (allocation variants beside Step 1's |W| prior).

Step 1 gives each layer the share of a modality's weights that fall under one
magnitude threshold, so a layer whose weights are small because of how it was
initialised (not because they matter) is pruned hardest. Two variants that look
at the scores (`--method`'s, any of `scores.SCORES`; wanda's for sparsegpt) instead:

- `scores`: one threshold per modality over per-layer-normalised scores (each
  layer's scores divided by their mean): the modality's k-th smallest
  normalised score, found exactly with Step 1's selection over the scores.
- `owl`: outlier-weighted layerwise sparsity (Yin et al., 2023), per block
  as in OWL's code: a block's (decoder layer's) outlier share D_b = fraction
  of the scores of all its linears above M x their mean (M = 5); within a
  modality, keep ratios are D_b rescaled to [0, 2 lambda] (lambda = 0.08),
  shifted so that the modality keeps 1 - s of its weights (weighted by block
  size: a vision block and a text block differ), clamped to [0, 1]; every
  linear of a block gets the block's sparsity.
"""

from __future__ import annotations

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
    dist = distribute(inventory.with_reader(reader, torch.float32), [target], progress)[0]
    return {name: share.pruned for name, share in dist.layers.items()}


def block_of(name: str) -> str:
    """The block a layer belongs to, from its name: up to the first numeric part (`model.layers.3.mlp.up_proj` ->
    `model.layers.3`, an entry of the model's layer list), else its parent module (`multi_modal_projector`)."""
    parts = name.split(".")
    digit = next((i for i, p in enumerate(parts) if p.isdigit()), None)
    if digit is not None:
        return ".".join(parts[: digit + 1])
    return ".".join(parts[:-1]) or name


def owl_keep_ratios(shares: list[float], sizes: list[int], target: float, lam: float = OWL_LAMBDA) -> list[float]:
    """Keep ratios of one modality's blocks from their outlier shares (OWL's rescale, size-weighted shift)."""
    d = torch.tensor(shares, dtype=torch.float64)
    n = torch.tensor(sizes, dtype=torch.float64)
    span = d.max() - d.min()
    keep = (d - d.min()) / span * 2 * lam if span > 0 else torch.zeros_like(d)
    keep = keep - (keep * n).sum() / n.sum() + (1 - target)
    return keep.clamp(0, 1).tolist()


def owl_sparsities(inventory: Inventory, score: ScoreFn, target: float) -> dict[str, float]:
    """Per-layer sparsity by OWL, per modality: the sparsity of the layer's block. Two passes over the weights
    (the block's mean score, then its outliers), so that no more than one layer's scores are ever in memory."""
    block = {l.name: (l.modality, block_of(l.name)) for l in inventory.layers}
    sizes: dict[tuple[str, str], int] = {}
    for l in inventory.layers:
        sizes[block[l.name]] = sizes.get(block[l.name], 0) + l.numel
    sums = dict.fromkeys(sizes, 0.0)
    for layer, weight in inventory.read(inventory.layers):
        sums[block[layer.name]] += float(score(layer, weight).sum(dtype=torch.float64))
    outliers = dict.fromkeys(sizes, 0)
    for layer, weight in inventory.read(inventory.layers):
        b = block[layer.name]
        outliers[b] += int((score(layer, weight) > OWL_M * (sums[b] / sizes[b])).sum())
    out = {}
    for layers in inventory.by_modality().values():
        blocks = list(dict.fromkeys(block[l.name] for l in layers))
        if not blocks:
            continue
        keep = dict(zip(blocks, owl_keep_ratios([outliers[b] / sizes[b] for b in blocks], [sizes[b] for b in blocks],
                                                target)))
        out.update({l.name: 1 - keep[block[l.name]] for l in layers})
    return out
