"""The Python entry points (re-exported by `multiflow`): Step 1 for an nn.Module or a checkpoint folder
(`compute_distribution(s)`, `inventory`), Step 2 (`calibrate`), Step 3 (`prune`, `prune_module`), all three
(`run`) and what it cost (`evaluate`). Each builds its stage's config and calls the stage; the CLI (cli.py) calls these."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable

from torch import nn

from multiflow.calibration.text_data import DEFAULT_SEQ_LEN
from multiflow.distribution.distribute import Distribution, distribute
from multiflow.models import inventory as layers
from multiflow.models.families import ModalityRules
from multiflow.storage.outputs import output_path


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
    max_layer_sparsity: float | None = None,
    prune_only: str = "all",
) -> list[Distribution]:
    """Step 1 for several targets from one read of the weights. `max_layer_sparsity`, `prune_only`: as the CLI's
    --max-layer-sparsity and --prune-only (`distribution.choices.DistributionChoices`)."""
    from multiflow.distribution.choices import DistributionChoices

    choices = DistributionChoices(max_layer_sparsity=max_layer_sparsity, prune_only=prune_only)
    return distribute(inventory(model, rules, vision_tower, allow_pickle), target_sparsities, progress,
                      choices=choices)


def compute_distribution(
    model: nn.Module | str | os.PathLike,
    target_sparsity: float,
    rules: str | os.PathLike | ModalityRules | None = None,
    **kwargs,
) -> Distribution:
    """Step 1: `{layer name: sparsity}` per modality for one target (docs/algorithm.md, Step 1: paper Eq. 7).

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
              samples_per_pass: int | None = None, device_map: str | None = None, progress: bool = False, masker=None,
              overwrite: bool = False, seq_len: int = DEFAULT_SEQ_LEN, pruner=None, deterministic_report: bool = False):
    """Step 2: write the activation statistics of every prunable layer to `output`; returns (stats, metadata).

    Block by block unless `whole_model`: one block's weights in memory at a time. An existing
    `output` is replaced only with `overwrite`. A plain language model is calibrated on `nsamples`
    windows of `seq_len` tokens of the text `data` (`text_data`). `deterministic_report`: the file's
    metadata without the fields that vary between identical runs (`calibration.calibrate.VOLATILE_META_FIELDS`).
    """
    from multiflow.calibration.calibrate import CalibrationConfig
    from multiflow.calibration.calibrate import calibrate as _calibrate

    return _calibrate(CalibrationConfig(
        model=Path(model), output=output_path(output), data=None if data is None else Path(data), nsamples=nsamples,
        seed=seed, batch_size=batch_size, dtype=dtype, device=device, include_answers=include_answers,
        split_token_types=split_token_types, rules=None if rules is None else Path(rules),
        vision_tower=None if vision_tower is None else Path(vision_tower), allow_pickle=allow_pickle,
        trust_remote_code=trust_remote_code, whole_model=whole_model, samples_per_pass=samples_per_pass,
        device_map=device_map, overwrite=overwrite, seq_len=seq_len, deterministic_report=deterministic_report),
        progress, masker, pruner)


def _prune_config(model, output, target_sparsity, distribution=None, stats=None, method: str = "multiflow",
                  allocation: str = "modality", group: str = "layer", structure: str = "unstructured",
                  dead_layers: str = "keep", rules=None, overwrite: bool = False, update: str = "none",
                  blocksize: int = 128, percdamp: float = 0.01, deterministic_report: bool = False,
                  max_layer_sparsity: float | None = None, prune_only: str = "all"):
    from multiflow.pruning.config import PruneConfig, Structure

    as_path = lambda p: None if p is None else Path(p)  # noqa: E731
    return PruneConfig(
        model=Path(model), output=output_path(output), target_sparsity=target_sparsity,
        distribution=as_path(distribution), stats=as_path(stats), method=method, allocation=allocation, group=group,
        structure=Structure.parse(structure), dead_layers=dead_layers, rules=as_path(rules), overwrite=overwrite,
        update=update, blocksize=blocksize, percdamp=percdamp, deterministic_report=deterministic_report,
        max_layer_sparsity=max_layer_sparsity, prune_only=prune_only)


def prune(model: str | os.PathLike, output: str | os.PathLike, target_sparsity: float | None = None, *,
          distribution=None, stats=None, method: str = "multiflow", allocation: str = "modality",
          group: str = "layer", structure: str = "unstructured", dead_layers: str = "keep", rules=None,
          overwrite: bool = False, progress: bool = False, calibration: dict | None = None,
          deterministic_report: bool = False, max_layer_sparsity: float | None = None,
          prune_only: str = "all") -> dict:
    """Step 3: write the pruned checkpoint folder `output`; returns the report (multiflow_report.json).

    `output` must be new, empty, or (with `overwrite`) a previous multiflow output: never another folder.
    `deterministic_report`: the report without the fields that vary between identical runs
    (`pruning.report.VOLATILE_REPORT_FIELDS`: timings, peak memory), so that it is byte-identical."""
    from multiflow.pruning.prune import prune as _prune

    return _prune(_prune_config(model, output, target_sparsity, distribution, stats, method, allocation, group,
                                structure, dead_layers, rules, overwrite,
                                deterministic_report=deterministic_report, max_layer_sparsity=max_layer_sparsity,
                                prune_only=prune_only), progress, calibration)


