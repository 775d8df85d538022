"""Step 3: masks for every prunable layer, streamed from the input shards into a pruned copy.

The output keeps the input's files, keys, dtypes and sharding: each safetensors
file is copied header first, then tensor by tensor, prunable weights zeroed by
their mask. One tensor is held at a time, so a 7B model never needs two copies
in memory, and the folder loads with `from_pretrained` exactly as the input did
(original-layout LLaVA stays in its own layout). Everything is written to a
temporary folder beside the output and moved into place at the end.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from multiflow import layers as layers_mod
from multiflow import masks, scores
from multiflow.checkpoint import list_tensors, read_tensors
from multiflow.distribution import Distribution, check_target, distribute, write_atomic
from multiflow.errors import MultiflowError
from multiflow.layers import Inventory, Layer
from multiflow.stats_file import LayerStats, load_stats

log = logging.getLogger("multiflow")

METHODS = ("multiflow", "wanda", "magnitude")
ALLOCATIONS = ("modality", "uniform", "global", "scores", "owl")
SCORE_ALLOCATIONS = ("scores", "owl")  # per-layer sparsity from the scores: need the statistics before planning
GROUPS = ("layer", "row")
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


@dataclass(frozen=True)
class Structure:
    """unstructured, or N:M = at most N non-zero weights in every M consecutive inputs of a row."""

    n: int | None = None
    m: int | None = None

    @classmethod
    def parse(cls, text: str) -> "Structure":
        if text == "unstructured":
            return cls()
        match = re.fullmatch(r"(\d+):(\d+)", text)
        if not match or not 0 < int(match.group(1)) < int(match.group(2)):
            raise MultiflowError(f"--structure {text!r}: give 'unstructured' or N:M with 0 < N < M (e.g. 2:4)")
        return cls(int(match.group(1)), int(match.group(2)))

    @property
    def is_n_m(self) -> bool:
        return self.n is not None

    def __str__(self) -> str:
        return f"{self.n}:{self.m}" if self.is_n_m else "unstructured"


@dataclass(frozen=True)
class PruneConfig:
    """What `multiflow prune` needs, validated at the edge."""

    model: Path
    output: Path
    target_sparsity: float | None = None
    distribution: Path | None = None
    stats: Path | None = None
    method: str = "multiflow"
    allocation: str = "modality"
    group: str = "layer"
    structure: Structure = field(default_factory=Structure)
    dead_layers: str = "keep"
    rules: Path | None = None
    overwrite: bool = False

    def __post_init__(self) -> None:
        for value, allowed, flag in ((self.method, METHODS, "--method"), (self.allocation, ALLOCATIONS, "--allocation"),
                                     (self.group, GROUPS, "--group"), (self.dead_layers, ("keep", "prune"), "--dead-layers")):
            if value not in allowed:
                raise MultiflowError(f"{flag} {value!r}: choose one of {', '.join(allowed)}")
        if self.target_sparsity is not None:
            check_target(self.target_sparsity)
        if self.method != "magnitude" and self.stats is None:
            raise MultiflowError(f"--method {self.method} needs activation statistics: pass --stats stats.safetensors "
                                 "(from multiflow calibrate), or use --method magnitude")
        if self.structure.is_n_m:
            if self.distribution is not None:
                raise MultiflowError("--structure N:M fixes the sparsity of every layer; drop --distribution")
        elif self.target_sparsity is None and self.distribution is None:
            raise MultiflowError("give --target-sparsity (or --distribution for --allocation modality)")
        if self.distribution is not None and self.allocation != "modality":
            raise MultiflowError(f"--distribution is Step 1's per-layer map: it applies to --allocation modality, "
                                 f"not {self.allocation}")
        if self.allocation in SCORE_ALLOCATIONS and self.dead_layers == "prune":
            raise MultiflowError(f"--allocation {self.allocation} allocates from the scores of every layer; "
                                 "--dead-layers prune applies to the modality and global allocations")
        if self.distribution is not None and self.dead_layers == "prune":
            raise MultiflowError("--dead-layers prune recomputes Step 1 with the dead layers counted; drop --distribution")


@dataclass
class LayerPlan:
    """How one layer is pruned: its allocated count (unstructured) and what the mask achieved."""

    layer: Layer
    k: int  # weights to prune (layer group) or per row (row group); ignored for N:M
    target: float
    dead: bool = False
    pruned: int = 0


def plan(config: PruneConfig, inventory: Inventory, progress: bool = True,
         stats: dict[str, LayerStats] | None = None) -> tuple[list[LayerPlan], Distribution | None]:
    """Per-layer pruning counts from the allocation; validates the distribution against the model.
    `stats` (the score allocations need them unless --method magnitude): {layer name: LayerStats}."""
    dead = set(inventory.dead_layers()) if config.dead_layers == "prune" else set()
    if config.structure.is_n_m:
        s = config.structure
        for layer in inventory.layers:
            if layer.shape[1] % s.m:
                raise MultiflowError(f"layer {layer.name} has {layer.shape[1]} inputs, not a multiple of M={s.m} "
                                     f"for --structure {s}")
        return [LayerPlan(l, 0, 1 - s.n / s.m) for l in inventory.layers], None
    if config.allocation in SCORE_ALLOCATIONS:
        return _score_plans(config, inventory, stats, progress), None
    if config.allocation == "uniform":
        s = check_target(config.target_sparsity)
        dist = None
        plans = [LayerPlan(l, _k(config, l, s), s) for l in inventory.layers]
    else:
        if config.distribution is not None:
            dist = Distribution.load(config.distribution)
            _check_distribution(dist, inventory, config.distribution)
            if config.target_sparsity is not None and config.target_sparsity != dist.target_sparsity:
                raise MultiflowError(f"--target-sparsity {config.target_sparsity} but {config.distribution} was "
                                     f"computed for {dist.target_sparsity}")
        else:
            dist = distribute(inventory, [config.target_sparsity], progress, pooled=config.allocation == "global",
                              dead=dead)[0]
        plans = []
        for l in inventory.layers:
            share = dist.layers[l.name]
            plans.append(LayerPlan(l, share.pruned if config.group == "layer" else _k(config, l, share.sparsity),
                                   share.sparsity))
    for p in plans:
        if p.layer.name in dead:
            p.dead, p.k, p.target = True, (p.layer.numel if config.group == "layer" else p.layer.shape[1]), 1.0
    return plans, dist


def _score_plans(config: PruneConfig, inventory: Inventory, stats, progress: bool) -> list[LayerPlan]:
    from multiflow import allocation

    s = check_target(config.target_sparsity)
    if stats is None and config.method != "magnitude":
        raise MultiflowError(f"--allocation {config.allocation} derives each layer's sparsity from the "
                             f"{config.method} scores: it needs the statistics (and cannot be fixed before "
                             "calibration, as --sequential would need)")

    def score(layer: Layer, weight: torch.Tensor) -> torch.Tensor:
        return layer_score(config.method, weight, None if stats is None else stats[layer.name].sq_mean)

    if config.allocation == "scores":
        counts = allocation.score_counts(inventory, score, s, progress)
        return [LayerPlan(l, counts[l.name] if config.group == "layer" else _k(config, l, counts[l.name] / l.numel),
                          counts[l.name] / l.numel) for l in inventory.layers]
    sparsities = allocation.owl_sparsities(inventory, score, s)
    return [LayerPlan(l, _k(config, l, sparsities[l.name]), sparsities[l.name]) for l in inventory.layers]


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


def layer_score(method: str, weight: torch.Tensor, sq_mean: torch.Tensor | None) -> torch.Tensor:
    """A layer's float32 importance scores by --method."""
    if method == "magnitude":
        return scores.magnitude_score(weight)
    if method == "wanda":
        return scores.wanda_score(weight, sq_mean)
    return scores.multiflow_score(weight, sq_mean)


