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
