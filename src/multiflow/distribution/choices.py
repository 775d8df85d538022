"""Step 1's choices beyond the target, defined once (`DistributionChoices`: the CLI's flags and the API's keyword
arguments, also part of Step 3's `PruningChoices`), and their pure math: which layers stay dense (`dense_layers`)
and the per-layer cap, water-filled within a modality (`cap_counts`)."""

from __future__ import annotations

import argparse
import math
import re
from dataclasses import dataclass
from fractions import Fraction
from typing import TYPE_CHECKING

from multiflow.errors import MultiflowError
from multiflow.options import option

if TYPE_CHECKING:
    from multiflow.models.inventory import Inventory

LANGUAGE_MODEL = "language-model"  # --prune-only's name for the layers of the family's language model
RECOMMENDED_CAP = 0.9


def parse_cap(text: str) -> float:
    """--max-layer-sparsity's value: a number in (0, 1]."""
    try:
        value = float(text)
    except (TypeError, ValueError):
        raise argparse.ArgumentTypeError(f"{text!r} is not a number; give a value in (0, 1], e.g. "
                                         f"{RECOMMENDED_CAP}") from None
    if math.isnan(value) or not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"{text!r} is outside (0, 1]; give e.g. {RECOMMENDED_CAP}")
    return value


@dataclass(frozen=True)
class DistributionChoices:
    """How Step 1 spreads a modality's target over its layers, beyond the paper's method (both off by default)."""

    max_layer_sparsity: float | None = option(
        None, parse=parse_cap, metavar="X",
        help=f"cap every layer's sparsity at X in Step 1's distribution; what a capped layer cannot take goes to "
             f"the other layers of its modality, in proportion to their share, so the modality's target stays "
             f"exact (an error names the modality when the cap cannot hold it). Default: off, the paper's method. "
             f"Recommended: {RECOMMENDED_CAP} (a layer of mostly small weights, e.g. Qwen2.5-VL's merger "
             f"visual.merger.mlp.2 at 99%% for a 0.5 target, otherwise loses almost all its weights and breaks "
             f"the model; 0.9 leaves every layer a tenth of its weights and binds only on such outliers)")
    prune_only: str = option(
        "all", metavar="PARTS",
        help=f"prune only these parts, keep the rest dense: all (default), a comma list of modalities "
             f"(vision, text, fusion), or {LANGUAGE_MODEL} = the layers of the family's language model (LLaVA's "
             f"and Qwen2-VL's decoder layers, Mllama's cross-attention layers with them, BLIP-2's OPT or T5, "
             f"while vision tower and projector stay dense; in LLaVA presets the decoder layers and the projector "
             f"are both 'fusion'). "
             f"The target applies to the pruned layers; the overall sparsity is reported over all layers")

    def _check_distribution_choices(self) -> None:
        if self.max_layer_sparsity is not None:
            try:
                parse_cap(self.max_layer_sparsity)
            except argparse.ArgumentTypeError as exc:
                raise MultiflowError(f"--max-layer-sparsity {exc}") from None
        parts = self.prune_only.split(",") if isinstance(self.prune_only, str) else []
        if not parts or any(not p.strip() for p in parts):
            raise MultiflowError(f"--prune-only {self.prune_only!r}: give all, a comma list of modalities "
                                 f"(e.g. vision,fusion) or {LANGUAGE_MODEL}")
        if "all" in parts and len(parts) > 1:
            raise MultiflowError(f"--prune-only {self.prune_only!r}: 'all' stands alone")

    def __post_init__(self) -> None:
        self._check_distribution_choices()

    def dense_layers(self, inventory: Inventory) -> list[str]:
        """The prunable layers --prune-only keeps dense, in model order; an error when a part is not a modality of
        the rules (nor language-model, where the family names its language model) or nothing is left to prune."""
        return dense_layers(inventory, self.prune_only)


def dense_layers(inventory: Inventory, prune_only: str) -> list[str]:
    if prune_only == "all":
        return []
    parts = [p.strip() for p in prune_only.split(",")]
    modalities = inventory.rules.modalities
    unknown = [p for p in parts if p not in modalities and p != LANGUAGE_MODEL]
    if unknown:
        raise MultiflowError(f"--prune-only {prune_only}: {unknown[0]!r} is not a modality of the rules "
                             f"{inventory.rules.name!r} ({', '.join(modalities)}) nor {LANGUAGE_MODEL}")
    pattern = None
    if LANGUAGE_MODEL in parts:
        pattern = inventory.family.language_model if inventory.family is not None else None
        if pattern is None:
            raise MultiflowError(f"--prune-only {LANGUAGE_MODEL}: the rules {inventory.rules.name!r} do not say "
                                 "which layers are the language model's: add 'language_layers' (or "
                                 "'aligned_layers') to the rules file "
                                 "(README, 'Modality rules'), or name modalities")
    pruned = {l.name for l in inventory.layers if l.modality in parts or (pattern and re.search(pattern, l.name))}
    if not pruned:
        raise MultiflowError(f"--prune-only {prune_only} selects no prunable layer of this model; its modalities "
                             f"with layers: {', '.join(sorted({l.modality for l in inventory.layers}))}")
    return [l.name for l in inventory.layers if l.name not in pruned]


def cap_counts(pruned: list[int], numel: list[int], cap: float, where: str) -> list[int]:
    """Step 1's pruned counts of one modality's layers with none above `cap` x numel (water-filling), the total kept.

    Layers over the cap are set to it (floor(cap x numel)); their excess goes to the others, each scaled by one
    common factor (so their proportions stay Step 1's), and a layer that the scaling takes over the cap joins the
    capped ones, until none does. The scaled counts are rounded down and the remainder goes, one each, to the
    largest fractional parts (the earlier layer first on ties): the total is exactly Step 1's. When the others
    prune nothing to scale, the excess is spread in proportion to their sizes. Unchanged when no layer is over
    the cap; an error naming `where` when the cap cannot hold the total.
    """
    limit = [math.floor(cap * n) for n in numel]
    total = sum(pruned)
    if all(p <= c for p, c in zip(pruned, limit)):
        return list(pruned)
    if total > sum(limit):
        raise MultiflowError(f"{where}: its target needs {total:,} of {sum(numel):,} weights pruned, but "
                             f"--max-layer-sparsity {cap:g} allows at most {sum(limit):,}; raise the cap or lower the "
                             "target")
    capped = {i for i, (p, c) in enumerate(zip(pruned, limit)) if p > c}
    while True:
        free = [i for i in range(len(pruned)) if i not in capped]
        if not free:  # every layer at its cap: the total is their sum (checked above)
            return limit
        base = [pruned[i] for i in free]
        if not sum(base):
            base = [numel[i] for i in free]
        scale = Fraction(total - sum(limit[i] for i in capped), sum(base))
        over = {i for i, b in zip(free, base) if scale * b > limit[i]}
        if not over:
            break
        capped |= over
    counts = list(limit)
    shares = {i: scale * b for i, b in zip(free, base)}
    for i, share in shares.items():
        counts[i] = math.floor(share)
    left = total - sum(counts)
    by_fraction = sorted(shares, key=lambda i: (-(shares[i] - counts[i]), i))
    for i in by_fraction[:left]:
        counts[i] += 1
    return counts
