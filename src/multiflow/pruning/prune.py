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
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from tqdm.auto import tqdm

from multiflow.distribution.distribute import Distribution, check_target, distribute, target_name
from multiflow.errors import MultiflowError
from multiflow.models import inventory as layers_mod
from multiflow.models.inventory import Inventory, Layer
from multiflow.pruning import masks, scores
from multiflow.pruning.methods import METHODS
from multiflow.storage.checkpoint import check_finite, list_tensors, read_tensors
from multiflow.storage.outputs import REPORT_NAME, FolderOutput, write_atomic
from multiflow.storage.stats_file import LayerStats, load_stats

log = logging.getLogger("multiflow")

UPDATES = ("none", "obs")  # obs: SparseGPT's weight update after each tile's mask (reconstruction.py, `run` only)
DEAD_LAYERS = ("keep", "prune")  # keep: prune as any layer (the paper); prune: zero the layers whose output is never used
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
SPARSEGPT_NEEDS_RUN = ("--method sparsegpt updates the weights from each layer's Hessian, collected while "
                       "calibrating block by block: use `multiflow run --method sparsegpt` (multiflow.run(..., "
                       "method='sparsegpt')); prune from a stats file and prune_module cannot")
UPDATE_NEEDS_RUN = ("--update obs updates the weights from each layer's Hessian, collected while calibrating block "
                    "by block: use `multiflow run --update obs` (multiflow.run(..., update='obs')); prune from a "
                    "stats file and prune_module cannot")


# --group: what one threshold compares -> the keep-mask of k pruned per group (masks.py, looked up at call time)
COMPARISON_GROUPS: dict[str, Callable[[torch.Tensor, int], torch.Tensor]] = {
    "layer": lambda score, k: masks.layer_mask(score, k),  # the whole matrix, k pruned
    "row": lambda score, k: masks.row_mask(score, k),  # each output row, k pruned per row
}


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
    update: str = "none"  # obs: SparseGPT's OBS update of the kept weights (--method sparsegpt always has it)
    blocksize: int = 128  # the OBS update's column block (SparseGPT's default)
    percdamp: float = 0.01  # the OBS update's dampening, a fraction of the Hessian's mean diagonal
    deterministic_report: bool = False  # leave out VOLATILE_REPORT_FIELDS: same inputs, same report bytes

    def __post_init__(self) -> None:
        for value, allowed, flag in ((self.method, METHODS, "--method"), (self.allocation, ALLOCATIONS, "--allocation"),
                                     (self.group, COMPARISON_GROUPS, "--group"), (self.dead_layers, DEAD_LAYERS, "--dead-layers"),
                                     (self.update, UPDATES, "--update")):
            if value not in allowed:
                raise MultiflowError(f"{flag} {value!r}: choose one of {', '.join(allowed)}")
        if self.target_sparsity is not None:
            check_target(self.target_sparsity)
        if self.blocksize < 1:
            raise MultiflowError(f"--blocksize {self.blocksize}: give at least 1")
        if not 0 <= self.percdamp < float("inf"):
            raise MultiflowError(f"--percdamp {self.percdamp}: give a number >= 0 (SparseGPT uses 0.01)")
        if METHODS[self.method].needs_statistics and not METHODS[self.method].reconstructs and self.stats is None:
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

    @property
    def reconstructs(self) -> bool:
        """The kept weights get SparseGPT's OBS update: --method sparsegpt, or a score with --update obs."""
        return METHODS[self.method].reconstructs or self.update == "obs"

    @property
    def allocation_score(self) -> str:
        """The score --allocation scores / owl plans from: the --method's; wanda's for sparsegpt (OWL+SparseGPT in
        the OWL paper takes its outlier ratios from Wanda's |W| * ||x|| on the dense model)."""
        return METHODS[self.method].planning_score


@dataclass
class LayerPlan:
    """How one layer is pruned: its allocated count (unstructured) and what the mask achieved."""

    layer: Layer
    k: int  # weights to prune (layer group) or per row (row group); ignored for N:M
    target: float
    dead: bool = False
    pruned: int = 0
    written: bool = False  # set by Step 3 once its zeros are checked in the bytes written


_Planned = tuple[list[LayerPlan], "Distribution | None"]