def layer_mask(weight: torch.Tensor, plan_: LayerPlan, config: PruneConfig, sq_mean: torch.Tensor | None) -> torch.Tensor:
    """The keep-mask of one layer (pure: weight and statistic in, mask out)."""
    if plan_.dead:
        return torch.zeros(weight.shape, dtype=torch.bool)
    score = layer_score(config.method, weight, sq_mean)
    if config.structure.is_n_m:
        return masks.n_m_mask(score, config.structure.n, config.structure.m)
    if config.group == "row":
        return masks.row_mask(score, plan_.k)
    return masks.layer_mask(score, plan_.k)


def masker_for(config: PruneConfig, inventory: Inventory, progress: bool = False):
    """`(layer name, weight, sq_mean) -> keep mask` by this config's plan, for sequential calibration
    (blocks pruned in memory as it goes; the checkpoint is written by `prune` from the same statistics,
    which gives the same masks when the calibration dtype holds the checkpoint's values exactly)."""
    return masker_from_plans(config, plan(config, inventory, progress)[0])


def masker_from_plans(config: PruneConfig, plans: list[LayerPlan]):
    """`masker_for` with the plan already made (`run --sequential` hands the same plan to `prune`)."""
    by_name = {p.layer.name: p for p in plans}

    def masker(name: str, weight: torch.Tensor, sq_mean: torch.Tensor) -> torch.Tensor | None:
        if name not in by_name:  # e.g. a --vision-tower folder's layers: calibrated, never written, never pruned
            return None
        return layer_mask(weight.cpu(), by_name[name], config, sq_mean)

    return masker


