"""Step 2 end to end: calibration samples -> prompts -> forward passes with hooks -> stats.safetensors."""

from __future__ import annotations

import contextlib
import logging
import re
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Callable

import torch
from tqdm.auto import tqdm

from multiflow.calibration.block_runner import image_positions, run_blocks
from multiflow.calibration.data import Sample, load_samples
from multiflow.calibration.statistics import collect_statistics
from multiflow.calibration.text_data import DEFAULT_SEQ_LEN, TextWindow, check_seq_len, encode_windows, load_tokenizer, load_windows
from multiflow.errors import MultiflowError
from multiflow.models import inventory as layers
from multiflow.models.loading import load_model
from multiflow.models.prompts import encode_prompts
from multiflow.models.retrieval import encode_pairs, retrieval_head
from multiflow.storage.stats_file import LayerStats, from_collector, save_stats

log = logging.getLogger("multiflow")

DEFAULT_SAMPLES_PER_PASS = 64
# Metadata that differs between two runs with the same inputs and options (the statistics never do).
VOLATILE_META_FIELDS = ("seconds", "peak_device_memory_gib")


@dataclass(frozen=True)
class CalibrationConfig:
    """Everything `multiflow calibrate` needs, validated at the edge (the CLI)."""

    model: Path
    output: Path
    data: Path | None = None
    nsamples: int = 128
    seed: int = 0
    batch_size: int = 1
    dtype: str = "float32"
    device: str = "cpu"
    include_answers: bool = False
    split_token_types: bool = False
    rules: Path | None = None
    vision_tower: Path | None = None
    allow_pickle: bool = False
    trust_remote_code: bool = False
    whole_model: bool = False  # load every weight at once instead of one block at a time
    samples_per_pass: int | None = None  # block by block: samples in flight per pass (default 64; sequential: all)
    device_map: str | None = None  # whole model spread over devices by accelerate ("auto")
    seq_len: int = DEFAULT_SEQ_LEN  # a plain language model: tokens per calibration window (text_data)
    overwrite: bool = False  # replace an existing output file
    deterministic_report: bool = False  # metadata without VOLATILE_META_FIELDS: same inputs, same file bytes

    def __post_init__(self) -> None:
        if self.nsamples < 1:
            raise MultiflowError(f"--nsamples {self.nsamples}: give at least 1")
        if self.batch_size < 1:
            raise MultiflowError(f"--batch-size {self.batch_size}: give at least 1")
        if self.samples_per_pass is not None and self.samples_per_pass < 1:
            raise MultiflowError(f"--samples-per-pass {self.samples_per_pass}: give at least 1")
        check_seq_len(self.seq_len)
        if self.device_map is not None and not self.whole_model:
            raise MultiflowError("--device-map spreads the whole model over devices: add --whole-model (block by "
                                 "block, --device alone holds one block at a time)")


# (layer, weight, sq_mean) -> keep mask, or None to leave the layer dense
Masker = Callable[[str, torch.Tensor, torch.Tensor], torch.Tensor | None]


