"""Step 1: the per-layer sparsity each modality can afford (paper Eq. 7).

For each modality m with N_m prunable weights: k_m = floor(N_m * s), tau_m =
the k_m-th smallest |W| over the whole modality (1-based, as torch.kthvalue),
and each layer's sparsity is count(|W_l| <= tau_m) / numel(W_l). The k-th value
is found exactly from bit-pattern histograms (see `selection`), one pass over
the weights for float16/bfloat16 (any number of targets at once), plus one pass
over the boundary bins for float32.

`Distribution` is the one object later steps read: per layer its modality,
size and exact pruned count, plus modality statistics; written and read as the
seed's `sparsity_distribution_<s>.json` with a `meta` block.
"""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import torch
from tqdm.auto import tqdm

from multiflow.distribution import selection
from multiflow.distribution.choices import DistributionChoices, cap_counts
from multiflow.errors import MultiflowError
from multiflow.models.inventory import Inventory, Layer
from multiflow.storage.outputs import write_atomic

STAT_FIELDS = (
    "num_layers",
    "total_params",
    "pruned_params",
    "actual_sparsity",
    "min_layer_sparsity",
    "max_layer_sparsity",
    "mean_layer_sparsity",
    "std_layer_sparsity",
)


@dataclass(frozen=True)
class LayerShare:
    """One layer's part of a distribution: its modality, size and exact pruned count."""

    modality: str
    numel: int
    pruned: int

    @property
    def sparsity(self) -> float:
        return self.pruned / self.numel


