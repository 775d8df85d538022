"""The bundled default model until a trained demo model ships.

A small LlavaForConditionalGeneration (4-layer CLIP vision tower, 4-layer Llama,
`vision_feature_layer=-2` as LLaVA-1.5) built from a config with RANDOM, seeded
weights. Each linear weight gets its own seeded scale so layer sparsities
differ. It is for trying the tool, not for judging quality: nothing was trained.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import torch

DEMO_NAME = "random-tiny-llava-v1"
DEMO_LABEL = "bundled demo: tiny LLaVA with RANDOM seeded weights (untrained; for trying the tool only)"


def build_demo_model(seed: int = 0):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    vision = CLIPVisionConfig(hidden_size=64, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
                              image_size=32, patch_size=8)
    text = LlamaConfig(hidden_size=128, intermediate_size=352, num_hidden_layers=4, num_attention_heads=4,
                       num_key_value_heads=4, vocab_size=512, max_position_embeddings=256)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_index=511, vision_feature_layer=-2)
    generator = torch.Generator().manual_seed(seed)
    model = LlavaForConditionalGeneration(config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            scale = float(torch.empty(1).uniform_(-4.6, -3.2, generator=generator).exp())  # 0.01 .. 0.04
            param.copy_(torch.randn(param.shape, generator=generator) * scale)
    return model


def ensure_demo_model(cache_root: Path) -> Path:
    """Build the demo checkpoint once under cache_root (atomically) and return its folder."""
    folder = Path(cache_root) / DEMO_NAME
    if (folder / "config.json").is_file():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{DEMO_NAME}.", dir=folder.parent))
    try:
        build_demo_model().save_pretrained(tmp)
        (tmp / "README.txt").write_text(DEMO_LABEL + "\n")
        tmp.rename(folder)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not (folder / "config.json").is_file():  # not a lost race with another process
            raise
    return folder
