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
    vision_tower: str | Path | None = None,
) -> LoadedModel:
    """The checkpoint as an eval-mode transformers model on `device`, plus its processor."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    folder = Path(folder)
    if dtype not in DTYPES:
        raise MultiflowError(f"--dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
    target = resolve_device(device)
    if inventory.naming == "llava-original":
        return _load_original(folder, inventory, DTYPES[dtype], target, vision_tower, allow_pickle)
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


# Original LLaVA repository key -> transformers (5.x, in-memory) module path, first match wins.
_ORIGINAL_TO_HF = (
    (r"^model\.mm_projector\.0\.", "model.multi_modal_projector.linear_1."),
    (r"^model\.mm_projector\.2\.", "model.multi_modal_projector.linear_2."),
    (r"^model\.vision_tower\.vision_tower\.vision_model\.", "model.vision_tower."),
    (r"^model\.(embed_tokens|layers|norm)\.", r"model.language_model.\1."),
)
_CLIP_TO_HF = ((r"^vision_model\.", "model.vision_tower."),)


def _rename(key: str, rules) -> str | None:
    import re

    for pattern, replacement in rules:
        renamed, n = re.subn(pattern, replacement, key, count=1)
        if n:
            return renamed
    return None


def _load_original(folder: Path, inventory: Inventory, dtype: torch.dtype, device: torch.device,
                   vision_tower: str | Path | None, allow_pickle: bool) -> LoadedModel:
    """Convert an original-layout LLaVA checkpoint to the equivalent transformers LlavaForConditionalGeneration
    in memory (as transformers' convert_llava_weights_to_hf.py does: `<image>` and `<pad>` tokens added,
    new embedding rows set to the mean of the others)."""
    from transformers import (AddedToken, AutoTokenizer, CLIPImageProcessor, CLIPVisionConfig, LlamaConfig,
                              LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor)

    from multiflow.calibration import LLAVA_15_CHAT_TEMPLATE
    from multiflow.checkpoint import list_tensors, read_config, read_tensor

    config = read_config(folder)
    sources = [(e, _rename(e.key, _ORIGINAL_TO_HF) or e.key) for e in list_tensors(folder, allow_pickle)]
    clip_folder = Path(vision_tower) if vision_tower else None
    if not any(name.startswith("model.vision_tower.") for _, name in sources):
        if clip_folder is None:
            raise MultiflowError(
                f"{folder} is an original-layout LLaVA checkpoint without its vision tower weights (config names "
                f"{config.get('mm_vision_tower')}); pass --vision-tower PATH to a local copy of that CLIP folder"
            )
        sources += [(e, name) for e in list_tensors(clip_folder, allow_pickle)
                    if (name := _rename(e.key, _CLIP_TO_HF)) is not None]
    if config.get("mm_projector_type", "mlp2x_gelu") != "mlp2x_gelu":
        raise MultiflowError(f"{folder}: mm_projector_type {config.get('mm_projector_type')!r} has no transformers "
                             "equivalent (LLaVA-1.5 uses mlp2x_gelu)")
    clip_config = read_config(clip_folder) if clip_folder else None
    vision = CLIPVisionConfig(**(clip_config.get("vision_config", clip_config) if clip_config else {}))
    text = LlamaConfig(**{k: v for k, v in config.items() if not k.startswith("mm_") and k not in
                          ("architectures", "model_type", "auto_map")})
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder)
        images = CLIPImageProcessor.from_pretrained(clip_folder or folder)
    except (OSError, ValueError) as exc:
        raise MultiflowError(f"cannot load the tokenizer of {folder} or the image processor of "
                             f"{clip_folder or folder}: {exc}") from exc
    if "<image>" not in tokenizer.get_vocab():
        tokenizer.add_tokens(AddedToken("<image>", special=True, normalized=False), special_tokens=True)
    if tokenizer.pad_token is None:
        tokenizer.add_special_tokens({"pad_token": "<pad>"})
    strategy = "full" if config.get("mm_vision_select_feature") == "cls_patch" else "default"
    llava = LlavaConfig(vision_config=vision, text_config=text,
                        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
                        vision_feature_layer=config.get("mm_vision_select_layer", -2),
                        vision_feature_select_strategy=strategy,
                        image_seq_length=(vision.image_size // vision.patch_size) ** 2,
                        projector_hidden_act="gelu", multimodal_projector_bias=True)
    state = {name: read_tensor(entry).to(dtype) for entry, name in sources}
    model = LlavaForConditionalGeneration(llava).to(dtype)
    embed = state["model.language_model.embed_tokens.weight"]
    if len(tokenizer) > embed.shape[0]:  # new token rows: the mean of the existing rows
        grow = len(tokenizer) - embed.shape[0]
        for key in ("model.language_model.embed_tokens.weight", "lm_head.weight"):
            state[key] = torch.cat([state[key], state[key].float().mean(0, keepdim=True).to(dtype).expand(grow, -1)])
        model.resize_token_embeddings(len(tokenizer))
    result = model.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if not k.endswith("position_ids")]
    if missing or result.unexpected_keys:
        raise MultiflowError(f"{folder}: converting to transformers LLaVA left {len(missing)} weights missing "
                             f"({missing[:1]}) and {len(result.unexpected_keys)} unexpected "
                             f"({result.unexpected_keys[:1]})")
    processor = LlavaProcessor(image_processor=images, tokenizer=tokenizer, patch_size=vision.patch_size,
                               vision_feature_select_strategy=strategy,
                               chat_template=getattr(tokenizer, "chat_template", None) or LLAVA_15_CHAT_TEMPLATE,
                               num_additional_image_tokens=1)
    to_original = {}
    for entry, name in sources:
        if entry.key.endswith(".weight"):
            hf = name.removesuffix(".weight")
            original = entry.key.removesuffix(".weight")
            if entry.file.parent != folder:  # from the CLIP folder: named as inside the LLaVA checkpoint
                original = (inventory.family.vision_tower_prefix or "") + original.removeprefix("vision_model.")
            to_original[hf] = original
    wanted = {layer.name for layer in inventory.layers}
    mapping = {hf: orig for hf, orig in to_original.items() if orig in wanted}
    if set(mapping.values()) != wanted:
        raise MultiflowError(f"{folder}: converted model lacks layers {sorted(wanted - set(mapping.values()))[:3]}")
    model.to(device).eval()
    return LoadedModel(model, processor, device, llava.image_token_id, mapping)
