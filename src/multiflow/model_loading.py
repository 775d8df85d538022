"""Load a checkpoint as a runnable transformers model with its processor (Step 2 needs forward passes).

Hugging Face layouts load with `from_pretrained` (safetensors only unless the
user allows pickles; `trust_remote_code` only when the user passes it).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from multiflow.errors import MultiflowError
from multiflow.layers import Inventory

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class LoadedModel:
    model: torch.nn.Module
    processor: Any
    device: torch.device
    image_token_id: int | None
    to_inventory_name: dict[str, str]  # module name in the loaded model -> Step 1 layer name


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise MultiflowError(f"--device {device}: no CUDA device is available here; use --device cpu")
    try:
        return torch.device(device)
    except RuntimeError as exc:
        raise MultiflowError(f"--device {device!r} is not a device (cpu, cuda, cuda:1, auto)") from exc


def load_model(
    folder: str | Path,
    inventory: Inventory,
    dtype: str = "float32",
    device: str = "cpu",
    trust_remote_code: bool = False,
    allow_pickle: bool = False,
) -> LoadedModel:
    """The checkpoint as an eval-mode transformers model on `device`, plus its processor."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    folder = Path(folder)
    if dtype not in DTYPES:
        raise MultiflowError(f"--dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
    if inventory.naming == "llava-original":
        raise MultiflowError(
            f"{folder} is an original-layout LLaVA checkpoint; calibration runs the transformers model. "
            "Convert it first (transformers' convert_llava_weights_to_hf.py) and point --model at the result"
        )
    target = resolve_device(device)
    try:
        processor = AutoProcessor.from_pretrained(folder, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError) as exc:
        raise MultiflowError(
            f"cannot load a processor (tokenizer + image processor) from {folder}: {exc}. "
            "Calibration needs the tokenizer and preprocessor files next to the weights"
        ) from exc
    try:
        model = AutoModelForImageTextToText.from_pretrained(
            folder, dtype=DTYPES[dtype], trust_remote_code=trust_remote_code, use_safetensors=not allow_pickle
        )
    except (OSError, ValueError) as exc:
        raise MultiflowError(f"cannot load the model from {folder}: {exc}") from exc
    model.to(target).eval()
    names = {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    missing = [layer.name for layer in inventory.layers if layer.name not in names]
    if missing:
        raise MultiflowError(
            f"the loaded model has no module named {missing[0]} (and {len(missing) - 1} more): "
            "its layout differs from the checkpoint's"
        )
    token_id = getattr(model.config, "image_token_id", None)
    if token_id is None:
        token_id = getattr(model.config, "image_token_index", None)
    return LoadedModel(model, processor, target, token_id, {l.name: l.name for l in inventory.layers})
