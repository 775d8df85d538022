"""Tiny LLaVA checkpoints in every layout and dtype, built from configs, offline."""

from __future__ import annotations

import json
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

# Tiers (markers registered in pyproject.toml): `unit` tests call pure functions on hand-made tensors, tiny
# hand-built modules or files; `e2e` tests run tiny models built from configs through the CLI or the public API.
# A module's tier is below unless a test marks itself; `slow` (over ~2 s on 2 cores) is marked on the test.
# `make test` runs every tier; `pytest -m unit` or `-m "not slow"` for a quick pass.
UNIT_MODULES = {"test_allocation", "test_bounded_images", "test_calibration_data", "test_checkpoint", "test_docs",
                "test_imports", "test_masks", "test_rules", "test_selection", "test_sparsegpt", "test_statistics"}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.get_closest_marker("unit") or item.get_closest_marker("e2e"):
            continue
        item.add_marker(pytest.mark.unit if item.module.__name__.rsplit(".", 1)[-1] in UNIT_MODULES
                        else pytest.mark.e2e)


def tiny_llava(seed: int = 0, dtype: torch.dtype = torch.float32):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                              image_size=16, patch_size=8)
    text = LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2,
                       num_key_value_heads=2, vocab_size=64)
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(LlavaConfig(vision_config=vision, text_config=text, image_token_index=63))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # per-tensor scales so layer sparsities differ
        for p in model.parameters():
            p.mul_(float(torch.empty(1).uniform_(0.3, 3.0, generator=g)))
    return model.to(dtype)


def hub_key(inmemory: str) -> str:
    """In-memory (transformers 5.x) name -> llava-hf hub (transformers 4.x) key."""
    if inmemory.startswith("lm_head"):
        return "language_model." + inmemory
    if inmemory.startswith("model.language_model."):
        return "language_model.model." + inmemory[len("model.language_model."):]
    if inmemory.startswith("model.vision_tower."):
        return "vision_tower.vision_model." + inmemory[len("model.vision_tower."):]
    return inmemory.removeprefix("model.")


def original_key(inmemory: str) -> str:
    """In-memory name -> original LLaVA repository key."""
    for a, b in (
        ("model.language_model.", "model."),
        ("model.multi_modal_projector.linear_1.", "model.mm_projector.0."),
        ("model.multi_modal_projector.linear_2.", "model.mm_projector.2."),
        ("model.vision_tower.", "model.vision_tower.vision_tower.vision_model."),
    ):
        if inmemory.startswith(a):
            return b + inmemory[len(a):]
    return inmemory


def state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}


def write_checkpoint(folder: Path, tensors: dict[str, torch.Tensor], config: dict, shards: int = 1) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config))
    keys = sorted(tensors)
    if shards == 1:
        save_file({k: tensors[k] for k in keys}, str(folder / "model.safetensors"), metadata={"format": "pt"})
        return folder
    weight_map = {}
    for i in range(shards):
        name = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = keys[i::shards]
        save_file({k: tensors[k] for k in part}, str(folder / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in part})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return folder


def original_config(model) -> dict:
    cfg = model.config.text_config.to_dict()
    cfg.update(model_type="llava_llama", architectures=["LlavaLlamaForCausalLM"],
               mm_vision_tower="openai/clip-vit-large-patch14-336", mm_projector_type="mlp2x_gelu",
               mm_vision_select_layer=-2)
    return cfg


def original_with_clip_folder(model, processor, root: Path) -> tuple[Path, Path]:
    """`model` in the original LLaVA layout without its vision tower (root/orig, with the tokenizer) and
    that vision tower as a separate CLIP folder (root/clip, with the image processor), as users have them."""
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    text = model.config.text_config.to_dict()
    text.update(model_type="llava_llama", architectures=["LlavaLlamaForCausalLM"], mm_vision_tower="clip-local",
                mm_projector_type="mlp2x_gelu", mm_vision_select_layer=-2, mm_vision_select_feature="patch")
    original = write_checkpoint(root / "orig", {original_key(k): v for k, v in sd.items()
                                                if not k.startswith("model.vision_tower.")}, text)
    processor.tokenizer.save_pretrained(original)
    clip = write_checkpoint(root / "clip", {"vision_model." + k[len("model.vision_tower."):]: v
                                            for k, v in sd.items() if k.startswith("model.vision_tower.")},
                            dict(model.config.vision_config.to_dict(), model_type="clip_vision_model"))
    processor.image_processor.save_pretrained(clip)
    return original, clip


def layouts(model, root: Path) -> dict[str, Path]:
    """The same weights in every layout multiflow accepts."""
    sd = state(model)
    hf_config = model.config.to_dict()
    out = {}
    model.save_pretrained(root / "hf5")
    out["hf5"] = root / "hf5"
    out["hub4"] = write_checkpoint(root / "hub4", {hub_key(k): v for k, v in sd.items()}, hf_config)
    out["hub4-sharded"] = write_checkpoint(root / "hub4-sharded", {hub_key(k): v for k, v in sd.items()}, hf_config, shards=3)
    out["inmemory"] = write_checkpoint(root / "inmemory", sd, hf_config)
    orig = {original_key(k): v for k, v in sd.items()}
    out["original-with-clip"] = write_checkpoint(root / "original-with-clip", orig, original_config(model), shards=2)
    no_clip = {k: v for k, v in orig.items() if not k.startswith("model.vision_tower.")}
    out["original"] = write_checkpoint(root / "original", no_clip, original_config(model))
    clip = {"vision_model." + k[len("model.vision_tower."):]: v for k, v in sd.items() if k.startswith("model.vision_tower.")}
    clip["text_model.encoder.layers.0.mlp.fc1.weight"] = torch.randn(8, 4).to(next(iter(sd.values())).dtype)
    clip["text_projection.weight"] = torch.randn(4, 4).to(next(iter(sd.values())).dtype)
    out["clip"] = write_checkpoint(root / "clip", clip, {"model_type": "clip", "architectures": ["CLIPModel"]})
    return out


@pytest.fixture(scope="session", params=[torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
def llava(request, tmp_path_factory):
    model = tiny_llava(dtype=request.param)
    root = tmp_path_factory.mktemp(f"llava-{str(request.param)[6:]}")
    return model, layouts(model, root)


@pytest.fixture(scope="session")
def demo(tmp_path_factory):
    """A random demo-shaped LLaVA saved with its processor: (folder, model, processor)."""
    from multiflow.demo import build_demo_model

    model, processor = build_demo_model(seed=1)
    folder = tmp_path_factory.mktemp("demo") / "llava"
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder, model, processor


@pytest.fixture(scope="session")
def jsonl(tmp_path_factory):
    """Five noise images of different sizes with questions and answers, as JSONL."""
    root = tmp_path_factory.mktemp("data")
    g = torch.Generator().manual_seed(0)
    lines = []
    for i, (w, h) in enumerate([(40, 30), (32, 32), (50, 20), (24, 48), (33, 33)]):
        pixels = (torch.rand(h, w, 3, generator=g) * 255).to(torch.uint8).numpy()
        Image.fromarray(pixels).save(root / f"img{i}.png")
        lines.append(json.dumps({"image": f"img{i}.png", "question": "What is shown" + "?" * (i + 1),
                                 "answer": "noise " * (i + 1)}))
    (root / "data.jsonl").write_text("\n".join(lines) + "\n")
    return root / "data.jsonl"
