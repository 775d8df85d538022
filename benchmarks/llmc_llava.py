#!/usr/bin/env python
"""llm-compressor's Wanda or SparseGPT on the language model of a LLaVA checkpoint, fed multiflow's calibration inputs.

Runs INSIDE a separate virtualenv that holds llm-compressor (it pins transformers <= 5.17, multiflow wants
5.x >= 5.0; both agree on 5.15-5.17), with multiflow installed there without its dependencies so that both
tools see byte-identical calibration inputs:

    python3 -m venv /work/llmc-venv
    /work/llmc-venv/bin/pip install torch==2.13.0                      # the CPU wheel first, never unpinned
    printf 'torch==2.13.0\\ntransformers==5.17.0\\n' > /work/llmc-venv/constraints.txt
    /work/llmc-venv/bin/pip install -c /work/llmc-venv/constraints.txt llmcompressor==0.14.0.1
    /work/llmc-venv/bin/pip install -c /work/llmc-venv/constraints.txt --no-deps -e .
    /work/llmc-venv/bin/pip install -c /work/llmc-venv/constraints.txt numba matplotlib scikit-image rouge-score

    /work/llmc-venv/bin/python benchmarks/llmc_llava.py --model src/multiflow/demo_model --output /tmp/llmc-out \\
        --sparsity 0.5 --nsamples 8 --seed 0 --dtype float32

What it does, as llm-compressor's own LLaVA example (examples/multimodal_vision/llava_example.py) does it:

- `LlavaForConditionalGeneration.from_pretrained(model, dtype=...)` (the whole model in memory) and
  `AutoProcessor.from_pretrained(model)`;
- calibration inputs exactly as `multiflow calibrate` / `multiflow run` build them: `load_samples(data,
  nsamples, seed)` from `multiflow.calibration.data` (`--data`, else the demo model's calibration split for the
  demo model, else the bundled photographs: multiflow's own default), prompts from
  `multiflow.models.prompts.build_prompt(processor, question, None)`, one sample per batch,
  `processor(images=[image], text=[prompt], return_tensors="pt")`; stored as a pre-tokenized
  `datasets.Dataset` (input_ids, attention_mask, pixel_values) with the example's one-sample data collator;
- `oneshot(model, processor, dataset, recipe=WandaPruningModifier(sparsity, mask_structure="0:0",
  targets=["Linear"], ignore=["re:.*lm_head", "re:.*vision_tower.*", "re:.*multi_modal_projector.*"]),
  (`--method sparsegpt`: SparseGPTModifier with the same arguments and its defaults: block_size 128,
  dampening_frac 0.01, as multiflow's)
  sequential_targets=["LlamaDecoderLayer"], num_calibration_samples=N, shuffle_calibration_samples=False)`:
  llm-compressor's default "independent" pipeline, which picks its sequential pipeline for both (the model is
  traced with torch.fx and run decoder layer by decoder layer; each layer's inputs are the outputs of the
  already pruned layers before it, unless --no-propagate);
- `model.save_pretrained(output, save_compressed=False)` (dense safetensors, as multiflow writes) and
  `processor.save_pretrained(output)`.

Prints one JSON line last: seconds of load, inputs, the `oneshot` call and the save; VmRSS and VmHWM after
imports, load, `oneshot` and save (MiB) and the size of the weights; the achieved sparsity of
the language model's decoder linears (zeros / weights, counted in memory after `oneshot`) and of every other
linear (should stay as dense as the input); library versions.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run by path in llm-compressor's venv
from benchmarks._common import llmc_pruned, llmc_versions, memory_mib  # noqa: E402

LANGUAGE_LINEAR = re.compile(r"^model\.language_model\.layers\.\d+\.")
IGNORE = ["re:.*lm_head", "re:.*vision_tower.*", "re:.*multi_modal_projector.*"]
DTYPES = ("float32", "bfloat16", "float16")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, required=True, help="transformers LLaVA checkpoint folder with its processor "
                   "files (tokenizer, image processor, chat template)")
    p.add_argument("--output", type=Path, required=True, help="folder for the pruned checkpoint (created; must be "
                   "empty or absent)")
    p.add_argument("--method", choices=("wanda", "sparsegpt"), default="wanda", help="llm-compressor's modifier: "
                   "WandaPruningModifier (default) or SparseGPTModifier")
    p.add_argument("--sparsity", type=float, default=0.5, help="sparsity of each language-model linear "
                   "(default 0.5)")
    p.add_argument("--nsamples", type=int, default=128, help="calibration samples (default 128, as multiflow)")
    p.add_argument("--seed", type=int, default=0, help="which samples, in which order (multiflow's --seed; default 0)")
    p.add_argument("--data", default=None, help="calibration data as multiflow's --data; default: what multiflow "
                   "uses (the demo model's calibration split for the demo model, else the bundled photos)")
    p.add_argument("--dtype", choices=DTYPES, default="float32", help="dtype to load and run the model in "
                   "(default float32)")
    p.add_argument("--no-propagate", action="store_true", help="feed each decoder layer the DENSE model's "
                   "activations (llm-compressor's propagate_error=False) instead of the pruned layers' outputs; "
                   "this is what multiflow's single dense calibration pass sees")
    p.add_argument("--mask-structure", default="0:0", help="llm-compressor's mask_structure (default 0:0: "
                   "unstructured)")
    return p.parse_args(argv)


def calibration_data(given: str | None, model: Path) -> str | None:
    """multiflow's default: --data, else the demo model's calibration split for the demo model, else None."""
    if given:
        return given
    from multiflow.demo import demo_split, is_demo

    split = demo_split("calibration") if is_demo(model) else None
    return None if split is None else str(split)


def build_dataset(processor, data: str | None, nsamples: int, seed: int):
    """Pre-tokenized calibration set: one row per sample, as multiflow encodes a batch of one."""
    import numpy as np
    from datasets import Dataset

    from multiflow.calibration.data import load_samples
    from multiflow.models.prompts import build_prompt

    samples, report = load_samples(data, nsamples, seed)
    rows = []
    for s in samples:
        enc = processor(images=[s.image], text=[build_prompt(processor, s.question, None)], return_tensors="pt")
        # keep the batch dimension (1, ...): the collator turns each value back into the tensor the model takes
        rows.append({"input_ids": enc["input_ids"].tolist(), "attention_mask": enc["attention_mask"].tolist(),
                     "pixel_values": enc["pixel_values"].numpy().astype(np.float32)})
    tokens = sum(len(r["input_ids"][0]) for r in rows)
    return Dataset.from_list(rows), {"data": report.source, "nsamples": len(rows), "tokens": tokens}


def data_collator(batch):
    """llm-compressor's LLaVA example collator: one sample per batch, lists back to tensors."""
    import torch

    assert len(batch) == 1
    return {key: torch.tensor(value) for key, value in batch[0].items()}