@dataclass
class Distribution:
    """`{layer name: sparsity}` with exact counts, per-modality thresholds and metadata."""

    target_sparsity: float
    layers: dict[str, LayerShare]
    modalities: tuple[str, ...]  # every modality of the rules, also empty ones
    thresholds: dict[str, dict[str, Any]] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        check_target(self.target_sparsity)
        for name, share in self.layers.items():
            if share.modality not in self.modalities:
                raise MultiflowError(f"layer {name}: modality {share.modality!r} not in {list(self.modalities)}")
            if not 0 <= share.pruned <= share.numel or share.numel <= 0:
                raise MultiflowError(f"layer {name}: pruned count {share.pruned} outside 0..{share.numel}")

    @property
    def layer_sparsity(self) -> dict[str, float]:
        return {name: share.sparsity for name, share in self.layers.items()}

    def modality_layers(self, modality: str) -> dict[str, LayerShare]:
        return {n: s for n, s in self.layers.items() if s.modality == modality}

    def modality_stats(self) -> dict[str, dict[str, float | int]]:
        """The seed's eight fields per modality that has prunable layers (population std)."""
        stats = {}
        for modality in self.modalities:
            shares = list(self.modality_layers(modality).values())
            if not shares:
                continue
            values = [s.sparsity for s in shares]
            total = sum(s.numel for s in shares)
            pruned = sum(s.pruned for s in shares)
            stats[modality] = {
                "num_layers": len(shares),
                "total_params": total,
                "pruned_params": pruned,
                "actual_sparsity": pruned / total,
                "min_layer_sparsity": min(values),
                "max_layer_sparsity": max(values),
                "mean_layer_sparsity": statistics.fmean(values),
                "std_layer_sparsity": statistics.pstdev(values),
            }
        return stats

    def to_json(self) -> dict[str, Any]:
        meta = dict(self.meta)
        meta["modalities"] = list(self.modalities)
        meta["thresholds"] = self.thresholds
        meta["layers"] = {n: {"modality": s.modality, "numel": s.numel, "pruned": s.pruned} for n, s in self.layers.items()}
        return {
            "target_sparsity": self.target_sparsity,
            "modality_stats": self.modality_stats(),
            "layer_distribution": self.layer_sparsity,
            "meta": meta,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any], where: str = "distribution") -> "Distribution":
        if not isinstance(data, dict):
            raise MultiflowError(f"{where} holds a JSON {type(data).__name__}, not a multiflow distribution (an "
                                 "object with target_sparsity, layer_distribution and meta): give the file that "
                                 "multiflow distribute wrote")
        try:
            meta = dict(data["meta"])
            layers = {
                name: LayerShare(str(v["modality"]), int(v["numel"]), int(v["pruned"]))
                for name, v in meta.pop("layers").items()
            }
            modalities = tuple(meta.pop("modalities"))
            thresholds = meta.pop("thresholds", {})
            target = float(data["target_sparsity"])
            listed = data["layer_distribution"]
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise MultiflowError(f"{where} is not a multiflow distribution (missing or bad {exc})") from exc
        if set(listed) != set(layers):
            raise MultiflowError(f"{where}: layer_distribution and meta.layers name different layers")
        for name, share in layers.items():
            if listed[name] != share.sparsity:
                raise MultiflowError(f"{where}: layer {name} sparsity {listed[name]} disagrees with its counts")
        return cls(target, layers, modalities, thresholds, meta)

    def save(self, path: str | Path) -> Path:
        return write_atomic(Path(path), json.dumps(self.to_json(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> "Distribution":
        path = Path(path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise MultiflowError(f"cannot read distribution {path}: {exc}") from exc
        return cls.from_json(data, str(path))


def target_name(s: float) -> str:
    """A target as written in file names (`sparsity_distribution_<name>.json`): %g, or every digit when %g
    would round it (0.5000001, 0.9999999), so that two targets never share a file name."""
    return f"{s:g}" if float(f"{s:g}") == s else repr(s)


def check_target(value: Any) -> float:
    """A target sparsity: a real number in [0, 1)."""
    try:
        s = float(value)
    except (TypeError, ValueError):
        raise MultiflowError(f"target sparsity {value!r} is not a number; give a value in [0, 1), e.g. 0.5") from None
    if isinstance(value, bool) or math.isnan(s) or not 0 <= s < 1:
        raise MultiflowError(f"target sparsity {value!r} is outside [0, 1); give e.g. 0.5 for 50%")
    return s


@dataclass
class _Boundary:
    """Where the k-th smallest key of one modality lies, for one target."""

    k: int
    coarse_bin: int = -1
    rank: int = 0  # k's rank inside coarse_bin (1-based)
    fine_bin: int = -1  # resolved second level (two-level key spaces only)


def distribute(
    inventory: Inventory,
    targets: Iterable[float],
    progress: bool = True,
    pooled: bool = False,
    dead: Iterable[str] = (),
    choices: DistributionChoices | None = None,
) -> list[Distribution]:
    """Step 1 for every target at once, from one read of the weights (two for float32).

    `pooled`: one threshold over all layers instead of one per modality (the
    "global" ablation). `dead`: layers pruned entirely (their output never
    reaches the model's output); they count toward their group's budget, so
    the live layers of that group carry less sparsity at the same total.
    `choices` (choices.py): `prune_only` keeps layers dense (pruned 0, outside
    every threshold: the target applies to the others); `max_layer_sparsity`
    caps each layer, the excess water-filled over its group (`cap_counts`).
    """
    choices = choices or DistributionChoices()
    targets = [check_target(t) for t in targets]
    if not targets:
        raise MultiflowError("give at least one target sparsity")
    dense = set(choices.dense_layers(inventory))
    dead = set(dead) - dense  # a layer kept dense is not zeroed either
    unknown = dead - {l.name for l in inventory.layers}
    if unknown:
        raise MultiflowError(f"dead layer {sorted(unknown)[0]} is not a prunable layer of this model")
    group_of = (lambda layer: "all") if pooled else (lambda layer: layer.modality)
    live = [l for l in inventory.layers if l.name not in dead and l.name not in dense]
    groups: dict[str, list[Layer]] = {}
    for layer in live:
        groups.setdefault(group_of(layer), []).append(layer)
    reserved: dict[str, int] = {}
    for layer in inventory.layers:
        if layer.name in dead:
            reserved[group_of(layer)] = reserved.get(group_of(layer), 0) + layer.numel
    spaces = {m: selection.key_space_for({layer.dtype for layer in ls}) for m, ls in groups.items()}

    coarse: dict[str, torch.Tensor] = {}
    bar = tqdm(total=sum(l.numel for l in live), unit="w", unit_scale=True,
               desc="Step 1: |W| histograms", disable=not progress)
    with bar:
        def count(layer: Layer, piece: torch.Tensor) -> torch.Tensor:
            return selection.coarse_histogram(piece, spaces[group_of(layer)], sliced=False)

        for layer, counts in inventory.map_pieces(live, count):
            space = spaces[group_of(layer)]
            hist = sum(counts[1:], counts[0])
            if int(hist[space.nonfinite_key >> space.shift :].sum()):
                entry = layer.handle
                where = f" (tensor {entry.key!r} of {entry.file})" if hasattr(entry, "file") else ""
                raise MultiflowError(f"layer {layer.name} contains NaN or inf weights{where}; fix or re-download "
                                     "the checkpoint")
            coarse[layer.name] = hist.to(torch.int32) if layer.numel < 2**31 else hist
            bar.update(layer.numel)

    boundaries: dict[tuple[float, str], _Boundary] = {}
    for s in targets:
        for m, layers in groups.items():
            total = sum(l.numel for l in layers) + reserved.get(m, 0)
            b = _Boundary(k=max(0, math.floor(total * s) - reserved.get(m, 0)))
            if b.k > 0:
                summed = torch.stack([coarse[l.name].to(torch.int64) for l in layers]).sum(0)
                b.coarse_bin, b.rank = selection.locate(summed, b.k)
            boundaries[(s, m)] = b

    fine = _fine_pass(inventory, groups, spaces, boundaries, progress)

    distributions = []
    for s in targets:
        shares = {l.name: LayerShare(l.modality, l.numel, l.numel) for l in inventory.layers if l.name in dead}
        shares.update({l.name: LayerShare(l.modality, l.numel, 0) for l in inventory.layers if l.name in dense})
        capped: list[str] = []
        thresholds = {}
        for m, layers in groups.items():
            space, b = spaces[m], boundaries[(s, m)]
            if b.k == 0:
                thresholds[m] = {"k": 0, "threshold": None, "threshold_key": None, "key_dtype": _dtype_name(space.dtype)}
                shares.update({l.name: LayerShare(l.modality, l.numel, 0) for l in layers})
                continue
            if space.two_level:
                summed = sum(fine[(l.name, b.coarse_bin)] for l in layers)
                b.fine_bin, _ = selection.locate(summed, b.rank)
                key = (b.coarse_bin << space.shift) | b.fine_bin
            else:
                key = b.coarse_bin
            for l in layers:
                if space.two_level:
                    pruned = selection.count_through(coarse[l.name], b.coarse_bin - 1) + selection.count_through(
                        fine[(l.name, b.coarse_bin)], b.fine_bin
                    )
                else:
                    pruned = selection.count_through(coarse[l.name], key)
                shares[l.name] = LayerShare(l.modality, l.numel, pruned)
            thresholds[m] = {"k": b.k, "threshold": space.value(key), "threshold_key": key,
                             "key_dtype": _dtype_name(space.dtype)}
            if choices.max_layer_sparsity is not None:
                where = "all modalities (--allocation global)" if pooled else f"modality {m}"
                counts = cap_counts([shares[l.name].pruned for l in layers], [l.numel for l in layers],
                                    choices.max_layer_sparsity, where)
                for l, count in zip(layers, counts):
                    capped += [l.name] if count < shares[l.name].pruned else []
                    shares[l.name] = LayerShare(l.modality, l.numel, count)
        ordered = {l.name: shares[l.name] for l in inventory.layers}
        meta = _meta(inventory, groups)
        meta.update(pooled=pooled, dead_layers=sorted(dead, key=list(ordered).index))
        if choices.max_layer_sparsity is not None:  # the thresholds are Step 1's before the cap
            meta.update(max_layer_sparsity=choices.max_layer_sparsity, capped_layers=sorted(capped, key=list(ordered).index))
        if dense:
            meta.update(prune_only=choices.prune_only, dense_layers=[n for n in ordered if n in dense])
        distributions.append(Distribution(s, ordered, inventory.rules.modalities, thresholds, meta))
    return distributions


def _fine_pass(inventory, groups, spaces, boundaries, progress) -> dict[tuple[str, int], torch.Tensor]:
    """Second-level histograms of the boundary bins, for float32 key spaces only."""
    wanted: dict[str, set[int]] = {}
    for (s, m), b in boundaries.items():
        if b.k > 0 and spaces[m].two_level:
            for layer in groups[m]:
                wanted.setdefault(layer.name, set()).add(b.coarse_bin)
    if not wanted:
        return {}
    layers = [l for l in inventory.layers if l.name in wanted]
    space_of = {l.name: spaces[m] for m, ls in groups.items() for l in ls}
    fine = {}
    bar = tqdm(total=sum(l.numel for l in layers), unit="w", unit_scale=True,
               desc="Step 1: float32 boundary bins", disable=not progress)
    with bar:
        def count(layer: Layer, piece: torch.Tensor) -> list[torch.Tensor]:
            return [selection.fine_histogram(piece, space_of[layer.name], b, sliced=False)
                    for b in sorted(wanted[layer.name])]

        for layer, counts in inventory.map_pieces(layers, count):
            for index, coarse_bin in enumerate(sorted(wanted[layer.name])):
                fine[(layer.name, coarse_bin)] = sum((c[index] for c in counts[1:]), counts[0][index])
            bar.update(layer.numel)
    return fine


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _meta(inventory: Inventory, groups: dict[str, list[Layer]]) -> dict[str, Any]:
    from multiflow._version import __version__

    return {
        "tool": "multiflow",
        "version": __version__,
        "model": inventory.model_path,
        "naming": inventory.naming,
        "rules": inventory.rules.to_dict(),
        "weight_dtypes": {m: sorted({_dtype_name(l.dtype) for l in ls}) for m, ls in groups.items()},
        "std": "population (ddof=0) over layers",
        "notes": list(inventory.notes),
    }