def plan(config: PruneConfig, inventory: Inventory, progress: bool = True,
         stats: dict[str, LayerStats] | None = None) -> tuple[list[LayerPlan], Distribution | None]:
    """Per-layer pruning counts from the allocation (ALLOCATIONS); validates the distribution against the model.
    `stats` (the score allocations need them unless --method magnitude): {layer name: LayerStats}."""
    dead = set(inventory.dead_layers()) if config.dead_layers == "prune" else set()
    if config.structure.is_n_m:
        s = config.structure
        for layer in inventory.layers:
            if layer.shape[1] % s.m:
                raise MultiflowError(f"layer {layer.name} has {layer.shape[1]} inputs, not a multiple of M={s.m} "
                                     f"for --structure {s}")
        return [LayerPlan(l, 0, 1 - s.n / s.m) for l in inventory.layers], None
    plans, dist = ALLOCATIONS[config.allocation].plan(config, inventory, stats, progress, dead)
    for p in plans:
        if p.layer.name in dead:
            p.dead, p.k, p.target = True, (p.layer.numel if config.group == "layer" else p.layer.shape[1]), 1.0
    return plans, dist


def _uniform(config: PruneConfig, inventory: Inventory, stats, progress: bool, dead: set[str]) -> _Planned:
    s = check_target(config.target_sparsity)
    return [LayerPlan(l, _k(config, l, s), s) for l in inventory.layers], None


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
                          dead=dead)[0]
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

    if config.allocation == "scores":
        counts = allocation.score_counts(inventory, score, s, progress)
        return [LayerPlan(l, counts[l.name] if config.group == "layer" else _k(config, l, counts[l.name] / l.numel),
                          counts[l.name] / l.numel) for l in inventory.layers], None
    sparsities = allocation.owl_sparsities(inventory, score, s)
    return [LayerPlan(l, _k(config, l, sparsities[l.name]), sparsities[l.name]) for l in inventory.layers], None


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
    "owl": Allocation("outlier-weighted (OWL: layers with more scores above 5x their mean keep more, within "
                      "+-0.08 of the target)", _score_plans, from_scores=True),
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


def layer_score(method: str, weight: torch.Tensor, sq_mean: torch.Tensor | None) -> torch.Tensor:
    """A layer's float32 importance scores by --method (`scores.SCORES`; an unknown name is an error)."""
    if method in METHODS and METHODS[method].score is None:
        raise MultiflowError(SPARSEGPT_NEEDS_RUN)
    return scores.score(method, weight, sq_mean)


def layer_mask(weight: torch.Tensor, plan_: LayerPlan, config: PruneConfig, sq_mean: torch.Tensor | None) -> torch.Tensor:
    """The keep-mask of one layer (pure: weight and statistic in, mask out)."""
    if plan_.dead:
        return torch.zeros(weight.shape, dtype=torch.bool)
    return _mask_of(layer_score(config.method, weight, sq_mean), plan_, config)


def _mask_of(score: torch.Tensor, plan_: LayerPlan, config: PruneConfig) -> torch.Tensor:
    if config.structure.is_n_m:
        return masks.n_m_mask(score, config.structure.n, config.structure.m)
    return COMPARISON_GROUPS[config.group](score, plan_.k)


def checked_mask(weight: torch.Tensor, plan_: LayerPlan, config: PruneConfig, sq_mean: torch.Tensor | None,
                 where: Any = None) -> torch.Tensor:
    """`layer_mask`, checked against the plan from the score alone (`masks.mask_violation`): at least k pruned,
    beyond k only ties with the k-th score, never a pruned score above a kept one; N:M exactly N kept per group."""
    if plan_.dead:
        return torch.zeros(weight.shape, dtype=torch.bool)
    score = layer_score(config.method, weight, sq_mean)
    keep = _mask_of(score, plan_, config)
    s = config.structure
    why = masks.mask_violation(score, keep, plan_.k, row=config.group == "row", n_m=(s.n, s.m) if s.is_n_m else None)
    if why is not None:
        raise MultiflowError(f"layer {plan_.layer.name}{f' ({where})' if where else ''}: the mask does not match "
                             f"the plan ({why}). Please report this")
    return keep