def calibrate(config: CalibrationConfig, progress: bool = True, masker: Masker | None = None, pruner=None,
              ) -> tuple[dict[str, LayerStats], dict[str, Any]]:
    """Run the calibration pass; write config.output atomically; return (stats, metadata).

    `masker` makes the pass sequential (block by block only): each block is pruned in memory
    with it as soon as every batch has run the block, and later blocks see the pruned outputs.
    `pruner` does the same with its own hooks (SparseGPT: `reconstruction.SparseGPTStep`):
    `pruner.attach(loaded, collector, names)` is a context manager that yields the on_block.
    """
    from multiflow._version import __version__

    sequential = masker is not None or pruner is not None
    if sequential and config.whole_model:
        raise MultiflowError("--sequential (and --method sparsegpt) run block by block: drop --whole-model")
    started = time.perf_counter()
    inventory = layers.from_checkpoint(config.model, config.rules, config.vision_tower, config.allow_pickle)
    _check_output(config)
    text_only = inventory.family is not None and inventory.family.text_only
    head = retrieval_head(inventory.family) if inventory.family is not None and inventory.family.retrieval else None
    if head is not None and sequential and head.revisits_blocks:
        raise MultiflowError(f"--sequential (and --method sparsegpt, --update obs) prune each block once, as "
                             f"calibration reaches it; a {inventory.family.name} model runs its text blocks twice "
                             f"(retrieval head {head.name}): drop --sequential, or use --method wanda / multiflow")
    if text_only:  # a plain causal LM: windows of tokens, no images, no prompts
        if config.include_answers:
            raise MultiflowError("--include-answers applies to image-question data; a plain language model is "
                                 "calibrated on windows of text: drop it")
        samples, report = load_windows(config.data, load_tokenizer(config.model, config.trust_remote_code),
                                       config.seq_len, config.nsamples, config.seed, model_config=inventory.config)
    else:
        samples, report = load_samples(config.data, config.nsamples, config.seed)
    loaded = load_model(config.model, inventory, config.dtype, config.device, config.trust_remote_code,
                        config.allow_pickle, config.vision_tower, lazy=not config.whole_model,
                        device_map=config.device_map)
    if loaded.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(loaded.device)
    family = inventory.family
    # hooks live on the loaded model's modules; the file uses the checkpoint's (Step 1) names
    to_model = {v: k for k, v in loaded.to_inventory_name.items()}
    names = [to_model[layer.name] for layer in inventory.layers]
    aligned = _aligned_pattern(family, loaded)
    if config.split_token_types:
        _check_split(aligned, names, loaded, inventory)
    batches = [samples[i : i + config.batch_size] for i in range(0, len(samples), config.batch_size)]
    encode = _encode if head is None else partial(_encode_pairs, head)
    forward = None if head is None else head.calibration_forward
    with collect_statistics(loaded.model, names, aligned, config.split_token_types) as collector, \
            contextlib.ExitStack() as attached:
        if config.whole_model:
            _whole_model(loaded, batches, collector, config, progress, inventory, encode, forward)
            execution = "whole model"
        else:
            encoded = [_inputs(loaded, b, config.include_answers, encode) for b in batches]
            for inputs in encoded:
                _refuse_counted_padding(collector, inputs, config, inventory)
            on_block = None if masker is None else _pruning_step(loaded, collector, set(names), masker)
            if pruner is not None:
                on_block = attached.enter_context(pruner.attach(loaded, collector, names))
            per_pass = config.samples_per_pass or (len(samples) if sequential else DEFAULT_SAMPLES_PER_PASS)
            run = run_blocks(loaded, [dict(e) for e in encoded], collector, names, on_block,
                             max(1, per_pass // config.batch_size), progress, forward)
            execution = (f"block by block ({run['blocks']} blocks, {run['passes']} pass"
                         f"{'es' if run['passes'] > 1 else ''}{', sequential' if sequential else ''})")
    stats = {loaded.to_inventory_name[name]: st for name, st in from_collector(collector).items()}
    silent = [n for n, st in stats.items() if not st.tokens]
    if silent:
        log.warning("%d layer(s) saw no calibration token: %s", len(silent), ", ".join(silent[:5]))
    meta = {
        "tool": "multiflow",
        "version": __version__,
        "model": str(config.model),
        "naming": inventory.naming,
        "data": report.source,
        "data_kind": report.kind,
        "nsamples": len(samples),
        "nsamples_requested": config.nsamples,
        "seed": config.seed,
        "batch_size": config.batch_size,
        "prompt": (f"text windows of {config.seq_len} tokens" if text_only else
                   f"image-caption pairs (retrieval head {head.name})" if head is not None else
                   "with answers" if config.include_answers else "ends at the answer slot"),
        **({"seq_len": config.seq_len} if text_only else {}),
        "dtype": config.dtype,
        "device": str(loaded.device),
        "split_token_types": config.split_token_types,
        "skipped_samples": len(report.skipped),
        "execution": execution,
        "sequential": sequential,
        "seconds": round(time.perf_counter() - started, 3),
    }
    if loaded.device.type == "cuda":
        meta["peak_device_memory_gib"] = round(torch.cuda.max_memory_allocated(loaded.device) / 2**30, 3)
    if config.deterministic_report:
        meta = {k: v for k, v in meta.items() if k not in VOLATILE_META_FIELDS}
    _check_output(config)  # again: a file may have appeared there during the pass
    save_stats(config.output, stats, meta)
    return stats, meta


def _check_output(config: CalibrationConfig) -> None:
    from multiflow.storage.outputs import check_file_output

    check_file_output(config.output, {"the input model folder": config.model, "the --vision-tower folder":
                                      config.vision_tower, "the --data input": config.data,
                                      "the --rules file": config.rules}, config.overwrite, example="stats.safetensors")


def _whole_model(loaded, batches: list[list[Sample]], collector, config: CalibrationConfig, progress: bool,
                 inventory, encode=None, forward=None) -> None:
    """Every batch through the whole model: its own forward, or `forward(model, inputs)` (a retrieval head's)."""
    bar = tqdm(total=sum(len(b) for b in batches), unit="sample", desc="Step 2: calibration", disable=not progress)
    with bar:
        for batch in batches:
            inputs = _inputs(loaded, batch, config.include_answers, encode)
            _refuse_counted_padding(collector, inputs, config, inventory)
            with collector.batch(inputs["attention_mask"], image_positions(loaded, inputs)), torch.inference_mode():
                if forward is None:
                    loaded.model(**inputs, use_cache=False)
                else:
                    forward(loaded.model, dict(inputs))
            bar.update(len(batch))


def _pruning_step(loaded, collector, names: set[str], masker: Masker):
    """Sequential calibration's on_block: prune the block's layers in place from the statistics so far."""
    def on_block(block) -> None:
        for sub, module in block.module.named_modules():
            name = f"{block.name}.{sub}" if sub else block.name
            if name in names:
                sq_mean = collector.layers[name].all.mean()
                if sq_mean is None:
                    raise MultiflowError(f"--sequential: layer {loaded.to_inventory_name[name]} saw no calibration "
                                         "token before it was to be pruned")
                with torch.no_grad():
                    keep = masker(loaded.to_inventory_name[name], module.weight, sq_mean)
                    if keep is not None:
                        module.weight.masked_fill_(~keep.to(module.weight.device), 0)

    return on_block


def _rules_fix(inventory, field: str) -> str:
    """Where the user sets a family field: their rules file's, or a rules file based on the preset."""
    family = inventory.family
    if family is not None and family.name.startswith("file:"):
        return f"add '{field}' to the rules file {family.name.removeprefix('file:')} (README, 'Modality rules')"
    base = f"'base: {family.name}' and " if family is not None else ""
    return f"pass --rules FILE with {base}'{field}' (README, 'Modality rules')"


def _check_split(aligned: str | None, names: list[str], loaded, inventory) -> None:
    """--split-token-types needs the language model's layers (aligned_layers) and the image token: never an empty
    split written silently."""
    if inventory.family is not None and inventory.family.text_only:
        raise MultiflowError("--split-token-types splits image-token and text-token positions; a plain language "
                             "model sees no image tokens: drop it")
    if inventory.family is not None and inventory.family.retrieval:
        raise MultiflowError("--split-token-types splits image-token and text-token positions of one sequence; a "
                             "retrieval model reads images and texts in separate towers: drop it")
    if not any(aligned and re.search(aligned, n) for n in names):
        raise MultiflowError("--split-token-types splits the language model's statistics, but no layer is marked "
                             f"as reading the prompt's tokens: {_rules_fix(inventory, 'aligned_layers')}, a regular "
                             "expression over the language model's layer names")
    if loaded.image_token_id is None:
        raise MultiflowError("--split-token-types needs the image token's id, which config.json does not give: "
                             f"{_rules_fix(inventory, 'image_token')} (or 'image_token_id')")


def _refuse_counted_padding(collector, inputs, config: CalibrationConfig, inventory) -> None:
    """Padding (batches of prompts of different lengths) is excluded only in the aligned layers: with none, it
    would be counted in the statistics, so the result would depend on --batch-size. An error naming the fix."""
    mask = inputs.get("attention_mask")
    if collector.aligned or mask is None or bool(mask.bool().all()):
        return
    raise MultiflowError(f"--batch-size {config.batch_size}: this batch has padding, but no layer is marked as "
                         "reading the prompt's tokens, so padding positions would be counted in the statistics: "
                         f"{_rules_fix(inventory, 'aligned_layers')}, or use --batch-size 1")


def _aligned_pattern(family, loaded) -> str | None:
    """Which loaded-model layers see prompt-aligned tokens (family data; a converted model's: its target family's)."""
    from multiflow.models.families import family_by_name

    if family is not None and family.converted_to is not None:
        return family_by_name(family.converted_to).aligned_layers
    return family.aligned_layers if family else None


def pair_text(sample: Sample, include_answers: bool = False) -> str:
    """A retrieval model's text for a sample: its caption; for question-answer data, the question (and
    the answer after it with --include-answers)."""
    if sample.caption is not None:
        return sample.caption
    return f"{sample.question} {sample.answer}" if include_answers and sample.answer else sample.question


def _encode_pairs(head, processor: Any, batch: list[Sample], include_answers: bool):
    """A retrieval model's inputs: the images and their texts (models/retrieval.py)."""
    from transformers import BatchFeature

    return BatchFeature(encode_pairs(processor, head, [s.image for s in batch],
                                     [pair_text(s, include_answers) for s in batch]))


def _inputs(loaded, batch: list[Sample] | list[TextWindow], include_answers: bool, encode=None):
    """A batch encoded for the loaded model by `encode` (default `_encode`), on its device. An encoder-decoder
    language model (BLIP-2's Flan-T5) reads the prompt with its encoder; its decoder runs on the start token alone."""
    from multiflow.models.loading import is_encoder_decoder

    inputs = (encode or _encode)(loaded.processor, batch, include_answers)
    if is_encoder_decoder(loaded.model) and "decoder_input_ids" not in inputs:
        text = loaded.model.config.get_text_config()
        start = text.decoder_start_token_id if text.decoder_start_token_id is not None else text.pad_token_id
        inputs["decoder_input_ids"] = torch.full((inputs["input_ids"].shape[0], 1), start, dtype=torch.long)
    return inputs.to(loaded.device)


def _encode(processor: Any, batch: list[Sample] | list[TextWindow], include_answers: bool):
    if batch and isinstance(batch[0], TextWindow):
        return encode_windows(batch)
    return encode_prompts(processor, batch, include_answers)
