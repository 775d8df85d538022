"""Step 3's streamed copy (pruning/writer.py): the pipelined writer (reader thread, one-pass threshold, writer
thread) writes exactly the bytes of the plain path (checked_mask + masked_fill_, written in order), pinned by
sha256s recorded with the code before the pipeline (commit 02daca3), and the held-buffer reader hands out every
tensor intact while later ones are read."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import multiflow
from multiflow.storage.stats_file import LayerStats, save_stats

pytestmark = pytest.mark.e2e

V, T, INTER, VOCAB = 32, 48, 64, 40  # vision width, text width, MLP width, vocabulary


def _shapes() -> dict[str, tuple[int, ...]]:
    v, t = "vision_tower.vision_model.", "language_model.model."
    shapes = {v + "embeddings.class_embedding": (V,), v + "embeddings.patch_embedding.weight": (V, 3, 8, 8),
              v + "embeddings.position_embedding.weight": (5, V), v + "pre_layrnorm.weight": (V,),
              v + "pre_layrnorm.bias": (V,), v + "post_layernorm.weight": (V,), v + "post_layernorm.bias": (V,),
              "multi_modal_projector.linear_1.weight": (T, V), "multi_modal_projector.linear_1.bias": (T,),
              "multi_modal_projector.linear_2.weight": (T, T), "multi_modal_projector.linear_2.bias": (T,),
              t + "embed_tokens.weight": (VOCAB, T), t + "norm.weight": (T,), "language_model.lm_head.weight": (VOCAB, T)}
    for i in range(2):
        p = f"{v}encoder.layers.{i}."
        for proj in ("k_proj", "v_proj", "q_proj", "out_proj"):
            shapes[p + f"self_attn.{proj}.weight"], shapes[p + f"self_attn.{proj}.bias"] = (V, V), (V,)
        shapes.update({p + "mlp.fc1.weight": (INTER, V), p + "mlp.fc1.bias": (INTER,), p + "mlp.fc2.weight": (V, INTER),
                       p + "mlp.fc2.bias": (V,), p + "layer_norm1.weight": (V,), p + "layer_norm1.bias": (V,),
                       p + "layer_norm2.weight": (V,), p + "layer_norm2.bias": (V,)})
        p = f"{t}layers.{i}."
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            shapes[p + f"self_attn.{proj}.weight"] = (T, T)
        shapes.update({p + "mlp.gate_proj.weight": (INTER, T), p + "mlp.up_proj.weight": (INTER, T),
                       p + "mlp.down_proj.weight": (T, INTER), p + "input_layernorm.weight": (T,),
                       p + "post_attention_layernorm.weight": (T,)})
    return shapes


def _config() -> dict:
    return {"model_type": "llava", "architectures": ["LlavaForConditionalGeneration"], "image_token_index": 39,
            "vision_config": {"model_type": "clip_vision_model", "hidden_size": V, "intermediate_size": INTER,
                              "num_hidden_layers": 2, "num_attention_heads": 2, "image_size": 16, "patch_size": 8},
            "text_config": {"model_type": "llama", "hidden_size": T, "intermediate_size": INTER,
                            "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 2,
                            "vocab_size": VOCAB}}


def make_checkpoint(folder: Path, dtype: torch.dtype) -> Path:
    """Two shards of seeded normal weights (not transformers' initialisation), every fifth tensor rounded to
    a coarse grid so that many scores tie with the k-th smallest."""
    g = torch.Generator().manual_seed(7)
    tensors = {}
    for i, (key, shape) in enumerate(sorted(_shapes().items())):
        w = torch.randn(shape, generator=g) * (0.02 + 0.01 * (i % 7))
        tensors[key] = ((w * 50).round() / 50 if i % 5 == 0 else w).to(dtype)
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(_config()))
    keys = sorted(tensors)
    weight_map = {}
    for s in range(2):
        name = f"model-{s + 1:05d}-of-00002.safetensors"
        save_file({k: tensors[k] for k in keys[s::2]}, str(folder / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in keys[s::2]})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return folder


def make_stats(folder: Path, path: Path) -> Path:
    from multiflow.models import inventory

    g = torch.Generator().manual_seed(3)
    layers = inventory.from_checkpoint(folder).layers
    return save_stats(path, {l.name: LayerStats(torch.rand(l.shape[1], generator=g) + 0.01, 100) for l in layers},
                      {"data": "synthetic"})


def shard_sha256(folder: Path) -> list[str]:
    return [hashlib.sha256(p.read_bytes()).hexdigest()[:16] for p in sorted(folder.glob("*.safetensors"))]