def planned_count(p: LayerPlan, config: PruneConfig) -> int:
    """The fewest weights the plan prunes in this layer (ties with the k-th score can add more, N:M cannot)."""
    rows, cols = p.layer.shape
    if p.dead:
        return rows * cols
    if config.structure.is_n_m:
        return rows * (cols // config.structure.m) * (config.structure.m - config.structure.n)
    return p.k * rows if config.group == "row" else p.k


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
        exact = p.dead or config.structure.is_n_m
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
    if method in METHODS and METHODS[method].reconstructs:
        raise MultiflowError(SPARSEGPT_NEEDS_RUN)
    needs_stats = method not in METHODS or METHODS[method].needs_statistics
    config = PruneConfig(model=_IN_MEMORY, output=_IN_MEMORY, target_sparsity=target_sparsity,
                         stats=_IN_MEMORY if needs_stats else None, method=method, allocation=allocation,
                         group=group, structure=Structure.parse(structure), dead_layers=dead_layers)
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
    report = _report(config, inventory, plans, dist, None, None)
    check_achieved(plans, config, report, dist)
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
    target = FolderOutput(config.output, output_inputs(config), config.overwrite)
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
        digest = _write_pruned(Path(config.model), tmp, by_key, config, stats, progress, updated)
        report = _report(config, inventory, plans, dist, stats_meta if calibration is None else calibration, digest)
        check_achieved(plans, config, report, dist)
        report["timings"] = {**(timings or {}), "distribute_seconds": round(planned_at - started, 3),
                             "prune_seconds": round(time.perf_counter() - planned_at, 3)}
        if config.deterministic_report:
            drop_volatile(report)
        if dist is not None:
            from multiflow.reporting.plots import plot_distribution

            name = f"sparsity_distribution_{target_name(dist.target_sparsity)}"
            dist.save(tmp / f"{name}.json")
            plot_distribution(dist, tmp / f"{name}.png")
        write_atomic(tmp / REPORT_NAME, json.dumps(report, indent=2) + "\n")
    return report


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


def output_inputs(config: PruneConfig) -> dict[str, Path | None]:
    """The inputs a prune output must keep clear of (never inside, over or around them)."""
    return {"the input model folder": config.model, "the --stats file": config.stats,
            "the --distribution file": config.distribution, "the --rules file": config.rules}


def _write_pruned(src: Path, dst: Path, by_key: dict, config: PruneConfig, stats, progress: bool,
                  updated=None) -> str:
    """Copy every file of src into dst, zeroing pruned weights; returns sha256 of the input weight files."""
    entries = list_tensors(src)
    files = list(dict.fromkeys(e.file for e in entries))
    digest = hashlib.sha256()
    for path in sorted(src.iterdir()):
        if path.is_file() and path not in files and path.suffix not in _WEIGHT_SUFFIXES:
            shutil.copyfile(path, dst / path.name)  # a new file: its mode follows the umask
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
                    check_finite(tensor, entry.key, entry.file)
                    p = by_key.get((entry.file, entry.key))
                    if p is not None and updated is not None:  # sparsegpt: its updated weights and mask
                        keep = updated(p.layer.name, tensor)
                    elif p is not None:
                        keep = checked_mask(tensor, p, config, stats[p.layer.name].sq_mean if stats else None,
                                            entry.file)
                    if p is not None:
                        tensor.masked_fill_(~keep, 0)
                        p.pruned = keep.numel() - int(torch.count_nonzero(keep))
                        _check_zeros(raw, tensor, entry, p, config, sparsegpt=updated is not None)
                        p.written = True
                    out.write(memoryview(raw.numpy()))
                    position = entry.end
                    bar.update(entry.end - entry.begin)
    return digest.hexdigest()


def _check_zeros(raw: torch.Tensor, tensor: torch.Tensor, entry, p: LayerPlan, config: PruneConfig,
                 sparsegpt: bool) -> None:
    """The zeros in the bytes about to be written, counted: at least the pruned count, and exactly it where
    no kept weight can be zero (a kept score is above a threshold >= 0, so its |W| > 0: layer or row group with
    k > 0; dead layers). N:M, k = 0 and SparseGPT can keep a weight that is zero."""
    written = raw.view(entry.dtype)
    if written.data_ptr() != tensor.data_ptr() or written.numel() != tensor.numel():
        raise MultiflowError(f"layer {p.layer.name}: the data written for {entry.key!r} is not the pruned tensor; "
                             "nothing was written")
    zeros = written.numel() - int(torch.count_nonzero(written))
    exact = p.dead or (not sparsegpt and not config.structure.is_n_m and p.k > 0)
    if zeros < p.pruned or (exact and zeros != p.pruned):
        raise MultiflowError(f"layer {p.layer.name}: {zeros} zeros in the data written for {entry.key!r}, but "
                             f"{p.pruned} weights pruned; nothing was written")


def _method_fields(config: PruneConfig) -> dict[str, Any]:
    """The report's record of the weight update and of the score a score-based allocation planned from."""
    by_scores = config.allocation in SCORE_ALLOCATIONS and not config.structure.is_n_m
    return {"update": "obs" if config.reconstructs else "none",
            "obs": {"blocksize": config.blocksize, "percdamp": config.percdamp} if config.reconstructs else None,
            "allocation_score": config.allocation_score if by_scores else None}


def _report(config, inventory, plans, dist, calibration, digest) -> dict[str, Any]:
    import safetensors
    import transformers

    from multiflow._version import __version__

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
        **_method_fields(config),
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
