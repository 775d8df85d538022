"""The obviously-right Step 1: concatenate |W| per modality and call torch.kthvalue."""

from __future__ import annotations

import math
from pathlib import Path

import torch
from safetensors.torch import load_file


def reference_pruned(weights: dict[str, torch.Tensor], modality_of: dict[str, str], s: float) -> dict[str, int]:
    """{layer: count(|W| <= tau_m)} with tau_m = kthvalue over the concatenated modality."""
    out = {}
    for m in sorted(set(modality_of.values())):
        names = [n for n in weights if modality_of[n] == m]
        flat = torch.cat([weights[n].abs().reshape(-1) for n in names])  # promotes mixed dtypes like multiflow
        k = math.floor(flat.numel() * s)
        if k == 0:
            out.update({n: 0 for n in names})
            continue
        tau = torch.kthvalue(flat, k).values
        out.update({n: int((weights[n].abs().to(flat.dtype) <= tau).sum()) for n in names})
    return out


def llava_modality(name: str) -> str | None:
    """Hand-written LLaVA grouping for module names of either naming."""
    last = name.rsplit(".", 1)[-1]
    if "embed" in last or last == "lm_head" or "norm" in last:
        return None
    if ".vision_tower." in "." + name:
        return "vision"
    if "projector" in name or ".layers." in name:
        return "fusion"
    raise AssertionError(name)


def load_linear_weights(folder: Path, to_name) -> dict[str, torch.Tensor]:
    """2-D `.weight` tensors of every safetensors file in folder, by module name."""
    out = {}
    for path in sorted(Path(folder).glob("*.safetensors")):
        for key, value in load_file(str(path)).items():
            if key.endswith(".weight") and value.dim() == 2:
                out[to_name(key[: -len(".weight")])] = value
    return out


def reference_sequential_obs(folder, jsonl, nsamples: int, config, score=None):
    """The obviously-right SparseGPT pass (and `--update obs`): the whole model in memory; for each block in order,
    every sample runs the whole model while hooks add the block's layers' inputs (language model: non-padding
    tokens) to one Hessian per layer; then each of its layers gets `sparsegpt_prune` with its planned count, cast to
    the checkpoint's dtype. `score(weight, sq_mean)`, when given, makes the tile scorer that chooses the masks
    (sq_mean = H_jj / 2). Returns ({layer: (new weight, keep mask, plan)}, how many layers' masks differ from
    SparseGPT's own criterion; 0 without `score`)."""
    from multiflow.calibration.block_runner import find_blocks
    from multiflow.calibration.data import load_samples
    from multiflow.models.inventory import from_checkpoint
    from multiflow.models.loading import load_model
    from multiflow.models.prompts import build_prompt
    from multiflow.pruning.plan import plan
    from multiflow.pruning.sparsegpt import HessianAccumulator, sparsegpt_prune

    inventory = from_checkpoint(folder)
    plans = {p.layer.name: p for p in plan(config, inventory, progress=False)[0]}
    loaded = load_model(folder, inventory)
    model, processor, to_inventory = loaded.model, loaded.processor, loaded.to_inventory_name
    names = [n for n in to_inventory if to_inventory[n] in plans]
    samples, _ = load_samples(jsonl, nsamples, 0)
    inputs = [processor(images=[s.image], text=[build_prompt(processor, s.question, None)], return_tensors="pt")
              for s in samples]
    s = config.structure
    args = dict(group=config.group, structure=(s.n, s.m) if s.is_n_m else None)
    out, differ = {}, 0
    for block in find_blocks(model, names):
        mine = [n for n in names if n == block.name or n.startswith(block.name + ".")]
        hessians = {n: HessianAccumulator(model.get_submodule(n).in_features) for n in mine}
        current = {}

        def add(name):
            language = name.startswith("model.language_model.")
            return lambda m, a: hessians[name].add_batch(a[0], current["mask"] if language else None)

        hooks = [model.get_submodule(n).register_forward_pre_hook(add(n)) for n in mine]
        for x in inputs:
            current["mask"] = x["attention_mask"].bool()
            with torch.no_grad():
                model(**x, use_cache=False)
        for h in hooks:
            h.remove()
        for n in mine:
            p = plans[to_inventory[n]]
            weight = model.get_submodule(n).weight
            h = hessians[n].hessian()
            with torch.no_grad():
                chosen = None if score is None else score(weight, torch.diagonal(h) / 2)
                new, keep = sparsegpt_prune(weight, h, p.k, score=chosen, **args)
                if score is not None:
                    differ += not torch.equal(keep, sparsegpt_prune(weight, h, p.k, **args)[1])
                weight.copy_(new.to(p.layer.dtype))
            out[to_inventory[n]] = (new.to(p.layer.dtype), keep, p)
    return out, differ