# An in-memory run has no files: PruneConfig's file fields hold this placeholder; only its choices are read.
_IN_MEMORY = Path("<in memory>")


def prune_module(model: torch.nn.Module, target_sparsity: float | None, *, stats: dict[str, LayerStats] | None = None,
                 method: str = "multiflow", allocation: str = "modality", group: str = "layer",
                 structure: str = "unstructured", dead_layers: str = "keep", rules=None) -> dict[str, Any]:
    """Step 3 on an nn.Module in memory: zero the pruned weights of its prunable nn.Linear layers in place.

    The same allocation (Step 1 on the module's own weights), scores and masks as `prune` on a
    checkpoint (tested equal). `stats` maps module names to `LayerStats` (`stats_file.from_collector`
    of a `statistics.collect_statistics` run), needed by wanda and multiflow. `rules`: as Step 1's.
    Returns the report (`prune`'s fields without the file ones).
    """
    config = PruneConfig(model=_IN_MEMORY, output=_IN_MEMORY, target_sparsity=target_sparsity,
                         stats=None if method == "magnitude" else _IN_MEMORY, method=method, allocation=allocation,
                         group=group, structure=Structure.parse(structure), dead_layers=dead_layers)
    inventory = layers_mod.from_module(model, rules)
    if method != "magnitude":
        check_stats(stats or {}, inventory, Path("stats"))
    plans, dist = plan(config, inventory, progress=False, stats=stats)
    with torch.no_grad():
        for p in plans:
            weight = p.layer.handle
            sq_mean = None if method == "magnitude" else stats[p.layer.name].sq_mean
            keep = layer_mask(weight.detach().cpu(), p, config, sq_mean).to(weight.device)
            weight.masked_fill_(~keep, 0)
            p.pruned = int(keep.numel() - keep.sum())
    report = _report(config, inventory, plans, dist, None, None)
    for key in ("model", "input_sha256"):
        report.pop(key)
    return report


def prune(config: PruneConfig, progress: bool = True, calibration: dict[str, Any] | None = None,
          planned: tuple[list[LayerPlan], Distribution | None] | None = None) -> dict[str, Any]:
    """Step 3: write the pruned checkpoint folder; return the report (also saved as multiflow_report.json).

    `planned`: `plan(config, ...)`'s result when the caller already made it (sequential calibration)."""
    output = Path(config.output)
    if output.resolve() == Path(config.model).resolve():
        raise MultiflowError(f"--output {output} is the input model folder; write the pruned copy elsewhere")
    if output.exists() and (not output.is_dir() or any(output.iterdir())) and not config.overwrite:
        raise MultiflowError(f"--output {output} exists and is not empty; pass --overwrite or choose another folder")
    inventory = layers_mod.from_checkpoint(config.model, config.rules)
    if any(e.begin is None for e in list_tensors(config.model, allow_pickle=True)):
        raise MultiflowError(f"{config.model} holds pickled weights; convert them to safetensors before pruning")
    stats, stats_meta = (None, {})
    if config.method != "magnitude":
        stats, stats_meta = load_stats(config.stats)
        check_stats(stats, inventory, config.stats)
    started = time.perf_counter()
    plans, dist = planned if planned is not None else plan(config, inventory, progress, stats)
    planned_at = time.perf_counter()
    by_key = {(p.layer.handle.file, p.layer.handle.key): p for p in plans}
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{output.name}.", dir=output.parent))
    try:
        digest = _write_pruned(Path(config.model), tmp, by_key, config, stats, progress)
        report = _report(config, inventory, plans, dist, stats_meta if calibration is None else calibration, digest)
        report["timings"] = {"distribute_seconds": round(planned_at - started, 3),
                             "prune_seconds": round(time.perf_counter() - planned_at, 3)}
        if dist is not None:
            from multiflow.plots import plot_distribution

            name = f"sparsity_distribution_{dist.target_sparsity:g}"
            dist.save(tmp / f"{name}.json")
            plot_distribution(dist, tmp / f"{name}.png")
        write_atomic(tmp / "multiflow_report.json", json.dumps(report, indent=2) + "\n")
        if output.exists():
            shutil.rmtree(output)
        tmp.rename(output)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return report


