"""The Python entry points: the same Step 1 for an nn.Module or a checkpoint folder."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable

from torch import nn

from multiflow import layers
from multiflow.distribution import Distribution, distribute
from multiflow.modality_rules import ModalityRules


def inventory(
    model: nn.Module | str | os.PathLike,
    rules: str | os.PathLike | ModalityRules | None = None,
    vision_tower: str | os.PathLike | None = None,
    allow_pickle: bool = False,
) -> layers.Inventory:
    """The prunable layers of a model object or a checkpoint folder, grouped by modality."""
    if isinstance(model, nn.Module):
        return layers.from_module(model, rules)
    return layers.from_checkpoint(Path(model), rules, vision_tower, allow_pickle)


def compute_distributions(
    model: nn.Module | str | os.PathLike,
    target_sparsities: Iterable[float],
    rules: str | os.PathLike | ModalityRules | None = None,
    *,
    vision_tower: str | os.PathLike | None = None,
    allow_pickle: bool = False,
    progress: bool = False,
) -> list[Distribution]:
    """Step 1 for several targets from one read of the weights."""
    return distribute(inventory(model, rules, vision_tower, allow_pickle), target_sparsities, progress)


def compute_distribution(
    model: nn.Module | str | os.PathLike,
    target_sparsity: float,
    rules: str | os.PathLike | ModalityRules | None = None,
    **kwargs,
) -> Distribution:
    """Step 1: `{layer name: sparsity}` per modality for one target (ALGORITHM.md Eq. 7).

    `model` is an in-memory model (its nn.Linear layers, by module name) or a
    checkpoint folder read tensor by tensor; both give identical results.
    `rules` is None (the preset of the model's family), a rules file, or a
    `ModalityRules`.
    """
    return compute_distributions(model, [target_sparsity], rules, **kwargs)[0]


def calibrate(model: str | os.PathLike, output: str | os.PathLike = "stats.safetensors", *, data=None,
              nsamples: int = 128, seed: int = 0, batch_size: int = 1, dtype: str = "float32", device: str = "cpu",
              include_answers: bool = False, split_token_types: bool = False, rules=None, vision_tower=None,
              allow_pickle: bool = False, trust_remote_code: bool = False, whole_model: bool = False,
              samples_per_pass: int | None = None, device_map: str | None = None, progress: bool = False, masker=None):
    """Step 2: write the activation statistics of every prunable layer to `output`; returns (stats, metadata).

    Block by block unless `whole_model`: one block's weights in memory at a time.
    """
    from multiflow.calibration import CalibrationConfig
    from multiflow.calibration import calibrate as _calibrate

    return _calibrate(CalibrationConfig(
        model=Path(model), output=Path(output), data=None if data is None else Path(data), nsamples=nsamples,
        seed=seed, batch_size=batch_size, dtype=dtype, device=device, include_answers=include_answers,
        split_token_types=split_token_types, rules=None if rules is None else Path(rules),
        vision_tower=None if vision_tower is None else Path(vision_tower), allow_pickle=allow_pickle,
        trust_remote_code=trust_remote_code, whole_model=whole_model, samples_per_pass=samples_per_pass,
        device_map=device_map), progress, masker)


def _prune_config(model, output, target_sparsity, distribution=None, stats=None, method: str = "multiflow",
                  allocation: str = "modality", group: str = "layer", structure: str = "unstructured",
                  dead_layers: str = "keep", rules=None, overwrite: bool = False):
    from multiflow.pruning import PruneConfig, Structure

    as_path = lambda p: None if p is None else Path(p)  # noqa: E731
    return PruneConfig(
        model=Path(model), output=Path(output), target_sparsity=target_sparsity,
        distribution=as_path(distribution), stats=as_path(stats), method=method, allocation=allocation, group=group,
        structure=Structure.parse(structure), dead_layers=dead_layers, rules=as_path(rules), overwrite=overwrite)


def prune(model: str | os.PathLike, output: str | os.PathLike, target_sparsity: float | None = None, *,
          distribution=None, stats=None, method: str = "multiflow", allocation: str = "modality",
          group: str = "layer", structure: str = "unstructured", dead_layers: str = "keep", rules=None,
          overwrite: bool = False, progress: bool = False, calibration: dict | None = None) -> dict:
    """Step 3: write the pruned checkpoint folder `output`; returns the report (multiflow_report.json)."""
    from multiflow.pruning import prune as _prune

    return _prune(_prune_config(model, output, target_sparsity, distribution, stats, method, allocation, group,
                                structure, dead_layers, rules, overwrite), progress, calibration)


def run(model: str | os.PathLike, output: str | os.PathLike, target_sparsity: float | None = None, *, data=None,
        nsamples: int = 128, seed: int = 0, batch_size: int = 1, dtype: str = "float32", device: str = "cpu",
        include_answers: bool = False, split_token_types: bool = False, method: str = "multiflow",
        allocation: str = "modality", group: str = "layer", structure: str = "unstructured",
        dead_layers: str = "keep", rules=None, overwrite: bool = False, trust_remote_code: bool = False,
        vision_tower=None, whole_model: bool = False, samples_per_pass: int | None = None, device_map: str | None = None,
        sequential: bool = False, progress: bool = False) -> dict:
    """Steps 1-3: calibrate (when the method needs statistics), distribute and prune into `output`.

    `sequential`: each block is calibrated on the outputs of the already-pruned blocks before it
    (Step 1 runs first to fix every layer's count). `vision_tower` (original-layout LLaVA) serves
    calibration only: the pruned copy holds the checkpoint folder's own weights. The report's
    "timings" gives each stage's seconds (Step 1 = distribute, Step 2 = calibrate, Step 3 = prune).
    """
    import tempfile
    import time

    from multiflow.errors import MultiflowError
    from multiflow.pruning import masker_from_plans, plan
    from multiflow.pruning import prune as _prune

    prune_args = dict(method=method, allocation=allocation, group=group, structure=structure,
                      dead_layers=dead_layers, rules=rules, overwrite=overwrite)
    if method == "magnitude":
        if sequential:
            raise MultiflowError("--sequential changes the statistics the scores use; --method magnitude uses none")
        return prune(model, output, target_sparsity, progress=progress, **prune_args)
    with tempfile.TemporaryDirectory(prefix="multiflow-run-") as scratch:
        stats_path = Path(scratch) / "stats.safetensors"
        config = _prune_config(model, output, target_sparsity, stats=stats_path, **prune_args)
        started = time.perf_counter()
        planned = plan(config, inventory(model, rules), progress) if sequential else None  # Step 1, once
        masker = masker_from_plans(config, planned[0]) if sequential else None
        plan_done = time.perf_counter()
        _, meta = calibrate(model, stats_path, data=data, nsamples=nsamples, seed=seed, batch_size=batch_size,
                            dtype=dtype, device=device, include_answers=include_answers,
                            split_token_types=split_token_types, rules=rules, vision_tower=vision_tower,
                            trust_remote_code=trust_remote_code, whole_model=whole_model,
                            samples_per_pass=samples_per_pass, device_map=device_map, progress=progress,
                            masker=masker)
        calibrated = time.perf_counter()
        report = _prune(config, progress, meta, planned)
        report["timings"] = {**({"sequential_plan_seconds": round(plan_done - started, 3)} if sequential else {}),
                             "calibrate_seconds": round(calibrated - plan_done, 3), **report["timings"]}
        return _save_report(output, report)


def prune_module(model: nn.Module, target_sparsity: float | None = None, *, stats=None, method: str = "multiflow",
                 allocation: str = "modality", group: str = "layer", structure: str = "unstructured",
                 dead_layers: str = "keep", rules=None) -> dict:
    """Step 3 in memory: zero the pruned weights of `model`'s prunable linears in place; returns the report.

    `stats`: {module name: LayerStats}, e.g. `stats_file.from_collector(collector)` after forward passes
    inside `statistics.collect_statistics(model, names, aligned_pattern)`; needed by wanda and multiflow.
    """
    from multiflow.pruning import prune_module as _prune_module

    return _prune_module(model, target_sparsity, stats=stats, method=method, allocation=allocation, group=group,
                         structure=structure, dead_layers=dead_layers, rules=rules)


def _save_report(output, report: dict) -> dict:
    import json

    from multiflow.distribution import write_atomic

    write_atomic(Path(output) / "multiflow_report.json", json.dumps(report, indent=2) + "\n")
    return report