def run(model: str | os.PathLike, output: str | os.PathLike, target_sparsity: float | None = None, *, data=None,
        nsamples: int = 128, seed: int = 0, batch_size: int = 1, dtype: str = "float32", device: str = "cpu",
        include_answers: bool = False, split_token_types: bool = False, method: str | None = None,
        allocation: str | None = None, group: str | None = None, structure: str = "unstructured",
        dead_layers: str = "keep", rules=None, overwrite: bool = False, trust_remote_code: bool = False,
        vision_tower=None, whole_model: bool = False, samples_per_pass: int | None = None, device_map: str | None = None,
        sequential: bool = False, seq_len: int = DEFAULT_SEQ_LEN, progress: bool = False, update: str | None = None,
        blocksize: int = 128, percdamp: float = 0.01, deterministic_report: bool = False,
        max_layer_sparsity: float | None = None, prune_only: str = "all") -> dict:
    """Steps 1-3: calibrate (when the method needs statistics), distribute and prune into `output`.

    Without `method`, the configuration measured best on the pretrained judges (`pruning.config.RUN_RECOMMENDED`:
    SparseGPT, every layer and every output row at the target); with a `method`, `allocation`, `group` and `update`
    default as the paper (`PAPER_DEFAULTS`: `method="multiflow"` alone is the paper's exact method).

    `sequential`: each block is calibrated on the outputs of the already-pruned blocks before it
    (Step 1 runs first to fix every layer's count). `vision_tower` (original-layout LLaVA) serves
    calibration only: the pruned copy holds the checkpoint folder's own weights. The report's
    "timings" gives each stage's seconds (Step 1 = distribute, Step 2 = calibrate, Step 3 = prune),
    left out with `deterministic_report` (as every field of `pruning.report.VOLATILE_REPORT_FIELDS`).
    `method="sparsegpt"` is always sequential: each block's layers are pruned and their weights updated
    from their inputs' Hessians as calibration reaches them (`reconstruction`). `update="obs"` does the
    same with the `method`'s score as the selection criterion (`blocksize`, `percdamp`: the update's).
    With either and `allocation` scores or owl, one dense statistics pass plans every layer's count
    first (from the method's scores; wanda's for sparsegpt), then the sequential pass prunes.
    """
    import tempfile
    import time

    from multiflow.errors import MultiflowError
    from multiflow.pruning import methods
    from multiflow.pruning.config import run_choices
    from multiflow.pruning.masking import masker_from_plans
    from multiflow.pruning.plan import check_stats, plan, SCORE_ALLOCATIONS
    from multiflow.pruning.prune import prune as _prune
    from multiflow.pruning.reconstruction import SparseGPTStep
    from multiflow.pruning.scores import NO_STATISTICS
    from multiflow.storage.outputs import FolderOutput
    from multiflow.storage.stats_file import load_stats

    defaulted = method is None  # the recommended configuration: say so where it matters
    choices = run_choices(method, allocation, group, update)
    method, allocation, group, update = (choices[k] for k in ("method", "allocation", "group", "update"))
    chosen = methods.method(method)
    reconstructs = chosen.reconstructs or update == "obs"
    sequential = sequential or reconstructs
    prune_args = dict(method=method, allocation=allocation, group=group, structure=structure,
                      dead_layers=dead_layers, rules=rules, overwrite=overwrite,
                      deterministic_report=deterministic_report, max_layer_sparsity=max_layer_sparsity,
                      prune_only=prune_only)
    update_args = dict(update=update, blocksize=blocksize, percdamp=percdamp)
    if not chosen.needs_statistics and not reconstructs:
        _prune_config(model, output, target_sparsity, **prune_args, **update_args)  # validates update's flags too
        if sequential:
            raise MultiflowError("--sequential changes the statistics the scores use; --method magnitude uses none")
        return prune(model, output, target_sparsity, progress=progress, **prune_args)
    if reconstructs and whole_model:
        raise MultiflowError(f"{f'--method {method}' if chosen.reconstructs else '--update obs'} prunes block by "
                             "block as calibration reaches each block: drop --whole-model"
                             + (f" (run without --method uses --method {method}; --method multiflow is the paper's "
                                "one-pass method, which --whole-model can run)" if defaulted else ""))
    # checked before the long calibration pass (prune checks again, and at the end before replacing anything)
    FolderOutput(output, {"the input model folder": model, "the --vision-tower folder": vision_tower,
                          "the --data input": data, "the --rules file": rules}, overwrite)
    with tempfile.TemporaryDirectory(prefix="multiflow-run-") as scratch:
        stats_path = Path(scratch) / "stats.safetensors"
        config = _prune_config(model, output, target_sparsity, stats=stats_path, **prune_args, **update_args)
        calibration_args = dict(data=data, nsamples=nsamples, seed=seed, batch_size=batch_size, dtype=dtype,
                                device=device, include_answers=include_answers, split_token_types=split_token_types,
                                rules=rules, vision_tower=vision_tower, trust_remote_code=trust_remote_code,
                                whole_model=whole_model, samples_per_pass=samples_per_pass, device_map=device_map,
                                progress=progress, seq_len=seq_len)
        started = time.perf_counter()
        inv, dense_stats, timings = inventory(model, rules), None, {}
        config.dense_layers(inv)  # a --prune-only that names nothing of this model: an error before calibrating
        if reconstructs and config.allocation in SCORE_ALLOCATIONS and not config.structure.is_n_m \
                and config.allocation_score not in NO_STATISTICS:  # the plan needs every layer's scores first
            dense_path = Path(scratch) / "dense-stats.safetensors"
            calibrate(model, dense_path, **calibration_args)  # the dense statistics of `multiflow calibrate`
            dense_stats = load_stats(dense_path)[0]
            check_stats(dense_stats, inv, dense_path)
            timings["allocation_calibrate_seconds"] = round(time.perf_counter() - started, 3)
        plan_started = time.perf_counter()
        planned = plan(config, inv, progress, dense_stats) if sequential else None  # Step 1, once
        masker = masker_from_plans(config, planned[0]) if sequential and not reconstructs else None
        pruner = SparseGPTStep(config, planned[0], Path(scratch) / "sparsegpt") if reconstructs else None
        plan_done = time.perf_counter()
        _, meta = calibrate(model, stats_path, **calibration_args, masker=masker, pruner=pruner)
        calibrated = time.perf_counter()
        timings.update({**({"sequential_plan_seconds": round(plan_done - plan_started, 3)} if sequential else {}),
                        "calibrate_seconds": round(calibrated - plan_done, 3)})
        return _prune(config, progress, meta, planned, timings, updated=pruner and pruner.updated)