def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not 0 <= args.sparsity < 1:
        sys.exit(f"--sparsity {args.sparsity}: give a value in [0, 1)")
    if args.output.exists() and any(args.output.iterdir()):
        sys.exit(f"--output {args.output} is not empty")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    import torch
    from llmcompressor import oneshot
    from llmcompressor.modifiers.pruning import SparseGPTModifier, WandaPruningModifier
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    memory = {"imports": memory_mib()}
    t0 = time.perf_counter()
    model = LlavaForConditionalGeneration.from_pretrained(args.model, dtype=getattr(torch, args.dtype)).eval()
    processor = AutoProcessor.from_pretrained(args.model)
    t1 = time.perf_counter()
    memory["loaded"] = memory_mib()
    dataset, data_info = build_dataset(processor, calibration_data(args.data, args.model), args.nsamples, args.seed)
    t2 = time.perf_counter()

    # targets must be a LIST: llm-compressor 0.14's sparsity modifiers match a plain string "Linear" character by
    # character (compressed_tensors.match_named_modules iterates it), find nothing and prune nothing, silently
    modifier = SparseGPTModifier if args.method == "sparsegpt" else WandaPruningModifier
    recipe = modifier(sparsity=args.sparsity, mask_structure=args.mask_structure, targets=["Linear"], ignore=IGNORE)
    oneshot(model=model, processor=processor, dataset=dataset, recipe=recipe, data_collator=data_collator,
            num_calibration_samples=len(dataset), shuffle_calibration_samples=False,
            sequential_targets=["LlamaDecoderLayer"], propagate_error=not args.no_propagate)
    t3 = time.perf_counter()
    memory["oneshot"] = memory_mib()
    sparsity = llmc_pruned(model, LANGUAGE_LINEAR, "language", args.sparsity)
    args.output.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(args.output, save_compressed=False)
    processor.save_pretrained(args.output)
    t4 = time.perf_counter()
    memory["saved"] = memory_mib()

    print(json.dumps({
        "tool": "llm-compressor", "method": args.method, "sparsity_target": args.sparsity,
        "mask_structure": args.mask_structure, "propagate_error": not args.no_propagate, "dtype": args.dtype,
        "model": str(args.model), "output": str(args.output), "seed": args.seed, **data_info,
        "load_s": round(t1 - t0, 3), "inputs_s": round(t2 - t1, 3), "oneshot_s": round(t3 - t2, 3),
        "save_s": round(t4 - t3, 3),
        "language_sparsity": sparsity["language"]["sparsity"], "language_layers": sparsity["language"]["layers"],
        "language_zeros": sparsity["language"]["zeros"], "language_numel": sparsity["language"]["numel"],
        "other_sparsity": sparsity["other"]["sparsity"], "other_layers": sparsity["other"]["layers"],
        "memory_mib": memory, "weights_mib": round(sum(p.numel() * p.element_size() for p in model.parameters())
                                                   / 2**20, 1),
        "versions": llmc_versions(),
    }), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