def _write_pruned(src: Path, dst: Path, by_key: dict, config: PruneConfig, stats, progress: bool) -> str:
    """Copy every file of src into dst, zeroing pruned weights; returns sha256 of the input weight files."""
    entries = list_tensors(src)
    files = list(dict.fromkeys(e.file for e in entries))
    digest = hashlib.sha256()
    for path in sorted(src.iterdir()):
        if path.is_file() and path not in files and path.suffix not in _WEIGHT_SUFFIXES:
            shutil.copy2(path, dst / path.name)
    bar = tqdm(total=sum(e.end - e.begin for e in entries), unit="B", unit_scale=True,
               desc="Step 3: pruning", disable=not progress)
    with bar:
        for path in files:
            in_file = sorted((e for e in entries if e.file == path), key=lambda e: e.begin)
            with open(path, "rb") as f:
                head = f.read(in_file[0].begin if in_file else path.stat().st_size)
            digest.update(head)
            with open(dst / path.name, "wb") as out:
                out.write(head)
                position = len(head)
                for entry, tensor in read_tensors(in_file):
                    if entry.begin != position:
                        raise MultiflowError(f"{path}: tensor {entry.key!r} does not follow the previous one; "
                                             "re-save the checkpoint with safetensors")
                    raw = tensor.reshape(-1).view(torch.uint8)
                    digest.update(memoryview(raw.numpy()))
                    p = by_key.get((entry.file, entry.key))
                    if p is not None:
                        keep = layer_mask(tensor, p, config, stats[p.layer.name].sq_mean if stats else None)
                        tensor.masked_fill_(~keep, 0)
                        p.pruned = int(keep.numel() - keep.sum())
                    out.write(memoryview(raw.numpy()))
                    position = entry.end
                    bar.update(entry.end - entry.begin)
    return digest.hexdigest()


def _report(config, inventory, plans, dist, calibration, digest) -> dict[str, Any]:
    import safetensors
    import transformers

    from multiflow import __version__

    per_layer = {
        p.layer.name: {"modality": p.layer.modality, "numel": p.layer.numel, "target_sparsity": p.target,
                       "achieved_sparsity": p.pruned / p.layer.numel, "pruned": p.pruned,
                       "kept": p.layer.numel - p.pruned, **({"dead": True} if p.dead else {})}
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
        "model": str(config.model), "naming": inventory.naming, "input_sha256": digest,
        "method": config.method, "allocation": None if config.structure.is_n_m else config.allocation,
        "group": config.group, "structure": str(config.structure), "dead_layers": config.dead_layers,
        "dead_layer_names": inventory.dead_layers(),
        "target_sparsity": config.target_sparsity if dist is None else dist.target_sparsity,
        "calibration": {k: calibration.get(k) for k in ("data", "nsamples", "seed", "prompt", "dtype", "device",
                                                                   "execution", "sequential", "peak_device_memory_gib")} if calibration else None,
        "global": {"layers": len(plans), "params": n_all, "pruned": pruned_all,
                   "achieved_sparsity": pruned_all / n_all if n_all else 0.0},
        "modalities": totals,
        "layers": per_layer,
        "notes": notes,
    }