def evaluate(model: str | os.PathLike, data=None, *, reference: str | os.PathLike | None = None,
             nsamples: int | None = None, seed: int = 0, batch_size: int = 8, max_new_tokens: int = 16,
             dtype: str = "float32", device: str = "cpu", seq_len: int = DEFAULT_SEQ_LEN,
             class_templates: Iterable[str] | None = None, rules=None, trust_remote_code: bool = False,
             progress: bool = False) -> dict:
    """What pruning cost (`multiflow eval`), as the dict its `--output` writes.

    A plain language model: perplexity over non-overlapping windows of `seq_len` tokens of the text `data`
    (`perplexity`, `tokens`; with `reference`, the dense model, also `kl` (KL(reference ‖ model) per token) and
    `top1_agreement`). A vision-language model: answers generated for the records of `data` (`nsamples` of
    them, drawn by `seed`; all by default), exact-match `accuracy` overall and per kind, and with `reference`
    agreement and KL per answer token. A retrieval model: recall@k and zero-shot accuracy.
    """
    from multiflow.evaluation.evaluate import EvalConfig, evaluate as _evaluate

    templates = {"class_templates": tuple(class_templates)} if class_templates else {}
    return _evaluate(EvalConfig(
        model=Path(model), data=Path(data) if data is not None else None,
        reference=Path(reference) if reference is not None else None, nsamples=nsamples, seed=seed,
        batch_size=batch_size, max_new_tokens=max_new_tokens, dtype=dtype, device=device,
        trust_remote_code=trust_remote_code, seq_len=seq_len, rules=Path(rules) if rules is not None else None,
        **templates), progress=progress)


def prune_module(model: nn.Module, target_sparsity: float | None = None, *, stats=None, method: str = "multiflow",
                 allocation: str = "modality", group: str = "layer", structure: str = "unstructured",
                 dead_layers: str = "keep", rules=None, max_layer_sparsity: float | None = None,
                 prune_only: str = "all") -> dict:
    """Step 3 in memory: zero the pruned weights of `model`'s prunable linears in place; returns the report.

    `stats`: {module name: LayerStats}, e.g. `stats_file.from_collector(collector)` after forward passes
    inside `statistics.collect_statistics(model, names, aligned_pattern)`; needed by wanda and multiflow.
    """
    from multiflow.pruning.prune import prune_module as _prune_module

    return _prune_module(model, target_sparsity, stats=stats, method=method, allocation=allocation, group=group,
                         structure=structure, dead_layers=dead_layers, rules=rules,
                         max_layer_sparsity=max_layer_sparsity, prune_only=prune_only)
