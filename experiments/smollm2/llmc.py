#!/usr/bin/env python
"""llm-compressor's SparseGPT or Wanda on a plain causal LM, fed multiflow's own calibration windows.

Runs INSIDE llm-compressor's virtualenv (recipe in benchmarks/llmc_llava.py: /work/llmc-venv with torch 2.13.0,
transformers 5.17.0, llmcompressor 0.14.0.1, and multiflow installed there with --no-deps -e), so that both
tools see the same token windows:

    /work/llmc-venv/bin/python experiments/smollm2/llmc.py --model /work/bench/smollm2/model \\
        --data /work/bench/smollm2/calibration.txt --seq-len 256 --nsamples 32 --seed 0 \\
        --method sparsegpt --sparsity 0.5 --output /tmp/llmc-sgpt-05

What it does:
- `AutoModelForCausalLM.from_pretrained(model, dtype=float32)` and `AutoTokenizer` (multiflow's `load_tokenizer`);
- calibration windows exactly as `multiflow run --data D --seq-len L --nsamples N --seed S` builds them for a
  plain LM: `multiflow.calibration.text_data.load_windows(D, tokenizer, L, N, S, "calibration")` (the text tokenized once,
  cut into non-overlapping L-token windows, N of them picked by a `random.Random(S)` shuffle), one window per
  forward pass, all-ones attention mask; stored as a pre-tokenized `datasets.Dataset` with a one-sample collator;
- `oneshot(model, tokenizer, dataset, recipe=<Modifier>(sparsity, mask_structure, targets=["Linear"],
  ignore=["re:.*lm_head"]), sequential_targets=["LlamaDecoderLayer"], num_calibration_samples=N,
  shuffle_calibration_samples=False)`: llm-compressor's sequential pipeline (each decoder layer calibrated on the
  outputs of the already pruned layers before it). SparseGPTModifier keeps its defaults (block_size 128,
  dampening_frac 0.01: multiflow's); WandaPruningModifier has no other knob.
- `--structure N:M` is multiflow's convention (KEEP N of every M). llm-compressor's mask_structure "n:m" PRUNES n of
  every m (sgpt_sparsify / wanda_sparsify: `torch.topk(score, prune_n, largest=False)` marks the n smallest of each
  m for zeroing), so multiflow's N:M is llm-compressor's "(M-N):M"; for 2:4 both read "2:4".
- `model.save_pretrained(output, save_compressed=False)` (dense safetensors, as multiflow writes) and the
  tokenizer next to it.

`--windows-hash` only prints the SHA-256 of the calibration windows' token ids (and how many) and exits: run it
with both venvs' pythons to check that both transformers versions tokenize the text identically.

Prints one JSON line last: seconds of load, inputs, `oneshot` and save; VmRSS and VmHWM (MiB) after each; the
achieved sparsity of the decoder linears (zeros / weights, counted in memory after `oneshot`) and of every other
linear (lm_head: must stay dense); with --structure N:M, how many groups of M consecutive inputs hold more
than N nonzeros (`nm_violations`, 0 when the pattern is multiflow's); the windows' hash; library versions.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run by path in llm-compressor's venv
from benchmarks._common import llmc_pruned, llmc_versions, memory_mib  # noqa: E402

DECODER_LINEAR = re.compile(r"^model\.layers\.\d+\.")
IGNORE = ["re:.*lm_head"]
METHODS = ("sparsegpt", "wanda")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, required=True, help="causal LM checkpoint folder with its tokenizer")
    p.add_argument("--data", type=Path, required=True, help="calibration text, as multiflow's --data")
    p.add_argument("--output", type=Path, help="folder for the pruned checkpoint (created; must be empty or absent)")
    p.add_argument("--method", choices=METHODS, default="sparsegpt")
    p.add_argument("--sparsity", type=float, default=0.5, help="unstructured sparsity of every decoder linear")
    p.add_argument("--structure", default=None, metavar="N:M", help="multiflow's N:M (keep N of every M) instead "
                   "of --sparsity; passed to llm-compressor as mask_structure '(M-N):M'")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--nsamples", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--windows-hash", action="store_true", help="print the calibration windows' hash and exit")
    args = p.parse_args(argv)
    if not args.windows_hash and args.output is None:
        p.error("--output is required")
    return args


def llmc_mask_structure(structure: str | None) -> str:
    """multiflow's "N:M" (keep N of M) as llm-compressor's mask_structure (prune n of m); None: "0:0"."""
    if structure is None:
        return "0:0"
    keep, group = (int(x) for x in structure.split(":"))
    if not 0 < keep < group:
        sys.exit(f"--structure {structure}: give N:M with 0 < N < M")
    return f"{group - keep}:{group}"


def calibration_windows(args):
    from multiflow.calibration.text_data import load_tokenizer, load_windows

    tokenizer = load_tokenizer(args.model)
    config = json.loads((args.model / "config.json").read_text())
    windows, report = load_windows(args.data, tokenizer, args.seq_len, args.nsamples, args.seed, "calibration",
                                   model_config=config)
    digest = hashlib.sha256()
    for w in windows:
        digest.update(w.input_ids.numpy().astype("<i8").tobytes())
    info = {"data": report.source, "nsamples": len(windows), "seq_len": args.seq_len, "seed": args.seed,
            "windows_available": report.available, "windows_sha256": digest.hexdigest()}
    return tokenizer, windows, info



def nm_violations(model, structure: str | None) -> int | None:
    """Groups of M consecutive inputs (a row's columns) of the decoder linears holding more than N nonzeros."""
    import torch

    if structure is None:
        return None
    keep, group = (int(x) for x in structure.split(":"))
    bad = 0
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and DECODER_LINEAR.match(name):
            w = module.weight.detach()
            bad += int(((w != 0).reshape(w.shape[0], -1, group).sum(-1) > keep).sum())
    return bad



def data_collator(batch):
    """One window per batch, lists back to tensors ([1, seq_len])."""
    import torch

    assert len(batch) == 1
    return {key: torch.tensor(value) for key, value in batch[0].items()}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    mask_structure = llmc_mask_structure(args.structure)
    if args.windows_hash:
        import transformers

        _, _, info = calibration_windows(args)
        print(json.dumps({**info, "transformers": transformers.__version__}), flush=True)
        return 0
    if args.structure is None and not 0 < args.sparsity < 1:
        sys.exit(f"--sparsity {args.sparsity}: give a value in (0, 1)")
    if args.output.exists() and any(args.output.iterdir()):
        sys.exit(f"--output {args.output} is not empty")

    import torch
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.pruning import SparseGPTModifier, WandaPruningModifier
    from transformers import AutoModelForCausalLM

    memory = {"imports": memory_mib()}
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    tokenizer, windows, data_info = calibration_windows(args)
    t1 = time.perf_counter()
    memory["loaded"] = memory_mib()
    dataset = Dataset.from_list([{"input_ids": [w.input_ids.tolist()], "attention_mask": [[1] * len(w.input_ids)]}
                                 for w in windows])
    t2 = time.perf_counter()

    # targets must be a LIST (a plain string is matched character by character in llm-compressor 0.14: nothing
    # pruned). With a mask structure, `sparsity` is not used by either modifier but must be given.
    modifier = SparseGPTModifier if args.method == "sparsegpt" else WandaPruningModifier
    sparsity = 0.5 if args.structure else args.sparsity
    recipe = modifier(sparsity=sparsity, mask_structure=mask_structure, targets=["Linear"], ignore=IGNORE)
    oneshot(model=model, processor=tokenizer, dataset=dataset, recipe=recipe, data_collator=data_collator,
            num_calibration_samples=len(dataset), shuffle_calibration_samples=False,
            sequential_targets=["LlamaDecoderLayer"])
    t3 = time.perf_counter()
    memory["oneshot"] = memory_mib()
    counted = llmc_pruned(model, DECODER_LINEAR, "decoder", sparsity)
    args.output.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(args.output, save_compressed=False)
    tokenizer.save_pretrained(args.output)
    t4 = time.perf_counter()
    memory["saved"] = memory_mib()

    print(json.dumps({
        "tool": "llm-compressor", "method": args.method, "sparsity_target": None if args.structure else sparsity,
        "structure": args.structure, "mask_structure": mask_structure, "model": str(args.model),
        "output": str(args.output), **data_info,
        "load_s": round(t1 - t0, 3), "inputs_s": round(t2 - t1, 3), "oneshot_s": round(t3 - t2, 3),
        "save_s": round(t4 - t3, 3),
        "decoder_sparsity": counted["decoder"]["sparsity"], "decoder_layers": counted["decoder"]["layers"],
        "decoder_zeros": counted["decoder"]["zeros"], "decoder_numel": counted["decoder"]["numel"],
        "other_sparsity": counted["other"]["sparsity"], "other_layers": counted["other"]["layers"],
        "nm_violations": nm_violations(model, args.structure), "memory_mib": memory,
        "versions": llmc_versions(),
    }), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
